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
    pub policies: Vec<PolicySpec>,
}

#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub grpc_listen: Option<SocketAddr>,
    pub max_body_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Clone, Debug)]
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

#[derive(Clone, Debug)]
pub struct TelemetrySettings {
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// Share of new traces recorded (0.0 to 1.0); a caller's sampled flag wins.
    pub sampling_ratio: f64,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Guest `log` calls at or above this level (0 trace … 4 error) become span events.
    pub guest_log_level: i32,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            sampling_ratio: 1.0,
            service_name: "sandgate".to_owned(),
            guest_log_level: 2,
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

/// Settings of the shared wasmtime engine.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Where compiled modules are cached; `None` disables the disk cache.
    pub cache_dir: Option<PathBuf>,
    /// The largest linear memory any policy may be given (pool slot size).
    pub max_memory_bytes: u64,
    /// Instances that may be live at once across all policies.
    pub max_instances: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            cache_dir: default_cache_dir(),
            max_memory_bytes: defaults::ENGINE_MAX_MEMORY_MB << 20,
            max_instances: defaults::ENGINE_MAX_INSTANCES,
        }
    }
}

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

/// One policy, validated.
#[derive(Clone, Debug)]
pub struct PolicySpec {
    pub name: String,
    pub version: String,
    pub module: ModuleSource,
    pub sha256: Option<Digest>,
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
        PolicySpec {
            name,
            version: defaults::VERSION.to_owned(),
            module: ModuleSource::File(path.to_path_buf()),
            sha256: None,
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

// ---- raw TOML mirror -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    audit: Option<RawAudit>,
    telemetry: Option<RawTelemetry>,
    ebpf: Option<RawEbpf>,
    engine: Option<RawEngine>,
    #[serde(default)]
    policy: Vec<RawPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    grpc_listen: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<u64>>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    version: Option<Spanned<String>>,
    module: Spanned<String>,
    sha256: Option<Spanned<String>>,
    timeout_ms: Option<Spanned<u64>>,
    memory_limit_mb: Option<Spanned<u64>>,
    max_input_bytes: Option<Spanned<u64>>,
    max_output_bytes: Option<Spanned<u64>>,
    max_in_flight: Option<Spanned<u32>>,
    fail_mode: Option<FailMode>,
    wasi: Option<RawWasi>,
    egress: Option<RawEgress>,
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
            policies,
        })
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
        let Some(raw) = raw else {
            return Ok(ServerSettings {
                listen: default_listen,
                grpc_listen: None,
                max_body_bytes: defaults::MAX_INPUT_BYTES,
            });
        };
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
        Ok(ServerSettings {
            listen,
            grpc_listen,
            max_body_bytes,
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
        Ok(TelemetrySettings {
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
            settings.cache_dir = Some(self.relative(dir.get_ref()));
        }
        if raw.cache == Some(false) {
            settings.cache_dir = None;
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
        let version = match &raw.version {
            Some(v) if v.get_ref().is_empty() => {
                return self.error(
                    Some(v.span()),
                    format!("{}: must not be empty", key("version")),
                );
            }
            Some(v) => v.get_ref().clone(),
            None => defaults::VERSION.to_owned(),
        };
        let sha256 = match &raw.sha256 {
            Some(s) => Some(
                Digest::parse(s.get_ref())
                    .or_else(|m| self.error(Some(s.span()), format!("{}: {m}", key("sha256"))))?,
            ),
            None => None,
        };
        let module_text = raw.module.get_ref();
        let module = if module_text.starts_with("https://") || module_text.starts_with("http://") {
            if sha256.is_none() {
                return self.error(
                    Some(raw.module.span()),
                    format!(
                        "{}: a module fetched from a URL must be pinned with `sha256`",
                        key("module")
                    ),
                );
            }
            ModuleSource::Url(module_text.clone())
        } else if module_text.is_empty() {
            return self.error(
                Some(raw.module.span()),
                format!("{}: must not be empty", key("module")),
            );
        } else {
            ModuleSource::File(self.relative(module_text))
        };
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
        Ok(PolicySpec {
            name,
            version,
            module,
            sha256,
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
