//! The engine's guarantees: deadlines, memory caps, traps, a fresh instance
//! per evaluation, and the compiled-module disk cache.

use std::time::{Duration, Instant};

use crate::support::*;
use sandgate::ErrorCode;

#[tokio::test]
async fn infinite_loop_ends_as_eval_timeout_within_the_deadline() {
    let dir = tempdir();
    let module = write(
        dir.path(),
        "loop.wat",
        &abi_guest("", "(loop $l br $l) i64.const 0"),
    );
    let started = Instant::now();
    let (e, audit) =
        evaluate_once(dir.path(), &policy_toml(&module, "timeout_ms = 50"), "{}").await;
    let elapsed = started.elapsed();
    assert_eq!(e.decision.error_code(), Some(ErrorCode::EvalTimeout));
    assert!(!e.decision.allow);
    assert!(e.duration >= Duration::from_millis(50), "{:?}", e.duration);
    assert!(
        e.duration < Duration::from_millis(50 + 40),
        "deadline overshot: {:?}",
        e.duration
    );
    assert!(elapsed < Duration::from_secs(5));
    let line = audit
        .iter()
        .find(|l| l["kind"] == "decision")
        .expect("decision line");
    assert_eq!(line["error"]["code"], "eval_timeout");
    assert_eq!(line["allow"], false);
}

#[tokio::test]
async fn growing_memory_past_the_cap_is_memory_limit() {
    let dir = tempdir();
    // 1 MiB cap; try to grow by 64 MiB, then trap as a guest allocator would.
    let body = "(drop (memory.grow (i32.const 1024))) unreachable";
    let module = write(dir.path(), "bomb.wat", &abi_guest("", body));
    let (e, _) = evaluate_once(
        dir.path(),
        &policy_toml(&module, "memory_limit_mb = 1"),
        "{}",
    )
    .await;
    assert_eq!(
        e.decision.error_code(),
        Some(ErrorCode::MemoryLimit),
        "{:?}",
        e.decision
    );
}

#[tokio::test]
async fn memory_grow_past_the_cap_returns_minus_one_to_the_guest() {
    let dir = tempdir();
    let body = allow_if("(i32.eq (memory.grow (i32.const 1024)) (i32.const -1))");
    let module = write(dir.path(), "grow.wat", &abi_guest("", &body));
    let (e, _) = evaluate_once(
        dir.path(),
        &policy_toml(&module, "memory_limit_mb = 1"),
        "{}",
    )
    .await;
    assert!(
        e.decision.allow,
        "the refused grow is visible to the guest: {:?}",
        e.decision
    );
}

#[tokio::test]
async fn unreachable_is_guest_trap() {
    let dir = tempdir();
    let module = write(dir.path(), "trap.wat", &abi_guest("", "unreachable"));
    let (e, _) = evaluate_once(dir.path(), &policy_toml(&module, ""), "{}").await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::GuestTrap));
    assert!(
        e.decision
            .error
            .as_ref()
            .is_some_and(|m| m.message.contains("unreachable")),
        "{:?}",
        e.decision
    );
}

#[tokio::test]
async fn fail_open_allows_but_still_reports_the_error() {
    let dir = tempdir();
    let module = write(dir.path(), "trap.wat", &abi_guest("", "unreachable"));
    let (e, audit) = evaluate_once(
        dir.path(),
        &policy_toml(&module, "fail_mode = \"open\""),
        "{}",
    )
    .await;
    assert!(e.decision.allow);
    assert_eq!(e.decision.error_code(), Some(ErrorCode::GuestTrap));
    assert_eq!(audit[0]["error"]["code"], "guest_trap");
}

#[tokio::test]
async fn input_that_is_not_json_is_invalid_input() {
    let dir = tempdir();
    let module = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let (e, _) = evaluate_once(dir.path(), &policy_toml(&module, ""), "{not json").await;
    assert_eq!(e.decision.error_code(), Some(ErrorCode::InvalidInput));
    assert!(!e.decision.allow);
}

