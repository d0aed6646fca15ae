//! Initialised snapshots (DESIGN §2 `sandgate_init`, §10): init runs once at
//! load, every evaluation starts fresh from its state, a failed init refuses
//! the load with `module_invalid` everywhere it shows, clocks and randomness
//! are refused and audited during init, and a changed data file reloads.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sandgate::ErrorCode;
use serde_json::Value;

use crate::support::*;

/// A guest whose `sandgate_init` runs `init` (an i32 expression: its status)
/// and whose evaluation increments the global `$count` and the byte at 2000,
/// allowing only when they are exactly one above what init left (42 and 8).
fn counting_guest(imports: &str, init: &str) -> String {
    abi_guest(
        &format!(
            r#"{imports}
  (global $count (mut i32) (i32.const 0))
  (func (export "sandgate_init") (result i32)
    i32.const 41 global.set $count
    (i32.store8 (i32.const 2000) (i32.const 7))
    {init})"#
        ),
        &format!(
            "global.get $count i32.const 1 i32.add global.set $count
    (i32.store8 (i32.const 2000) (i32.add (i32.load8_u (i32.const 2000)) (i32.const 1)))
    {}",
            allow_if(
                "(i32.and (i32.eq (global.get $count) (i32.const 42)) \
                 (i32.eq (i32.load8_u (i32.const 2000)) (i32.const 8)))"
            )
        ),
    )
}

