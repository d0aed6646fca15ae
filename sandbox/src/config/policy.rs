//! The resolved model of one policy: where its module comes from and its
//! digest, its versions and routing, its decision cache and its WASI grants.
//! Built by `resolve` (or `PolicySpec::for_module`); read by `policy`,
//! `engine`, `wasi`, `server` and `main`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{EgressSettings, defaults};
use crate::decision::FailMode;
use crate::language::{Language, LanguageSpec};

/// Where a policy's module comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleSource {
    File(PathBuf),
    Url(String),
    /// The guest built into sandgate for a policy language.
    Builtin(Language),
}

impl fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleSource::File(p) => write!(f, "{}", p.display()),
            ModuleSource::Url(u) => f.write_str(u),
            ModuleSource::Builtin(l) => write!(f, "built-in {l} guest"),
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
    /// The ABI the module speaks, with what it needs (`abi`, `plugin_config`,
    /// `[policy.proxy_wasm.clusters]`).
    pub abi: Abi,
    /// `engine = "rego"`: the language, files and entrypoint; `None` for a module.
    pub language: Option<LanguageSpec>,
}

/// The ABI a policy's module speaks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Abi {
    /// The guest ABI v1 of DESIGN §2 (`abi = "sandgate-v1"`, the default).
    #[default]
    SandgateV1,
    /// A proxy-wasm filter, ABI 0.2.x (`abi = "proxy-wasm"`, DESIGN §2b).
    ProxyWasm(ProxyWasmSettings),
}

impl Abi {
    /// The name as written in the config.
    pub fn as_str(&self) -> &'static str {
        match self {
            Abi::SandgateV1 => "sandgate-v1",
            Abi::ProxyWasm(_) => "proxy-wasm",
        }
    }
}

/// What a proxy-wasm filter is configured with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyWasmSettings {
    /// The bytes `on_configure` reads as its plugin configuration (shared:
    /// every store of the filter holds it).
    pub plugin_config: std::sync::Arc<str>,
    /// `dispatch_http_call` cluster name -> base URL (no trailing `/`),
    /// each within `[policy.egress] allow`.
    pub clusters: std::sync::Arc<BTreeMap<String, String>>,
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
            abi: Abi::default(),
            language: None,
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
        spec.language = None;
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
