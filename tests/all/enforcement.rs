//! BPF LSM enforcement (`[ebpf] enforce`) against the real kernel, as root:
//! the start-up drill and its report, decisions that use their grants
//! (preopened files, bridged HTTP, reload) still working under it, a test
//! guest's raw host syscalls (the `escape-drill` feature of this crate's
//! test build) refused and audited, a daemon without CAP_MAC_ADMIN that
//! refuses to start under `required` naming why, and `enforce = false`
//! loading no LSM program.
//!
//! Some machines forbid loading BTF-attached programs altogether (a
//! security policy of their own refuses BPF_PROG_LOAD for LSM and fentry
//! programs with EPERM, whatever the capabilities). There the daemon must
//! say so: `auto` serves without the layer and reports why, `required`
//! refuses to start naming it; the tests check that, and say loudly that the
//! kernel's refusals themselves were not exercised.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const EBPF_ENFORCE: &str = "[ebpf]\nmode = \"auto\"\nenforce = true\n";

/// Whether the daemon's LSM programs attached; when they did not, checks
/// that the daemon says why (and that the refusal is the machine's, not a
/// missing capability of the test) and returns `false`.
fn lsm_attached(report: &Value) -> bool {
    let enforcement = &report["enforcement"];
    if enforcement["lsm"] == "attached" {
        return true;
    }
    let lsm = enforcement["lsm"].as_str().unwrap_or_default();
    assert!(
        lsm.starts_with("not attached: ") && lsm.contains("forbids"),
        "the LSM programs neither attached nor said that the machine forbids them: {report}"
    );
    assert_eq!(enforcement["selftest"], "not run", "{report}");
    assert_eq!(report["attached"], true, "the probes still run: {report}");
    eprintln!(
        "NOTE: this machine refuses BPF LSM programs ({lsm}); the kernel's refusals were not \
         exercised"
    );
    false
}

const RBAC_INPUT: &str =
    r#"{"subject":{"id":"alice","roles":["viewer"]},"action":"read","resource":{"type":"orders"}}"#;

/// BPF_PROG_TYPE_LSM in the kernel's enum bpf_prog_type.
const PROG_TYPE_LSM: &str = "29";

/// How many BPF LSM programs process `pid` holds open (from the kernel's
/// fdinfo of each descriptor, not from the daemon's own report).
fn lsm_programs_of(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter(|info| {
            info.lines().any(|line| {
                line.strip_prefix("prog_type:")
                    .is_some_and(|t| t.trim() == PROG_TYPE_LSM)
            })
        })
        .count()
}

async fn get(client: &reqwest::Client, daemon: &Daemon, path: &str) -> Value {
    json_body(
        client
            .get(daemon.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}")),
    )
    .await
}

async fn evaluate(client: &reqwest::Client, daemon: &Daemon, policy: &str, input: &str) -> Value {
    json_body(
        client
            .post(daemon.url(&format!("/v1/policies/{policy}/evaluate")))
            .body(input.to_owned())
            .send()
            .await
            .expect("evaluate"),
    )
    .await
}