#[tokio::test]
async fn every_evaluation_gets_a_fresh_instance() {
    let dir = tempdir();
    // A global counter: allow only on the first call in an instance.
    let wat = abi_guest(
        "(global $calls (mut i32) (i32.const 0))",
        &format!(
            "(global.set $calls (i32.add (global.get $calls) (i32.const 1))) {}",
            allow_if("(i32.eq (global.get $calls) (i32.const 1))")
        ),
    );
    let module = write(dir.path(), "count.wat", &wat);
    let (_, config) = config(dir.path(), &policy_toml(&module, ""));
    let engine = engine(&dir.path().join("cache"));
    let policy = sandgate::Policy::load(&engine, config.policies[0].clone())
        .await
        .expect("load");
    let audit = sandgate::audit::AuditLog::disabled();
    for _ in 0..5 {
        let e = policy
            .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
            .await;
        assert!(e.decision.allow, "state leaked between evaluations");
    }
}

#[tokio::test]
async fn a_hostile_policy_does_not_stall_a_healthy_one() {
    let dir = tempdir();
    let hostile = write(
        dir.path(),
        "loop.wat",
        &abi_guest("", "(loop $l br $l) i64.const 0"),
    );
    let healthy = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let toml = format!(
        "[[policy]]\nname = \"hostile\"\nmodule = \"{}\"\ntimeout_ms = 200\n\n[[policy]]\nname = \"healthy\"\nmodule = \"{}\"\n",
        hostile.display(),
        healthy.display()
    );
    let (_, config) = config(dir.path(), &toml);
    let engine = engine(&dir.path().join("cache"));
    let registry = sandgate::Registry::load(&engine, &config.policies)
        .await
        .expect("load");
    let audit = sandgate::audit::AuditLog::disabled();
    let hostile = registry.get("hostile").expect("hostile").clone();
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (p, a) = (hostile.clone(), audit.clone());
            tokio::spawn(async move {
                p.evaluate(b"{}", &sandgate::EvalOptions::default(), &a)
                    .await
            })
        })
        .collect();
    let healthy = registry.get("healthy").expect("healthy");
    let started = Instant::now();
    for _ in 0..20 {
        let e = healthy
            .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
            .await;
        assert!(e.decision.allow);
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "healthy policy was stalled: {:?}",
        started.elapsed()
    );
    for handle in loops {
        let e = handle.await.expect("join");
        assert_eq!(e.decision.error_code(), Some(ErrorCode::EvalTimeout));
    }
}

fn cache_entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn compiled_modules_are_cached_on_disk_and_corrupt_entries_recompiled() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let module = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let (_, config) = config(dir.path(), &policy_toml(&module, ""));
    let spec = config.policies[0].clone();

    let first = sandgate::Policy::load(&engine(&cache), spec.clone())
        .await
        .expect("load");
    assert_eq!(first.compiled_from(), "compiled");
    let entries = cache_entries(&cache);
    assert_eq!(
        entries.len(),
        1,
        "one entry keyed by digest and engine: {entries:?}"
    );
    let name = entries[0]
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    assert!(name.starts_with(&first.digest().hex()), "{name}");
    // No temporary files are left behind: the entry and the cache's key.
    assert_eq!(std::fs::read_dir(&cache).expect("cache dir").count(), 2);

    let second = sandgate::Policy::load(&engine(&cache), spec.clone())
        .await
        .expect("load");
    assert_eq!(second.compiled_from(), "disk cache");

    // Flip one byte in the payload: detected, recompiled, rewritten.
    let mut bytes = std::fs::read(&entries[0]).expect("read entry");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&entries[0], &bytes).expect("corrupt entry");
    let third = sandgate::Policy::load(&engine(&cache), spec.clone())
        .await
        .expect("corrupt entry must not break loading");
    assert_eq!(third.compiled_from(), "compiled");
    let e = third
        .evaluate(
            b"{}",
            &sandgate::EvalOptions::default(),
            &sandgate::audit::AuditLog::disabled(),
        )
        .await;
    assert!(e.decision.allow);
    let fourth = sandgate::Policy::load(&engine(&cache), spec.clone())
        .await
        .expect("load");
    assert_eq!(
        fourth.compiled_from(),
        "disk cache",
        "the entry was rewritten intact"
    );

    // A truncated (torn) entry is also recompiled.
    std::fs::write(&entries[0], &bytes[..bytes.len() / 2]).expect("truncate entry");
    let fifth = sandgate::Policy::load(&engine(&cache), spec)
        .await
        .expect("load");
    assert_eq!(fifth.compiled_from(), "compiled");
}
