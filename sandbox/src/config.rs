//! Configuration: parses the TOML of DESIGN §5 into raw structs that mirror it
//! exactly (unknown keys refused), then resolves them into the validated types
//! the runtime uses (`Config`, `PolicySpec`, `Grants`, …). After `load` nothing
//! else in the daemon looks at raw strings: every error names the file, line
//! and key at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use crate::decision::FailMode;
use crate::wasi;

/// Defaults, in one place. `sandgate check` prints the resolved values.
pub mod defaults {
    pub const LISTEN: &str = "127.0.0.1:8181";
    pub const TIMEOUT_MS: u64 = 100;
    pub const MEMORY_LIMIT_MB: u64 = 16;
    pub const MAX_OUTPUT_BYTES: u64 = 1024 * 1024;
    pub const MAX_INPUT_BYTES: u64 = 1024 * 1024;
    pub const ENGINE_MAX_MEMORY_MB: u64 = 256;
    pub const ENGINE_MAX_INSTANCES: u32 = 1000;
    pub const EGRESS_TIMEOUT_MS: u64 = 1000;
    pub const EGRESS_MAX_RESPONSE_BYTES: u64 = 64 * 1024;
    pub const EGRESS_MAX_CALLS: u32 = 8;
    pub const VERSION: &str = "default";
    pub const MAX_IN_FLIGHT: u32 = 256;
    pub const RELOAD_DEBOUNCE_MS: u64 = 200;
    pub const VERSION_WEIGHT: u32 = 100;
    pub const VERSION_HEADER: &str = "x-sandgate-version";
    pub const FETCH_TIMEOUT_MS: u64 = 30_000;
    pub const MAX_MODULE_MB: u64 = 64;
    pub const DECISION_CACHE_MAX_ENTRIES: u64 = 10_000;
    pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    /// Longer than the idle keep-alive of the proxies in front (nginx 60 s,
    /// Traefik 90 s, Caddy 120 s), so the proxy closes an idle connection first.
    pub const IDLE_TIMEOUT_MS: u64 = 180_000;
    /// File descriptors kept out of `max_connections` when it is derived from
    /// RLIMIT_NOFILE: policies' files, egress, audit log, cache, probes.
    pub const FD_RESERVE: u64 = 256;
    pub const MIN_DERIVED_CONNECTIONS: u64 = 16;
}

const MAX_TIMEOUT_MS: u64 = 60_000;

/// A configuration error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file this came from; relative paths in it were resolved against its directory.
    pub source: PathBuf,
    pub server: ServerSettings,
    pub audit: AuditSettings,
    pub telemetry: TelemetrySettings,
    pub ebpf: EbpfMode,
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

/// Where a policy's module comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleSource {
    File(PathBuf),
    Url(String),
}

impl fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleSource::File(p) => write!(f, "{}", p.display()),
            ModuleSource::Url(u) => f.write_str(u),
        }
    }
}

/// A SHA-256 digest, rendered `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(bytes).into())
    }

    /// Parses 64 hex digits, optionally prefixed `sha256:`.
    pub fn parse(text: &str) -> Result<Digest, String> {
        let hex_part = text.strip_prefix("sha256:").unwrap_or(text);
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out)
            .map_err(|_| format!("`{text}` is not a sha256 digest (64 hex digits)"))?;
        Ok(Digest(out))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One policy, validated. `version`, `module` and `sha256` describe the
/// version this spec loads (the first of `versions`); [`PolicySpec::for_version`]
/// gives the spec of any other.
#[derive(Clone, Debug)]
pub struct PolicySpec {
    pub name: String,
    pub version: String,
    pub module: ModuleSource,
    pub sha256: Option<Digest>,
    /// Every version, in config order: the `[[policy.version]]` tables, or the
    /// one version `version`/`module`/`sha256` describe (weight 100).
    pub versions: Vec<VersionSpec>,
    /// How a request picks among `versions`.
    pub routing: Routing,
    /// Decisions reused for an identical input, when enabled.
    pub decision_cache: Option<DecisionCacheSettings>,
    pub timeout: Duration,
    pub memory_limit_bytes: u64,
    pub max_input_bytes: u64,
    pub max_output_bytes: u64,
    /// Evaluations of this policy that may run at once; excess is refused.
    pub max_in_flight: u32,
    pub fail_mode: FailMode,
    pub grants: Grants,
    pub egress: EgressSettings,
}

impl PolicySpec {
    /// A policy for a bare module with nothing granted (`sandgate eval --module`).
    pub fn for_module(path: &Path) -> PolicySpec {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "module".to_owned());
        let module = ModuleSource::File(path.to_path_buf());
        PolicySpec {
            name,
            version: defaults::VERSION.to_owned(),
            versions: vec![VersionSpec {
                name: defaults::VERSION.to_owned(),
                module: module.clone(),
                sha256: None,
                weight: defaults::VERSION_WEIGHT,
            }],
            module,
            sha256: None,
            routing: Routing::default(),
            decision_cache: None,
            timeout: Duration::from_millis(defaults::TIMEOUT_MS),
            memory_limit_bytes: defaults::MEMORY_LIMIT_MB << 20,
            max_input_bytes: defaults::MAX_INPUT_BYTES,
            max_output_bytes: defaults::MAX_OUTPUT_BYTES,
            max_in_flight: defaults::MAX_IN_FLIGHT,
            fail_mode: FailMode::Closed,
            grants: Grants::default(),
            egress: EgressSettings::default(),
        }
    }
}