async fn load(dir: &Path, toml: &str) -> Result<sandgate::Policy, sandgate::policy::LoadError> {
    let (_, config) = config(dir, toml);
    let engine = engine(&dir.join("cache"));
    sandgate::Policy::load(&engine, config.policies[0].clone()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_evaluation_starts_from_the_initialised_snapshot_never_from_another() {
    let dir = tempdir();
    let module = write(dir.path(), "m.wat", &counting_guest("", "i32.const 0"));
    let policy = load(dir.path(), &policy_toml(&module, ""))
        .await
        .unwrap_or_else(|e| panic!("policy must load: {e}"));
    let snapshot = policy.facts().snapshot.as_ref();
    assert!(snapshot.is_some_and(|s| s.sandgate_init), "{snapshot:?}");
    let audit = sandgate::audit::AuditLog::disabled();
    let options = sandgate::EvalOptions::default();
    for i in 0..50 {
        let evaluation = policy.evaluate(b"{}", &options, &audit).await;
        assert!(
            evaluation.decision.allow,
            "evaluation {i}: {:?}",
            evaluation.decision
        );
    }
    let mut concurrent = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let policy = policy.clone();
        concurrent.spawn(async move {
            let audit = sandgate::audit::AuditLog::disabled();
            policy
                .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
                .await
                .decision
        });
    }
    while let Some(decision) = concurrent.join_next().await {
        let decision = decision.expect("evaluation task");
        assert!(decision.allow, "{decision:?}");
    }
}

#[tokio::test]
async fn a_module_without_init_is_evaluated_as_it_is() {
    let dir = tempdir();
    let module = write(dir.path(), "m.wat", &abi_guest("", ALLOW_RESULT));
    let policy = load(dir.path(), &policy_toml(&module, ""))
        .await
        .unwrap_or_else(|e| panic!("policy must load: {e}"));
    assert!(policy.facts().snapshot.is_none());
    assert_eq!(policy.snapshot_digest(), None);
}

/// The ways init fails, with what the refusal must say.
fn failing_inits() -> Vec<(&'static str, String, &'static str)> {
    let log_import = r#"(import "sandgate" "log" (func $log (param i32 i32 i32)))
  (data (i32.const 3000) "roles.json is missing")"#;
    vec![
        (
            "non-zero",
            counting_guest(
                log_import,
                "(call $log (i32.const 4) (i32.const 3000) (i32.const 21)) i32.const 3",
            ),
            "sandgate_init returned 3; the guest said: roles.json is missing",
        ),
        ("trap", counting_guest("", "unreachable"), "unreachable"),
        (
            "deadline",
            counting_guest("", "(loop $forever (br $forever)) i32.const 0"),
            "deadline",
        ),
    ]
}

#[tokio::test]
async fn failed_init_refuses_the_load_with_module_invalid_and_the_reason() {
    for (case, wat, says) in failing_inits() {
        let dir = tempdir();
        let module = write(dir.path(), "m.wat", &wat);
        let err = match load(dir.path(), &policy_toml(&module, "timeout_ms = 100")).await {
            Ok(_) => panic!("{case}: a failed init must refuse the load"),
            Err(e) => e,
        };
        assert_eq!(err.code(), ErrorCode::ModuleInvalid, "{case}");
        let message = err.to_string();
        assert!(message.contains("init failed"), "{case}: {message}");
        assert!(message.contains(says), "{case}: {message}");
    }
}

#[test]
fn failed_init_is_refused_by_check_and_eval() {
    for (case, wat, says) in failing_inits() {
        let dir = tempdir();
        let module = write(dir.path(), "m.wat", &wat);
        let config = write(
            dir.path(),
            "sandgate.toml",
            &policy_toml(&module, "timeout_ms = 100"),
        );
        let cache = dir.path().join("cache");
        let check = sandgate(
            &["check", "--config", config.to_str().expect("utf-8 path")],
            &cache,
        );
        assert!(!check.status.success(), "{case}: check must fail");
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(stderr.contains(says), "{case}: {stderr}");

        let input = write(dir.path(), "input.json", "{}");
        let eval = Eval::policy(&config, "p").input(&input).run(&cache);
        assert_eq!(eval.status.code(), Some(3), "{case}");
        let decision = stdout_json(&eval);
        assert_eq!(decision["allow"], false, "{case}");
        assert_eq!(decision["error"]["code"], "module_invalid", "{case}");
        let message = decision["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(says), "{case}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_init_shows_in_readyz_while_other_policies_serve() {
    let dir = tempdir();
    let path = dir.path();
    let bad = write(path, "bad.wat", &counting_guest("", "i32.const 1"));
    let good = write(path, "good.wat", &counting_guest("", "i32.const 0"));
    let config = write(
        path,
        "sandgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[policy]]\nname = \"bad\"\nmodule = \"{}\"\n\n[[policy]]\nname = \"good\"\nmodule = \"{}\"\n",
            bad.display(),
            good.display()
        ),
    );
    let daemon = Daemon::start(&config, &path.join("cache"));
    let client = client();
    // Both loads ended: `bad` refused, `good` serving.
    let ready = daemon
        .until_readyz(
            &client,
            "module_invalid for `bad` and ready `good` in /readyz",
            |status, body| {
                status == 503
                    && body.to_string().contains("module_invalid")
                    && body["policies"]["good"]["state"] == "ready"
            },
        )
        .await;
    assert!(
        ready.to_string().contains("sandgate_init returned 1"),
        "{ready}"
    );
    let answer = evaluate(&client, &daemon, "good").await;
    assert_eq!(answer["allow"], true, "{answer}");
    let answer = evaluate(&client, &daemon, "bad").await;
    assert_eq!(answer["error"]["code"], "module_invalid", "{answer}");
}

async fn evaluate(client: &reqwest::Client, daemon: &Daemon, policy: &str) -> Value {
    daemon.evaluate(client, policy, "{}").await.1
}

#[tokio::test]
async fn clocks_and_randomness_are_refused_at_init_and_audited_but_granted_after() {
    let dir = tempdir();
    let imports = r#"(import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))"#;
    // Init succeeds only when both calls were refused; evaluation only
    // when randomness works (the policy's grant applies again).
    let wat = abi_guest(
        imports,
        &format!(
            "(call $random (i32.const 4096) (i32.const 8)) drop {}",
            allow_if("(i32.eqz (call $random (i32.const 4096) (i32.const 8)))")
        ),
    )
    .replace(
        "(global $next",
        r#"(func (export "sandgate_init") (result i32)
    (i32.or
      (i32.eqz (call $random (i32.const 4096) (i32.const 8)))
      (i32.eqz (call $clock (i32.const 0) (i64.const 1) (i32.const 4096)))))
  (global $next"#,
    );
    let module = write(dir.path(), "m.wat", &wat);
    let toml = policy_toml(
        &module,
        "[policy.wasi]\nallow = [\"random\", \"clock\"]\non_denied = \"errno\"",
    );
    let (_, config) = config(dir.path(), &toml);
    let engine = engine(&dir.path().join("cache"));
    let audit_path = dir.path().join("audit.jsonl");
    let audit =
        sandgate::audit::AuditLog::open(&sandgate::config::AuditTarget::File(audit_path.clone()))
            .expect("audit log");
    let policy = sandgate::Policy::load_audited(&engine, config.policies[0].clone(), &audit)
        .await
        .unwrap_or_else(|e| panic!("init must see both calls refused: {e}"));
    let evaluation = policy
        .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
        .await;
    audit.flush();
    assert!(evaluation.decision.allow, "{:?}", evaluation.decision);
    assert!(evaluation.denials.is_empty(), "{:?}", evaluation.denials);
    let lines = audit_lines(&audit_path);
    let refused: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["kind"] == "wasi_denied")
        .map(|l| {
            (
                l["call"].as_str().unwrap_or(""),
                l["decision_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [("random_get", "init"), ("clock_time_get", "init")],
        "{lines:?}"
    );
}

/// The rbac example with its role table copied into `dir/data`.
fn rbac_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::copy(
        repo_root().join("examples/rbac/data/roles.json"),
        data.join("roles.json"),
    )
    .expect("copy role table");
    write(
        dir,
        "sandgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n[[policy]]\nname = \"rbac\"\nmodule = \"{}\"\n\n[policy.wasi]\nallow = [\"fs_read\"]\npreopens = [{{ host = \"{}\", guest = \"/data\", mode = \"ro\" }}]\n",
            guest("rbac").display(),
            data.display()
        ),
    )
}

const AUDITOR_READS: &str = r#"{"subject":{"id":"ann","roles":["auditor"]},"action":"read","resource":{"type":"invoices","id":"1"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_data_file_reloads_the_snapshot_without_dropping_a_request() {
    let dir = tempdir();
    let path = dir.path();
    let config = rbac_config(path, "[reload]\ndebounce_ms = 50\n");
    let daemon = Arc::new(Daemon::start(&config, &path.join("cache")));
    let client = client();
    daemon.ready(&client).await;
    let ask = |client: reqwest::Client, daemon: Arc<Daemon>| async move {
        let response = client
            .post(daemon.url("/v1/policies/rbac/evaluate"))
            .body(AUDITOR_READS)
            .send()
            .await
            .expect("evaluate");
        (response.status().as_u16(), json_body(response).await)
    };
    let (status, answer) = ask(client.clone(), Arc::clone(&daemon)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["allow"], false, "no auditor role yet: {answer}");

    // Traffic keeps flowing while the table changes.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (client, daemon, stop, failures) = (
            client.clone(),
            Arc::clone(&daemon),
            Arc::clone(&stop),
            Arc::clone(&failures),
        );
        load.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, answer) = ask(client.clone(), Arc::clone(&daemon)).await;
                if status != 200 || answer.get("error").is_some() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    // Replaced by rename, as an operator (or a ConfigMap) would.
    let table = path.join("data").join("roles.json");
    let mut roles: Value =
        serde_json::from_str(&std::fs::read_to_string(&table).expect("read table")).expect("json");
    roles["roles"]["auditor"] = serde_json::json!({"*": ["read"]});
    let staged = path.join("data").join(".roles.json.new");
    std::fs::write(&staged, roles.to_string()).expect("stage table");
    std::fs::rename(&staged, &table).expect("replace table");

    eventually(
        Duration::from_secs(30),
        "the new role applied",
        async || match ask(client.clone(), Arc::clone(&daemon)).await {
            (_, answer) if answer["allow"] == true => Ok(()),
            (_, answer) => Err(answer.to_string()),
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the reload"
    );

    // A broken table fails the reload; the last good snapshot keeps serving.
    std::fs::write(&staged, "{ not json").expect("stage broken table");
    std::fs::rename(&staged, &table).expect("replace table");
    let ready = daemon
        .until_readyz(&client, "a failed reload", |_, ready| {
            ready["last_reload"]["result"] == "failed"
        })
        .await;
    let error = ready["last_reload"]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("role table /data/roles.json is invalid"),
        "{ready}"
    );
    let (status, answer) = ask(client.clone(), Arc::clone(&daemon)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["allow"], true, "{answer}");
    assert!(
        daemon
            .metrics(&client)
            .await
            .contains("sandgate_last_reload_failed 1")
    );
}