/// The `kernel_denied` lines of `decision_id`.
fn denied_lines(audit: &std::path::Path, decision_id: &str) -> Vec<Value> {
    audit_lines(audit)
        .into_iter()
        .filter(|l| l["kind"] == "kernel_denied" && l["decision_id"] == decision_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_passes_and_decisions_using_their_grants_still_work() {
    let url = decide_service().await;
    let request = serde_json::json!({"method": "POST", "url": url}).to_string();
    let dir = tempdir();
    let policies = format!(
        "{}\n{}",
        rbac_policy("rbac"),
        wat_policy(
            dir.path(),
            "remote",
            &response_guest(&request),
            &format!("timeout_ms = 2000\n[policy.egress]\nallow = [\"{url}\"]\n"),
        )
    );
    let config = daemon_config(dir.path(), EBPF_ENFORCE, &policies);
    let audit = dir.path().join("audit.jsonl");
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    let ready = daemon.ready(&client).await;

    // The report, in /v1/probes and /readyz.
    let report = get(&client, &daemon, "/v1/probes").await;
    assert_eq!(ready["enforcement"], report["enforcement"], "{ready}");
    if !lsm_attached(&report) {
        // Without the layer, decisions that use their grants still work.
        for policy in ["rbac", "remote"] {
            let input = if policy == "rbac" { RBAC_INPUT } else { "{}" };
            let answer = evaluate(&client, &daemon, policy, input).await;
            assert_eq!(answer["allow"], true, "{answer}");
        }
        assert!(
            audit_lines(&audit)
                .iter()
                .all(|l| l["kind"] != "kernel_denied")
        );
        tokio::task::block_in_place(|| daemon.stop());
        return;
    }
    let enforcement = &report["enforcement"];
    assert_eq!(enforcement["lsm"], "attached", "{report}");
    assert_eq!(enforcement["selftest"], "passed", "{report}");
    assert_eq!(enforcement["seccomp"]["mode"], "enforce", "{report}");
    assert_eq!(ready["enforcement"], *enforcement, "{ready}");
    let lsm: Vec<&str> = report["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter(|p| p["kind"] == "lsm")
        .filter_map(|p| p["name"].as_str())
        .collect();
    for hook in ["file_open", "socket_connect", "bprm_check_security"] {
        assert!(lsm.contains(&hook), "{report}");
    }
    assert_eq!(lsm_programs_of(daemon.pid()), lsm.len(), "{report}");

    // The drill's two refusals, audited as its invocation's.
    let drill = denied_lines(&audit, "selftest");
    let operations: Vec<&str> = drill
        .iter()
        .filter_map(|l| l["operation"].as_str())
        .collect();
    assert_eq!(operations, ["file_open", "socket_connect"], "{drill:?}");
    for line in &drill {
        assert_eq!(line["policy"], "sandgate:selftest", "{line}");
        assert!(
            line["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{line}"
        );
    }
    assert!(
        drill[1]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("127.0.0.1:")),
        "{drill:?}"
    );
    assert!(
        daemon.logs().contains("BPF LSM drill passed"),
        "{}",
        daemon.logs()
    );

    // A policy reading its preopen, and one calling its egress, work, and
    // nothing of theirs is refused.
    for round in 0..2 {
        let answer = evaluate(&client, &daemon, "rbac", RBAC_INPUT).await;
        assert_eq!(answer["allow"], true, "round {round}: {answer}");
        let id = answer["decision_id"].as_str().expect("decision id");
        let answer = evaluate(&client, &daemon, "remote", "{}").await;
        assert_eq!(answer["allow"], true, "round {round}: {answer}");
        let remote = answer["decision_id"].as_str().expect("decision id");
        audit_line_where(&audit, "the remote decision", |l| {
            l["kind"] == "decision" && l["decision_id"] == remote
        })
        .await;
        assert!(denied_lines(&audit, id).is_empty(), "{id}");
        assert!(denied_lines(&audit, remote).is_empty(), "{remote}");
    }

    // A reload gives the new versions their grants (and frees the old).
    let response = client
        .post(daemon.url("/v1/reload"))
        .send()
        .await
        .expect("reload");
    assert!(response.status().is_success(), "{}", response.status());
    let answer = evaluate(&client, &daemon, "rbac", RBAC_INPUT).await;
    assert_eq!(answer["allow"], true, "{answer}");
    let answer = evaluate(&client, &daemon, "remote", "{}").await;
    assert_eq!(answer["allow"], true, "{answer}");
    let counters = get(&client, &daemon, "/v1/probes").await["counters"].clone();
    assert_eq!(counters["kernel_denied"], 2, "only the drill's: {counters}");
    let metrics = daemon.metrics(&client).await;
    assert!(
        metrics.contains("sandgate_kernel_denied_total 2"),
        "{metrics}"
    );
    tokio::task::block_in_place(|| daemon.stop());
}

const ESCAPE_IMPORT: &str =
    r#"(import "sandgate_escape_drill" "escape" (func $escape (param i32 i32) (result i32)))"#;

/// The errno of escape `op` with `arg` (0: it succeeded).
fn escape(op: u32, arg: u32) -> String {
    format!("(call $escape (i32.const {op}) (i32.const {arg}))")
}

/// A guest that asks the host, through the test build's escape-drill
/// import, to open /etc/shadow, connect to `port` on loopback and exec; it
/// allows only when each came back EPERM.
fn escaping_guest(port: u16) -> String {
    let eperm = |op: u32, arg: u32| format!("(i32.eq {} (i32.const 1))", escape(op, arg));
    abi_guest(
        ESCAPE_IMPORT,
        &allow_if(&format!(
            "(i32.and (i32.and {} {}) {})",
            eperm(1, 0),
            eperm(2, u32::from(port)),
            eperm(3, 0)
        )),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_raw_host_syscalls_are_refused_by_the_kernel_and_audited() {
    // Something listens, so that only the kernel's refusal fails the connect.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        EBPF_ENFORCE,
        &wat_policy(
            dir.path(),
            "escape",
            &escaping_guest(port),
            "timeout_ms = 2000",
        ),
    );
    let audit = dir.path().join("audit.jsonl");
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    if !lsm_attached(&get(&client, &daemon, "/v1/probes").await) {
        // Nothing but the kernel could refuse these (the import bypasses
        // the host's checks): the exec would replace the daemon, so only
        // the open and the connect are tried, and they go through.
        std::fs::write(
            dir.path().join("escape.wat"),
            abi_guest(
                ESCAPE_IMPORT,
                &allow_if(&format!(
                    "(i32.and (i32.eqz {}) (i32.eqz {}))",
                    escape(1, 0),
                    escape(2, u32::from(port))
                )),
            ),
        )
        .expect("write the guest");
        let response = client
            .post(daemon.url("/v1/reload"))
            .send()
            .await
            .expect("reload");
        assert!(response.status().is_success(), "{}", response.status());
        let answer = evaluate(&client, &daemon, "escape", "{}").await;
        assert_eq!(answer["allow"], true, "unrefused, both succeed: {answer}");
        assert!(
            audit_lines(&audit)
                .iter()
                .all(|l| l["kind"] != "kernel_denied")
        );
        tokio::task::block_in_place(|| daemon.stop());
        return;
    }

    let answer = evaluate(&client, &daemon, "escape", "{}").await;
    assert_eq!(
        answer["allow"], true,
        "each escape came back EPERM: {answer}"
    );
    let id = answer["decision_id"]
        .as_str()
        .expect("decision id")
        .to_owned();
    let lines = eventually(
        Duration::from_secs(10),
        "three kernel_denied lines",
        async || {
            let lines = denied_lines(&audit, &id);
            if lines.len() >= 3 {
                Ok(lines)
            } else {
                Err(format!("{lines:?}"))
            }
        },
    )
    .await;
    let found: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["operation"].as_str().unwrap_or_default(),
                l["detail"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(found[0].0, "file_open", "{found:?}");
    assert!(found[0].1.starts_with("shadow ("), "{found:?}");
    assert_eq!(found[1], ("socket_connect", &*format!("127.0.0.1:{port}")));
    assert_eq!(found[2], ("exec", "/bin/true"), "{found:?}");
    for line in &lines {
        assert_eq!(line["policy"], "escape", "{line}");
        assert!(
            line["digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:"))
        );
    }
    assert!(
        daemon
            .logs()
            .contains("the kernel refused an operation the policy's grants do not explain"),
        "{}",
        daemon.logs()
    );
    // The daemon is still itself (the exec did not replace it) and serves.
    let answer = evaluate(&client, &daemon, "escape", "{}").await;
    assert_eq!(answer["allow"], true, "{answer}");
    drop(listener);
    tokio::task::block_in_place(|| daemon.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_enforcement_starts_only_when_the_drill_passes_else_names_why() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), REQUIRED, &rbac_policy("rbac"));
    let mut child = std::process::Command::new(sandgate_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("SANDGATE_CACHE_DIR", dir.path().join("cache"))
        .env("SANDGATE_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sandgate serve");
    let stderr = child.stderr.take().expect("stderr");
    let lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    // Either it gets as far as listening (the drill passed), or it exits
    // saying why enforcement cannot be had.
    let mut seen = Vec::new();
    for line in lines.map_while(Result::ok) {
        let listening = line.starts_with("sandgate: http listening on");
        seen.push(line);
        if listening {
            break;
        }
    }
    let text = seen.join("\n");
    if text.contains("http listening on") {
        assert!(text.contains("BPF LSM drill passed"), "{text}");
        child.kill().expect("stop the daemon");
        let _ = child.wait();
    } else {
        let status = child.wait().expect("wait");
        assert!(!status.success(), "{text}");
        assert!(
            text.contains("BPF LSM enforcement is required") && text.contains("forbids"),
            "{text}"
        );
    }
}

const REQUIRED: &str = "[ebpf]\nmode = \"required\"\nenforce = true\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_enforcement_without_cap_mac_admin_refuses_to_start_naming_it() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), REQUIRED, &rbac_policy("rbac"));
    let out = std::process::Command::new("setpriv")
        .args(["--inh-caps=-mac_admin", "--bounding-set=-mac_admin", "--"])
        .arg(sandgate_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("SANDGATE_CACHE_DIR", dir.path().join("cache"))
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("BPF LSM enforcement is required") && stderr.contains("CAP_MAC_ADMIN"),
        "{stderr}"
    );

    // With `auto` it serves without the layer and says why.
    let config = daemon_config(
        dir.path(),
        "[ebpf]\nmode = \"auto\"\nenforce = true\n",
        &rbac_policy("rbac"),
    );
    let drop_mac_admin = [
        "setpriv",
        "--inh-caps=-mac_admin",
        "--bounding-set=-mac_admin",
        "--",
    ];
    let mut daemon = Daemon::start_under(&drop_mac_admin, &config, &dir.path().join("cache"));
    let client = client();
    let ready = daemon.ready(&client).await;
    let enforcement = &ready["enforcement"];
    assert!(
        enforcement["lsm"]
            .as_str()
            .is_some_and(|l| l.starts_with("not attached: missing capability CAP_MAC_ADMIN")),
        "{ready}"
    );
    assert_eq!(enforcement["selftest"], "not run", "{ready}");
    assert_eq!(
        ready["probes"]["attached"], true,
        "the probes still run: {ready}"
    );
    assert_eq!(lsm_programs_of(daemon.pid()), 0);
    let answer = evaluate(&client, &daemon, "rbac", RBAC_INPUT).await;
    assert_eq!(answer["allow"], true, "{answer}");
    tokio::task::block_in_place(|| daemon.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enforce_no_lsm_program_is_loaded() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "[ebpf]\nmode = \"required\"\n",
        &rbac_policy("rbac"),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let report = get(&client, &daemon, "/v1/probes").await;
    assert_eq!(report["attached"], true, "{report}");
    assert_eq!(
        report["enforcement"]["lsm"], "not enabled: [ebpf] enforce = false",
        "{report}"
    );
    assert!(
        report["programs"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["kind"] != "lsm")),
        "{report}"
    );
    assert_eq!(lsm_programs_of(daemon.pid()), 0);
    // The escape a guest could ask for is not refused by anything here but
    // the host itself; nothing is audited as kernel_denied.
    let answer = evaluate(&client, &daemon, "rbac", RBAC_INPUT).await;
    assert_eq!(answer["allow"], true, "{answer}");
    assert!(
        audit_lines(&dir.path().join("audit.jsonl"))
            .iter()
            .all(|l| l["kind"] != "kernel_denied")
    );
    tokio::task::block_in_place(|| daemon.stop());
}

#[test]
fn enforce_without_probes_is_a_configuration_error() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "[ebpf]\nmode = \"off\"\nenforce = true\n",
        &rbac_policy("rbac"),
    );
    let out = sandgate(
        &["check", "--config", config.to_str().expect("utf-8")],
        &dir.path().join("cache"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ebpf.enforce") && stderr.contains("mode = \"off\""),
        "{stderr}"
    );
}