impl PolicySpec {
    /// The spec that loads `version` of this policy (every other setting shared).
    pub fn for_version(&self, version: &VersionSpec) -> PolicySpec {
        PolicySpec {
            version: version.name.clone(),
            module: version.module.clone(),
            sha256: version.sha256,
            ..self.clone()
        }
    }

    /// Replaces the module of every version (`sandgate eval --module` with a config).
    pub fn with_module(&self, module: ModuleSource) -> PolicySpec {
        let mut spec = self.clone();
        spec.module = module.clone();
        spec.sha256 = None;
        spec.versions = vec![VersionSpec {
            name: spec.version.clone(),
            module,
            sha256: None,
            weight: defaults::VERSION_WEIGHT,
        }];
        spec
    }
}

/// One version of a policy: `[[policy.version]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionSpec {
    pub name: String,
    pub module: ModuleSource,
    pub sha256: Option<Digest>,
    /// Share of the traffic not routed by header, relative to the other
    /// versions' weights; 0 = reachable only by the version header.
    pub weight: u32,
}

/// How a request picks the version that answers it: the version header when
/// enabled and present, else the sticky key's hash when configured and
/// present, else a weighted random draw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    /// Honour `x-sandgate-version` (`version_header = false` turns it off).
    pub version_header: bool,
    pub sticky: Option<StickyKey>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            version_header: true,
            sticky: None,
        }
    }
}

/// What keeps one user on one version: `sticky = "header:NAME"` or `"input:a.b.c"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StickyKey {
    /// A request header (lower-case name).
    Header(String),
    /// A field of the caller's input, by its path of object keys (or array indices).
    Input(Vec<String>),
}

impl fmt::Display for StickyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StickyKey::Header(h) => write!(f, "header:{h}"),
            StickyKey::Input(path) => write!(f, "input:{}", path.join(".")),
        }
    }
}

/// `decision_cache_ttl_ms`: decisions reused for an identical canonical input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionCacheSettings {
    pub ttl: Duration,
    pub max_entries: u64,
}

/// What a denied WASI call does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDenied {
    /// Return `ERRNO_NOTCAPABLE` (76) to the guest.
    #[default]
    Errno,
    /// Abort the evaluation with `wasi_denied`.
    Trap,
}

/// Access a preopened directory grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Access {
    #[serde(rename = "ro")]
    ReadOnly,
    #[serde(rename = "rw")]
    ReadWrite,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::ReadOnly => "ro",
            Access::ReadWrite => "rw",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preopen {
    /// Canonical host directory.
    pub host: PathBuf,
    /// Absolute path the guest sees.
    pub guest: String,
    pub access: Access,
}

/// The WASI capabilities of a policy: the exact preview1 functions that are
/// real, everything else refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// Groups and function names as written in the config.
    pub requested: Vec<String>,
    /// The exact `wasi_snapshot_preview1` functions granted.
    pub functions: BTreeSet<&'static str>,
    pub on_denied: OnDenied,
    /// Environment variables the guest sees, with their values read at load.
    pub env: BTreeMap<String, String>,
    /// Listed variables that were not set in the daemon's environment.
    pub env_missing: Vec<String>,
    pub preopens: Vec<Preopen>,
}

impl Grants {
    pub fn allows(&self, function: &str) -> bool {
        self.functions.contains(function)
    }
}

/// `[policy.egress]`: where a guest may send HTTP requests through the bridge.
#[derive(Clone, Debug)]
pub struct EgressSettings {
    pub allow: Vec<EgressRule>,
    pub timeout: Duration,
    pub max_response_bytes: u64,
    pub max_calls: u32,
    /// Follow redirects (each hop checked against `allow`); off by default.
    pub allow_redirects: bool,
    /// Cache responses this long (bounded by the response's `max-age`).
    pub cache_ttl: Option<Duration>,
    pub credentials: Vec<Credential>,
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            allow: Vec::new(),
            timeout: Duration::from_millis(defaults::EGRESS_TIMEOUT_MS),
            max_response_bytes: defaults::EGRESS_MAX_RESPONSE_BYTES,
            max_calls: defaults::EGRESS_MAX_CALLS,
            allow_redirects: false,
            cache_ttl: None,
            credentials: Vec::new(),
        }
    }
}

pub use crate::bridge::EgressRule;

/// A header the bridge adds to requests matching `prefix`; the guest never sees it.
#[derive(Clone)]
pub struct Credential {
    pub prefix: EgressRule,
    /// Lower-case header name.
    pub header: String,
    pub value: String,
    /// Where the value came from (`env NAME` or `file PATH`), for `check`.
    pub source: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("prefix", &self.prefix)
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

/// The soft RLIMIT_NOFILE of this process (65536 when it is unlimited).
fn open_files_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(65_536)
}