/// `sandgate check --json` and `sandgate eval` of the rbac policy with
/// `cache` as the daemon's cache: the snapshot facts, the answer to
/// `AUDITOR_READS` and what the runs logged.
fn check_and_eval(config: &Path, cache: &Path) -> (Value, Value, String) {
    let path = config.to_str().expect("UTF-8 path");
    let check = sandgate(&["check", "--config", path, "--json"], cache);
    let log = String::from_utf8_lossy(&check.stderr).into_owned();
    assert_eq!(check.status.code(), Some(0), "{log}");
    let report = stdout_json(&check);
    let facts = report["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "rbac"))
        .map(|p| p["snapshot"].clone())
        .unwrap_or_else(|| panic!("rbac in {report}"));
    let eval = Eval::policy(config, "rbac")
        .stdin(AUDITOR_READS.as_bytes())
        .run(cache);
    assert_eq!(
        eval.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    (facts, stdout_json(&eval), log)
}

/// Gives the auditor role of the rbac example's table `grant` on everything.
fn set_auditor(dir: &Path, grant: Value) {
    let table = dir.join("data").join("roles.json");
    let mut roles: Value =
        serde_json::from_str(&std::fs::read_to_string(&table).expect("read table")).expect("json");
    roles["roles"]["auditor"] = serde_json::json!({ "*": grant });
    std::fs::write(&table, roles.to_string()).expect("write table");
}

#[test]
fn a_restart_starts_from_the_cached_init_result_until_a_file_init_read_changes() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let config = rbac_config(dir.path(), "");

    let (first, answer, _) = check_and_eval(&config, &cache);
    assert_eq!(first["cached"], false, "nothing cached yet: {first}");
    assert_eq!(answer["allow"], false, "no auditor role yet: {answer}");
    let (second, answer, _) = check_and_eval(&config, &cache);
    assert_eq!(
        second["cached"], true,
        "unchanged module and files: {second}"
    );
    assert_eq!(second["digest"], first["digest"], "the same snapshot");
    assert_eq!(answer["allow"], false, "{answer}");

    // The role table init parsed changes: init runs again and answers from it.
    set_auditor(dir.path(), serde_json::json!(["read"]));
    let (third, answer, _) = check_and_eval(&config, &cache);
    assert_eq!(third["cached"], false, "the role table changed: {third}");
    assert_ne!(third["digest"], first["digest"], "a new snapshot");
    assert_eq!(answer["allow"], true, "the new role applies: {answer}");
    let (fourth, answer, _) = check_and_eval(&config, &cache);
    assert_eq!(fourth["cached"], true, "{fourth}");
    assert_eq!(fourth["digest"], third["digest"]);
    assert_eq!(answer["allow"], true, "{answer}");

    // A file added to the preopened directory changes what init could list.
    std::fs::write(dir.path().join("data").join("extra.json"), "{}").expect("write");
    let (fifth, _, _) = check_and_eval(&config, &cache);
    assert_eq!(
        fifth["cached"], false,
        "the preopen's listing changed: {fifth}"
    );
}

#[test]
fn an_altered_cached_snapshot_is_refused_and_init_runs_again() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let config = rbac_config(dir.path(), "");
    set_auditor(dir.path(), serde_json::json!(["read"]));
    let (first, _, _) = check_and_eval(&config, &cache);
    assert_eq!(first["cached"], false, "{first}");
    let (second, _, _) = check_and_eval(&config, &cache);
    assert_eq!(second["cached"], true, "{second}");

    // Flip one byte of the snapshot's data, keeping its length and tag.
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "snapshot"))
        .collect();
    assert_eq!(entries.len(), 1, "one snapshot entry: {entries:?}");
    let mut bytes = std::fs::read(&entries[0]).expect("read entry");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&entries[0], &bytes).expect("alter entry");

    let (third, answer, log) = check_and_eval(&config, &cache);
    assert_eq!(
        third["cached"], false,
        "the altered entry must not be used: {third}"
    );
    assert!(
        log.contains("cache entry refused"),
        "the refusal is logged: {log}"
    );
    assert_eq!(answer["allow"], true, "{answer}");
}
