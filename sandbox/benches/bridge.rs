//! The HTTP bridge's cost: one evaluation whose guest makes one bridged call
//! to a decision service on loopback (a minimal WAT guest, and the
//! `remote-decision` example), next to the same request sent directly by a
//! reqwest client in the host. Bridged minus direct is what the sandbox adds
//! to a call: instantiation, the ABI crossings, the allowlist check, the JSON
//! and base64 documents, and the difference between the bridge's own
//! connection handling (driven inside the evaluation) and reqwest's (a task
//! per connection). Results and the command are in `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use criterion::{Criterion, criterion_group, criterion_main};

/// The question every variant sends, and the service's answer.
const QUESTION: &str = r#"{"subject":"alice","object":"/orders/7","action":"read"}"#;
const ANSWER: &str = r#"{"allow":true}"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn build_guests() {
    let status = Command::new(repo_root().join("scripts/build-guests"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/build-guests: {e}"));
    assert!(status.success(), "building the example guests failed");
}

/// A decision service answering [`ANSWER`] to `POST /v1/decide`; returns its URL.
async fn decision_service() -> String {
    let app = axum::Router::new().route(
        "/v1/decide",
        axum::routing::post(|| async { ([("content-type", "application/json")], ANSWER) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("address: {e}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v1/decide")
}

/// A guest that posts [`QUESTION`] to `url`, reads the whole response and
/// allows when the call succeeded: the bridge's cost with almost no guest work.
fn call_guest(url: &str) -> String {
    let request = serde_json::json!({
        "method": "POST",
        "url": url,
        "headers": [["content-type", "application/json"], ["accept", "application/json"]],
        "body": base64::engine::general_purpose::STANDARD.encode(QUESTION),
    })
    .to_string();
    let escaped = request.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"(module
  (import "sandgate" "http_send" (func $send (param i32 i32) (result i64)))
  (import "sandgate" "http_read" (func $read (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 1024) "{{\"allow\":true}}")
  (data (i32.const 1100) "{{\"allow\":false}}")
  (data (i32.const 2048) "{escaped}")
  (func (export "sandgate_abi_version") (result i32) i32.const 1)
  (func (export "sandgate_alloc") (param i32) (result i32) i32.const 65536)
  (func (export "sandgate_evaluate") (param i32 i32) (result i64)
    (local $n i64)
    (local.set $n (call $send (i32.const 2048) (i32.const {len})))
    (if (result i64) (i64.lt_s (local.get $n) (i64.const 0))
      (then i64.const 4724464025615)
      (else
        (drop (call $read (i32.const 8192) (i32.wrap_i64 (local.get $n))))
        i64.const 4398046511118))))"#,
        len = request.len()
    )
}

fn bench(c: &mut Criterion) {
    build_guests();
    // The service runs on a thread of its own, as a service in another
    // process would; both clients run on the benchmark's thread, reqwest's
    // connection task included, so each exchange wakes the service's thread
    // and is woken by it the same way on either side.
    let service = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let url = service.block_on(decision_service());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("call.wat"), call_guest(&url)).unwrap_or_else(|e| panic!("{e}"));
    let remote = repo_root().join("target/guests/wasm32-wasip1/release/remote_decision.wasm");
    // No response cache: every evaluation makes the real call.
    let egress = format!("[policy.egress]\nallow = [\"{url}\"]\ntimeout_ms = 1000\n");
    let config_path = dir.path().join("sandgate.toml");
    std::fs::write(
        &config_path,
        format!(
            "[[policy]]\nname = \"call\"\nmodule = \"call.wat\"\ntimeout_ms = 1000\n{egress}\n\
             [[policy]]\nname = \"remote-decision\"\nmodule = \"{}\"\ntimeout_ms = 1000\n\
             [policy.wasi]\nallow = [\"env\"]\nenv = [\"DECISION_URL\"]\n{egress}",
            remote.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut config = sandgate::config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    // The variable is read from the daemon's environment at load; give it
    // here rather than mutate this process's environment.
    config.policies[1]
        .grants
        .env
        .insert("DECISION_URL".to_owned(), url.clone());
    let engine = sandgate::Engine::new(&config.engine).unwrap_or_else(|e| panic!("{e}"));
    let load = |i: usize| {
        runtime
            .block_on(sandgate::Policy::load(&engine, config.policies[i].clone()))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (call, remote) = (load(0), load(1));
    let audit = sandgate::audit::AuditLog::disabled();
    let options = sandgate::EvalOptions::default();
    let input = QUESTION.as_bytes();

    for policy in [&call, &remote] {
        let check = runtime.block_on(policy.evaluate(input, &options, &audit));
        assert!(
            check.decision.allow && check.decision.error.is_none() && check.http_calls.len() == 1,
            "{}: {:?} {:?}",
            policy.name(),
            check.decision,
            check.http_calls
        );
    }

    // The same request from the host, with reqwest set up as the bridge's
    // client was before it had its own: no redirects, no proxy.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("reqwest client: {e}"));
    let direct = || async {
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .timeout(std::time::Duration::from_millis(1000))
            .body(QUESTION)
            .send()
            .await
            .unwrap_or_else(|e| panic!("direct call: {e}"));
        assert!(response.status().is_success());
        response
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("direct body: {e}"))
    };
    assert_eq!(runtime.block_on(direct()).as_ref(), ANSWER.as_bytes());

    let mut group = c.benchmark_group("bridge");
    group.bench_function("direct_reqwest", |b| {
        b.to_async(&runtime)
            .iter(|| async { std::hint::black_box(direct().await.len()) })
    });
    group.bench_function("bridged_wat", |b| {
        b.to_async(&runtime).iter(|| async {
            let e = call.evaluate(input, &options, &audit).await;
            std::hint::black_box(e.decision.allow)
        })
    });
    group.bench_function("bridged_remote_decision", |b| {
        b.to_async(&runtime).iter(|| async {
            let e = remote.evaluate(input, &options, &audit).await;
            std::hint::black_box(e.decision.allow)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
