//! Capability-restricted WASI: only granted functions are real; every other
//! call is refused with ERRNO_NOTCAPABLE (or a trap) and audited; preopens
//! confine the guest and honour read-only.

use crate::support::*;
use sandgate::ErrorCode;

const NOTCAPABLE: &str = "(i32.const 76)";

const PATH_OPEN: &str = r#"(import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))"#;

/// `path_open(fd 3, path at 3000)` with the given oflags and rights.
fn path_open(path: &str, oflags: u32, rights: u64) -> String {
    format!(
        "(call $path_open (i32.const 3) (i32.const 0) (i32.const 3000) (i32.const {}) (i32.const {oflags}) (i64.const {rights}) (i64.const 0) (i32.const 0) (i32.const 2000))",
        path.len()
    )
}

fn path_data(path: &str) -> String {
    format!(r#"(data (i32.const 3000) "{path}")"#)
}

fn denials(audit: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    audit
        .iter()
        .filter(|l| l["kind"] == "wasi_denied")
        .collect()
}

#[tokio::test]
async fn denied_random_get_returns_notcapable_and_is_audited() {
    let dir = tempdir();
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))"#,
        &allow_if(&format!(
            "(i32.eq (call $random_get (i32.const 2048) (i32.const 16)) {NOTCAPABLE})"
        )),
    );
    let module = write(dir.path(), "m.wat", &wat);
    let (e, audit) = evaluate_once(dir.path(), &policy_toml(&module, ""), "{}").await;
    assert!(
        e.decision.allow,
        "random_get must return 76: {:?}",
        e.decision
    );
    let denied = denials(&audit);
    assert_eq!(denied.len(), 1, "{audit:?}");
    assert_eq!(denied[0]["call"], "random_get");
    assert_eq!(denied[0]["detail"], "16 bytes");
    assert_eq!(denied[0]["policy"], "p");
    assert_eq!(denied[0]["decision_id"], e.decision_id.as_str());
    assert!(
        denied[0]["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    assert!(denied[0]["ts"].as_str().is_some());
    assert_eq!(e.denials.len(), 1);
}

#[tokio::test]
async fn granted_random_get_is_real() {
    let dir = tempdir();
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))"#,
        &allow_if("(i32.eqz (call $random_get (i32.const 2048) (i32.const 16)))"),
    );
    let module = write(dir.path(), "m.wat", &wat);
    let (e, audit) = evaluate_once(
        dir.path(),
        &policy_toml(&module, "[policy.wasi]\nallow = [\"random\"]"),
        "{}",
    )
    .await;
    assert!(e.decision.allow, "{:?}", e.decision);
    assert!(denials(&audit).is_empty());
}

#[tokio::test]
async fn on_denied_trap_aborts_the_evaluation_with_wasi_denied() {
    let dir = tempdir();
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))"#,
        &format!("(drop (call $env (i32.const 2048) (i32.const 2052))) {ALLOW_RESULT}"),
    );
    let module = write(dir.path(), "m.wat", &wat);
    let (e, audit) = evaluate_once(
        dir.path(),
        &policy_toml(&module, "[policy.wasi]\non_denied = \"trap\""),
        "{}",
    )
    .await;
    assert!(!e.decision.allow);
    assert_eq!(e.decision.error_code(), Some(ErrorCode::WasiDenied));
    let message = &e.decision.error.as_ref().expect("error").message;
    assert!(
        message.contains("environ_sizes_get") && message.contains("`env`"),
        "{message}"
    );
    assert_eq!(denials(&audit)[0]["call"], "environ_sizes_get");
    let decision = audit
        .iter()
        .find(|l| l["kind"] == "decision")
        .expect("decision line");
    assert_eq!(decision["error"]["code"], "wasi_denied");
}

/// A directory to preopen holding `keep.txt`, next to a `secret` outside it.
fn preopen_fixture(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("data");
    write(&data, "keep.txt", "keep");
    write(dir, "secret", "outside the preopen");
    data
}

/// A guest that calls `path_open(path, oflags, rights)` in preopen fd 3 and
/// allows when `test` (given the call's expression) holds.
fn open_guest(path: &str, oflags: u32, rights: u64, test: impl Fn(&str) -> String) -> String {
    abi_guest(
        &format!("{PATH_OPEN} {}", path_data(path)),
        &allow_if(&test(&path_open(path, oflags, rights))),
    )
}

/// Evaluates the guest `wat` once with the `preopen_toml` grants.
async fn run_in_preopen(
    dir: &std::path::Path,
    wat: &str,
    allow: &str,
    mode: &str,
) -> (sandgate::Evaluation, Vec<serde_json::Value>) {
    let module = write(dir, "m.wat", wat);
    evaluate_once(dir, &preopen_toml(&module, allow, mode), "{}").await
}

fn preopen_toml(module: &std::path::Path, allow: &str, mode: &str) -> String {
    policy_toml(
        module,
        &format!(
            "[policy.wasi]\nallow = [{allow}]\npreopens = [{{ host = \"data\", guest = \"/data\", mode = \"{mode}\" }}]"
        ),
    )
}