// ---- raw TOML mirror -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    audit: Option<RawAudit>,
    telemetry: Option<RawTelemetry>,
    ebpf: Option<RawEbpf>,
    engine: Option<RawEngine>,
    reload: Option<RawReload>,
    #[serde(default)]
    policy: Vec<RawPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch: Option<bool>,
    debounce_ms: Option<Spanned<u64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    grpc_listen: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<u64>>,
    header_read_timeout_ms: Option<Spanned<u64>>,
    idle_timeout_ms: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    forward_auth_headers: Option<ForwardAuthHeaders>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<Spanned<String>>,
    otlp_protocol: Option<OtlpProtocol>,
    sampling_ratio: Option<Spanned<f64>>,
    service_name: Option<Spanned<String>>,
    guest_log_level: Option<Spanned<String>>,
    otlp_metrics: Option<bool>,
    otlp_metrics_interval_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEbpf {
    mode: Option<EbpfMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    cache_dir: Option<Spanned<String>>,
    cache: Option<bool>,
    max_memory_mb: Option<Spanned<u64>>,
    max_instances: Option<Spanned<u32>>,
    allow_insecure_http: Option<bool>,
    fetch_timeout_ms: Option<Spanned<u64>>,
    max_module_mb: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    /// `version = "v1"`, or the `[[policy.version]]` tables.
    version: Option<Spanned<RawVersions>>,
    module: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    sticky: Option<Spanned<String>>,
    version_header: Option<bool>,
    decision_cache_ttl_ms: Option<Spanned<u64>>,
    decision_cache_max_entries: Option<Spanned<u64>>,
    decision_cache_force: Option<bool>,
    timeout_ms: Option<Spanned<u64>>,
    memory_limit_mb: Option<Spanned<u64>>,
    max_input_bytes: Option<Spanned<u64>>,
    max_output_bytes: Option<Spanned<u64>>,
    max_in_flight: Option<Spanned<u32>>,
    fail_mode: Option<FailMode>,
    wasi: Option<RawWasi>,
    egress: Option<RawEgress>,
}

/// The `version` key of a policy: a name, or an array of `[[policy.version]]`
/// tables. Written by hand (not `untagged`) so that an unknown key inside a
/// version table is still reported with its name and line.
enum RawVersions {
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
struct RawVersion {
    name: Spanned<String>,
    module: Spanned<String>,
    sha256: Option<Spanned<String>>,
    weight: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWasi {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    on_denied: Option<OnDenied>,
    #[serde(default)]
    env: Vec<Spanned<String>>,
    #[serde(default)]
    preopens: Vec<Spanned<RawPreopen>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreopen {
    host: String,
    guest: String,
    mode: Access,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    timeout_ms: Option<Spanned<u64>>,
    max_response_bytes: Option<Spanned<u64>>,
    max_calls: Option<Spanned<u32>>,
    allow_redirects: Option<bool>,
    cache_ttl_ms: Option<Spanned<u64>>,
    #[serde(default)]
    credentials: Vec<Spanned<RawCredential>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    prefix: String,
    header: String,
    value_env: Option<String>,
    value_file: Option<String>,
}

// ---- resolution ------------------------------------------------------------

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates configuration text; `path` locates relative paths and
/// names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let resolver = Resolver {
        text,
        path,
        base: path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| resolver.line(s.start));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            message: e.message().trim_end().to_owned(),
        }
    })?;
    resolver.resolve(raw)
}

struct Resolver<'a> {
    text: &'a str,
    path: &'a Path,
    base: PathBuf,
}

