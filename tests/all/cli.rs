//! The CLI contract (DESIGN §4): `eval`, `check`, `inspect`, their output
//! and exit codes.

use crate::support::*;

#[test]
fn eval_prints_the_decision_and_exits_zero() {
    let dir = tempdir();
    let module = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let input = write(dir.path(), "in.json", r#"{"user":"alice"}"#);
    let out = Eval::module(&module)
        .input(&input)
        .run(&dir.path().join("c"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_json(&out), serde_json::json!({"allow": true}));
}

#[test]
fn eval_reads_stdin_and_fails_closed_with_exit_three() {
    let dir = tempdir();
    let module = write(dir.path(), "trap.wat", &abi_guest("", "unreachable"));
    let audit = dir.path().join("audit.jsonl");
    let out = Eval::module(&module)
        .stdin(b"{}")
        .audit(&audit)
        .run(&dir.path().join("c"));
    assert_eq!(out.status.code(), Some(3));
    let decision = stdout_json(&out);
    assert_eq!(decision["allow"], false);
    assert_eq!(decision["error"]["code"], "guest_trap");
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["kind"], "decision");
    assert_eq!(lines[0]["error"]["code"], "guest_trap");
    assert!(lines[0]["duration_us"].as_u64().is_some());
}

#[test]
fn eval_of_an_invalid_module_prints_module_invalid_and_exits_three() {
    let dir = tempdir();
    let module = write(
        dir.path(),
        "bad.wat",
        "(module (memory (export \"memory\") 1))",
    );
    let input = write(dir.path(), "in.json", "{}");
    let out = Eval::module(&module)
        .input(&input)
        .run(&dir.path().join("c"));
    assert_eq!(out.status.code(), Some(3));
    let decision = stdout_json(&out);
    assert_eq!(decision["error"]["code"], "module_invalid");
    assert!(
        decision["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("sandgate_abi_version"))
    );
}

#[test]
fn eval_usage_errors_exit_two() {
    let dir = tempdir();
    let out = sandgate(&["eval", "--input", "x.json"], &dir.path().join("c"));
    assert_eq!(out.status.code(), Some(2));
    let module = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let out = Eval::module(&module)
        .arg("--input", "/nonexistent/in.json")
        .run(&dir.path().join("c"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/in.json"));
}

#[test]
fn eval_with_config_uses_the_policys_grants() {
    let dir = tempdir();
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "random_get" (func $r (param i32 i32) (result i32)))"#,
        &allow_if("(i32.eqz (call $r (i32.const 2048) (i32.const 8)))"),
    );
    let module = write(dir.path(), "r.wat", &wat);
    let config = write(
        dir.path(),
        "sandgate.toml",
        &format!(
            "[[policy]]\nname = \"rand\"\nmodule = \"{}\"\n[policy.wasi]\nallow = [\"random\"]\n",
            module.display()
        ),
    );
    let input = write(dir.path(), "in.json", "{}");
    let cache = dir.path().join("c");
    let out = Eval::policy(&config, "rand").input(&input).run(&cache);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout_json(&out)["allow"], true, "granted by the config");
    let out = Eval::module(&module).input(&input).run(&cache);
    assert_eq!(
        stdout_json(&out)["allow"],
        false,
        "nothing granted without --config"
    );
    let out = Eval::policy(&config, "nope").input(&input).run(&cache);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy `nope`"));
}

#[test]
fn guest_stdout_goes_to_the_daemon_log_never_to_the_caller() {
    let dir = tempdir();
    // One iovec at 3000 -> 17 bytes at 3008 (0x0bc0).
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (data (i32.const 3000) "\c0\0b\00\00\11\00\00\00")
  (data (i32.const 3008) "hello-from-guest\n")"#,
        &format!(
            "(drop (call $w (i32.const 1) (i32.const 3000) (i32.const 1) (i32.const 2000))) (drop (call $w (i32.const 2) (i32.const 3000) (i32.const 1) (i32.const 2000))) {ALLOW_RESULT}"
        ),
    );
    let module = write(dir.path(), "talk.wat", &wat);
    let input = write(dir.path(), "in.json", "{}");
    let audit = dir.path().join("audit.jsonl");
    let out = Eval::module(&module)
        .input(&input)
        .audit(&audit)
        .run(&dir.path().join("c"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout_json(&out),
        serde_json::json!({"allow": true}),
        "stdout carries only the decision"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    let tagged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hello-from-guest"))
        .collect();
    assert_eq!(tagged.len(), 2, "stdout and stderr lines in the log: {log}");
    assert!(tagged.iter().all(|l| l.contains("policy=talk")), "{log}");
    assert!(
        tagged
            .iter()
            .any(|l| l.contains("stream=\"stdout\"") || l.contains("stream=stdout")),
        "{log}"
    );
    assert!(
        audit_lines(&audit)
            .iter()
            .all(|l| l["kind"] != "wasi_denied"),
        "stdio is not a denial"
    );
}

#[test]
fn inspect_lists_imports_exports_abi_and_needed_wasi() {
    let dir = tempdir();
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "sandgate" "log" (func (param i32 i32 i32)))"#,
        ALLOW_RESULT,
    );
    let module = write(dir.path(), "m.wat", &wat);
    let out = sandgate(
        &[
            "inspect",
            "--module",
            module.to_str().expect("UTF-8 path"),
            "--json",
        ],
        &dir.path().join("c"),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let facts = stdout_json(&out);
    assert_eq!(facts["abi_version"], 1);
    assert_eq!(
        facts["wasi_groups"],
        serde_json::json!(["fs_read", "random"])
    );
    assert!(
        facts["exports"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x == "sandgate_evaluate"))
    );
    assert!(
        facts["imports"]
            .as_array()
            .is_some_and(|i| i.iter().any(|x| x == "sandgate::log"))
    );

    let text = sandgate(
        &["inspect", "--module", module.to_str().expect("UTF-8 path")],
        &dir.path().join("c"),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("abi version   1") && text.contains("allow = [\"fs_read\", \"random\"]"),
        "{text}"
    );

    let bad = write(
        dir.path(),
        "bad.wat",
        "(module (memory (export \"memory\") 1))",
    );
    let out = sandgate(
        &["inspect", "--module", bad.to_str().expect("UTF-8 path")],
        &dir.path().join("c"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing required export"));
}
