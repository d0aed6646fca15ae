//! eBPF probes against the real kernel (these tests run as root, as CI
//! does): the syscalls a guest's invocation causes, seen by the programs the
//! daemon attaches, in its decision's `kernel` span; each charged to
//! its own invocation under load; and a daemon without the capabilities that
//! runs and says why its probes are off.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::support::otlp::{Got, Received, evaluate, grpc_receiver, named, telemetry};
use crate::support::*;

/// (syscall, phase) → count, from a `kernel` span's
/// `syscall.<name>.<phase>.count` attributes.
type Syscalls = HashMap<(String, String), u64>;

fn syscalls(kernel: &Got) -> Syscalls {
    let mut out = Syscalls::new();
    for kv in &kernel.span.attributes {
        let Some((name, phase)) = kv
            .key
            .strip_prefix("syscall.")
            .and_then(|k| k.strip_suffix(".count"))
            .and_then(|k| k.split_once('.'))
        else {
            continue;
        };
        let count: u64 = kernel
            .attr(&kv.key)
            .and_then(|c| c.parse().ok())
            .expect("an integer count");
        let time = kernel
            .attr(&format!("syscall.{name}.{phase}.time_ns"))
            .and_then(|t| t.parse::<u64>().ok());
        assert!(time.is_some(), "{} has no time_ns beside it", kv.key);
        *out.entry((name.to_owned(), phase.to_owned())).or_default() += count;
    }
    out
}

/// How many file opens in `phase` (cap-std resolves paths beneath the
/// preopen with `openat2` where the kernel has it).
fn opens(syscalls: &Syscalls, phase: &str) -> u64 {
    ["open", "openat", "openat2"]
        .iter()
        .filter_map(|name| syscalls.get(&((*name).to_owned(), phase.to_owned())))
        .sum()
}

/// How many file reads (`read`, `pread64`, `readv`, `preadv`) in any phase.
fn reads(syscalls: &Syscalls) -> u64 {
    ["read", "pread64", "readv", "preadv"]
        .iter()
        .map(|name| total(syscalls, name))
        .sum()
}

/// How many `name` syscalls, in any phase.
fn total(syscalls: &Syscalls, name: &str) -> u64 {
    syscalls
        .iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, c)| c)
        .sum()
}

/// The decision's spans once its `kernel` span arrived too.
async fn kernel_span(received: &Received, trace_id: &str) -> (Got, Got) {
    let spans = received.trace(trace_id, 4).await;
    let root = named(&spans, "sandgate.evaluate").clone();
    let kernel = named(&spans, "kernel").clone();
    assert_eq!(
        kernel.parent_id(),
        root.span_id(),
        "a child of the decision"
    );
    assert_eq!(kernel.attr("kernel.complete").as_deref(), Some("true"));
    (root, kernel)
}

async fn probes(client: &reqwest::Client, daemon: &Daemon) -> Value {
    json_body(
        client
            .get(daemon.url("/v1/probes"))
            .send()
            .await
            .expect("GET /v1/probes"),
    )
    .await
}

/// Waits until the daemon has reported every invocation it watched.
async fn settled_counters(client: &reqwest::Client, daemon: &Daemon) -> Value {
    eventually(
        Duration::from_secs(20),
        "no invocation left open",
        async || {
            let report = probes(client, daemon).await;
            let c = &report["counters"];
            if c["invocations_open"] == 0 {
                Ok(c.clone())
            } else {
                Err(c.to_string())
            }
        },
    )
    .await
}

const RBAC_INPUT: &str =
    r#"{"subject":{"id":"alice","roles":["viewer"]},"action":"read","resource":{"type":"orders"}}"#;