impl Resolver<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        message: String,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: span.map(|s| self.line(s.start)),
            message,
        })
    }

    fn relative(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn resolve(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let audit = AuditSettings {
            target: match raw.audit.and_then(|a| a.path) {
                None => AuditTarget::Stdout,
                Some(p) if p.get_ref() == "-" => AuditTarget::Stdout,
                Some(p) if p.get_ref().is_empty() => {
                    return self.error(Some(p.span()), "audit.path: must not be empty".into());
                }
                Some(p) => AuditTarget::File(self.relative(p.get_ref())),
            },
        };
        let telemetry = match raw.telemetry {
            None => TelemetrySettings::default(),
            Some(t) => self.telemetry(t)?,
        };
        let ebpf = raw.ebpf.and_then(|e| e.mode).unwrap_or_default();
        let engine = self.engine(raw.engine)?;
        let reload = self.reload(raw.reload)?;

        let mut policies = Vec::with_capacity(raw.policy.len());
        let mut seen = BTreeSet::new();
        for (index, p) in raw.policy.into_iter().enumerate() {
            if !seen.insert(p.name.get_ref().clone()) {
                return self.error(
                    Some(p.name.span()),
                    format!(
                        "policy[{index}].name: duplicate policy name `{}`",
                        p.name.get_ref()
                    ),
                );
            }
            policies.push(self.policy(index, p, &engine)?);
        }
        Ok(Config {
            source: self.path.to_path_buf(),
            server,
            audit,
            telemetry,
            ebpf,
            engine,
            reload,
            policies,
        })
    }

    fn reload(&self, raw: Option<RawReload>) -> Result<ReloadSettings, ConfigError> {
        let mut settings = ReloadSettings::default();
        let Some(raw) = raw else {
            return Ok(settings);
        };
        settings.watch = raw.watch.unwrap_or(settings.watch);
        if let Some(ms) = &raw.debounce_ms {
            settings.debounce =
                Duration::from_millis(self.ranged("reload.debounce_ms", ms, 0, 60_000)?);
        }
        Ok(settings)
    }

    fn socket_addr(&self, key: &str, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse().or_else(|_| {
            self.error(
                Some(value.span()),
                format!(
                    "{key}: `{}` is not an address like 127.0.0.1:8181",
                    value.get_ref()
                ),
            )
        })
    }

    fn server(&self, raw: Option<RawServer>) -> Result<ServerSettings, ConfigError> {
        let default_listen: SocketAddr = defaults::LISTEN
            .parse()
            .expect("the default listen address is valid");
        let raw = raw.unwrap_or_default();
        let listen = match &raw.listen {
            Some(l) => self.socket_addr("server.listen", l)?,
            None => default_listen,
        };
        let grpc_listen = match &raw.grpc_listen {
            Some(l) => Some(self.socket_addr("server.grpc_listen", l)?),
            None => None,
        };
        let max_body_bytes = match raw.max_body_bytes {
            Some(v) => self.ranged("server.max_body_bytes", &v, 1, 1 << 30)?,
            None => defaults::MAX_INPUT_BYTES,
        };
        let millis = |key: &str, v: &Option<Spanned<u64>>, default: u64| match v {
            Some(v) => self.ranged(key, v, 1, 3_600_000).map(Duration::from_millis),
            None => Ok(Duration::from_millis(default)),
        };
        let header_read_timeout = millis(
            "server.header_read_timeout_ms",
            &raw.header_read_timeout_ms,
            defaults::HEADER_READ_TIMEOUT_MS,
        )?;
        let idle_timeout = millis(
            "server.idle_timeout_ms",
            &raw.idle_timeout_ms,
            defaults::IDLE_TIMEOUT_MS,
        )?;
        let max_connections = match &raw.max_connections {
            Some(v) => MaxConnections {
                limit: self.ranged("server.max_connections", v, 1, 10_000_000)?,
                derived_from: None,
            },
            None => MaxConnections::derived(open_files_limit()),
        };
        Ok(ServerSettings {
            listen,
            grpc_listen,
            max_body_bytes,
            header_read_timeout,
            idle_timeout,
            max_connections,
            forward_auth_headers: raw.forward_auth_headers.unwrap_or_default(),
        })
    }

    fn telemetry(&self, t: RawTelemetry) -> Result<TelemetrySettings, ConfigError> {
        let defaults = TelemetrySettings::default();
        let otlp_protocol = t.otlp_protocol.unwrap_or(defaults.otlp_protocol);
        let otlp_endpoint = match t.otlp_endpoint {
            None => None,
            Some(e) => {
                let v = e.get_ref();
                let scheme = match url::Url::parse(v) {
                    Ok(url) if url.host_str().is_some() => url.scheme().to_owned(),
                    _ => String::new(),
                };
                if scheme != "http" && scheme != "https" {
                    return self.error(
                        Some(e.span()),
                        format!(
                            "telemetry.otlp_endpoint: `{v}` must be an http:// or https:// URL"
                        ),
                    );
                }
                if scheme == "https" && otlp_protocol == OtlpProtocol::Grpc {
                    return self.error(
                        Some(e.span()),
                        format!(
                            "telemetry.otlp_endpoint: `{v}`: this build exports OTLP/gRPC over plain http:// only; \
                             use otlp_protocol = \"http/protobuf\" for https:// or a local collector"
                        ),
                    );
                }
                Some(v.clone())
            }
        };
        let sampling_ratio = match t.sampling_ratio {
            None => defaults.sampling_ratio,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                return self.error(
                    Some(r.span()),
                    format!(
                        "telemetry.sampling_ratio: {} must be between 0.0 and 1.0",
                        r.get_ref()
                    ),
                );
            }
        };
        let service_name = match t.service_name {
            None => defaults.service_name,
            Some(n) if n.get_ref().trim().is_empty() => {
                return self.error(
                    Some(n.span()),
                    "telemetry.service_name: must not be empty".into(),
                );
            }
            Some(n) => n.into_inner(),
        };
        let guest_log_level = match t.guest_log_level {
            None => defaults.guest_log_level,
            Some(l) => match l.get_ref().as_str() {
                "trace" => 0,
                "debug" => 1,
                "info" => 2,
                "warn" => 3,
                "error" => 4,
                "off" => i32::MAX,
                other => {
                    return self.error(
                        Some(l.span()),
                        format!(
                            "telemetry.guest_log_level: `{other}` is not one of trace, debug, info, warn, error, off"
                        ),
                    );
                }
            },
        };
        let otlp_metrics_interval = match (t.otlp_metrics, t.otlp_metrics_interval_ms) {
            (Some(true), None) => Some(std::time::Duration::from_secs(10)),
            (Some(true), Some(ms)) if *ms.get_ref() >= 100 => {
                Some(std::time::Duration::from_millis(*ms.get_ref()))
            }
            (_, Some(ms)) if *ms.get_ref() < 100 => {
                return self.error(
                    Some(ms.span()),
                    format!(
                        "telemetry.otlp_metrics_interval_ms: {} is below the minimum of 100",
                        ms.get_ref()
                    ),
                );
            }
            (None | Some(false), Some(ms)) => {
                return self.error(
                    Some(ms.span()),
                    "telemetry.otlp_metrics_interval_ms: set otlp_metrics = true to export metrics over OTLP".into(),
                );
            }
            _ => None,
        };
        if otlp_metrics_interval.is_some() && otlp_endpoint.is_none() {
            return self.error(
                None,
                "telemetry.otlp_metrics: needs telemetry.otlp_endpoint".into(),
            );
        }
        Ok(TelemetrySettings {
            otlp_metrics_interval,
            otlp_endpoint,
            otlp_protocol,
            sampling_ratio,
            service_name,
            guest_log_level,
        })
    }

    fn engine(&self, raw: Option<RawEngine>) -> Result<EngineSettings, ConfigError> {
        let mut settings = EngineSettings::default();
        let Some(raw) = raw else {
            return Ok(settings);
        };
        if let Some(dir) = &raw.cache_dir {
            let dir = self.relative(dir.get_ref());
            settings.download_dir = Some(dir.join(DOWNLOADS_SUBDIR));
            settings.cache_dir = Some(dir);
        }
        // Only compiled modules: downloads are still kept, so a start
        // without network can use them.
        if raw.cache == Some(false) {
            settings.cache_dir = None;
        }
        settings.allow_insecure_http = raw.allow_insecure_http.unwrap_or(false);
        if let Some(ms) = &raw.fetch_timeout_ms {
            settings.fetch_timeout =
                Duration::from_millis(self.ranged("engine.fetch_timeout_ms", ms, 1, 600_000)?);
        }
        if let Some(mb) = &raw.max_module_mb {
            settings.max_module_bytes = self.ranged("engine.max_module_mb", mb, 1, 1024)? << 20;
        }
        if let Some(mb) = raw.max_memory_mb {
            settings.max_memory_bytes = self.ranged("engine.max_memory_mb", &mb, 1, 4096)? << 20;
        }
        if let Some(n) = raw.max_instances {
            settings.max_instances =
                self.ranged("engine.max_instances", &n.map_u64(), 1, 100_000)? as u32;
        }
        Ok(settings)
    }

    fn ranged(&self, key: &str, v: &Spanned<u64>, min: u64, max: u64) -> Result<u64, ConfigError> {
        let value = *v.get_ref();
        if value < min || value > max {
            return self.error(
                Some(v.span()),
                format!("{key}: {value} is out of range (allowed {min}..={max})"),
            );
        }
        Ok(value)
    }

    fn policy(
        &self,
        index: usize,
        raw: RawPolicy,
        engine: &EngineSettings,
    ) -> Result<PolicySpec, ConfigError> {
        let key = |k: &str| format!("policy[{index}].{k}");
        let name = raw.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return self.error(
                Some(raw.name.span()),
                format!(
                    "{}: `{name}` must be non-empty and use only letters, digits, '-', '_' and '.'",
                    key("name")
                ),
            );
        }
        let key = |k: &str| format!("policy[{index}].{k} (policy `{name}`)");
        let versions = self.versions(&key, &raw, engine)?;
        let routing = self.routing(&key, &raw)?;
        let timeout_ms = match &raw.timeout_ms {
            Some(v) => self.ranged(&key("timeout_ms"), v, 1, MAX_TIMEOUT_MS)?,
            None => defaults::TIMEOUT_MS,
        };
        let max_mb = engine.max_memory_bytes >> 20;
        let memory_limit_mb = match &raw.memory_limit_mb {
            Some(v) => self.ranged(&key("memory_limit_mb"), v, 1, max_mb)?,
            None => defaults::MEMORY_LIMIT_MB.min(max_mb),
        };
        let max_input_bytes = match &raw.max_input_bytes {
            Some(v) => self.ranged(&key("max_input_bytes"), v, 2, 1 << 30)?,
            None => defaults::MAX_INPUT_BYTES,
        };
        let max_output_bytes = match &raw.max_output_bytes {
            Some(v) => self.ranged(&key("max_output_bytes"), v, 16, 1 << 30)?,
            None => defaults::MAX_OUTPUT_BYTES,
        };
        let max_in_flight = match &raw.max_in_flight {
            Some(v) => self.ranged(&key("max_in_flight"), &v.map_u64(), 1, 100_000)? as u32,
            None => defaults::MAX_IN_FLIGHT,
        };
        let grants = self.grants(&key, raw.wasi)?;
        let egress = self.egress(&key, raw.egress)?;
        let decision_cache = self.decision_cache(
            &key,
            &raw.decision_cache_ttl_ms,
            &raw.decision_cache_max_entries,
            raw.decision_cache_force,
            &egress,
            raw.name.span(),
        )?;
        let first = versions[0].clone();
        Ok(PolicySpec {
            name,
            version: first.name,
            module: first.module,
            sha256: first.sha256,
            versions,
            routing,
            decision_cache,
            timeout: Duration::from_millis(timeout_ms),
            memory_limit_bytes: memory_limit_mb << 20,
            max_input_bytes,
            max_output_bytes,
            max_in_flight,
            fail_mode: raw.fail_mode.unwrap_or_default(),
            grants,
            egress,
        })
    }

    /// The versions of a policy: its `[[policy.version]]` tables, or the one
    /// its `version`/`module`/`sha256` keys describe.
    fn versions(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: &RawPolicy,
        engine: &EngineSettings,
    ) -> Result<Vec<VersionSpec>, ConfigError> {
        let tables = match raw.version.as_ref().map(|v| (v.span(), v.get_ref())) {
            Some((span, RawVersions::Tables(tables))) => {
                for (given, k) in [
                    (raw.module.as_ref().map(Spanned::span), "module"),
                    (raw.sha256.as_ref().map(Spanned::span), "sha256"),
                ] {
                    if let Some(given) = given {
                        return self.error(
                            Some(given),
                            format!(
                                "{}: the policy defines [[policy.version]] tables; give each version its own `{k}` instead",
                                key(k)
                            ),
                        );
                    }
                }
                if tables.is_empty() {
                    return self.error(
                        Some(span),
                        format!("{}: define at least one version", key("version")),
                    );
                }
                tables
            }
            other => {
                let name = match other {
                    Some((span, RawVersions::Name(n))) => {
                        self.version_name(&key("version"), n, span)?;
                        n.clone()
                    }
                    _ => defaults::VERSION.to_owned(),
                };
                let Some(module) = &raw.module else {
                    return self.error(
                        Some(raw.name.span()),
                        format!(
                            "{}: missing; give the policy a `module` or [[policy.version]] tables",
                            key("module")
                        ),
                    );
                };
                let sha256 = self.digest(&key("sha256"), raw.sha256.as_ref())?;
                let module = self.module_source(&key("module"), module, sha256, engine)?;
                return Ok(vec![VersionSpec {
                    name,
                    module,
                    sha256,
                    weight: defaults::VERSION_WEIGHT,
                }]);
            }
        };
        let mut versions: Vec<VersionSpec> = Vec::with_capacity(tables.len());
        for (i, table) in tables.iter().enumerate() {
            let table = table.get_ref();
            let vkey = |k: &str| key(&format!("version[{i}].{k}"));
            let name = table.name.get_ref();
            self.version_name(&vkey("name"), name, table.name.span())?;
            if versions.iter().any(|v| &v.name == name) {
                return self.error(
                    Some(table.name.span()),
                    format!("{}: duplicate version name `{name}`", vkey("name")),
                );
            }
            let sha256 = self.digest(&vkey("sha256"), table.sha256.as_ref())?;
            let module = self.module_source(&vkey("module"), &table.module, sha256, engine)?;
            let weight = match &table.weight {
                Some(w) => self.ranged(&vkey("weight"), w, 0, 1_000_000)? as u32,
                None => defaults::VERSION_WEIGHT,
            };
            versions.push(VersionSpec {
                name: name.clone(),
                module,
                sha256,
                weight,
            });
        }
        if versions.iter().all(|v| v.weight == 0) {
            let span = raw.version.as_ref().map(Spanned::span);
            return self.error(
                span,
                format!(
                    "{}: every version has weight 0, so a request without the version header could not be answered; give at least one a weight",
                    key("version")
                ),
            );
        }
        Ok(versions)
    }

    fn version_name(
        &self,
        key: &str,
        name: &str,
        span: std::ops::Range<usize>,
    ) -> Result<(), ConfigError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return self.error(
                Some(span),
                format!(
                    "{key}: `{name}` must be non-empty and use only letters, digits, '-', '_' and '.'"
                ),
            );
        }
        Ok(())
    }

    fn digest(
        &self,
        key: &str,
        raw: Option<&Spanned<String>>,
    ) -> Result<Option<Digest>, ConfigError> {
        match raw {
            Some(s) => Digest::parse(s.get_ref())
                .map(Some)
                .or_else(|m| self.error(Some(s.span()), format!("{key}: {m}"))),
            None => Ok(None),
        }
    }

    /// A module path (relative to the config file) or a pinned URL:
    /// `https://`, or `http://` to a loopback host when
    /// `engine.allow_insecure_http` is set.
    fn module_source(
        &self,
        key: &str,
        raw: &Spanned<String>,
        sha256: Option<Digest>,
        engine: &EngineSettings,
    ) -> Result<ModuleSource, ConfigError> {
        let text = raw.get_ref();
        let span = Some(raw.span());
        let insecure = text.starts_with("http://");
        if !(insecure || text.starts_with("https://")) {
            if text.is_empty() {
                return self.error(span, format!("{key}: must not be empty"));
            }
            return Ok(ModuleSource::File(self.relative(text)));
        }
        if sha256.is_none() {
            return self.error(
                span,
                format!("{key}: a module fetched from a URL must be pinned with `sha256`"),
            );
        }
        let url = match url::Url::parse(text) {
            Ok(url) if url.host().is_some() => url,
            _ => return self.error(span, format!("{key}: `{text}` is not a valid URL")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return self.error(
                span,
                format!("{key}: `{text}` carries user information; module URLs must not"),
            );
        }
        if insecure {
            if !is_loopback(&url) {
                return self.error(
                    span,
                    format!(
                        "{key}: `{text}` is plain http:// to a host that is not loopback; modules are fetched over https://"
                    ),
                );
            }
            if !engine.allow_insecure_http {
                return self.error(
                    span,
                    format!(
                        "{key}: `{text}` is plain http://; set `allow_insecure_http = true` in [engine] to fetch modules from a loopback host without TLS"
                    ),
                );
            }
        }
        Ok(ModuleSource::Url(text.clone()))
    }

    fn routing(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: &RawPolicy,
    ) -> Result<Routing, ConfigError> {
        let sticky =
            match &raw.sticky {
                None => None,
                Some(text) => Some(parse_sticky(text.get_ref()).or_else(|m| {
                    self.error(Some(text.span()), format!("{}: {m}", key("sticky")))
                })?),
            };
        Ok(Routing {
            version_header: raw.version_header.unwrap_or(true),
            sticky,
        })
    }

    fn decision_cache(
        &self,
        key: &dyn Fn(&str) -> String,
        ttl: &Option<Spanned<u64>>,
        max_entries: &Option<Spanned<u64>>,
        force: Option<bool>,
        egress: &EgressSettings,
        policy_span: std::ops::Range<usize>,
    ) -> Result<Option<DecisionCacheSettings>, ConfigError> {
        let Some(ttl) = ttl else {
            if let Some(m) = max_entries {
                return self.error(
                    Some(m.span()),
                    format!(
                        "{}: has no effect without decision_cache_ttl_ms",
                        key("decision_cache_max_entries")
                    ),
                );
            }
            if force.is_some() {
                return self.error(
                    Some(policy_span),
                    format!(
                        "{}: has no effect without decision_cache_ttl_ms",
                        key("decision_cache_force")
                    ),
                );
            }
            return Ok(None);
        };
        let ttl_ms = self.ranged(&key("decision_cache_ttl_ms"), ttl, 1, 86_400_000)?;
        if !egress.allow.is_empty() && force != Some(true) {
            return self.error(
                Some(ttl.span()),
                format!(
                    "{}: the policy calls external services ([policy.egress]), whose answers can change while a cached decision is reused; set decision_cache_force = true to cache anyway",
                    key("decision_cache_ttl_ms")
                ),
            );
        }
        let max_entries = match max_entries {
            Some(m) => self.ranged(&key("decision_cache_max_entries"), m, 1, 10_000_000)?,
            None => defaults::DECISION_CACHE_MAX_ENTRIES,
        };
        Ok(Some(DecisionCacheSettings {
            ttl: Duration::from_millis(ttl_ms),
            max_entries,
        }))
    }

    fn grants(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: Option<RawWasi>,
    ) -> Result<Grants, ConfigError> {
        let Some(raw) = raw else {
            return Ok(Grants::default());
        };
        let mut grants = Grants {
            on_denied: raw.on_denied.unwrap_or_default(),
            ..Grants::default()
        };
        for item in &raw.allow {
            let word = item.get_ref();
            match wasi::expand_grant(word) {
                Some(functions) => grants.functions.extend(functions.iter().copied()),
                None => {
                    return self.error(
                        Some(item.span()),
                        format!(
                            "{}: `{word}` is neither a group ({}) nor a wasi_snapshot_preview1 function",
                            key("wasi.allow"),
                            wasi::GROUPS.iter().map(|(g, _)| *g).collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
            grants.requested.push(word.clone());
        }
        if !raw.env.is_empty() && !grants.allows("environ_get") {
            return self.error(
                Some(raw.env[0].span()),
                format!(
                    "{}: variables are listed but `env` is not in wasi.allow, so the guest could not read them",
                    key("wasi.env")
                ),
            );
        }
        for var in &raw.env {
            let name = var.get_ref();
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return self.error(
                    Some(var.span()),
                    format!("{}: `{name}` is not a variable name", key("wasi.env")),
                );
            }
            match std::env::var(name) {
                Ok(value) => {
                    grants.env.insert(name.clone(), value);
                }
                Err(_) => grants.env_missing.push(name.clone()),
            }
        }
        for p in &raw.preopens {
            let span = Some(p.span());
            let p = p.get_ref();
            if !grants.allows("path_open") {
                return self.error(
                    span,
                    format!(
                        "{}: `{}` is preopened but `fs_read` is not in wasi.allow, so the guest could not open it",
                        key("wasi.preopens"),
                        p.guest
                    ),
                );
            }
            if p.mode == Access::ReadWrite && !grants.allows("fd_write") {
                return self.error(
                    span,
                    format!(
                        "{}: `{}` is mode \"rw\" but `fs_write` is not in wasi.allow, so writes would be refused",
                        key("wasi.preopens"),
                        p.guest
                    ),
                );
            }
            if !p.guest.starts_with('/') || p.guest.split('/').any(|c| c == "..") {
                return self.error(
                    span,
                    format!(
                        "{}: guest path `{}` must be absolute and must not contain `..`",
                        key("wasi.preopens"),
                        p.guest
                    ),
                );
            }
            let host = self.relative(&p.host);
            let host = match host.canonicalize() {
                Ok(h) if h.is_dir() => h,
                Ok(_) => {
                    return self.error(
                        span,
                        format!(
                            "{}: host path {} is not a directory",
                            key("wasi.preopens"),
                            host.display()
                        ),
                    );
                }
                Err(e) => {
                    return self.error(
                        span,
                        format!(
                            "{}: host path {}: {e}",
                            key("wasi.preopens"),
                            host.display()
                        ),
                    );
                }
            };
            grants.preopens.push(Preopen {
                host,
                guest: p.guest.clone(),
                access: p.mode,
            });
        }
        Ok(grants)
    }

    fn egress(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: Option<RawEgress>,
    ) -> Result<EgressSettings, ConfigError> {
        let mut egress = EgressSettings::default();
        let Some(raw) = raw else {
            return Ok(egress);
        };
        for prefix in &raw.allow {
            let rule = EgressRule::parse(prefix.get_ref()).or_else(|m| {
                self.error(Some(prefix.span()), format!("{}: {m}", key("egress.allow")))
            })?;
            egress.allow.push(rule);
        }
        for c in &raw.credentials {
            let span = Some(c.span());
            let c = c.get_ref();
            let prefix = EgressRule::parse(&c.prefix).or_else(|m| {
                self.error(
                    span.clone(),
                    format!("{}: {m}", key("egress.credentials.prefix")),
                )
            })?;
            if !egress.allow.iter().any(|rule| rule.covers(&prefix)) {
                return self.error(
                    span,
                    format!(
                        "{}: `{}` is not within egress.allow, so this credential would never be sent",
                        key("egress.credentials.prefix"),
                        c.prefix
                    ),
                );
            }
            let header = c.header.to_ascii_lowercase();
            if header.is_empty()
                || !header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            {
                return self.error(
                    span,
                    format!(
                        "{}: `{}` is not a header name",
                        key("egress.credentials.header"),
                        c.header
                    ),
                );
            }
            let (value, source) = match (&c.value_env, &c.value_file) {
                (Some(var), None) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => (v, format!("env {var}")),
                    _ => {
                        return self.error(
                            span,
                            format!(
                                "{}: environment variable `{var}` is not set",
                                key("egress.credentials.value_env")
                            ),
                        );
                    }
                },
                (None, Some(file)) => {
                    let path = self.relative(file);
                    match std::fs::read_to_string(&path) {
                        Ok(v) if !v.trim_end_matches(['\r', '\n']).is_empty() => (
                            v.trim_end_matches(['\r', '\n']).to_owned(),
                            format!("file {}", path.display()),
                        ),
                        Ok(_) => {
                            return self.error(
                                span,
                                format!(
                                    "{}: {} is empty",
                                    key("egress.credentials.value_file"),
                                    path.display()
                                ),
                            );
                        }
                        Err(e) => {
                            return self.error(
                                span,
                                format!(
                                    "{}: {}: {e}",
                                    key("egress.credentials.value_file"),
                                    path.display()
                                ),
                            );
                        }
                    }
                }
                _ => {
                    return self.error(
                        span,
                        format!(
                            "{}: give exactly one of `value_env` and `value_file`",
                            key("egress.credentials")
                        ),
                    );
                }
            };
            if http_value_invalid(&value) {
                return self.error(
                    span,
                    format!(
                        "{}: the value ({source}) is not a valid header value",
                        key("egress.credentials")
                    ),
                );
            }
            egress.credentials.push(Credential {
                prefix,
                header,
                value,
                source,
            });
        }
        egress.allow_redirects = raw.allow_redirects.unwrap_or(false);
        if let Some(v) = &raw.cache_ttl_ms {
            egress.cache_ttl = Some(Duration::from_millis(self.ranged(
                &key("egress.cache_ttl_ms"),
                v,
                1,
                86_400_000,
            )?));
        }
        if let Some(v) = &raw.timeout_ms {
            egress.timeout = Duration::from_millis(self.ranged(
                &key("egress.timeout_ms"),
                v,
                1,
                MAX_TIMEOUT_MS,
            )?);
        }
        if let Some(v) = &raw.max_response_bytes {
            egress.max_response_bytes =
                self.ranged(&key("egress.max_response_bytes"), v, 1, 1 << 30)?;
        }
        if let Some(v) = &raw.max_calls {
            egress.max_calls = self.ranged(&key("egress.max_calls"), &v.map_u64(), 0, 1000)? as u32;
        }
        Ok(egress)
    }
}

/// `header:NAME` or `input:a.b.c`.
fn parse_sticky(text: &str) -> Result<StickyKey, String> {
    if let Some(header) = text.strip_prefix("header:") {
        let header = header.to_ascii_lowercase();
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(format!("`{text}`: `{header}` is not a header name"));
        }
        return Ok(StickyKey::Header(header));
    }
    if let Some(path) = text.strip_prefix("input:") {
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!(
                "`{text}`: the input path must be field names separated by '.', like input:subject.id"
            ));
        }
        return Ok(StickyKey::Input(segments));
    }
    Err(format!(
        "`{text}` must be \"header:NAME\" or \"input:FIELD.PATH\""
    ))
}

/// Whether a URL's host is a loopback address (`localhost` included).
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn http_value_invalid(value: &str) -> bool {
    value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

trait SpannedU32 {
    fn map_u64(&self) -> Spanned<u64>;
}

impl SpannedU32 for Spanned<u32> {
    fn map_u64(&self) -> Spanned<u64> {
        Spanned::new(self.span(), u64::from(*self.get_ref()))
    }
}
