//! Guest ABI v1: required exports, import rules, and bounds checks on every
//! pointer and length a guest hands the host.

use crate::support::*;
use sandgate::ErrorCode;

async fn load_error(wat: &str) -> String {
    let dir = tempdir();
    let module = write(dir.path(), "m.wat", wat);
    let (_, config) = config(dir.path(), &policy_toml(&module, ""));
    let engine = engine(&dir.path().join("cache"));
    match sandgate::Policy::load(&engine, config.policies[0].clone()).await {
        Ok(_) => panic!("module must be refused"),
        Err(e) => {
            assert_eq!(e.code(), ErrorCode::ModuleInvalid);
            e.to_string()
        }
    }
}

async fn eval_wat(wat: &str, extra: &str) -> sandgate::Evaluation {
    let dir = tempdir();
    let module = write(dir.path(), "m.wat", wat);
    evaluate_once(dir.path(), &policy_toml(&module, extra), "{}")
        .await
        .0
}

#[tokio::test]
async fn module_missing_a_required_export_is_refused_naming_it() {
    let wat = abi_guest("", ALLOW_RESULT).replace(r#"(export "sandgate_alloc")"#, "");
    let err = load_error(&wat).await;
    assert!(
        err.contains("missing required export `sandgate_alloc`"),
        "{err}"
    );
}

#[tokio::test]
async fn module_with_another_abi_version_is_refused() {
    let wat = abi_guest("", ALLOW_RESULT).replace(
        r#"(func (export "sandgate_abi_version") (result i32) i32.const 1)"#,
        r#"(func (export "sandgate_abi_version") (result i32) i32.const 2)"#,
    );
    let err = load_error(&wat).await;
    assert!(err.contains("sandgate_abi_version returned 2"), "{err}");
}

#[tokio::test]
async fn export_with_the_wrong_type_is_refused() {
    let wat = abi_guest("", ALLOW_RESULT).replace(
        r#"(func (export "sandgate_evaluate") (param $ptr i32) (param $len i32) (result i64)"#,
        r#"(func (export "sandgate_evaluate") (param $ptr i32) (param $len i32) (param $extra i32) (result i64)"#,
    );
    let err = load_error(&wat).await;
    assert!(err.contains("export `sandgate_evaluate` has type"), "{err}");
}

#[tokio::test]
async fn imports_outside_the_abi_are_refused() {
    let err = load_error(&abi_guest(
        r#"(import "env" "system" (func))"#,
        ALLOW_RESULT,
    ))
    .await;
    assert!(err.contains("imports `env::system`"), "{err}");
    let err = load_error(&abi_guest(
        r#"(import "sandgate" "exec" (func))"#,
        ALLOW_RESULT,
    ))
    .await;
    assert!(err.contains("imports `sandgate::exec`"), "{err}");
    let err = load_error(&abi_guest(
        r#"(import "wasi_snapshot_preview1" "fork" (func))"#,
        ALLOW_RESULT,
    ))
    .await;
    assert!(err.contains("not a WASI preview 1 function"), "{err}");
}

#[tokio::test]
async fn decision_pointer_outside_memory_is_abi_violation() {
    // (200000 << 32) | 14: past the 2 pages (131072 bytes) of memory.
    let e = eval_wat(&abi_guest("", "i64.const 858993459200014"), "").await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::AbiViolation));
    assert!(!e.decision.allow, "fail closed");
    assert!(
        e.decision
            .error
            .as_ref()
            .is_some_and(|m| m.message.contains("outside guest memory"))
    );
}

#[tokio::test]
async fn decision_larger_than_max_output_is_abi_violation() {
    // (1024 << 32) | 5000 with max_output_bytes = 4096.
    let e = eval_wat(
        &abi_guest("", "i64.const 4398046516104"),
        "max_output_bytes = 4096",
    )
    .await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::AbiViolation));
    assert!(
        e.decision
            .error
            .as_ref()
            .is_some_and(|m| m.message.contains("maximum output is 4096"))
    );
}

