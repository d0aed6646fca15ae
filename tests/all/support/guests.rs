//! Inline WAT guests speaking ABI v1: the skeleton every hand-written guest
//! shares (`abi_guest`, packed allow/deny results), a guest that never ends,
//! and guests that call the HTTP egress bridge. Used across the behaviour
//! modules for hostile and edge cases.

/// A WAT guest speaking ABI v1 whose `sandgate_evaluate` body is `evaluate`
/// (params `$ptr $len`, result i64) and that may add `extra` module fields.
/// A bump allocator from 64 KiB; `{"allow":true}` is at 1024 (`ALLOW_RESULT`),
/// `{"allow":false}` at 1100 (`DENY_RESULT`).
pub fn abi_guest(extra: &str, evaluate: &str) -> String {
    format!(
        r#"(module
  {extra}
  (memory (export "memory") 2)
  (data (i32.const 1024) "{{\"allow\":true}}")
  (data (i32.const 1100) "{{\"allow\":false}}")
  (global $next (mut i32) (i32.const 65536))
  (func (export "sandgate_abi_version") (result i32) i32.const 1)
  (func (export "sandgate_alloc") (param $n i32) (result i32)
    (local $p i32)
    global.get $next local.set $p
    global.get $next local.get $n i32.add global.set $next
    local.get $p)
  (func (export "sandgate_evaluate") (param $ptr i32) (param $len i32) (result i64)
    {evaluate})
)"#
    )
}

/// The packed result pointing at the `{"allow":true}` document.
pub const ALLOW_RESULT: &str = "i64.const 4398046511118"; // (1024 << 32) | 14

/// The packed result pointing at the `{"allow":false}` document.
pub const DENY_RESULT: &str = "i64.const 4724464025615"; // (1100 << 32) | 15

/// `evaluate` body answering allow when the i32 `cond` expression is non-zero.
pub fn allow_if(cond: &str) -> String {
    format!("(if (result i64) {cond} (then {ALLOW_RESULT}) (else {DENY_RESULT}))")
}

/// A guest that never returns; only its deadline stops it.
pub fn spinning_guest() -> String {
    abi_guest("", "(loop $spin (br $spin)) unreachable")
}
fn wat_str(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

const BRIDGE_IMPORTS: &str = r#"(import "sandgate" "http_send" (func $send (param i32 i32) (result i64)))
  (import "sandgate" "http_read" (func $read (param i32 i32) (result i32)))"#;

/// A guest that sends `requests` in order and allows when the last result is `expected`.
pub fn code_guest(requests: &[String], expected: i64) -> String {
    let mut data = String::new();
    let mut calls = String::new();
    for (i, r) in requests.iter().enumerate() {
        let at = 3000 + i * 1000;
        data.push_str(&format!("(data (i32.const {at}) \"{}\")\n", wat_str(r)));
        calls.push_str(&format!(
            "(local.set $n (call $send (i32.const {at}) (i32.const {})))\n",
            r.len()
        ));
    }
    abi_guest(
        &format!("{BRIDGE_IMPORTS}\n{data}"),
        &format!(
            "(local $n i64)\n{calls}{}",
            allow_if(&format!("(i64.eq (local.get $n) (i64.const {expected}))"))
        ),
    )
}

/// A guest that sends `request` and returns `{"allow":true,"obligations":<HttpResponse>}`,
/// or denies when the call failed.
pub fn response_guest(request: &str) -> String {
    abi_guest(
        &format!(
            "{BRIDGE_IMPORTS}\n(data (i32.const 3000) \"{}\")\n(data (i32.const 8192) \"{{\\\"allow\\\":true,\\\"obligations\\\":\")",
            wat_str(request)
        ),
        &format!(
            "(local $n i64) (local $m i32)
    (local.set $n (call $send (i32.const 3000) (i32.const {})))
    (if (i64.lt_s (local.get $n) (i64.const 0)) (then ({DENY_RESULT}) (return)))
    (local.set $m (call $read (i32.const 8220) (i32.wrap_i64 (local.get $n))))
    (i32.store8 (i32.add (i32.const 8220) (local.get $m)) (i32.const 125))
    (i64.or (i64.shl (i64.const 8192) (i64.const 32)) (i64.extend_i32_u (i32.add (local.get $m) (i32.const 29))))",
            request.len()
        ),
    )
    .replace(&format!("(then ({DENY_RESULT}) (return))"), &format!("(then {DENY_RESULT} return)"))
}
