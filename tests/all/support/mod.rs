//! The test harness every behaviour module borrows: the example guests built
//! once, temporary configs and modules, the library loaded in process, and
//! `eventually()`, the one way a test waits for something. The real processes
//! and peers live in the submodules (daemon, nginx, Caddy, OTLP receivers,
//! ext_authz client, CLI runs, WAT guests, the services bridged calls reach,
//! the language guests' shared module caches).

#![allow(dead_code)]

pub mod caddy;
pub mod cli;
pub mod daemon;
pub mod ext_authz;
pub mod guests;
pub mod languages;
pub mod nginx;
pub mod otlp;
pub mod services;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use caddy::start_caddy;
pub use cli::{Eval, sandgate, stdout_json};
pub use daemon::{ALICE_READS, Daemon, client, daemon_config, json_body, rbac_policy, wat_policy};
pub use ext_authz::{ExtAuthzClient, check_request, envoy_check_request, response_headers};
pub use guests::{
    ALLOW_RESULT, DENY_RESULT, abi_guest, allow_if, code_guest, response_guest, spinning_guest,
};
pub use languages::{Seeded, SharedCache};
pub use nginx::{Backend, free_port, start_nginx};
pub use services::{decide_service, serve};

/// How often `eventually` looks again.
const POLL: Duration = Duration::from_millis(20);

/// Awaits `attempt` until it returns `Ok`, looking again every few
/// milliseconds; after `within` the test fails naming `what` it waited for
/// and the last state `attempt` reported in its `Err`.
pub async fn eventually<T>(
    within: Duration,
    what: impl Display,
    mut attempt: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(done) => return done,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not so after {within:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// `eventually` for code outside the async runtime (child processes,
/// blocking sockets): the same deadline and failure message.
pub fn eventually_blocking<T>(
    within: Duration,
    what: impl Display,
    attempt: impl FnMut() -> Result<T, String>,
) -> T {
    poll_blocking(within, attempt)
        .unwrap_or_else(|last| panic!("{what}: not so after {within:?}; last seen: {last}"))
}

/// Calls `attempt` until it returns `Ok` or `within` has passed, then
/// returns the last `Err`: for a caller that reports a timeout itself.
pub fn poll_blocking<T>(
    within: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + within;
    loop {
        match attempt() {
            Ok(done) => return Ok(done),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("sandbox/ has a parent")
        .to_path_buf()
}

/// The `sandgate` binary under test.
pub fn sandgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sandgate"))
}

/// Where the example guests are built (kept apart from the host's target dir).
pub fn guests_dir() -> PathBuf {
    repo_root().join("target").join("guests")
}

/// Path of a built example guest (`rbac`, `abac_owner`, `snoop`, `introspect`,
/// `remote_decision`, the proxy-wasm filters `proxy_wasm_apikey`,
/// `proxy_wasm_authcall`, `proxy_wasm_hostile`), building all of them for wasm32-wasip1 on first use.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(repo_root())
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "-p",
                "rbac",
                "-p",
                "abac-owner",
                "-p",
                "snoop",
                "-p",
                "introspect",
                "-p",
                "remote-decision",
                "-p",
                "proxy-wasm-apikey",
                "-p",
                "proxy-wasm-authcall",
                "-p",
                "proxy-wasm-hostile",
                "--target-dir",
            ])
            .arg(guests_dir())
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "building the example guests failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    guests_dir()
        .join("wasm32-wasip1")
        .join("release")
        .join(format!("{name}.wasm"))
}

/// A temporary directory that lives as long as the value.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sandgate-test-")
        .tempdir()
        .expect("temp dir")
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create parent dir");
    }
    std::fs::write(&path, text).expect("write file");
    path
}

/// Reads a JSON-lines audit file.
pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// Waits until the JSON-lines audit file at `path` holds a line `found`
/// accepts (the audit writer is asynchronous), and returns that line.
pub async fn audit_line_where(
    path: &Path,
    what: &str,
    found: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(
        Duration::from_secs(10),
        format!("{what} reached {}", path.display()),
        async || {
            let lines = audit_lines(path);
            match lines.iter().find(|l| found(l)) {
                Some(line) => Ok(line.clone()),
                None => Err(format!("{} lines", lines.len())),
            }
        },
    )
    .await
}

/// Writes a config file into `dir` and parses it with the library.
pub fn config(dir: &Path, toml: &str) -> (PathBuf, sandgate::Config) {
    let path = write(dir, "sandgate.toml", toml);
    let config = sandgate::config::load(&path).unwrap_or_else(|e| panic!("config must load: {e}"));
    (path, config)
}

/// An engine with its module cache in `cache`.
pub fn engine(cache: &Path) -> sandgate::Engine {
    let settings = sandgate::config::EngineSettings {
        cache_dir: Some(cache.to_path_buf()),
        ..Default::default()
    };
    sandgate::Engine::new(&settings).expect("engine")
}

/// Loads the first policy of `toml` (written into `dir`) and evaluates `input`,
/// recording audit lines into `dir/audit.jsonl`.
pub async fn evaluate_once(
    dir: &Path,
    toml: &str,
    input: &str,
) -> (sandgate::Evaluation, Vec<serde_json::Value>) {
    let (_, config) = config(dir, toml);
    let engine = engine(&dir.join("cache"));
    let policy = sandgate::Policy::load(&engine, config.policies[0].clone())
        .await
        .unwrap_or_else(|e| panic!("policy must load: {e}"));
    let audit_path = dir.join("audit.jsonl");
    let audit =
        sandgate::audit::AuditLog::open(&sandgate::config::AuditTarget::File(audit_path.clone()))
            .expect("audit log");
    let evaluation = policy
        .evaluate(input.as_bytes(), &sandgate::EvalOptions::default(), &audit)
        .await;
    audit.flush();
    (evaluation, audit_lines(&audit_path))
}

/// The single-policy config of a module file with `extra` policy keys/tables.
pub fn policy_toml(module: &Path, extra: &str) -> String {
    format!(
        "[[policy]]\nname = \"p\"\nmodule = \"{}\"\n{extra}\n",
        module.display()
    )
}
