//! Guest ABI v1 (DESIGN §2): the host state of one evaluation (`Invocation`),
//! module validation (required exports and their types, allowed imports), the
//! `sandgate` import module, and the only code that turns guest `(ptr, len)`
//! pairs into bytes — every access bounds-checked against the guest's memory.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use opentelemetry::KeyValue;
use wasmtime::{Caller, Extern, ExternType, Linker, Memory, Module, ValType};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::audit::{AuditLog, AuditRecord, Subject};
use crate::config::{Access, Grants};
use crate::engine::MemoryLimiter;
use crate::telemetry::log::Escaped;
use crate::telemetry::traces::Scope;
use crate::wasi::{Denial, GuestOutput};
use sandgate_probes_common::phase;

/// The ABI version this host speaks.
pub const ABI_VERSION: i32 = 1;
/// The host import module.
pub const MODULE: &str = "sandgate";
/// Longest path a WASI call may name before it is cut in audit lines.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest guest log message kept; longer ones are truncated.
pub const MAX_LOG_BYTES: usize = 16 * 1024;
/// Guest log calls per evaluation that become span events.
pub const MAX_LOG_CALLS: u32 = 256;

/// Imports of module `sandgate` this host provides.
pub const IMPORTS: [&str; 3] = ["log", "http_send", "http_read"];

/// A guest broke the ABI: a bad pointer, length or output.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AbiViolation(pub String);

/// The host state of one evaluation: everything a host function may touch.
pub struct Invocation {
    pub wasi: WasiP1Ctx,
    pub limiter: MemoryLimiter,
    pub grants: Arc<Grants>,
    /// Access of open directory descriptors (preopens and what was opened from them).
    pub fd_access: HashMap<u32, Access>,
    pub output: GuestOutput,
    pub audit: AuditLog,
    pub subject: Subject,
    pub denials: Vec<Denial>,
    pub log_calls: u32,
    /// The policy's HTTP egress path.
    pub bridge: Arc<crate::bridge::Bridge>,
    /// Bridged calls made (counted against `max_calls`).
    pub egress_calls: u32,
    /// Bridged requests refused by the allowlist during this evaluation.
    pub egress_denied: u32,
    /// The response `http_read` will copy.
    pub pending: Option<Vec<u8>>,
    pub http_calls: Vec<crate::bridge::HttpCall>,
    /// The span the guest runs in (its `evaluate` span once instantiated).
    pub trace: Scope,
    /// Epoch ticks the guest ran through (`wasm.fuel_or_epochs`).
    pub epochs: u64,
    /// This invocation as the eBPF probes know it.
    pub probe: crate::probes::Probe,
}

impl Invocation {
    /// Records a refused WASI call: audit line, daemon log, and the list the
    /// decision's trace reports.
    pub fn refuse(&mut self, denial: Denial) {
        if self.probe.is_watched()
            && let Some(index) = crate::wasi::PREVIEW1.iter().position(|f| *f == denial.call)
        {
            self.probe.wasi_denied(index);
        }
        tracing::warn!(
            policy = %self.subject.policy,
            version = %self.subject.version,
            decision_id = %self.subject.decision_id,
            call = denial.call,
            detail = %Escaped(&denial.detail),
            "wasi call refused"
        );
        self.trace.event("wasi_denied", || {
            vec![
                KeyValue::new("wasi.call", denial.call),
                KeyValue::new("wasi.detail", denial.detail.clone()),
            ]
        });
        self.audit.record(
            &self.subject,
            &AuditRecord::WasiDenied {
                call: denial.call.to_owned(),
                detail: denial.detail.clone(),
                args: denial.args.clone(),
            },
        );
        self.denials.push(denial);
    }
}

/// The byte range `[ptr, ptr+len)` if it lies inside memory of `size` bytes.
pub fn checked_range(size: usize, ptr: u32, len: u32) -> Result<Range<usize>, AbiViolation> {
    let start = ptr as usize;
    let end = start.checked_add(len as usize);
    match end {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(AbiViolation(format!(
            "range [{ptr}, {ptr}+{len}) is outside guest memory of {size} bytes"
        ))),
    }
}

/// The guest's exported memory, seen from a host function.
pub fn memory(caller: &mut Caller<'_, Invocation>) -> Option<Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub fn read_guest(
    caller: &mut Caller<'_, Invocation>,
    ptr: i32,
    len: usize,
) -> Result<Vec<u8>, AbiViolation> {
    let memory = memory(caller).ok_or_else(|| AbiViolation("module exports no memory".into()))?;
    let data = memory.data(&caller);
    let len = u32::try_from(len).map_err(|_| AbiViolation(format!("length {len} is too large")))?;
    let range = checked_range(data.len(), ptr as u32, len)?;
    Ok(data[range].to_vec())
}

/// Reads a UTF-8 string (lossily) of at most `max` bytes; longer ones are cut.
pub fn read_guest_string(
    caller: &mut Caller<'_, Invocation>,
    ptr: i32,
    len: i32,
    max: usize,
) -> Result<String, AbiViolation> {
    let len = u32::try_from(len).map_err(|_| AbiViolation(format!("negative length {len}")))?;
    let memory = memory(caller).ok_or_else(|| AbiViolation("module exports no memory".into()))?;
    let data = memory.data(&caller);
    let range = checked_range(data.len(), ptr as u32, len)?;
    let bytes = &data[range];
    let cut = bytes.len().min(max);
    let mut text = String::from_utf8_lossy(&bytes[..cut]).into_owned();
    if cut < bytes.len() {
        text.push('…');
    }
    Ok(text)
}

