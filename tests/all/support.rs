//! Shared test harness: builds the example guests once, writes temporary
//! configs and modules, runs the `sandgate` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

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

/// Runs `sandgate` with `args`, with a private module cache.
pub fn sandgate(args: &[&str], cache: &Path) -> Output {
    sandgate_with_stdin(args, cache, None)
}

pub fn sandgate_with_stdin(args: &[&str], cache: &Path, stdin: Option<&[u8]>) -> Output {
    sandgate_with_env(args, cache, stdin, &[])
}

/// Runs `sandgate` with extra environment variables.
pub fn sandgate_with_env(
    args: &[&str],
    cache: &Path,
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> Output {
    use std::io::Write;
    let mut child = Command::new(sandgate_bin())
        .args(args)
        .envs(env.iter().copied())
        .env("SANDGATE_CACHE_DIR", cache)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sandgate");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("wait for sandgate")
}

/// Parses the decision JSON a command printed on stdout.
pub fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Reads a JSON-lines audit file.
pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// A WAT guest speaking ABI v1 whose `sandgate_evaluate` body is `evaluate`
/// (params `$ptr $len`, result i64) and that may add `extra` module fields.
/// A bump allocator from 64 KiB; `{"allow":true}` is at 1024 (`ALLOW_RESULT`),
/// `{"allow":false}` at 1100 (`DENY_RESULT`).
pub fn abi_guest(extra: &str, evaluate: &str) -> String {
    format!(
        r#"(module
  {extra}
  (memory (export "memory") 2)
  (data (i32.const 1024) "{{\"allow\":true}}")
  (data (i32.const 1100) "{{\"allow\":false}}")
  (global $next (mut i32) (i32.const 65536))
  (func (export "sandgate_abi_version") (result i32) i32.const 1)
  (func (export "sandgate_alloc") (param $n i32) (result i32)
    (local $p i32)
    global.get $next local.set $p
    global.get $next local.get $n i32.add global.set $next
    local.get $p)
  (func (export "sandgate_evaluate") (param $ptr i32) (param $len i32) (result i64)
    {evaluate})
)"#
    )
}

/// The packed result pointing at the `{"allow":true}` document.
pub const ALLOW_RESULT: &str = "i64.const 4398046511118"; // (1024 << 32) | 14

/// The packed result pointing at the `{"allow":false}` document.
pub const DENY_RESULT: &str = "i64.const 4724464025615"; // (1100 << 32) | 15

/// `evaluate` body answering allow when the i32 `cond` expression is non-zero.
pub fn allow_if(cond: &str) -> String {
    format!("(if (result i64) {cond} (then {ALLOW_RESULT}) (else {DENY_RESULT}))")
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
