//! What a hostile guest (or a careless config) must not be able to do to the
//! daemon, the log and the CLI: flood the log and stall other policies, forge
//! log lines, hide a memory cap behind a timeout, use up the instance pool
//! for another policy, or leave a stale reload failure; and the CLI ends
//! quietly on a closed pipe.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// A guest that writes 64 KiB of newlines to stdout and to stderr, then allows.
fn flooding_guest() -> String {
    abi_guest(
        r#"(import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (data (i32.const 1200) "\00\08\00\00\00\00\01\00")"#,
        &format!(
            "(memory.fill (i32.const 2048) (i32.const 10) (i32.const 65536))
    (drop (call $w (i32.const 1) (i32.const 1200) (i32.const 1) (i32.const 1300)))
    (drop (call $w (i32.const 2) (i32.const 1200) (i32.const 1) (i32.const 1300)))
    {ALLOW_RESULT}"
        ),
    )
}

async fn evaluate(client: &reqwest::Client, daemon: &Daemon, policy: &str) -> Value {
    let response = client
        .post(daemon.url(&format!("/v1/policies/{policy}/evaluate")))
        .body("{}")
        .send()
        .await
        .expect("evaluate request");
    json_of(response).await
}

async fn json_of(response: reqwest::Response) -> Value {
    let text = response.text().await.expect("answer body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_flood_is_bounded_reported_and_leaves_every_policy_its_own_answer() {
    let dir = tempdir();
    let flood = write(dir.path(), "flood.wat", &flooding_guest());
    let healthy = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let config = write(
        dir.path(),
        "sandgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[audit]\npath = \"{}\"\n\
             [[policy]]\nname = \"flood\"\nmodule = \"{}\"\ntimeout_ms = 50\n\
             [[policy]]\nname = \"flood-granted\"\nmodule = \"{}\"\ntimeout_ms = 50\n[policy.wasi]\nallow = [\"fs_write\"]\n\
             [[policy]]\nname = \"healthy\"\nmodule = \"{}\"\ntimeout_ms = 50\n",
            dir.path().join("audit.jsonl").display(),
            flood.display(),
            flood.display(),
            healthy.display()
        ),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    const ROUNDS: usize = 4;
    let mut answers = Vec::new();
    for _ in 0..ROUNDS {
        let (a, b, c) = tokio::join!(
            evaluate(&client, &daemon, "flood"),
            evaluate(&client, &daemon, "flood-granted"),
            evaluate(&client, &daemon, "healthy"),
        );
        answers.extend([a, b, c]);
    }
    for answer in &answers {
        assert_eq!(
            answer["allow"], true,
            "each policy answers with its own decision: {answer}"
        );
        assert!(answer.get("error").is_none(), "{answer}");
    }

    // Every flooding evaluation reports its truncation once, at warn.
    let floods = 2 * ROUNDS;
    let truncated = eventually(
        DEADLINE,
        daemon.waiting_for("a truncation line per flood"),
        async || {
            let truncated = daemon
                .logs()
                .lines()
                .filter(|l| l.contains("guest output truncated"))
                .count();
            if truncated >= floods {
                Ok(truncated)
            } else {
                Err(format!("{truncated} truncation lines"))
            }
        },
    )
    .await;
    let logs = daemon.logs();
    assert_eq!(
        truncated, floods,
        "one truncation line per flooding evaluation"
    );
    let warn = logs
        .lines()
        .find(|l| l.contains("guest output truncated"))
        .expect("truncation line");
    assert!(
        warn.contains("WARN") && warn.contains("dropped_lines="),
        "{warn}"
    );
    let guest_lines = logs
        .lines()
        .filter(|l| l.contains("stream=\"stdout\"") || l.contains("stream=\"stderr\""))
        .count();
    assert!(
        guest_lines <= floods * 100,
        "at most 100 lines of guest output per evaluation, got {guest_lines} for {floods} evaluations"
    );
    let metrics = daemon.metrics(&client).await;
    for policy in ["flood", "flood-granted"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "sandgate_guest_output_dropped_lines_total{{policy=\"{policy}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no dropped-lines metric for {policy}:\n{metrics}"));
        let count: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("counter value");
        assert!(count > 0, "{line}");
    }
}

#[test]
fn guest_log_and_stdout_cannot_forge_a_daemon_log_line() {
    let dir = tempdir();
    // "hello\nFORGED INFO allowed\x1b[2K" through `log` (info) and stdout.
    let wat = abi_guest(
        r#"(import "sandgate" "log" (func $log (param i32 i32 i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (data (i32.const 2000) "hello\0aFORGED INFO allowed\1b[2K\0d\e2\80\a8end\0a")
  (data (i32.const 1200) "\d0\07\00\00\25\00\00\00")"#,
        &format!(
            "(call $log (i32.const 2) (i32.const 2000) (i32.const 37))
    (drop (call $w (i32.const 1) (i32.const 1200) (i32.const 1) (i32.const 1300)))
    {ALLOW_RESULT}"
        ),
    );
    let module = write(dir.path(), "forge.wat", &wat);
    let input = write(dir.path(), "in.json", "{}");
    let out = Eval::module(&module)
        .input(&input)
        .run(&dir.path().join("c"));
    assert_eq!(out.status.code(), Some(0));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a guest started a log line of its own:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "an escape byte reached the log:\n{log}"
    );
    assert!(!log.contains('\r') && !log.contains('\u{2028}'), "{log}");
    let escaped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FORGED INFO allowed\\u{1b}[2K\\r\\u{2028}end"))
        .collect();
    assert_eq!(
        escaped.len(),
        2,
        "the log call and the stdout line, escaped:\n{log}"
    );
    assert!(
        escaped.iter().any(|l| l.contains("hello\\nFORGED")),
        "the log call's newline is escaped:\n{log}"
    );
}

