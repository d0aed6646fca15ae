//! The effective settings of a loaded policy as one typed, serialisable
//! report: what it is granted, which of its imports are refused, and where
//! each of its versions came from. `sandgate check` prints it (text and
//! `--json`), `GET /v1/policies` serves it, and `/readyz` and `/v1/reload`
//! show its per-version summary.

use serde::Serialize;

use super::{Policy, SnapshotFacts, Versions};
use crate::config::{OnDenied, PolicySpec};
use crate::decision::FailMode;
use crate::wasi;

/// One policy with every loaded version, as `check --json` and
/// `GET /v1/policies` show it.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    pub name: String,
    /// The configured (first) version.
    pub version: String,
    pub module: String,
    pub digest: String,
    /// Whether the config pins the module's sha256.
    pub digest_pinned: bool,
    pub compiled_from: String,
    pub fetched_from: Option<String>,
    pub snapshot: Option<SnapshotFacts>,
    pub versions: Vec<VersionReport>,
    pub routing: RoutingReport,
    pub decision_cache: Option<DecisionCacheReport>,
    pub timeout_ms: u64,
    pub memory_limit_mb: u64,
    pub max_input_bytes: u64,
    pub max_output_bytes: u64,
    pub max_in_flight: u32,
    pub fail_mode: FailMode,
    pub wasi: WasiReport,
    pub egress: EgressReport,
    /// What a proxy-wasm filter is configured with; absent for ABI v1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_wasm: Option<ProxyWasmReport>,
    /// For a policy written in a language (`engine`): what runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<LanguageReport>,
}

/// A proxy-wasm filter's settings and the host calls it would be refused.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyWasmReport {
    /// The ABI version the module declares (`0.2.1`).
    pub abi_version: Option<String>,
    pub plugin_config_bytes: usize,
    /// `dispatch_http_call` cluster -> base URL.
    pub clusters: std::collections::BTreeMap<String, String>,
    /// The module's proxy-wasm imports sandgate provides.
    pub host_calls: Vec<String>,
    /// The module's proxy-wasm imports sandgate refuses (audited as `wasi_denied`).
    pub host_calls_refused: Vec<String>,
}

/// A language policy: its engine and version, files and entrypoint.
#[derive(Clone, Debug, Serialize)]
pub struct LanguageReport {
    pub engine: String,
    pub engine_version: String,
    pub files: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,
    /// Cedar: the ids of the loaded policies, as the guest lists them
    /// (filled by `sandgate check`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_ids: Option<Vec<String>>,
    /// Cedar: the header naming an HTTP request's principal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal_header: Option<String>,
}

/// One loaded version: its summary and where its module came from.
#[derive(Clone, Debug, Serialize)]
pub struct VersionReport {
    #[serde(flatten)]
    pub summary: VersionSummary,
    pub module: String,
    pub compiled_from: String,
    pub fetched_from: Option<String>,
    /// Whether the version takes traffic (weight above 0); only
    /// `GET /v1/policies` says it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
}

/// One version as `/readyz` and `/v1/reload` show it.
#[derive(Clone, Debug, Serialize)]
pub struct VersionSummary {
    pub version: String,
    pub digest: String,
    pub weight: u32,
}

impl VersionSummary {
    pub fn of(policy: &Policy, weight: u32) -> VersionSummary {
        VersionSummary {
            version: policy.spec().version.clone(),
            digest: policy.digest().to_string(),
            weight,
        }
    }