#[tokio::test]
async fn decision_that_is_not_json_or_lacks_allow_is_abi_violation() {
    let not_json = abi_guest(
        r#"(data (i32.const 2048) "allow")"#,
        "i64.const 8796093022213",
    ); // (2048<<32)|5
    let e = eval_wat(&not_json, "").await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::AbiViolation));
    assert!(
        e.decision
            .error
            .as_ref()
            .is_some_and(|m| m.message.contains("not valid JSON"))
    );

    let no_allow = abi_guest(
        r#"(data (i32.const 2048) "{\"ok\":1}")"#,
        "i64.const 8796093022216",
    ); // (2048<<32)|8
    let e = eval_wat(&no_allow, "").await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::AbiViolation));
    assert!(
        e.decision
            .error
            .as_ref()
            .is_some_and(|m| m.message.contains("no `allow`"))
    );
}

#[tokio::test]
async fn alloc_failure_or_bad_pointer_is_abi_violation() {
    let zero = abi_guest("", ALLOW_RESULT).replace("local.get $p)", "i32.const 0)");
    let e = eval_wat(&zero, "").await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::AbiViolation));
    assert!(
        e.decision
            .error
            .as_ref()
            .is_some_and(|m| m.message.contains("returned 0"))
    );

    let outside = abi_guest("", ALLOW_RESULT).replace("local.get $p)", "i32.const 131070)");
    let e = eval_wat(&outside, "").await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::AbiViolation));
    assert!(
        e.decision
            .error
            .as_ref()
            .is_some_and(|m| m.message.contains("unusable pointer"))
    );
}

#[tokio::test]
async fn log_with_a_bad_pointer_is_abi_violation_not_a_host_crash() {
    let wat = abi_guest(
        r#"(import "sandgate" "log" (func $log (param i32 i32 i32)))"#,
        &format!("(call $log (i32.const 2) (i32.const 131000) (i32.const 5000)) {ALLOW_RESULT}"),
    );
    let e = eval_wat(&wat, "").await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::AbiViolation));
}

#[tokio::test]
async fn the_guest_reads_the_input_document_with_context() {
    // Allow only when the bytes at ptr start with `{"input":`.
    let wat = abi_guest(
        "",
        &allow_if(
            "(i32.and (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 123)) (i32.eq (i32.load8_u offset=2 (local.get $ptr)) (i32.const 105)))",
        ),
    );
    let e = eval_wat(&wat, "").await;
    assert!(e.decision.allow, "{:?}", e.decision);
    assert_eq!(e.decision.error, None);
}

#[tokio::test]
async fn http_send_is_refused_and_audited_without_egress() {
    let dir = tempdir();
    let wat = abi_guest(
        r#"(import "sandgate" "http_send" (func $send (param i32 i32) (result i64)))
  (import "sandgate" "http_read" (func $read (param i32 i32) (result i32)))
  (data (i32.const 3000) "{\"method\":\"POST\",\"url\":\"http://127.0.0.1:9/introspect\"}")
  (data (i32.const 3100) "not json")"#,
        &allow_if(
            "(i32.and (i32.and (i64.eq (call $send (i32.const 3000) (i32.const 55)) (i64.const -1)) (i64.eq (call $send (i32.const 3100) (i32.const 8)) (i64.const -5))) (i32.eq (call $read (i32.const 4000) (i32.const 10)) (i32.const -5)))",
        ),
    );
    let module = write(dir.path(), "m.wat", &wat);
    let (e, audit) = evaluate_once(dir.path(), &policy_toml(&module, ""), "{}").await;
    assert!(e.decision.allow, "{:?}", e.decision);
    let denied: Vec<_> = audit
        .iter()
        .filter(|l| l["kind"] == "egress_denied")
        .collect();
    assert_eq!(denied.len(), 1, "{audit:?}");
    assert_eq!(denied[0]["url"], "http://127.0.0.1:9/introspect");
    assert!(
        denied[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("egress.allow"))
    );
}
