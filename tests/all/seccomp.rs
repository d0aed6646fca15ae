//! The daemon-wide seccomp allowlist (`[server] syscall_filter`) against the
//! real kernel: under `enforce` every thread of the daemon is filtered and
//! every surface still works (evaluate, forward-auth, a reload, the bridge,
//! tracing, the probes) without one refused call; `log` installs it too;
//! `off` leaves none; a bad value is refused with its key and line.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::routing::post;
use serde_json::{Value, json};

use crate::support::otlp::{evaluate, grpc_receiver, named, telemetry};
use crate::support::*;

/// The `Seccomp:` field of `/proc/PID/task/TID/status` of every thread of
/// the process, by value (`0` none, `2` a filter).
fn seccomp_of_threads(pid: u32) -> BTreeSet<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    tasks
        .filter_map(|task| {
            let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim().to_owned())
        })
        .collect()
}

fn seccomp_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(|v| v.trim().to_owned())
        .expect("a Seccomp: line")
}

async fn get(client: &reqwest::Client, daemon: &Daemon, path: &str) -> Value {
    json_body(client.get(daemon.url(path)).send().await.expect(path)).await
}

/// An HTTP service the bridge may call: answers `{"active":true}` and counts calls.
async fn introspection() -> (String, Arc<Mutex<u32>>) {
    let calls: Arc<Mutex<u32>> = Arc::default();
    let counted = Arc::clone(&calls);
    let app = axum::Router::new().route(
        "/introspect",
        post(move || {
            let counted = Arc::clone(&counted);
            async move {
                *counted.lock().expect("calls") += 1;
                ([("content-type", "application/json")], r#"{"active":true}"#)
            }
        }),
    );
    let addr = serve(app).await;
    (format!("http://{addr}/introspect"), calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_enforce_every_thread_is_filtered_and_every_surface_still_works() {
    let (collector, received) = grpc_receiver().await;
    let (url, calls) = introspection().await;
    let dir = tempdir();
    let request = json!({"method": "POST", "url": url, "body": "dG9rZW49Z29vZA=="}).to_string();
    let bridged = wat_policy(
        dir.path(),
        "bridged",
        &response_guest(&request),
        &format!("timeout_ms = 2000\n[policy.egress]\nallow = [\"{url}\"]"),
    );
    let policies = format!("{}\n{bridged}", rbac_policy("rbac"));
    let server = format!(
        "syscall_filter = \"enforce\"\n{}",
        telemetry(&format!("http://{collector}"), "")
    );
    let config = daemon_config(dir.path(), &server, &policies);
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    let ready = daemon.ready(&client).await;

    daemon
        .logged("sandgate: syscall filter enforce (installed)")
        .await;
    assert_eq!(seccomp_of(daemon.pid()), "2");
    assert_eq!(
        seccomp_of_threads(daemon.pid()),
        BTreeSet::from(["2".to_owned()]),
        "every thread, those started before the filter too"
    );
    let seccomp = &ready["enforcement"]["seccomp"];
    assert_eq!(seccomp["mode"], "enforce", "{ready}");
    assert_eq!(seccomp["installed"], true, "{ready}");
    let probes = get(&client, &daemon, "/v1/probes").await;
    assert_eq!(
        probes["enforcement"]["seccomp"]["mode"], "enforce",
        "{probes}"
    );

    // The JSON API, a decision from the rbac guest reading its preopen.
    let (status, answer) = daemon.evaluate(&client, "rbac", ALICE_READS).await;
    assert_eq!((status, &answer["allow"]), (200, &json!(true)), "{answer}");

    // Forward-auth: a decision, not a failure.
    let response = client
        .get(daemon.url("/v1/authz/rbac/orders/7"))
        .header("x-original-method", "GET")
        .header("x-original-uri", "/orders/7")
        .send()
        .await
        .expect("forward-auth");
    let code = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    assert!(
        code == 200 || code == 403,
        "forward-auth answered {code}: {body}"
    );
    assert!(!body.contains("internal"), "{body}");

    // The bridge, and the decision's trace exported over OTLP.
    let answer = evaluate(
        &client,
        &daemon,
        "/v1/policies/bridged/evaluate",
        "{}",
        None,
    )
    .await;
    assert_eq!(
        answer["allow"], true,
        "the bridged call succeeded: {answer}"
    );
    assert_eq!(*calls.lock().expect("calls"), 1);
    let trace_id = answer["trace_id"].as_str().expect("a trace id").to_owned();
    let spans = received.trace(&trace_id, 4).await;
    named(&spans, "sandgate.evaluate");
    named(&spans, "POST");

    // A reload: the config and module files read again, the policies
    // compiled again, all after the filter was installed.
    let text = std::fs::read_to_string(&config).expect("config");
    write(
        dir.path(),
        "sandgate.toml",
        &text.replacen("timeout_ms = 500", "timeout_ms = 600", 1),
    );
    let response = client
        .post(daemon.url("/v1/reload"))
        .send()
        .await
        .expect("reload");
    let reload_status = response.status().as_u16();
    let reload_body = json_body(response).await;
    assert_eq!(reload_status, 200, "{reload_body}");
    eventually(
        std::time::Duration::from_secs(30),
        daemon.waiting_for("generation 2 ready"),
        async || {
            let r = get(&client, &daemon, "/readyz").await;
            match (r["generation"].as_u64(), r["ready"].as_bool()) {
                (Some(g), Some(true)) if g >= 2 => Ok(()),
                _ => Err(r.to_string()),
            }
        },
    )
    .await;
    let (status, answer) = daemon.evaluate(&client, "rbac", ALICE_READS).await;
    assert_eq!((status, &answer["allow"]), (200, &json!(true)), "{answer}");

    // SIGHUP: the audit log reopened, a reload; then a clean stop.
    daemon.signal("HUP");
    daemon.logged("SIGHUP: reopening the audit log").await;
    let readyz = get(&client, &daemon, "/readyz").await;
    assert_eq!(
        readyz["enforcement"]["seccomp"]["violations"],
        0,
        "nothing refused: {readyz}\n{}",
        daemon.logs()
    );
    assert!(
        !daemon
            .logs()
            .contains("seccomp: a syscall outside the allowlist"),
        "{}",
        daemon.logs()
    );
    daemon.stop();
}

#[tokio::test]
async fn log_mode_installs_the_filter_and_off_installs_none() {
    let client = client();
    for (mode, want, installed) in [("log", "2", true), ("off", "0", false)] {
        let dir = tempdir();
        let config = daemon_config(
            dir.path(),
            &format!("syscall_filter = \"{mode}\"\n"),
            &rbac_policy("rbac"),
        );
        let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
        let ready = daemon.ready(&client).await;
        assert_eq!(seccomp_of(daemon.pid()), want, "{mode}");
        let seccomp = &ready["enforcement"]["seccomp"];
        assert_eq!(seccomp["mode"], mode, "{ready}");
        assert_eq!(seccomp["installed"], installed, "{ready}");
        let (status, answer) = daemon.evaluate(&client, "rbac", ALICE_READS).await;
        assert_eq!((status, &answer["allow"]), (200, &json!(true)), "{answer}");
        daemon.stop();
    }
}

#[test]
fn a_bad_syscall_filter_is_refused_with_its_key_and_line() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "syscall_filter = \"kill\"\n",
        &rbac_policy("rbac"),
    );
    let out = sandgate(
        &["check", "--config", config.to_str().expect("utf-8 path")],
        &dir.path().join("cache"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:3: server.syscall_filter: `kill` is not one of \"enforce\", \"log\" or \"off\"",
            config.display()
        )),
        "{stderr}"
    );
}
