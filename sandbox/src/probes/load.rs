//! Loading and attaching the eBPF programs: the embedded object, the
//! `raw_syscalls` tracepoints, the memory-mapped slots, and the capability
//! check that says precisely why they cannot run here.
//! [`Probes::start`](super::Probes::start) calls [`attach`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray, RingBuf},
    programs::RawTracePoint,
};
use sandgate_probes_common::{Offsets, names};

use super::btf::Btf;
use super::consume::{ExpectedSets, Shared, consume};
use super::enforce;
use super::slots::Slots;
use crate::fetch::error_chain;

/// The programs, built by `build.rs`; empty when built with `AYA_BUILD_SKIP`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sandgate-probes"));

/// The `raw_syscalls` tracepoints, attached raw (BPF_RAW_TRACEPOINT_OPEN: no
/// perf buffer is filled per syscall, and no tracefs is needed).
pub(super) const TRACEPOINTS: [(&str, &str, &str); 2] = [
    (names::SYS_ENTER, "raw_syscalls", "sys_enter"),
    (names::SYS_EXIT, "raw_syscalls", "sys_exit"),
];

/// Loads the programs, maps the slots, attaches the programs and starts
/// the consumer task; the error is the precise reason they cannot run here.
/// With `enforce`, also attaches the LSM programs; the second value is then
/// why they could not be, if they could not (the probes still run).
pub(super) fn attach(enforce: bool) -> Result<(Arc<Shared>, Option<String>), String> {
    if OBJECT.is_empty() {
        return Err("this sandgate binary was built without eBPF probes (AYA_BUILD_SKIP)".into());
    }
    if let Some(missing) = missing_capabilities() {
        return Err(missing);
    }
    let pid = std::process::id();
    // The LSM programs read kernel structures at offsets from the kernel's
    // BTF; without enforcement they are never loaded and need none.
    let (offsets, mut lsm_error) = if enforce {
        match Btf::from_sys_fs().and_then(|btf| btf.offsets()) {
            Ok(offsets) => (offsets, None),
            Err(reason) => (Offsets::default(), Some(reason)),
        }
    } else {
        (Offsets::default(), None)
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(sandgate_probes_common::TARGET_TGID, &pid, true)
        .override_global(sandgate_probes_common::OFFSETS, &offsets, true)
        .load(OBJECT)
        .map_err(|e| format!("loading the eBPF programs failed: {}", error_chain(&e)))?;
    let take = |ebpf: &mut Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| format!("map {name} is missing from the eBPF object"))
    };
    let slots = match take(&mut ebpf, names::SLOTS)? {
        aya::maps::Map::Array(data) => data,
        _ => return Err(format!("map {} is not an array", names::SLOTS)),
    };
    let threads = take(&mut ebpf, names::THREADS)?;
    let slots = Slots::map(slots, threads)?;
    let expected = Array::try_from(take(&mut ebpf, names::EXPECTED)?)
        .map_err(|e| format!("map {}: {}", names::EXPECTED, error_chain(&e)))?;
    let ring = RingBuf::try_from(take(&mut ebpf, names::EVENTS)?)
        .map_err(|e| format!("map {}: {}", names::EVENTS, error_chain(&e)))?;
    let stats = PerCpuArray::try_from(take(&mut ebpf, names::STATS)?)
        .map_err(|e| format!("map {}: {}", names::STATS, error_chain(&e)))?;
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
    let lsm = if enforce && lsm_error.is_none() {
        match enforce::attach(&mut ebpf) {
            Ok(lsm) => Some(lsm),
            Err(reason) => {
                lsm_error = Some(reason);
                None
            }
        }
    } else {
        None
    };
    let shared = Arc::new(Shared {
        accounts: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        stats,
        slots,
        expected: Mutex::new(ExpectedSets::new(expected)),
        received: AtomicU64::new(0),
        watched: AtomicU64::new(0),
        reported: AtomicU64::new(0),
        incomplete: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        untallied: AtomicU64::new(0),
        denied: AtomicU64::new(0),
        lsm,
        _ebpf: Mutex::new(ebpf),
    });
    tokio::spawn(consume(Arc::clone(&shared), ring));
    Ok((shared, lsm_error))
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
