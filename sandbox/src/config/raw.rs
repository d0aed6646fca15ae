//! The raw TOML mirror of DESIGN §5: serde structs with `deny_unknown_fields`,
//! values wrapped in `Spanned` where an error must name their line. Only
//! `resolve` reads them; nothing here validates.

use std::fmt;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::{Access, EbpfMode, ForwardAuthHeaders, OnDenied, OtlpProtocol};
use crate::decision::FailMode;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: Option<RawServer>,
    pub(super) audit: Option<RawAudit>,
    pub(super) telemetry: Option<RawTelemetry>,
    pub(super) ebpf: Option<RawEbpf>,
    pub(super) engine: Option<RawEngine>,
    pub(super) reload: Option<RawReload>,
    #[serde(default)]
    pub(super) policy: Vec<RawPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) watch: Option<bool>,
    pub(super) debounce_ms: Option<Spanned<u64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) grpc_listen: Option<Spanned<String>>,
    pub(super) max_body_bytes: Option<Spanned<u64>>,
    pub(super) header_read_timeout_ms: Option<Spanned<u64>>,
    pub(super) idle_timeout_ms: Option<Spanned<u64>>,
    pub(super) max_connections: Option<Spanned<u64>>,
    pub(super) forward_auth_headers: Option<ForwardAuthHeaders>,
    pub(super) syscall_filter: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) otlp_endpoint: Option<Spanned<String>>,
    pub(super) otlp_protocol: Option<OtlpProtocol>,
    pub(super) sampling_ratio: Option<Spanned<f64>>,
    pub(super) service_name: Option<Spanned<String>>,
    pub(super) guest_log_level: Option<Spanned<String>>,
    pub(super) otlp_metrics: Option<bool>,
    pub(super) otlp_metrics_interval_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEbpf {
    pub(super) mode: Option<EbpfMode>,
    pub(super) enforce: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEngine {
    pub(super) cache_dir: Option<Spanned<String>>,
    pub(super) cache: Option<bool>,
    pub(super) max_memory_mb: Option<Spanned<u64>>,
    pub(super) max_instances: Option<Spanned<u32>>,
    pub(super) allow_insecure_http: Option<bool>,
    pub(super) fetch_timeout_ms: Option<Spanned<u64>>,
    pub(super) max_module_mb: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) name: Spanned<String>,
    /// `version = "v1"`, or the `[[policy.version]]` tables.
    pub(super) version: Option<Spanned<RawVersions>>,
    pub(super) module: Option<Spanned<String>>,
    pub(super) sha256: Option<Spanned<String>>,
    pub(super) sticky: Option<Spanned<String>>,
    pub(super) version_header: Option<bool>,
    pub(super) decision_cache_ttl_ms: Option<Spanned<u64>>,
    pub(super) decision_cache_max_entries: Option<Spanned<u64>>,
    pub(super) decision_cache_force: Option<bool>,
    pub(super) timeout_ms: Option<Spanned<u64>>,
    pub(super) memory_limit_mb: Option<Spanned<u64>>,
    pub(super) max_input_bytes: Option<Spanned<u64>>,
    pub(super) max_output_bytes: Option<Spanned<u64>>,
    pub(super) max_in_flight: Option<Spanned<u32>>,
    pub(super) fail_mode: Option<FailMode>,
    pub(super) wasi: Option<RawWasi>,
    pub(super) egress: Option<RawEgress>,
    /// `abi = "proxy-wasm"` (default `sandgate-v1`).
    pub(super) abi: Option<Spanned<String>>,
    /// Handed to a proxy-wasm filter's `on_configure`.
    pub(super) plugin_config: Option<Spanned<String>>,
    /// `[policy.proxy_wasm]`: the clusters of `dispatch_http_call`.
    pub(super) proxy_wasm: Option<Spanned<RawProxyWasm>>,
    /// `engine = "rego"` or `"cedar"`: a policy language run by a built-in guest.
    pub(super) engine: Option<Spanned<String>>,
    pub(super) files: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) entrypoint: Option<Spanned<String>>,
    /// Cedar: the header whose value is an HTTP request's principal.
    pub(super) principal_header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxyWasm {
    #[serde(default)]
    pub(super) clusters: std::collections::BTreeMap<String, Spanned<String>>,
}

/// The `version` key of a policy: a name, or an array of `[[policy.version]]`
/// tables. Written by hand (not `untagged`) so that an unknown key inside a
/// version table is still reported with its name and line.
pub(super) enum RawVersions {
    Name(String),
    Tables(Vec<Spanned<RawVersion>>),
}

impl<'de> Deserialize<'de> for RawVersions {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawVersions;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a version name or [[policy.version]] tables")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawVersions, E> {
                Ok(RawVersions::Name(v.to_owned()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawVersions, A::Error> {
                let mut tables = Vec::new();
                while let Some(table) = seq.next_element()? {
                    tables.push(table);
                }
                Ok(RawVersions::Tables(tables))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVersion {
    pub(super) name: Spanned<String>,
    pub(super) module: Spanned<String>,
    pub(super) sha256: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWasi {
    #[serde(default)]
    pub(super) allow: Vec<Spanned<String>>,
    pub(super) on_denied: Option<OnDenied>,
    #[serde(default)]
    pub(super) env: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) preopens: Vec<Spanned<RawPreopen>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPreopen {
    pub(super) host: String,
    pub(super) guest: String,
    pub(super) mode: Access,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    #[serde(default)]
    pub(super) allow: Vec<Spanned<String>>,
    pub(super) timeout_ms: Option<Spanned<u64>>,
    pub(super) max_response_bytes: Option<Spanned<u64>>,
    pub(super) max_calls: Option<Spanned<u32>>,
    pub(super) allow_redirects: Option<bool>,
    pub(super) cache_ttl_ms: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) credentials: Vec<Spanned<RawCredential>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) prefix: String,
    pub(super) header: String,
    pub(super) value_env: Option<String>,
    pub(super) value_file: Option<String>,
}
