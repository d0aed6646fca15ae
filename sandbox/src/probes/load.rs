//! Loading and attaching the eBPF programs: the embedded object, the
//! uprobes on the marker functions and the `raw_syscalls` tracepoints, and
//! the capability check that says precisely why they cannot run here.
//! [`Probes::start`](super::Probes::start) calls [`attach`].

use std::{
    collections::HashMap,
    num::NonZeroU32,
    path::Path,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{PerCpuArray, RingBuf},
    programs::{RawTracePoint, UProbe, uprobe::UProbeScope},
};
use sandgate_probes_common::{marker, names};

use super::consume::{Shared, consume};
use crate::fetch::error_chain;

/// The programs, built by `build.rs`; empty when built with `AYA_BUILD_SKIP`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sandgate-probes"));

/// The uprobe programs and the marker symbols they attach to.
pub(super) const UPROBES: [(&str, &str); 6] = [
    (names::GUEST_ENTER, marker::GUEST_ENTER),
    (names::GUEST_EXIT, marker::GUEST_EXIT),
    (names::HOSTCALL_ENTER, marker::HOSTCALL_ENTER),
    (names::HOSTCALL_EXIT, marker::HOSTCALL_EXIT),
    (names::WASI_DENIED, marker::WASI_DENIED),
    (names::INVOCATION_END, marker::INVOCATION_END),
];

/// The `raw_syscalls` tracepoints, attached raw (BPF_RAW_TRACEPOINT_OPEN: no
/// perf buffer is filled per syscall, and no tracefs is needed).
pub(super) const TRACEPOINTS: [(&str, &str, &str); 2] = [
    (names::SYS_ENTER, "raw_syscalls", "sys_enter"),
    (names::SYS_EXIT, "raw_syscalls", "sys_exit"),
];

/// Loads the programs, attaches them and starts the consumer task; the
/// error is the precise reason they cannot run here.
pub(super) fn attach() -> Result<Arc<Shared>, String> {
    if OBJECT.is_empty() {
        return Err("this sandgate binary was built without eBPF probes (AYA_BUILD_SKIP)".into());
    }
    if let Some(missing) = missing_capabilities() {
        return Err(missing);
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        return Err("the kernel has no uprobe support (CONFIG_UPROBE_EVENTS)".into());
    }
    let pid = std::process::id();
    let target = NonZeroU32::new(pid).ok_or("process id 0")?;
    let mut ebpf = EbpfLoader::new()
        .override_global(sandgate_probes_common::TARGET_TGID, &pid, true)
        .load(OBJECT)
        .map_err(|e| format!("loading the eBPF programs failed: {}", error_chain(&e)))?;
    for (program, symbol) in UPROBES {
        let uprobe: &mut UProbe = ebpf
            .program_mut(program)
            .ok_or_else(|| format!("program {program} is missing from the eBPF object"))?
            .try_into()
            .map_err(|e| format!("program {program}: {}", error_chain(&e)))?;
        uprobe
            .load()
            .map_err(|e| format!("loading uprobe {program}: {}", error_chain(&e)))?;
        uprobe
            .attach(symbol, "/proc/self/exe", UProbeScope::OneProcess(target))
            .map_err(|e| format!("attaching a uprobe to {symbol}: {}", error_chain(&e)))?;
    }
    for (program, category, name) in TRACEPOINTS {
        let tracepoint: &mut RawTracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| format!("program {program} is missing from the eBPF object"))?
            .try_into()
            .map_err(|e| format!("program {program}: {}", error_chain(&e)))?;
        tracepoint
            .load()
            .map_err(|e| format!("loading tracepoint program {program}: {}", error_chain(&e)))?;
        tracepoint.attach(name).map_err(|e| {
            format!(
                "attaching to tracepoint {category}:{name}: {}",
                error_chain(&e)
            )
        })?;
    }
    let take = |ebpf: &mut Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| format!("map {name} is missing from the eBPF object"))
    };
    let ring = RingBuf::try_from(take(&mut ebpf, names::EVENTS)?)
        .map_err(|e| format!("map {}: {}", names::EVENTS, error_chain(&e)))?;
    let stats = PerCpuArray::try_from(take(&mut ebpf, names::STATS)?)
        .map_err(|e| format!("map {}: {}", names::STATS, error_chain(&e)))?;
    let shared = Arc::new(Shared {
        accounts: Mutex::new(HashMap::new()),
        stats,
        received: AtomicU64::new(0),
        watched: AtomicU64::new(0),
        reported: AtomicU64::new(0),
        incomplete: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        _ebpf: Mutex::new(ebpf),
    });
    tokio::spawn(consume(Arc::clone(&shared), ring));
    Ok(shared)
}

/// Why this process may not load and attach the programs, if it may not:
/// it needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN.
fn missing_capabilities() -> Option<String> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| *name)
        .collect();
    Some(format!(
        "missing {} (or CAP_SYS_ADMIN): effective capabilities are {effective:#x}; run as root \
         or grant CAP_BPF and CAP_PERFMON",
        missing.join(" and ")
    ))
}