#[tokio::test]
async fn path_open_leaving_the_preopen_is_refused_and_audited() {
    let dir = tempdir();
    preopen_fixture(dir.path());
    let wat = open_guest("../secret", 0, 2, |open| {
        format!("(i32.eq {open} {NOTCAPABLE})")
    });
    let (e, audit) = run_in_preopen(dir.path(), &wat, "\"fs_read\"", "ro").await;
    assert!(e.decision.allow, "escape must return 76: {:?}", e.decision);
    let denied = denials(&audit);
    assert_eq!(denied.len(), 1, "{audit:?}");
    assert_eq!(denied[0]["call"], "path_open");
    assert_eq!(denied[0]["detail"], "../secret");
    assert_eq!(denied[0]["args"]["fd"], 3);
}

#[tokio::test]
async fn symlink_out_of_the_preopen_is_refused_and_audited() {
    let dir = tempdir();
    let data = preopen_fixture(dir.path());
    std::os::unix::fs::symlink(dir.path(), data.join("out")).expect("symlink");
    let wat = open_guest("out/secret", 0, 2, |open| {
        format!("(i32.ne {open} (i32.const 0))")
    });
    let (e, audit) = run_in_preopen(dir.path(), &wat, "\"fs_read\"", "ro").await;
    assert!(
        e.decision.allow,
        "the symlink must not be followed out: {:?}",
        e.decision
    );
    let denied = denials(&audit);
    assert_eq!(denied.len(), 1, "{audit:?}");
    assert_eq!(denied[0]["detail"], "out/secret");
}

#[tokio::test]
async fn reading_a_file_in_a_read_only_preopen_works() {
    let dir = tempdir();
    preopen_fixture(dir.path());
    let wat = open_guest("keep.txt", 0, 2, |open| format!("(i32.eqz {open})"));
    let (e, audit) = run_in_preopen(dir.path(), &wat, "\"fs_read\"", "ro").await;
    assert!(e.decision.allow, "{:?}", e.decision);
    assert!(denials(&audit).is_empty(), "{audit:?}");
}

/// The WASI context (and with it the preopened directories) is opened on
/// the guest's first WASI call. A directory gone by then fails that
/// evaluation closed with `internal` naming it, never an answer computed
/// without the files; once it is back, evaluations answer again.
#[tokio::test]
async fn a_preopen_gone_at_evaluation_fails_it_closed_naming_the_directory() {
    let dir = tempdir();
    let data = preopen_fixture(dir.path());
    let wat = open_guest("keep.txt", 0, 2, |open| format!("(i32.eqz {open})"));
    let module = write(dir.path(), "m.wat", &wat);
    let (_, config) = config(dir.path(), &preopen_toml(&module, "\"fs_read\"", "ro"));
    let engine = engine(&dir.path().join("cache"));
    let policy = sandgate::Policy::load(&engine, config.policies[0].clone())
        .await
        .unwrap_or_else(|e| panic!("policy must load: {e}"));
    let audit = sandgate::audit::AuditLog::disabled();
    let options = sandgate::EvalOptions::default();

    let before = policy.evaluate(b"{}", &options, &audit).await;
    assert!(before.decision.allow, "{:?}", before.decision);

    let away = dir.path().join("data-away");
    std::fs::rename(&data, &away).expect("move the preopen away");
    let gone = policy.evaluate(b"{}", &options, &audit).await;
    assert!(!gone.decision.allow, "{:?}", gone.decision);
    let error = gone.decision.error.as_ref().expect("an error");
    assert_eq!(error.code, ErrorCode::Internal, "{error:?}");
    assert!(
        error
            .message
            .contains("cannot open the preopened directories")
            && error.message.contains(&data.display().to_string()),
        "{error:?}"
    );

    std::fs::rename(&away, &data).expect("put the preopen back");
    let after = policy.evaluate(b"{}", &options, &audit).await;
    assert!(after.decision.allow, "{:?}", after.decision);
}

