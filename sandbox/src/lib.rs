//! sandgate: a policy sandbox runtime. Guest policy modules (WebAssembly,
//! WASI preview 1) run in a capability-restricted sandbox and answer
//! authorization questions; see `DESIGN.md` for the contracts.
//!
//! Data flows one way: caller → `policy` (pick, evaluate) → `engine`/`abi`
//! (instantiate, run) → `decision`; `wasi` and `audit` are called from inside
//! that path.

pub mod abi;
pub mod audit;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod decision;
pub mod engine;
pub mod fetch;
pub mod host;
pub mod language;
pub mod policy;
pub mod preview1;
pub mod probes;
pub mod proxywasm;
pub mod seccomp;
pub mod server;
pub mod telemetry;
pub mod wasi;

pub use config::{Config, PolicySpec};

/// Installs ring as the process's rustls provider; reqwest (fetch, the
/// OTLP/HTTP exporter) and the bridge's client are built without one.
/// Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
pub use decision::{Decision, ErrorCode, FailMode};
pub use engine::Engine;
pub use policy::{EvalOptions, Evaluation, Policy, Registry};