/// Writes `bytes` at `ptr` in guest memory.
pub fn write_guest(
    caller: &mut Caller<'_, Invocation>,
    ptr: i32,
    bytes: &[u8],
) -> Result<(), AbiViolation> {
    let memory = memory(caller).ok_or_else(|| AbiViolation("module exports no memory".into()))?;
    let data = memory.data_mut(caller);
    let range = checked_range(data.len(), ptr as u32, bytes.len() as u32)?;
    data[range].copy_from_slice(bytes);
    Ok(())
}

/// Concatenates the buffers of a WASI iovec array, keeping at most `max` bytes.
pub fn gather_iovecs(
    caller: &mut Caller<'_, Invocation>,
    iovs: i32,
    count: i32,
    max: usize,
) -> Result<Vec<u8>, AbiViolation> {
    let memory = memory(caller).ok_or_else(|| AbiViolation("module exports no memory".into()))?;
    let data = memory.data(&caller);
    let count =
        u32::try_from(count).map_err(|_| AbiViolation(format!("negative iovec count {count}")))?;
    let table = checked_range(data.len(), iovs as u32, count.saturating_mul(8))?;
    let mut out = Vec::new();
    for entry in data[table].chunks_exact(8) {
        let ptr = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let len = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        let range = checked_range(data.len(), ptr, len)?;
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&data[range][..room.min(len as usize)]);
    }
    Ok(out)
}

/// Checks a module against ABI v1 before it is ever instantiated: required
/// exports with their exact types, and imports only from `sandgate` (known
/// names) and `wasi_snapshot_preview1`. The error names what is wrong.
pub fn validate(module: &Module) -> Result<(), String> {
    use ValType::{I32, I64};
    let func = |name: &str, params: &[ValType], results: &[ValType]| -> Result<(), String> {
        let signature = |ps: &[ValType], rs: &[ValType]| {
            let list = |ts: &[ValType]| {
                ts.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!("({}) -> ({})", list(ps), list(rs))
        };
        let wanted = signature(params, results);
        match module.get_export(name) {
            None => Err(format!("missing required export `{name}` {wanted}")),
            Some(ExternType::Func(ty)) => {
                let have = signature(
                    &ty.params().collect::<Vec<_>>(),
                    &ty.results().collect::<Vec<_>>(),
                );
                if have == wanted {
                    Ok(())
                } else {
                    Err(format!(
                        "export `{name}` has type {have}, expected {wanted}"
                    ))
                }
            }
            Some(_) => Err(format!("export `{name}` must be a function {wanted}")),
        }
    };
    match module.get_export("memory") {
        Some(ExternType::Memory(m)) if !m.is_64() => {}
        Some(ExternType::Memory(_)) => return Err("export `memory` must be a 32-bit memory".into()),
        Some(_) => return Err("export `memory` must be a memory".into()),
        None => return Err("missing required export `memory`".into()),
    }
    func("sandgate_abi_version", &[], &[I32])?;
    func("sandgate_alloc", &[I32], &[I32])?;
    func("sandgate_evaluate", &[I32, I32], &[I64])?;
    if module.get_export("_initialize").is_some() {
        func("_initialize", &[], &[])?;
    }
    if module.get_export("sandgate_init").is_some() {
        func("sandgate_init", &[], &[I32])?;
    }
    for import in module.imports() {
        match import.module() {
            MODULE if IMPORTS.contains(&import.name()) => {}
            MODULE => {
                return Err(format!(
                    "imports `{MODULE}::{}`, which ABI v1 does not provide (it has {})",
                    import.name(),
                    IMPORTS.join(", ")
                ));
            }
            crate::wasi::MODULE => {}
            other => {
                return Err(format!(
                    "imports `{other}::{}`: only `{MODULE}` and `{}` imports are allowed",
                    import.name(),
                    crate::wasi::MODULE
                ));
            }
        }
    }
    Ok(())
}

/// Adds the `sandgate` import module: `log` here, the HTTP functions from `bridge`.
pub fn add_to_linker(linker: &mut Linker<Invocation>) -> wasmtime::Result<()> {
    crate::bridge::add_to_linker(linker)?;
    linker.func_wrap(
        MODULE,
        "log",
        |mut caller: Caller<'_, Invocation>,
         level: i32,
         ptr: i32,
         len: i32|
         -> wasmtime::Result<()> {
            let message = read_guest_string(&mut caller, ptr, len, MAX_LOG_BYTES)?;
            let probe = caller.data().probe;
            probe.phase(phase::LOG, || log(caller.data_mut(), level, &message));
            Ok(())
        },
    )?;
    Ok(())
}

/// A guest `log` call: kept in the evaluation's bounded output (written to
/// the daemon log after the evaluation, off the request path) and, up to
/// `MAX_LOG_CALLS`, a span event (the span bounds its own events too).
fn log(inv: &mut Invocation, level: i32, message: &str) {
    inv.log_calls += 1;
    inv.output.log(level, message);
    if inv.log_calls <= MAX_LOG_CALLS {
        inv.trace.guest_log(level, message);
    }
}

/// Splits the packed `(out_ptr << 32) | out_len` result of `sandgate_evaluate`.
pub fn unpack(packed: i64) -> (u32, u32) {
    let bits = packed as u64;
    ((bits >> 32) as u32, bits as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_against_memory_size() {
        assert_eq!(checked_range(100, 10, 20).ok(), Some(10..30));
        assert_eq!(checked_range(100, 0, 100).ok(), Some(0..100));
        assert!(checked_range(100, 90, 11).is_err());
        assert!(checked_range(100, u32::MAX, 2).is_err());
        assert!(checked_range(0, 0, 1).is_err());
    }

    #[test]
    fn packed_results_split_into_pointer_and_length() {
        assert_eq!(unpack((1024_i64 << 32) | 77), (1024, 77));
        assert_eq!(unpack(-1), (u32::MAX, u32::MAX));
    }
}