    /// Every version of `versions` with its weight and digest.
    pub fn all(versions: &Versions) -> Vec<VersionSummary> {
        versions
            .iter()
            .map(|(policy, weight)| VersionSummary::of(policy, weight))
            .collect()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RoutingReport {
    /// The header that picks a version, when `version_header` is on.
    pub version_header: Option<&'static str>,
    pub sticky: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecisionCacheReport {
    pub ttl_ms: u64,
    pub max_entries: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct WasiReport {
    /// The groups the config allows.
    pub allow: Vec<String>,
    /// The WASI functions those groups grant.
    pub functions: Vec<&'static str>,
    pub on_denied: &'static str,
    /// The names of the environment variables passed (never their values).
    pub env: Vec<String>,
    /// Listed variables absent from the daemon's environment.
    pub env_not_set: Vec<String>,
    pub preopens: Vec<PreopenReport>,
    /// The module's WASI imports its grants refuse, each with its group.
    pub imports_refused: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PreopenReport {
    pub host: std::path::PathBuf,
    pub guest: String,
    pub mode: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct EgressReport {
    pub allow: Vec<String>,
    pub credentials: Vec<CredentialReport>,
    pub allow_redirects: bool,
    pub cache_ttl_ms: Option<u64>,
    pub timeout_ms: u64,
    pub max_response_bytes: u64,
    pub max_calls: u32,
}

/// A credential the bridge adds, named by where its value comes from (the
/// value itself is never reported).
#[derive(Clone, Debug, Serialize)]
pub struct CredentialReport {
    pub prefix: String,
    pub header: String,
    pub source: String,
}

impl PolicyReport {
    /// The report of a loaded policy: the settings of its first version and
    /// every version's summary and origin.
    pub fn of(versions: &Versions) -> PolicyReport {
        let primary = versions.primary();
        let spec = primary.spec();
        let facts = primary.facts();
        PolicyReport {
            name: spec.name.clone(),
            version: spec.version.clone(),
            module: spec.module.to_string(),
            digest: facts.digest.clone(),
            digest_pinned: spec.sha256.is_some(),
            compiled_from: facts.compiled_from.clone(),
            fetched_from: facts.fetched_from.clone(),
            snapshot: facts.snapshot.clone(),
            versions: versions
                .iter()
                .map(|(policy, weight)| VersionReport {
                    summary: VersionSummary::of(policy, weight),
                    module: policy.spec().module.to_string(),
                    compiled_from: policy.facts().compiled_from.clone(),
                    fetched_from: policy.facts().fetched_from.clone(),
                    active: None,
                })
                .collect(),
            routing: RoutingReport {
                version_header: spec
                    .routing
                    .version_header
                    .then_some(crate::config::defaults::VERSION_HEADER),
                sticky: spec.routing.sticky.as_ref().map(|s| s.to_string()),
            },
            decision_cache: spec.decision_cache.as_ref().map(|c| DecisionCacheReport {
                ttl_ms: c.ttl.as_millis() as u64,
                max_entries: c.max_entries,
            }),
            timeout_ms: spec.timeout.as_millis() as u64,
            memory_limit_mb: spec.memory_limit_bytes >> 20,
            max_input_bytes: spec.max_input_bytes,
            max_output_bytes: spec.max_output_bytes,
            max_in_flight: spec.max_in_flight,
            fail_mode: spec.fail_mode,
            wasi: WasiReport::of(spec, &facts.wasi_imports),
            egress: EgressReport::of(spec),
            proxy_wasm: match &spec.abi {
                crate::config::Abi::ProxyWasm(settings) => Some(ProxyWasmReport {
                    abi_version: facts.proxy_wasm_abi.clone(),
                    plugin_config_bytes: settings.plugin_config.len(),
                    clusters: (*settings.clusters).clone(),
                    host_calls: facts
                        .proxy_wasm_imports
                        .iter()
                        .filter(|i| crate::proxywasm::SUPPORTED.contains(&i.as_str()))
                        .cloned()
                        .collect(),
                    host_calls_refused: facts
                        .proxy_wasm_imports
                        .iter()
                        .filter(|i| crate::proxywasm::REFUSED.contains(&i.as_str()))
                        .cloned()
                        .collect(),
                }),
                crate::config::Abi::SandgateV1 => None,
            },
            language: spec.language.as_ref().map(|l| LanguageReport {
                engine: l.language.to_string(),
                engine_version: l.language.engine_version(),
                files: l.files.iter().map(|f| f.display().to_string()).collect(),
                entrypoint: l.entrypoint.clone(),
                policy_ids: None,
                principal_header: l.principal_header.clone(),
            }),
        }
    }

    /// The same report saying which versions take traffic, as
    /// `GET /v1/policies` serves it.
    pub fn with_active(mut self) -> PolicyReport {
        for version in &mut self.versions {
            version.active = Some(version.summary.weight > 0);
        }
        self
    }
}

impl WasiReport {
    fn of(spec: &PolicySpec, wasi_imports: &[String]) -> WasiReport {
        let grants = &spec.grants;
        WasiReport {
            allow: grants.requested.clone(),
            functions: grants.functions.iter().copied().collect(),
            on_denied: match grants.on_denied {
                OnDenied::Errno => "errno",
                OnDenied::Trap => "trap",
            },
            env: grants.env.keys().cloned().collect(),
            env_not_set: grants.env_missing.clone(),
            preopens: grants
                .preopens
                .iter()
                .map(|p| PreopenReport {
                    host: p.host.clone(),
                    guest: p.guest.clone(),
                    mode: p.access.to_string(),
                })
                .collect(),
            imports_refused: wasi_imports
                .iter()
                .filter(|f| !grants.allows(f))
                .map(|f| match wasi::group_of(f) {
                    Some(group) => format!("{f} ({group})"),
                    None => f.clone(),
                })
                .collect(),
        }
    }
}

impl EgressReport {
    fn of(spec: &PolicySpec) -> EgressReport {
        let egress = &spec.egress;
        EgressReport {
            allow: egress.allow.iter().map(|r| r.as_str().to_owned()).collect(),
            credentials: egress
                .credentials
                .iter()
                .map(|c| CredentialReport {
                    prefix: c.prefix.as_str().to_owned(),
                    header: c.header.clone(),
                    source: c.source.clone(),
                })
                .collect(),
            allow_redirects: egress.allow_redirects,
            cache_ttl_ms: egress.cache_ttl.map(|t| t.as_millis() as u64),
            timeout_ms: egress.timeout.as_millis() as u64,
            max_response_bytes: egress.max_response_bytes,
            max_calls: egress.max_calls,
        }
    }
}