/// A guest that opens `roles.json` in its read-only preopen on every
/// evaluation and allows when that worked: two opens a decision, both in the
/// guest phase (the preopened directory, opened with the WASI context on
/// the first WASI call, then the file beneath it), no read.
fn reader_policy(dir: &std::path::Path) -> String {
    const PATH: &str = "roles.json";
    wat_policy(
        dir,
        "reader",
        &abi_guest(
            &format!(
                r#"(import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (data (i32.const 3000) "{PATH}")"#
            ),
            &allow_if(&format!(
                "(i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const 3000) (i32.const {}) (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 2000)))",
                PATH.len()
            )),
        ),
        &format!(
            "timeout_ms = 10000\nmax_in_flight = 1000\n[policy.wasi]\nallow = [\"fs_read\"]\npreopens = [{{ host = \"{}\", guest = \"/data\", mode = \"ro\" }}]",
            repo_root().join("examples/rbac/data").display()
        ),
    )
}

/// A guest that computes and allows, without any WASI import.
fn compute_policy(dir: &std::path::Path) -> String {
    wat_policy(
        dir,
        "compute",
        &abi_guest(
            "",
            "(local $i i32) (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1))) \
             (br_if $l (i32.lt_u (local.get $i) (i32.const 10000)))) i64.const 4398046511118",
        ),
        "timeout_ms = 10000\nmax_in_flight = 1000",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_from_the_rbac_snapshot_makes_no_file_call_and_a_compute_guest_none() {
    let (collector, received) = grpc_receiver().await;
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        &telemetry(&format!("http://{collector}"), ""),
        &format!("{}\n{}", rbac_policy("rbac"), compute_policy(dir.path())),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    let ready = daemon.ready(&client).await;
    assert_eq!(ready["probes"]["attached"], true, "{ready}");
    let report = probes(&client, &daemon).await;
    let programs: Vec<&str> = report["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    // The two syscall tracepoints and nothing else: no uprobe on the
    // per-decision path.
    assert_eq!(programs, ["sys_enter", "sys_exit"], "{report}");

    let answer = evaluate(
        &client,
        &daemon,
        "/v1/policies/rbac/evaluate",
        RBAC_INPUT,
        None,
    )
    .await;
    assert_eq!(answer["allow"], true, "{answer}");
    let trace_id = answer["trace_id"].as_str().expect("trace id");
    let (_, kernel) = kernel_span(&received, trace_id).await;
    let seen = syscalls(&kernel);
    // The guest parsed /data/roles.json once, in `sandgate_init` at load:
    // a decision starts from that snapshot and makes no WASI call, so not
    // even the preopen is opened (the WASI context is built on first use).
    assert_eq!(opens(&seen, "guest"), 0, "{seen:?}");
    assert_eq!(reads(&seen), 0, "{seen:?}");
    for file_call in ["fstat", "statx", "newfstatat"] {
        assert_eq!(total(&seen, file_call), 0, "{file_call} in {seen:?}");
    }
    assert_eq!(opens(&seen, "instantiate"), 0, "{seen:?}");
    assert_eq!(kernel.attr("kernel.unexpected").as_deref(), Some("0"));

    let answer = evaluate(
        &client,
        &daemon,
        "/v1/policies/compute/evaluate",
        "{}",
        None,
    )
    .await;
    assert_eq!(answer["allow"], true, "{answer}");
    let (_, kernel) = kernel_span(&received, answer["trace_id"].as_str().expect("id")).await;
    let seen = syscalls(&kernel);
    for file_call in [
        "openat",
        "openat2",
        "read",
        "pread64",
        "fstat",
        "statx",
        "newfstatat",
    ] {
        assert_eq!(total(&seen, file_call), 0, "{file_call} in {seen:?}");
    }
    assert_eq!(kernel.attr("kernel.unexpected").as_deref(), Some("0"));

    let counters = settled_counters(&client, &daemon).await;
    assert_eq!(counters["events_dropped"], 0, "{counters}");
    assert_eq!(counters["invocations_incomplete"], 0, "{counters}");
    assert_eq!(
        counters["events_sent"], counters["events_received"],
        "{counters}"
    );
    let metrics = daemon.metrics(&client).await;
    assert!(metrics.contains("sandgate_probes_attached 1"), "{metrics}");
    assert!(
        metrics.contains("sandgate_probe_events_dropped_total 0"),
        "{metrics}"
    );
    tokio::task::block_in_place(|| daemon.stop());
    let audit = audit_lines(&dir.path().join("audit.jsonl"));
    assert!(
        audit.iter().all(|l| l["kind"] != "kernel_syscall"),
        "benign guests cause no kernel_syscall lines: {audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_evaluations_are_each_charged_their_own_syscalls() {
    const N: usize = 1000;
    let (collector, received) = grpc_receiver().await;
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        &telemetry(&format!("http://{collector}"), ""),
        &format!(
            "{}\n{}",
            reader_policy(dir.path()),
            compute_policy(dir.path())
        ),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let (client, url, body) = if i % 2 == 0 {
            (
                client.clone(),
                daemon.url("/v1/policies/reader/evaluate"),
                "{}",
            )
        } else {
            (
                client.clone(),
                daemon.url("/v1/policies/compute/evaluate"),
                "{}",
            )
        };
        tasks.push(tokio::spawn(async move {
            let response = client.post(url).body(body).send().await.expect("evaluate");
            json_body(response).await
        }));
    }
    let mut traces = Vec::with_capacity(N);
    for task in tasks {
        let answer = task.await.expect("task");
        assert_eq!(answer["allow"], true, "{answer}");
        traces.push((
            answer["policy"].as_str().expect("policy").to_owned(),
            answer["trace_id"].as_str().expect("trace id").to_owned(),
        ));
    }

    // Every decision's kernel span: the reader's two opens in the guest
    // phase are in each reader span, exactly once, and none in the compute
    // guest's.
    let spans = eventually(
        Duration::from_secs(60),
        format!("{N} kernel spans"),
        async || {
            let spans = received.spans();
            let kernels = spans.iter().filter(|g| g.span.name == "kernel").count();
            if kernels >= N {
                Ok(spans)
            } else {
                Err(format!("{kernels} kernel spans"))
            }
        },
    )
    .await;
    let by_trace: HashMap<String, &Got> = spans
        .iter()
        .filter(|g| g.span.name == "kernel")
        .map(|g| (g.trace_id(), g))
        .collect();
    let counters = settled_counters(&client, &daemon).await;
    assert_eq!(counters["events_dropped"], 0, "{counters}");
    assert_eq!(counters["syscalls_untracked"], 0, "{counters}");
    assert_eq!(counters["syscalls_untallied"], 0, "{counters}");
    assert_eq!(counters["stretches_unslotted"], 0, "{counters}");
    assert_eq!(counters["invocations_incomplete"], 0, "{counters}");
    assert_eq!(counters["invocations_reported"], N as u64, "{counters}");
    // Counts stay in the kernel: a thousand normal decisions send no event.
    assert_eq!(counters["events_sent"], 0, "{counters}");
    assert_eq!(counters["events_received"], 0, "{counters}");
    for (policy, trace_id) in &traces {
        let kernel = by_trace
            .get(trace_id)
            .unwrap_or_else(|| panic!("no kernel span for {policy} {trace_id}; {counters}"));
        let seen = syscalls(kernel);
        if policy == "reader" {
            assert_eq!(opens(&seen, "guest"), 2, "{trace_id}: {seen:?}");
            assert_eq!(opens(&seen, "instantiate"), 0, "{trace_id}: {seen:?}");
            assert_eq!(reads(&seen), 0, "{trace_id}: {seen:?}");
        } else {
            assert_eq!(opens(&seen, "guest"), 0, "{trace_id}: {seen:?}");
            assert_eq!(opens(&seen, "instantiate"), 0, "{trace_id}: {seen:?}");
            assert_eq!(reads(&seen), 0, "{trace_id}: {seen:?}");
        }
        assert_eq!(kernel.attr("kernel.complete").as_deref(), Some("true"));
    }
    tokio::task::block_in_place(|| daemon.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_capabilities_the_daemon_serves_and_says_why_probes_are_off() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "[ebpf]\nmode = \"auto\"\n",
        &rbac_policy("rbac"),
    );
    // Root without any capability: what the kernel checks for bpf().
    let drop_all = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"];
    let mut daemon = Daemon::start_under(&drop_all, &config, &dir.path().join("cache"));
    let client = client();
    let ready = daemon.ready(&client).await;
    let reason = ready["probes"]["reason"].as_str().unwrap_or_default();
    assert_eq!(ready["probes"]["attached"], false, "{ready}");
    assert!(
        reason.contains("CAP_BPF") && reason.contains("CAP_PERFMON"),
        "{ready}"
    );
    let report = probes(&client, &daemon).await;
    assert_eq!(report["mode"], "auto");
    assert_eq!(report["reason"].as_str(), Some(reason));
    assert!(
        daemon
            .logs()
            .contains("eBPF probes are off: missing CAP_BPF"),
        "{}",
        daemon.logs()
    );
    let metrics = daemon.metrics(&client).await;
    assert!(metrics.contains("sandgate_probes_attached 0"), "{metrics}");
    // Decisions are unaffected.
    let answer = json_body(
        client
            .post(daemon.url("/v1/policies/rbac/evaluate"))
            .body(RBAC_INPUT)
            .send()
            .await
            .expect("evaluate"),
    )
    .await;
    assert_eq!(answer["allow"], true, "{answer}");
    tokio::task::block_in_place(|| daemon.stop());

    // `required` refuses to start, with the same reason.
    let required = daemon_config(
        dir.path(),
        "[ebpf]\nmode = \"required\"\n",
        &rbac_policy("rbac"),
    );
    let out = std::process::Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(sandgate_bin())
        .args(["serve", "--config"])
        .arg(&required)
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("eBPF probes are required") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_off_attaches_nothing_and_says_so() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "[ebpf]\nmode = \"off\"\n", &rbac_policy("rbac"));
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let report = probes(&client, &daemon).await;
    assert_eq!(report["attached"], false, "{report}");
    assert_eq!(report["mode"], "off");
    assert!(report["programs"].is_null(), "{report}");
    assert!(
        report["reason"]
            .as_str()
            .is_some_and(|r| r.contains("mode = \"off\"")),
        "{report}"
    );
    tokio::task::block_in_place(|| daemon.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_calls_socket_syscalls_are_charged_to_its_invocation_and_http_send() {
    let (collector, received) = grpc_receiver().await;
    let url = decide_service().await;
    let request = serde_json::json!({"method": "POST", "url": url}).to_string();
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        &telemetry(&format!("http://{collector}"), ""),
        &wat_policy(
            dir.path(),
            "remote",
            &response_guest(&request),
            &format!("timeout_ms = 2000\n[policy.egress]\nallow = [\"{url}\"]\n"),
        ),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    // The first call opens the connection, the second reuses it: both send
    // and receive inside their own invocation, in the http_send phase.
    for first in [true, false] {
        let answer = evaluate(&client, &daemon, "/v1/policies/remote/evaluate", "{}", None).await;
        assert_eq!(answer["allow"], true, "{answer}");
        let (_, kernel) = kernel_span(&received, answer["trace_id"].as_str().expect("id")).await;
        let seen = syscalls(&kernel);
        let in_send = |names: &[&str]| -> u64 {
            names
                .iter()
                .filter_map(|n| seen.get(&((*n).to_owned(), "http_send".to_owned())))
                .sum()
        };
        if first {
            assert_eq!(in_send(&["socket"]), 1, "{seen:?}");
            assert_eq!(in_send(&["connect"]), 1, "{seen:?}");
        }
        assert!(
            in_send(&["sendto", "write", "writev", "sendmsg"]) >= 1,
            "{seen:?}"
        );
        assert!(
            in_send(&["recvfrom", "read", "readv", "recvmsg"]) >= 1,
            "{seen:?}"
        );
        assert_eq!(
            kernel.attr("kernel.unexpected").as_deref(),
            Some("0"),
            "{seen:?}"
        );
    }
    tokio::task::block_in_place(|| daemon.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unexpected_syscall_is_an_event_a_kernel_syscall_audit_line_and_counted_in_the_span() {
    let (collector, received) = grpc_receiver().await;
    let dir = tempdir();
    // `clock_res_get` is answered with `clock_getres(2)`, which no grant
    // explains (the clocks are read through the vDSO, not a syscall).
    let clock = wat_policy(
        dir.path(),
        "clock",
        &abi_guest(
            r#"(import "wasi_snapshot_preview1" "clock_res_get" (func $res (param i32 i32) (result i32)))"#,
            "(drop (call $res (i32.const 1) (i32.const 2048))) i64.const 4398046511118",
        ),
        "timeout_ms = 2000\n[policy.wasi]\nallow = [\"clock\"]\n",
    );
    let config = daemon_config(
        dir.path(),
        &telemetry(&format!("http://{collector}"), ""),
        &format!("{clock}\n{}", compute_policy(dir.path())),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    // Normal decisions first: nothing goes through the ring buffer.
    for _ in 0..20 {
        let answer = evaluate(
            &client,
            &daemon,
            "/v1/policies/compute/evaluate",
            "{}",
            None,
        )
        .await;
        assert_eq!(answer["allow"], true, "{answer}");
    }
    let counters = settled_counters(&client, &daemon).await;
    assert_eq!(counters["invocations_reported"], 20, "{counters}");
    assert_eq!(counters["events_sent"], 0, "{counters}");

    let answer = evaluate(&client, &daemon, "/v1/policies/clock/evaluate", "{}", None).await;
    assert_eq!(answer["allow"], true, "{answer}");
    let decision_id = answer["decision_id"]
        .as_str()
        .expect("decision id")
        .to_owned();
    let (_, kernel) = kernel_span(&received, answer["trace_id"].as_str().expect("id")).await;
    let seen = syscalls(&kernel);
    assert_eq!(
        seen.get(&("clock_getres".to_owned(), "guest".to_owned())),
        Some(&1),
        "{seen:?}"
    );
    assert_eq!(kernel.attr("kernel.unexpected").as_deref(), Some("1"));

    // The kernel sent one event for it, and the daemon read it.
    let counters = eventually(
        Duration::from_secs(10),
        daemon.waiting_for("one probe event received"),
        async || {
            let counters = settled_counters(&client, &daemon).await;
            match counters["events_received"] == 1 {
                true => Ok(counters),
                false => Err(counters.to_string()),
            }
        },
    )
    .await;
    assert_eq!(counters["events_sent"], 1, "{counters}");
    assert_eq!(counters["events_received"], 1, "{counters}");
    assert_eq!(counters["unexpected_syscalls"], 1, "{counters}");
    let metrics = daemon.metrics(&client).await;
    assert!(
        metrics.contains("sandgate_kernel_unexpected_syscalls_total 1"),
        "{metrics}"
    );
    tokio::task::block_in_place(|| daemon.stop());

    let audit = audit_lines(&dir.path().join("audit.jsonl"));
    let lines: Vec<&Value> = audit
        .iter()
        .filter(|l| l["kind"] == "kernel_syscall")
        .collect();
    assert_eq!(lines.len(), 1, "{audit:#?}");
    assert_eq!(lines[0]["syscall"], "clock_getres");
    assert_eq!(lines[0]["count"], 1);
    assert_eq!(lines[0]["policy"], "clock");
    assert_eq!(lines[0]["decision_id"], decision_id.as_str());
}