#[test]
fn memory_grow_loop_after_the_cap_reports_memory_limit() {
    let dir = tempdir();
    let wat = abi_guest(
        "",
        "(loop $again (drop (memory.grow (i32.const 1))) (br $again)) unreachable",
    );
    let module = write(dir.path(), "grow.wat", &wat);
    let input = write(dir.path(), "in.json", "{}");
    let config = write(
        dir.path(),
        "sandgate.toml",
        &format!(
            "[[policy]]\nname = \"grow\"\nmodule = \"{}\"\ntimeout_ms = 50\nmemory_limit_mb = 1\n",
            module.display()
        ),
    );
    let out = Eval::policy(&config, "grow")
        .input(&input)
        .run(&dir.path().join("c"));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision = stdout_json(&out);
    assert_eq!(decision["allow"], false);
    assert_eq!(decision["error"]["code"], "memory_limit", "{decision}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverting_a_bad_config_clears_the_failed_last_reload() {
    let dir = tempdir();
    let module = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let good = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[reload]\nwatch = true\ndebounce_ms = 20\n\
         [[policy]]\nname = \"p\"\nmodule = \"{}\"\n",
        module.display()
    );
    let config = write(dir.path(), "sandgate.toml", &good);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let readyz = || async {
        client
            .get(daemon.url("/readyz"))
            .send()
            .await
            .expect("readyz")
            .text()
            .await
            .map(|t| serde_json::from_str::<Value>(&t).expect("readyz JSON"))
            .expect("readyz body")
    };
    let wait_for = |result: &'static str| {
        let readyz = &readyz;
        async move {
            eventually(DEADLINE, format!("last_reload {result}"), async || {
                let ready = readyz().await;
                if ready["last_reload"]["result"] == result {
                    Ok(ready)
                } else {
                    Err(ready.to_string())
                }
            })
            .await
        }
    };
    std::fs::write(&config, format!("{good}timeout_ms = \"soon\"\n")).expect("write bad config");
    wait_for("failed").await;
    std::fs::write(&config, &good).expect("restore config");
    let ready = wait_for("ok").await;
    assert_eq!(ready["generation"], 1, "nothing was swapped: {ready}");
    assert!(
        daemon
            .metrics(&client)
            .await
            .contains("sandgate_last_reload_failed 0"),
        "the failure gauge is cleared too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_policy_cannot_make_another_fail_for_want_of_instances() {
    let dir = tempdir();
    let looping = write(
        dir.path(),
        "loop.wat",
        &abi_guest("", "(loop $again (br $again)) unreachable"),
    );
    let healthy = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let config = write(
        dir.path(),
        "sandgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[engine]\nmax_instances = 2\n\
             [[policy]]\nname = \"loop\"\nmodule = \"{}\"\ntimeout_ms = 400\nmax_in_flight = 2\n\
             [[policy]]\nname = \"healthy\"\nmodule = \"{}\"\ntimeout_ms = 5000\nmax_in_flight = 2\n",
            looping.display(),
            healthy.display()
        ),
    );

    let check = sandgate(
        &["check", "--config", config.to_str().expect("UTF-8 path")],
        &dir.path().join("cache"),
    );
    let warned = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(0), "{warned}");
    assert!(
        warned.contains(
            "engine.max_instances = 2 is below the sum of max_in_flight over the policies (4)"
        ),
        "{warned}"
    );

    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    // The daemon logs the same warning at startup.
    daemon.logged("engine.max_instances = 2 is below").await;

    let loops = {
        let (client, first, second) = (
            client.clone(),
            daemon.url("/v1/policies/loop/evaluate"),
            daemon.url("/v1/policies/loop/evaluate"),
        );
        tokio::spawn(async move {
            let one = client.post(first).body("{}").send();
            let two = client.post(second).body("{}").send();
            let (a, b) = tokio::join!(one, two);
            for answer in [a, b] {
                let decision = json_of(answer.expect("loop request")).await;
                assert_eq!(decision["error"]["code"], "eval_timeout", "{decision}");
            }
        })
    };
    // Both instances are taken by the looping policy...
    daemon
        .until_metrics_show(&client, "sandgate_evaluations_in_flight{policy=\"loop\"} 2")
        .await;
    // ...so the healthy policy waits for one within its deadline.
    let decision = evaluate(&client, &daemon, "healthy").await;
    assert_eq!(decision["allow"], true, "{decision}");
    assert!(decision.get("error").is_none(), "{decision}");
    loops.await.expect("loop requests");
    assert_eq!(
        evaluate(&client, &daemon, "healthy").await["allow"],
        json!(true)
    );
}

#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    let dir = tempdir();
    let module = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let mut child = Command::new(sandgate_bin())
        .args(["inspect", "--module"])
        .arg(&module)
        .env("SANDGATE_CACHE_DIR", dir.path().join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sandgate inspect");
    // The reader goes away before the first line, as `head -0` would.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr is piped")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    let status = child.wait().expect("wait for sandgate inspect");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
}
