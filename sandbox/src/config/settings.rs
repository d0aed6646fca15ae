//! The daemon-wide settings of a resolved configuration: `[server]`, `[audit]`,
//! `[telemetry]`, `[ebpf]`, `[engine]`, `[reload]` and the `Config` that holds
//! them with the policies. Built by `resolve` (or from `Default` where no
//! config is given); read by `server`, `engine`, `telemetry`, `audit`, `main`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::PolicySpec;
use super::defaults;

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file this came from; relative paths in it were resolved against its directory.
    pub source: PathBuf,
    pub server: ServerSettings,
    pub audit: AuditSettings,
    pub telemetry: TelemetrySettings,
    pub ebpf: EbpfMode,
    /// `[ebpf] enforce`: BPF LSM programs refuse, on a thread inside an
    /// invocation, what the policy's grants do not explain (DESIGN §9).
    pub ebpf_enforce: bool,
    pub engine: EngineSettings,
    pub reload: ReloadSettings,
    pub policies: Vec<PolicySpec>,
}

impl Config {
    /// Settings that are valid but work against each other, for `check` to
    /// print and the daemon to log at startup.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let in_flight: u64 = self
            .policies
            .iter()
            .map(|p| u64::from(p.max_in_flight))
            .sum();
        if in_flight > u64::from(self.engine.max_instances) {
            warnings.push(format!(
                "engine.max_instances = {} is below the sum of max_in_flight over the policies ({in_flight}): \
                 busy policies can hold every instance, and the others' evaluations then wait for a free one \
                 and fail with eval_timeout; raise engine.max_instances or lower max_in_flight",
                self.engine.max_instances
            ));
        }
        warnings
    }
}

/// `[reload]`: how the daemon notices a changed config or module file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadSettings {
    /// Watch the config file and every module file, and reload when one changes.
    pub watch: bool,
    /// Quiet time after a change before reloading, so an editor's or a deploy
    /// tool's burst of writes becomes one reload.
    pub debounce: Duration,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        ReloadSettings {
            watch: true,
            debounce: Duration::from_millis(defaults::RELOAD_DEBOUNCE_MS),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub grpc_listen: Option<SocketAddr>,
    pub max_body_bytes: u64,
    /// How long a client may take to send a request's headers, from its first byte.
    pub header_read_timeout: Duration,
    /// How long a connection may wait for its next request (and a client take
    /// to read an answer) before it is closed.
    pub idle_timeout: Duration,
    /// Open connections allowed on both listeners together; more are refused.
    pub max_connections: MaxConnections,
    /// Which proxy headers forward-auth reads the original request from.
    pub forward_auth_headers: ForwardAuthHeaders,
    /// The daemon-wide seccomp allowlist, installed once at start.
    pub syscall_filter: crate::seccomp::Mode,
}

/// `server.max_connections`: set, or derived from the process's RLIMIT_NOFILE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxConnections {
    pub limit: u64,
    /// The soft RLIMIT_NOFILE it was derived from; `None` when configured.
    pub derived_from: Option<u64>,
}

impl MaxConnections {
    /// The cap for a process allowed `nofile` descriptors: all but a reserve
    /// of a quarter (at least `FD_RESERVE`) for everything that is not a
    /// client connection.
    pub fn derived(nofile: u64) -> MaxConnections {
        let reserve = (nofile / 4).max(defaults::FD_RESERVE);
        MaxConnections {
            limit: nofile
                .saturating_sub(reserve)
                .max(defaults::MIN_DERIVED_CONNECTIONS),
            derived_from: Some(nofile),
        }
    }
}

/// `server.forward_auth_headers`: the header convention of the proxy in front
/// of `/v1/authz`. A proxy passes the client's other headers through, so only
/// the pair the proxy itself sets can be trusted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ForwardAuthHeaders {
    /// Either pair (DESIGN §6); when both are present they must agree, and so
    /// must `X-Real-IP` and `X-Forwarded-For`, else the request is refused.
    #[default]
    #[serde(rename = "any")]
    Any,
    /// nginx: `X-Original-Method`, `X-Original-URI`, `X-Real-IP` only.
    #[serde(rename = "x-original")]
    XOriginal,
    /// Traefik, Caddy: `X-Forwarded-Method`, `X-Forwarded-Uri`, `X-Forwarded-For` only.
    #[serde(rename = "x-forwarded")]
    XForwarded,
}

impl ForwardAuthHeaders {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardAuthHeaders::Any => "any",
            ForwardAuthHeaders::XOriginal => "x-original",
            ForwardAuthHeaders::XForwarded => "x-forwarded",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    pub target: AuditTarget,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TelemetrySettings {
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// Share of new traces recorded (0.0 to 1.0); a caller's sampled flag wins.
    pub sampling_ratio: f64,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Guest `log` calls at or above this level (0 trace … 4 error) become span events.
    pub guest_log_level: i32,
    /// Also export the daemon's metrics over OTLP, this often (`None`: Prometheus only).
    pub otlp_metrics_interval: Option<std::time::Duration>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            sampling_ratio: 1.0,
            service_name: "sandgate".to_owned(),
            guest_log_level: 2,
            otlp_metrics_interval: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EbpfMode {
    #[default]
    Auto,
    Required,
    Off,
}

/// Settings of the shared wasmtime engine and of how it obtains modules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    /// Where compiled modules are cached; `None` disables the disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Where modules downloaded from URLs are kept (by digest), so later
    /// starts need no network; `None` keeps them in memory only.
    pub download_dir: Option<PathBuf>,
    /// The largest linear memory any policy may be given (pool slot size).
    pub max_memory_bytes: u64,
    /// Instances that may be live at once across all policies.
    pub max_instances: u32,
    /// Plain `http://` module URLs are accepted (loopback hosts only).
    pub allow_insecure_http: bool,
    /// Deadline of one module download, connection to last byte.
    pub fetch_timeout: Duration,
    /// The largest module a download may deliver.
    pub max_module_bytes: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        let cache_dir = default_cache_dir();
        EngineSettings {
            download_dir: cache_dir.as_ref().map(|d| d.join(DOWNLOADS_SUBDIR)),
            cache_dir,
            max_memory_bytes: defaults::ENGINE_MAX_MEMORY_MB << 20,
            max_instances: defaults::ENGINE_MAX_INSTANCES,
            allow_insecure_http: false,
            fetch_timeout: Duration::from_millis(defaults::FETCH_TIMEOUT_MS),
            max_module_bytes: defaults::MAX_MODULE_MB << 20,
        }
    }
}

/// Downloaded modules live in this directory under the cache directory.
pub const DOWNLOADS_SUBDIR: &str = "modules";

/// `$SANDGATE_CACHE_DIR`, else `$XDG_CACHE_HOME/sandgate`, else `~/.cache/sandgate`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SANDGATE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("sandgate"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("sandgate"))
}
