//! Configuration: parses the TOML of DESIGN §5 into raw structs that mirror it
//! exactly (unknown keys refused), then resolves them into the validated types
//! the runtime uses (`Config`, `PolicySpec`, `Grants`, …). After `load` nothing
//! else in the daemon looks at raw strings: every error names the file, line
//! and key at fault.
//!
//! `raw` mirrors the TOML, `resolve` turns it into the model (`settings`,
//! `policy`, `egress`); the rest of the crate imports `crate::config::X`.

use std::path::PathBuf;

mod egress;
mod policy;
mod raw;
mod resolve;
mod settings;

pub use egress::{Credential, EgressRule, EgressSettings};
pub use policy::{
    Abi, Access, DecisionCacheSettings, Digest, Grants, ModuleSource, OnDenied, PolicySpec,
    Preopen, ProxyWasmSettings, Routing, StickyKey, VersionSpec,
};
pub use resolve::{load, parse};
pub use settings::{
    AuditSettings, AuditTarget, Config, DOWNLOADS_SUBDIR, EbpfMode, EngineSettings,
    ForwardAuthHeaders, MaxConnections, OtlpProtocol, ReloadSettings, ServerSettings,
    TelemetrySettings, default_cache_dir,
};

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