#[tokio::test]
async fn read_only_preopen_refuses_creates_writes_renames_and_unlinks() {
    let dir = tempdir();
    let data = preopen_fixture(dir.path());
    let wat = abi_guest(
        &format!(
            r#"{PATH_OPEN}
  (import "wasi_snapshot_preview1" "path_unlink_file" (func $unlink (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_rename" (func $rename (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_create_directory" (func $mkdir (param i32 i32 i32) (result i32)))
  (data (i32.const 3000) "new.txt")
  (data (i32.const 3100) "keep.txt")
  (data (i32.const 3200) "moved.txt")
  (data (i32.const 3300) "newdir")"#
        ),
        &allow_if(&format!(
            "(i32.and (i32.and (i32.eq {create} {NOTCAPABLE}) (i32.eq {write} {NOTCAPABLE}))
               (i32.and (i32.ne (call $unlink (i32.const 3) (i32.const 3100) (i32.const 8)) (i32.const 0))
                 (i32.and (i32.ne (call $rename (i32.const 3) (i32.const 3100) (i32.const 8) (i32.const 3) (i32.const 3200) (i32.const 9)) (i32.const 0))
                          (i32.ne (call $mkdir (i32.const 3) (i32.const 3300) (i32.const 6)) (i32.const 0)))))",
            create = path_open("new.txt", 1, 64),
            write = "(call $path_open (i32.const 3) (i32.const 0) (i32.const 3100) (i32.const 8) (i32.const 0) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 2000))",
        )),
    );
    let (e, audit) = run_in_preopen(dir.path(), &wat, "\"fs_read\", \"fs_write\"", "ro").await;
    assert!(
        e.decision.allow,
        "every mutation must be refused: {:?}",
        e.decision
    );
    assert!(!data.join("new.txt").exists());
    assert!(!data.join("moved.txt").exists());
    assert!(!data.join("newdir").exists());
    assert_eq!(
        std::fs::read_to_string(data.join("keep.txt")).expect("keep.txt"),
        "keep"
    );
    let denied = denials(&audit);
    let opens: Vec<_> = denied.iter().filter(|l| l["call"] == "path_open").collect();
    assert_eq!(opens.len(), 2, "{audit:?}");
    assert_eq!(opens[0]["detail"], "new.txt");
    assert_eq!(opens[0]["args"]["write"], true);
}

#[tokio::test]
async fn read_write_preopen_allows_creating_files() {
    let dir = tempdir();
    let data = preopen_fixture(dir.path());
    let wat = open_guest("new.txt", 1, 64, |open| format!("(i32.eqz {open})"));
    let (e, _) = run_in_preopen(dir.path(), &wat, "\"fs_read\", \"fs_write\"", "rw").await;
    assert!(e.decision.allow, "{:?}", e.decision);
    assert!(data.join("new.txt").exists());
}

#[tokio::test]
async fn writes_without_fs_write_are_refused_even_on_a_preopen() {
    let dir = tempdir();
    let data = preopen_fixture(dir.path());
    let wat = open_guest("new.txt", 1, 64, |open| {
        format!("(i32.eq {open} {NOTCAPABLE})")
    });
    let (e, audit) = run_in_preopen(dir.path(), &wat, "\"fs_read\"", "ro").await;
    assert!(e.decision.allow, "{:?}", e.decision);
    assert!(!data.join("new.txt").exists());
    assert!(
        denials(&audit)[0]["args"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("fs_write"))
    );
}

#[tokio::test]
async fn only_listed_environment_variables_are_visible() {
    let dir = tempdir();
    // environ_sizes_get writes the variable count at 2048.
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))"#,
        &allow_if(
            "(i32.and (i32.eqz (call $env (i32.const 2048) (i32.const 2052))) (i32.eq (i32.load (i32.const 2048)) (i32.const 1)))",
        ),
    );
    let module = write(dir.path(), "m.wat", &wat);
    assert!(std::env::var("PATH").is_ok() && std::env::var("HOME").is_ok());
    let (e, _) = evaluate_once(
        dir.path(),
        &policy_toml(
            &module,
            "[policy.wasi]\nallow = [\"env\"]\nenv = [\"PATH\"]",
        ),
        "{}",
    )
    .await;
    assert!(
        e.decision.allow,
        "exactly one variable must be visible: {:?}",
        e.decision
    );
}

#[tokio::test]
async fn guests_get_no_arguments() {
    let dir = tempdir();
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "args_sizes_get" (func $args (param i32 i32) (result i32)))"#,
        &allow_if(
            "(i32.and (i32.eqz (call $args (i32.const 2048) (i32.const 2052))) (i32.eqz (i32.load (i32.const 2048))))",
        ),
    );
    let module = write(dir.path(), "m.wat", &wat);
    let (e, _) = evaluate_once(
        dir.path(),
        &policy_toml(&module, "[policy.wasi]\nallow = [\"args\"]"),
        "{}",
    )
    .await;
    assert!(e.decision.allow, "{:?}", e.decision);
}

#[tokio::test]
async fn fd_write_to_other_descriptors_is_refused_without_fs_write() {
    let dir = tempdir();
    let wat = abi_guest(
        r#"(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (data (i32.const 3000) "\b8\0b\00\00\02\00\00\00")
  (data (i32.const 3000) "\b8\0b\00\00\02\00\00\00")"#,
        &allow_if(&format!(
            "(i32.eq (call $fd_write (i32.const 7) (i32.const 3000) (i32.const 1) (i32.const 2000)) {NOTCAPABLE})"
        )),
    );
    let module = write(dir.path(), "m.wat", &wat);
    let (e, audit) = evaluate_once(dir.path(), &policy_toml(&module, ""), "{}").await;
    assert!(e.decision.allow, "{:?}", e.decision);
    assert_eq!(denials(&audit)[0]["call"], "fd_write");
    assert_eq!(denials(&audit)[0]["detail"], "fd 7");
}
