//! Policy lifecycle with the real daemon: hot reload (file changes, SIGHUP,
//! `POST /v1/reload`) that applies whole or not at all while traffic flows,
//! versions routed by weight, header and sticky key, modules fetched by URL
//! through the download cache, and the decision cache.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// A guest that allows with `reason` = `tag`, so an answer tells which module gave it.
fn tagged_guest(tag: &str) -> String {
    let document = format!(r#"{{"allow":true,"reason":"{tag}"}}"#);
    let packed = (2048u64 << 32) | document.len() as u64;
    abi_guest(
        &format!(
            r#"(data (i32.const 2048) "{}")"#,
            document.replace('"', "\\\"")
        ),
        &format!("i64.const {packed}"),
    )
}

/// A guest without `sandgate_abi_version`: compiles, but is refused at load.
fn guest_without_abi_version() -> String {
    r#"(module
  (memory (export "memory") 1)
  (func (export "sandgate_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "sandgate_evaluate") (param i32 i32) (result i64) i64.const 0))"#
        .to_owned()
}

/// Replaces `path` whole (temporary file + rename), as deploy tools do.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).expect("write temporary file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// The daemon config of one policy `p` with `version` and `module`, and `extra` policy keys.
fn single_version(dir: &Path, server: &str, version: &str, module: &Path, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[audit]\npath = \"{}\"\n\n[[policy]]\nname = \"p\"\nversion = \"{version}\"\nmodule = \"{}\"\n{extra}\n",
        dir.join("audit.jsonl").display(),
        module.display()
    )
}

async fn evaluate(client: &reqwest::Client, daemon: &Daemon, policy: &str) -> (u16, Value) {
    daemon.evaluate(client, policy, "{}").await
}

async fn reload(client: &reqwest::Client, daemon: &Daemon) -> (u16, Value) {
    let response = client
        .post(daemon.url("/v1/reload"))
        .send()
        .await
        .expect("reload");
    let status = response.status().as_u16();
    (status, json_body(response).await)
}

async fn metrics(client: &reqwest::Client, daemon: &Daemon) -> String {
    daemon.metrics(client).await
}

/// How one reload of the load test changes the files.
enum Step {
    /// A good module, answering with this tag.
    Good(&'static str),
    /// A module that does not compile.
    NotWasm,
    /// The right module with a wrong pin.
    DigestMismatch,
    /// A module without `sandgate_abi_version`.
    MissingExport,
    /// A config with an unknown key.
    UnknownKey,
    /// A setting that needs a restart.
    ListenChanged,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_no_request_and_failed_reloads_change_nothing() {
    let dir = tempdir();
    let path = dir.path();
    let modules = [
        ("a", write(path, "a.wat", &tagged_guest("a"))),
        ("b", write(path, "b.wat", &tagged_guest("b"))),
    ];
    let not_wasm = write(path, "broken.wasm", "this is not wasm");
    let no_abi = write(path, "no-abi.wat", &guest_without_abi_version());
    let server = "[reload]\nwatch = false\n";
    let config = write(
        path,
        "sandgate.toml",
        &single_version(path, server, "g0", &modules[0].1, ""),
    );
    let daemon = Daemon::start(&config, &path.join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let (_, first) = evaluate(&client, &daemon, "p").await;
    assert_eq!(first["version"], "g0", "{first}");
    assert_eq!(first["reason"], "a");

    // Continuous load: every answer must be a clean allow.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (client, url) = (client.clone(), daemon.url("/v1/policies/p/evaluate"));
        let (stop, answered, failures) = (
            Arc::clone(&stop),
            Arc::clone(&answered),
            Arc::clone(&failures),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = client.post(&url).body("{}").send().await;
                let failed = match result {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let body = json_body(response).await;
                        (status != 200 || body["allow"] != true || body.get("error").is_some())
                            .then(|| format!("{status} {body}"))
                    }
                    Err(e) => Some(format!("request failed: {e}")),
                };
                answered.fetch_add(1, Ordering::Relaxed);
                if let Some(failure) = failed {
                    failures.lock().expect("failures").push(failure);
                }
            }
        }));
    }

    let steps = [
        Step::Good("b"),
        Step::NotWasm,
        Step::Good("a"),
        Step::DigestMismatch,
        Step::Good("b"),
        Step::MissingExport,
        Step::Good("a"),
        Step::UnknownKey,
        Step::Good("b"),
        Step::ListenChanged,
        Step::Good("a"),
        Step::Good("b"),
        Step::NotWasm,
        Step::Good("a"),
        Step::Good("b"),
        Step::DigestMismatch,
        Step::Good("a"),
        Step::MissingExport,
        Step::Good("b"),
        Step::Good("a"),
    ];
    let (mut ok, mut failed) = (0, 0);
    let mut serving = ("g0".to_owned(), "a");
    let mut generation = 1;
    for (i, step) in steps.iter().enumerate() {
        let version = format!("g{}", i + 1);
        let module_of = |tag: &str| {
            &modules
                .iter()
                .find(|(t, _)| *t == tag)
                .expect("module tag")
                .1
        };
        let text = match step {
            Step::Good(tag) => single_version(path, server, &version, module_of(tag), ""),
            Step::NotWasm => single_version(path, server, &version, &not_wasm, ""),
            Step::DigestMismatch => single_version(
                path,
                server,
                &version,
                module_of("a"),
                &format!("sha256 = \"{}\"", "0".repeat(64)),
            ),
            Step::MissingExport => single_version(path, server, &version, &no_abi, ""),
            Step::UnknownKey => {
                single_version(path, server, &version, module_of("a"), "colour = \"blue\"")
            }
            Step::ListenChanged => single_version(path, server, &version, module_of("a"), "")
                .replace("127.0.0.1:0", "127.0.0.1:1"),
        };
        write_atomic(&config, &text);
        let (status, record) = reload(&client, &daemon).await;
        let (_, answer) = evaluate(&client, &daemon, "p").await;
        match step {
            Step::Good(tag) => {
                ok += 1;
                generation += 1;
                assert_eq!(status, 200, "step {i}: {record}");
                assert_eq!(record["result"], "ok");
                assert_eq!(record["generation"], generation);
                assert_eq!(record["policies"]["p"][0]["version"], version.as_str());
                assert_eq!(answer["version"], version.as_str(), "step {i}: {answer}");
                assert_eq!(answer["reason"], *tag, "step {i}: {answer}");
                serving = (version, tag);
            }
            _ => {
                failed += 1;
                assert_eq!(status, 422, "step {i}: {record}");
                assert_eq!(record["result"], "failed");
                assert_eq!(record["generation"], generation, "nothing was applied");
                let error = record["error"].as_str().unwrap_or_default();
                let expected = match step {
                    Step::NotWasm => "does not compile",
                    Step::DigestMismatch => "but the config pins",
                    Step::MissingExport => "sandgate_abi_version",
                    Step::UnknownKey => "colour",
                    Step::ListenChanged => "server.listen",
                    Step::Good(_) => unreachable!(),
                };
                assert!(
                    error.contains(expected),
                    "step {i}: {expected} not in {error}"
                );
                // The previous generation still answers.
                assert_eq!(answer["version"], serving.0.as_str(), "step {i}: {answer}");
                assert_eq!(answer["reason"], serving.1, "step {i}: {answer}");
                let (ready_status, ready) = daemon.readyz(&client).await;
                assert_eq!(ready_status, 200, "a failed reload keeps the daemon ready");
                assert_eq!(ready["last_reload"]["result"], "failed", "{ready}");
                assert!(
                    ready["last_reload"]["error"]
                        .as_str()
                        .is_some_and(|e| e.contains(expected)),
                    "{ready}"
                );
                assert!(
                    metrics(&client, &daemon)
                        .await
                        .contains("sandgate_last_reload_failed 1"),
                    "step {i}"
                );
            }
        }
    }

    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    let failures = std::mem::take(&mut *failures.lock().expect("failures"));
    let answered = answered.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {answered} requests failed during reloads: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(answered >= 20, "only {answered} requests ran");

    let text = metrics(&client, &daemon).await;
    for needle in [
        format!(r#"sandgate_reloads_total{{result="ok"}} {ok}"#),
        format!(r#"sandgate_reloads_total{{result="failed"}} {failed}"#),
        "sandgate_last_reload_failed 0".to_owned(),
        format!("sandgate_config_generation {generation}"),
        format!(
            r#"sandgate_decisions_total{{policy="p",version="{}",allow="true",error="none"}}"#,
            serving.0
        ),
    ] {
        assert!(
            text.contains(&needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }
    // Failures are logged.
    daemon.logged("reload failed; generation").await;
}

/// Polls `/v1/policies/p/evaluate` until `done` holds for the answer.
async fn wait_for_answer(
    client: &reqwest::Client,
    daemon: &Daemon,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    eventually(
        Duration::from_secs(20),
        daemon.waiting_for(what),
        async || {
            let (_, answer) = evaluate(client, daemon, "p").await;
            if done(&answer) {
                Ok(answer)
            } else {
                Err(format!("answer {answer}"))
            }
        },
    )
    .await
}

#[tokio::test]
async fn changed_module_and_config_files_are_reloaded_without_a_signal() {
    let dir = tempdir();
    let path = dir.path();
    let module = write(path, "policy.wat", &tagged_guest("one"));
    let server = "[reload]\ndebounce_ms = 50\n";
    let config = write(
        path,
        "sandgate.toml",
        &single_version(path, server, "v1", &module, ""),
    );
    let daemon = Daemon::start(&config, &path.join("cache"));
    let client = client();
    daemon.ready(&client).await;

    // The module file is rewritten in place: the new module answers.
    std::fs::write(&module, tagged_guest("two")).expect("rewrite module");
    wait_for_answer(&client, &daemon, "rewritten module", |a| {
        a["reason"] == "two"
    })
    .await;

    // The config file is replaced by rename: its new version name answers.
    write_atomic(&config, &single_version(path, server, "v2", &module, ""));
    let answer =
        wait_for_answer(&client, &daemon, "renamed config", |a| a["version"] == "v2").await;
    assert_eq!(answer["reason"], "two");

    // A broken module is refused; the last good one keeps answering.
    std::fs::write(&module, "not wasm any more").expect("break module");
    let ready = daemon
        .until_readyz(&client, "a failed reload", |_, ready| {
            ready["last_reload"]["result"] == "failed"
        })
        .await;
    assert!(ready["last_reload"]["trigger"] == "file change", "{ready}");
    let (status, answer) = evaluate(&client, &daemon, "p").await;
    assert_eq!(status, 200);
    assert_eq!(answer["reason"], "two", "{answer}");
    assert_eq!(answer["version"], "v2");
    assert!(
        metrics(&client, &daemon)
            .await
            .contains("sandgate_last_reload_failed 1")
    );

    // Fixed again: served again.
    std::fs::write(&module, tagged_guest("three")).expect("fix module");
    wait_for_answer(&client, &daemon, "fixed module", |a| a["reason"] == "three").await;
}

#[tokio::test]
async fn sighup_reloads_the_config_and_still_reopens_the_audit_log() {
    let dir = tempdir();
    let path = dir.path();
    let module = write(path, "policy.wat", &tagged_guest("one"));
    let server = "[reload]\nwatch = false\n";
    let config = write(
        path,
        "sandgate.toml",
        &single_version(path, server, "v1", &module, ""),
    );
    let daemon = Daemon::start(&config, &path.join("cache"));
    // The yardstick: a daemon that does watch its config, with a longer quiet
    // time than the default one the unwatched daemon would use were it watching.
    let watched_dir = path.join("watched");
    let watching = "[reload]\ndebounce_ms = 400\n";
    let watched_config = write(
        &watched_dir,
        "sandgate.toml",
        &single_version(&watched_dir, watching, "v1", &module, ""),
    );
    let watched = Daemon::start(&watched_config, &watched_dir.join("cache"));
    let client = client();
    daemon.ready(&client).await;
    watched.ready(&client).await;
    let (_, before) = evaluate(&client, &daemon, "p").await;
    assert_eq!(before["version"], "v1");

    let other = write(path, "other.wat", &tagged_guest("two"));
    write_atomic(&config, &single_version(path, server, "v2", &other, ""));
    write_atomic(
        &watched_config,
        &single_version(&watched_dir, watching, "v2", &other, ""),
    );
    // Not watched: nothing changes until the signal, though a watching daemon
    // has long seen the same change.
    wait_for_answer(&client, &watched, "the watching daemon's reload", |a| {
        a["version"] == "v2"
    })
    .await;
    let (_, still) = evaluate(&client, &daemon, "p").await;
    assert_eq!(still["version"], "v1");

    std::fs::rename(path.join("audit.jsonl"), path.join("audit.jsonl.1")).expect("rotate");
    daemon.signal("HUP");
    let after = wait_for_answer(&client, &daemon, "SIGHUP reload", |a| a["version"] == "v2").await;
    assert_eq!(after["reason"], "two");
    let (_, ready) = daemon.readyz(&client).await;
    assert_eq!(ready["last_reload"]["trigger"], "sighup", "{ready}");
    assert_eq!(ready["generation"], 2);
    let audit = path.join("audit.jsonl");
    let line = audit_line_where(&audit, "the reopened audit log's line", |l| {
        l["decision_id"] == after["decision_id"]
    })
    .await;
    assert_eq!(line["version"], "v2");
}

/// Policy `orders` with versions `v1` (tag one) and `v2` (tag two) at
/// `weights`, sticky by `sticky`, and a second policy `byinput` sticky by an
/// input field with the same versions.
fn versioned_config(dir: &Path, weights: (u32, u32)) -> String {
    let one = write(dir, "one.wat", &tagged_guest("one"));
    let two = write(dir, "two.wat", &tagged_guest("two"));
    let versions = format!(
        "[[policy.version]]\nname = \"v1\"\nmodule = \"{}\"\nweight = {}\n\n[[policy.version]]\nname = \"v2\"\nmodule = \"{}\"\nweight = {}\n",
        one.display(),
        weights.0,
        two.display(),
        weights.1
    );
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[reload]\nwatch = false\n[audit]\npath = \"{}\"\n\n[[policy]]\nname = \"orders\"\nsticky = \"header:x-user\"\n{versions}\n[[policy]]\nname = \"byinput\"\nsticky = \"input:subject.id\"\n{versions}",
        dir.join("audit.jsonl").display(),
    )
}

async fn evaluate_with(
    client: &reqwest::Client,
    daemon: &Daemon,
    policy: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = client
        .post(daemon.url(&format!("/v1/policies/{policy}/evaluate")))
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("evaluate");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, json_body(response).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_routed_by_weight_header_and_sticky_key_and_named_everywhere() {
    let dir = tempdir();
    let path = dir.path();
    let config = write(path, "sandgate.toml", &versioned_config(path, (100, 0)));
    let mut daemon = Daemon::start(&config, &path.join("cache"));
    let client = client();
    let ready = daemon.ready(&client).await;
    let versions = &ready["policies"]["orders"]["versions"];
    assert_eq!(versions[0]["version"], "v1", "{ready}");
    assert_eq!(versions[1]["version"], "v2");
    assert_eq!(versions[1]["weight"], 0);

    // Weight 0: only the header reaches v2.
    for i in 0..20 {
        let user = format!("user-{i}");
        let (_, headers, answer) =
            evaluate_with(&client, &daemon, "orders", &[("x-user", &user)], "{}").await;
        assert_eq!(answer["version"], "v1", "{answer}");
        assert_eq!(answer["reason"], "one");
        assert_eq!(headers["x-sandgate-version"], "v1");
    }
    let (status, headers, answer) = evaluate_with(
        &client,
        &daemon,
        "orders",
        &[("x-sandgate-version", "v2")],
        "{}",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["version"], "v2");
    assert_eq!(answer["reason"], "two");
    assert_eq!(headers["x-sandgate-version"], "v2");
    let v2_decision = answer["decision_id"].clone();
    let (status, _, answer) = evaluate_with(
        &client,
        &daemon,
        "orders",
        &[("x-sandgate-version", "v9")],
        "{}",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_input");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no version `v9`") && m.contains("v1, v2")),
        "{answer}"
    );
    // Forward-auth reads the same header from the request it authorizes.
    let forwarded = client
        .get(daemon.url("/v1/authz/orders/api/x"))
        .header("x-sandgate-version", "v2")
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(forwarded.status(), 200);
    assert_eq!(forwarded.headers()["x-sandgate-version"], "v2");

    // Canary at 50/50: each user keeps one version, both versions serve.
    write_atomic(&config, &versioned_config(path, (50, 50)));
    let (status, record) = reload(&client, &daemon).await;
    assert_eq!(status, 200, "{record}");
    let mut on_v2 = Vec::new();
    for i in 0..100 {
        let user = format!("user-{i}");
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (_, _, answer) =
                evaluate_with(&client, &daemon, "orders", &[("x-user", &user)], "{}").await;
            seen.push(answer["version"].as_str().expect("version").to_owned());
        }
        assert!(seen.iter().all(|v| v == &seen[0]), "{user} saw {seen:?}");
        if seen[0] == "v2" {
            on_v2.push(user);
        }
    }
    assert!(
        (25..=75).contains(&on_v2.len()),
        "{} of 100 users on v2",
        on_v2.len()
    );
    // Sticky by an input field: the same subject always gets the same version.
    let mut by_input = std::collections::HashSet::new();
    for i in 0..40 {
        let body = format!(r#"{{"subject":{{"id":"u{i}"}},"action":"read"}}"#);
        let (_, _, first) = evaluate_with(&client, &daemon, "byinput", &[], &body).await;
        let (_, _, again) = evaluate_with(&client, &daemon, "byinput", &[], &body).await;
        assert_eq!(first["version"], again["version"], "u{i}");
        by_input.insert(first["version"].as_str().expect("version").to_owned());
    }
    assert_eq!(by_input.len(), 2, "both versions serve: {by_input:?}");
    // Without a sticky key, the draw uses the weights.
    let mut drawn = std::collections::HashSet::new();
    for _ in 0..40 {
        let (_, _, answer) = evaluate_with(&client, &daemon, "orders", &[], "{}").await;
        drawn.insert(answer["version"].as_str().expect("version").to_owned());
    }
    assert_eq!(drawn.len(), 2, "{drawn:?}");

    // Rolling back is editing weights: everyone is on v1 again.
    write_atomic(&config, &versioned_config(path, (100, 0)));
    let (status, record) = reload(&client, &daemon).await;
    assert_eq!(status, 200, "{record}");
    for user in &on_v2 {
        let (_, _, answer) =
            evaluate_with(&client, &daemon, "orders", &[("x-user", user)], "{}").await;
        assert_eq!(answer["version"], "v1", "{user}: {answer}");
    }

    // Metrics and audit lines name the version that answered.
    let text = metrics(&client, &daemon).await;
    for needle in [
        r#"sandgate_decisions_total{policy="orders",version="v1",allow="true",error="none"}"#,
        r#"sandgate_decisions_total{policy="orders",version="v2",allow="true",error="none"}"#,
        r#"sandgate_evaluation_duration_seconds_count{policy="orders",version="v2"}"#,
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }
    tokio::task::block_in_place(|| daemon.stop());
    let audit = audit_lines(&path.join("audit.jsonl"));
    let line = audit
        .iter()
        .find(|l| l["decision_id"] == v2_decision)
        .expect("audit line of the v2 decision");
    assert_eq!(line["version"], "v2");
    assert_eq!(line["policy"], "orders");
    let v2_digest = format!(
        "sha256:{}",
        sandgate::config::Digest::of(tagged_guest("two").as_bytes()).hex()
    );
    assert_eq!(line["digest"], v2_digest.as_str());
}

#[tokio::test]
async fn check_lists_every_version_with_its_weight_and_origin() {
    let dir = tempdir();
    let path = dir.path();
    let config = write(path, "sandgate.toml", &versioned_config(path, (90, 10)));
    let cache = path.join("cache");
    let out = sandgate(
        &["check", "--config", config.to_str().expect("utf-8")],
        &cache,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "policy orders",
        "version v1 (weight 90)",
        "version v2 (weight 10)",
        "read from file",
        "sticky header:x-user",
        "sticky input:subject.id",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let out = sandgate(
        &[
            "check",
            "--config",
            config.to_str().expect("utf-8"),
            "--json",
        ],
        &cache,
    );
    let report = stdout_json(&out);
    let orders = &report["policies"][0];
    assert_eq!(orders["name"], "orders");
    assert_eq!(orders["versions"][1]["weight"], 10);
    assert_eq!(orders["versions"][1]["fetched_from"], "file");
    assert_eq!(orders["versions"][1]["compiled_from"], "disk cache");
}

/// The files a [`ModuleServer`] serves, by name.
type Served = Arc<std::collections::HashMap<&'static str, Vec<u8>>>;

/// A module server on loopback: serves `files` by name and counts requests.
struct ModuleServer {
    addr: std::net::SocketAddr,
    served: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ModuleServer {
    async fn start(files: Vec<(&'static str, Vec<u8>)>) -> ModuleServer {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::StatusCode;
        let files: Served = Arc::new(files.into_iter().collect());
        let served = Arc::new(AtomicU64::new(0));
        let app = axum::Router::new()
            .route(
                "/modules/{name}",
                axum::routing::get(
                    |State((files, served)): State<(Served, Arc<AtomicU64>)>,
                     UrlPath(name): UrlPath<String>| async move {
                        served.fetch_add(1, Ordering::Relaxed);
                        match files.get(name.as_str()) {
                            Some(bytes) => (StatusCode::OK, bytes.clone()),
                            None => (StatusCode::NOT_FOUND, Vec::new()),
                        }
                    },
                ),
            )
            .with_state((files, Arc::clone(&served)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind module server");
        let addr = listener.local_addr().expect("module server address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ModuleServer { addr, served, task }
    }

    fn url(&self, name: &str) -> String {
        format!("http://{}/modules/{name}", self.addr)
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for ModuleServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn remote_config(dir: &Path, engine: &str, url: &str, digest: &str) -> std::path::PathBuf {
    write(
        dir,
        "remote.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[engine]\n{engine}\n[audit]\npath = \"{}\"\n\n[[policy]]\nname = \"p\"\nmodule = \"{url}\"\nsha256 = \"{digest}\"\n",
            dir.join("audit.jsonl").display()
        ),
    )
}

/// The files of the download cache, temporary files included.
fn downloads(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.join("modules"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_modules_are_verified_kept_and_reused_without_network() {
    let dir = tempdir();
    let path = dir.path();
    let cache = path.join("cache");
    let module = tagged_guest("remote").into_bytes();
    let digest = sandgate::config::Digest::of(&module);
    let server = ModuleServer::start(vec![
        ("good.wasm", module.clone()),
        ("tampered.wasm", tagged_guest("evil").into_bytes()),
    ])
    .await;
    let check = |config: &Path| {
        let config = config.to_str().expect("utf-8").to_owned();
        let cache = cache.clone();
        async move {
            tokio::task::spawn_blocking(move || sandgate(&["check", "--config", &config], &cache))
                .await
                .expect("check")
        }
    };

    // Plain http:// needs the opt-in, and only ever reaches loopback.
    let config = remote_config(path, "", &server.url("good.wasm"), &digest.hex());
    let out = check(&config).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("allow_insecure_http"), "{stderr}");
    assert!(
        stderr.contains("remote.toml:10"),
        "names the line: {stderr}"
    );
    let config = remote_config(
        path,
        "allow_insecure_http = true",
        "http://example.com/m.wasm",
        &digest.hex(),
    );
    let out = check(&config).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.served(), 0);

    // A module that does not match its pin is refused; nothing is kept.
    let config = remote_config(
        path,
        "allow_insecure_http = true",
        &server.url("tampered.wasm"),
        &digest.hex(),
    );
    let out = check(&config).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tampered = sandgate::config::Digest::of(tagged_guest("evil").as_bytes());
    assert!(
        stderr.contains(&digest.to_string()) && stderr.contains(&tampered.to_string()),
        "names both digests: {stderr}"
    );
    assert_eq!(
        downloads(&cache),
        Vec::<String>::new(),
        "nothing half-written"
    );

    // The real module: downloaded, verified, kept under its digest.
    let config = remote_config(
        path,
        "allow_insecure_http = true",
        &server.url("good.wasm"),
        &digest.hex(),
    );
    let out = check(&config).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("read from network"), "{stdout}");
    assert!(stdout.contains("compiled: compiled"), "{stdout}");
    assert_eq!(downloads(&cache), vec![format!("{}.wasm", digest.hex())]);
    assert_eq!(
        std::fs::read(cache.join("modules").join(format!("{}.wasm", digest.hex())))
            .expect("kept module"),
        module
    );
    let served = server.served();

    // Later starts need no network: the compiled cache, or the download cache.
    drop(server);
    let out = check(&config).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("not read; compiled: disk cache"),
        "{stdout}"
    );
    let without_compiled_cache = remote_config(
        path,
        "allow_insecure_http = true\ncache = false",
        "http://127.0.0.1:9/modules/good.wasm",
        &digest.hex(),
    );
    let out = check(&without_compiled_cache).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("read from download cache"), "{stdout}");
    assert!(stdout.contains("compiled: compiled"), "{stdout}");

    let daemon = Daemon::start(&without_compiled_cache, &cache);
    let client = client();
    daemon.ready(&client).await;
    let (status, answer) = evaluate(&client, &daemon, "p").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["reason"], "remote");
    let policies = json_body(
        client
            .get(daemon.url("/v1/policies"))
            .send()
            .await
            .expect("policies"),
    )
    .await;
    assert_eq!(
        policies["policies"][0]["versions"][0]["fetched_from"], "download cache",
        "{policies}"
    );
    assert!(served >= 1);

    // A corrupted download cache entry is not used: with no network, the load fails.
    let kept = cache.join("modules").join(format!("{}.wasm", digest.hex()));
    std::fs::write(&kept, b"corrupted").expect("corrupt entry");
    let out = check(&without_compiled_cache).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot download"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!kept.exists(), "the corrupt entry was removed");
}

#[test]
fn lifecycle_config_errors_name_the_key_and_line() {
    let dir = tempdir();
    let module = write(dir.path(), "m.wat", &tagged_guest("m"));
    let m = module.display().to_string();
    let digest = "0".repeat(64);
    for (toml, line, needle) in [
        (
            format!(
                "[[policy]]\nname = \"p\"\n[[policy.version]]\nname = \"v1\"\nmodule = \"{m}\"\nwieght = 5\n"
            ),
            6,
            "wieght",
        ),
        (
            format!(
                "[[policy]]\nname = \"p\"\nmodule = \"{m}\"\n[[policy.version]]\nname = \"v1\"\nmodule = \"{m}\"\n"
            ),
            3,
            "give each version its own `module`",
        ),
        (
            format!(
                "[[policy]]\nname = \"p\"\n[[policy.version]]\nname = \"v1\"\nmodule = \"{m}\"\n[[policy.version]]\nname = \"v1\"\nmodule = \"{m}\"\n"
            ),
            7,
            "duplicate version name `v1`",
        ),
        (
            format!(
                "[[policy]]\nname = \"p\"\n[[policy.version]]\nname = \"v1\"\nmodule = \"{m}\"\nweight = 0\n"
            ),
            3,
            "every version has weight 0",
        ),
        (
            "[[policy]]\nname = \"p\"\n".to_owned(),
            2,
            "give the policy a `module` or [[policy.version]]",
        ),
        (
            format!("[[policy]]\nname = \"p\"\nmodule = \"{m}\"\nsticky = \"cookie:id\"\n"),
            4,
            "header:NAME",
        ),
        (
            format!(
                "[[policy]]\nname = \"p\"\nmodule = \"http://127.0.0.1:1/m.wasm\"\nsha256 = \"{digest}\"\n"
            ),
            3,
            "allow_insecure_http = true",
        ),
        (
            "[[policy]]\nname = \"p\"\n[[policy.version]]\nname = \"v1\"\nmodule = \"https://example.com/m.wasm\"\n"
                .to_owned(),
            5,
            "pinned with `sha256`",
        ),
        (
            format!(
                "[[policy]]\nname = \"p\"\nmodule = \"{m}\"\ndecision_cache_ttl_ms = 1000\n[policy.egress]\nallow = [\"http://127.0.0.1:1/x\"]\n"
            ),
            4,
            "decision_cache_force = true",
        ),
        (
            format!("[[policy]]\nname = \"p\"\nmodule = \"{m}\"\ndecision_cache_force = true\n"),
            2,
            "without decision_cache_ttl_ms",
        ),
        (
            "[reload]\ndebounce_ms = 99999999\n".to_owned(),
            2,
            "reload.debounce_ms",
        ),
        ("[reload]\nwatsh = true\n".to_owned(), 2, "watsh"),
    ] {
        let path = write(dir.path(), "sandgate.toml", &toml);
        let error = match sandgate::config::load(&path) {
            Ok(_) => panic!("config must be refused:\n{toml}"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(needle), "{needle} not in {error}\n{toml}");
        assert!(
            error.contains(&format!("sandgate.toml:{line}:")),
            "line {line} not in {error}\n{toml}"
        );
    }
    // With the force flag, a policy with egress may cache decisions.
    let path = write(
        dir.path(),
        "sandgate.toml",
        &format!(
            "[[policy]]\nname = \"p\"\nmodule = \"{m}\"\ndecision_cache_ttl_ms = 1000\ndecision_cache_force = true\n[policy.egress]\nallow = [\"http://127.0.0.1:1/x\"]\n"
        ),
    );
    let config = sandgate::config::load(&path).expect("forced cache is accepted");
    assert!(config.policies[0].decision_cache.is_some());
}

/// The value of the first metric line starting with `prefix` (0 when absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_cache_reuses_completed_decisions_for_the_same_input_within_the_ttl() {
    let dir = tempdir();
    let path = dir.path();
    let cached = format!(
        "{}\n{}",
        wat_policy(
            path,
            "cached",
            &tagged_guest("c"),
            "decision_cache_ttl_ms = 400"
        ),
        wat_policy(
            path,
            "trapping",
            &abi_guest("", "unreachable"),
            "decision_cache_ttl_ms = 60000"
        ),
    );
    let config = daemon_config(path, "[reload]\nwatch = false", &cached);
    let mut daemon = Daemon::start(&config, &path.join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let hits = r#"sandgate_decision_cache_hits_total{policy="cached",version="default"}"#;
    let misses = r#"sandgate_decision_cache_misses_total{policy="cached",version="default"}"#;
    let evaluations =
        r#"sandgate_evaluation_duration_seconds_count{policy="cached",version="default"}"#;

    let (_, _, first) =
        evaluate_with(&client, &daemon, "cached", &[], r#"{"a":1,"b":[1,2]}"#).await;
    let (_, _, same) = evaluate_with(
        &client,
        &daemon,
        "cached",
        &[],
        "{ \"b\": [1, 2], \"a\": 1 }",
    )
    .await;
    let (_, _, other) = evaluate_with(&client, &daemon, "cached", &[], r#"{"a":2}"#).await;
    for answer in [&first, &same, &other] {
        assert_eq!(answer["allow"], true, "{answer}");
        assert_eq!(answer["reason"], "c");
    }
    assert_ne!(
        first["decision_id"], same["decision_id"],
        "each answer has its own id"
    );
    let text = metrics(&client, &daemon).await;
    assert_eq!(metric(&text, hits), 1.0, "{text}");
    assert_eq!(metric(&text, misses), 2.0, "{text}");
    assert_eq!(
        metric(&text, evaluations),
        2.0,
        "the hit ran no guest:\n{text}"
    );

    // Past the TTL the decision is evaluated again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    evaluate_with(&client, &daemon, "cached", &[], r#"{"a":1,"b":[1,2]}"#).await;
    let text = metrics(&client, &daemon).await;
    assert_eq!(metric(&text, hits), 1.0, "{text}");
    assert_eq!(metric(&text, evaluations), 3.0, "{text}");

    // Failed evaluations are never cached.
    for _ in 0..2 {
        let (_, _, answer) = evaluate_with(&client, &daemon, "trapping", &[], "{}").await;
        assert_eq!(answer["error"]["code"], "guest_trap", "{answer}");
    }
    let text = metrics(&client, &daemon).await;
    assert_eq!(
        metric(
            &text,
            r#"sandgate_decision_cache_hits_total{policy="trapping""#
        ),
        0.0,
        "{text}"
    );

    // Cached answers are audited like evaluated ones.
    tokio::task::block_in_place(|| daemon.stop());
    let audit = audit_lines(&path.join("audit.jsonl"));
    let line = audit
        .iter()
        .find(|l| l["decision_id"] == same["decision_id"])
        .expect("audit line of the cached answer");
    assert_eq!(line["kind"], "decision");
    assert_eq!(line["allow"], true);
    assert_eq!(line["version"], "default");

    // `check` refuses a decision cache on a policy with egress unless forced.
    let egress = wat_policy(
        path,
        "calls-out",
        &tagged_guest("e"),
        "decision_cache_ttl_ms = 1000\n[policy.egress]\nallow = [\"http://127.0.0.1:1/introspect\"]",
    );
    let config = daemon_config(path, "", &egress);
    let out = sandgate(
        &["check", "--config", config.to_str().expect("utf-8")],
        &path.join("cache"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("decision_cache_force"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
