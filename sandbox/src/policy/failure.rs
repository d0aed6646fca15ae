//! How an evaluation fails: the classification of a guest's trap, a
//! refused call or a missed deadline into a DESIGN §3 error code and
//! message, and the hand-off of its bounded output to the log's writer.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use wasmtime::Trap;

use crate::abi::AbiViolation;
use crate::decision::ErrorCode;
use crate::host::Invocation;
use crate::telemetry::log::GuestBatch;
use crate::wasi::{self, WasiDenied};

/// Maps a failed run to its contract code and a message for the operator.
pub(super) fn classify(error: &anyhow::Error, inv: &Invocation) -> (ErrorCode, String) {
    if let Some(denied) = error.downcast_ref::<WasiDenied>() {
        let group = wasi::group_of(denied.call).unwrap_or("an exact function name");
        return (
            ErrorCode::WasiDenied,
            format!("{denied}; grant `{group}` in wasi.allow if the policy needs it"),
        );
    }
    // The cap is the root cause of whatever failed after it refused a
    // `memory.grow` (a trap, a bad pointer, a loop until the deadline).
    if inv.limiter.refused() {
        return (
            ErrorCode::MemoryLimit,
            format!(
                "guest tried to grow its memory past memory_limit_mb, then failed: {}",
                root_message(error)
            ),
        );
    }
    if let Some(violation) = error.downcast_ref::<AbiViolation>() {
        return (ErrorCode::AbiViolation, violation.0.clone());
    }
    let trap = error.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::Interrupt) {
        return (
            ErrorCode::EvalTimeout,
            "evaluation exceeded its deadline (timeout_ms)".into(),
        );
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return (
            ErrorCode::GuestTrap,
            format!("guest called proc_exit({})", exit.0),
        );
    }
    if let Some(trap) = trap {
        return (
            ErrorCode::GuestTrap,
            format!("guest trapped: {trap}{}", backtrace_hint(error)),
        );
    }
    (ErrorCode::Internal, root_message(error))
}

pub(super) fn root_message(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

pub(super) fn backtrace_hint(error: &anyhow::Error) -> String {
    match error.downcast_ref::<wasmtime::WasmBacktrace>() {
        Some(bt) => {
            let mut out = String::new();
            if let Some(frame) = bt.frames().first() {
                let _ = write!(out, " in {}", frame.func_name().unwrap_or("<unnamed>"));
            }
            out
        }
        None => String::new(),
    }
}

/// The error of an evaluation stopped by the async deadline: `memory_limit`
/// when the cap had refused the guest memory first, else `eval_timeout`.
pub(super) fn timed_out(timeout: Duration, inv: &Invocation) -> (ErrorCode, String) {
    let ms = timeout.as_millis();
    if inv.limiter.refused() {
        return (
            ErrorCode::MemoryLimit,
            format!(
                "guest tried to grow its memory past memory_limit_mb, then ran past timeout_ms = {ms}"
            ),
        );
    }
    (
        ErrorCode::EvalTimeout,
        format!("evaluation exceeded timeout_ms = {ms}"),
    )
}

/// Hands the guest's bounded output to the log writer (never waits on it);
/// returns how many lines the bound cut off.
pub(super) fn hand_off_output(inv: &Invocation, deadline: Instant) -> u64 {
    let collected = inv.wasi.output.finish();
    let dropped = collected.dropped_lines;
    crate::telemetry::log::hand_off(GuestBatch {
        policy: inv.subject.policy.clone(),
        version: inv.subject.version.clone(),
        decision_id: inv.subject.decision_id.clone(),
        deadline,
        lines: collected.lines,
        dropped_lines: collected.dropped_lines,
        dropped_bytes: collected.dropped_bytes,
    });
    dropped
}
