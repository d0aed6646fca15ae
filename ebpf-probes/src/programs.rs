//! The `raw_syscalls` tracepoints charge every syscall a daemon thread makes
//! inside a stretch of a guest invocation to that invocation, counted and
//! timed in the thread's slot. The daemon publishes the invocation in the
//! slot with plain stores into the memory-mapped `SLOTS` array (no kernel
//! crossing on its side) and reads the tallies back the same way; the ring
//! buffer carries only the unusual: a syscall outside the policy's expected
//! set, or a slot whose tallies are full.
//!
//! Only the daemon's own threads are considered (`TARGET_TGID`), and only
//! registered ones (`THREADS`) while inside a stretch: everything else
//! returns after one comparison or one lookup.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use sandgate_probes_common::{
    EXPECTED_BITS, Event, ExpectedSet, MAX_EXPECTED, MAX_SLOTS, NO_POLICY, NO_SYSCALL, Slot,
    TALLIES, event, expected_index, stat, tally_home, tally_key,
};

/// The daemon's pid; set by the loader.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// One slot per registered daemon thread, memory-mapped by the daemon.
#[map]
pub(crate) static SLOTS: Array<Slot> = Array::with_max_entries(MAX_SLOTS, BPF_F_MMAPABLE);

/// Thread id → its index in `SLOTS`; written by the daemon once per thread.
#[map]
pub(crate) static THREADS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SLOTS, 0);

/// The expected syscalls of each policy, two sets per policy index.
#[map]
static EXPECTED: Array<ExpectedSet> = Array::with_max_entries(MAX_EXPECTED, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// The calling thread's id, when it belongs to the daemon.
#[inline(always)]
fn daemon_thread() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a plain read of a global the loader sets before attaching.
    let target = unsafe { core::ptr::read_volatile(&TARGET_TGID) };
    ((pid_tgid >> 32) as u32 == target).then_some(pid_tgid as u32)
}

/// The slot of the calling daemon thread, if it registered one.
#[inline(always)]
pub(crate) fn slot() -> Option<(u32, *mut Slot)> {
    let tid = daemon_thread()?;
    // SAFETY: the value is a plain integer the daemon wrote.
    let index = unsafe { *THREADS.get(tid)? };
    match SLOTS.get_ptr_mut(index) {
        Some(slot) => Some((tid, slot)),
        None => {
            count(stat::UNTRACKED);
            None
        }
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: nothing else writes it concurrently.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn send(record: Event) {
    // Reservation takes no flags; the daemon reads the buffer on its own
    // schedule, so the commit wakes no one.
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(record);
            entry.submit(u64::from(BPF_RB_NO_WAKEUP));
            count(stat::SENT);
        }
        None => count(stat::DROPPED),
    }
}

/// Whether syscall `nr` in `phase` is in the expected set of `policy`.
#[inline(always)]
fn expected(policy: u32, phase: u32, nr: u32) -> bool {
    if policy == NO_POLICY {
        // The daemon checks this policy's syscalls itself.
        return true;
    }
    if nr >= EXPECTED_BITS {
        return false;
    }
    match EXPECTED.get(expected_index(policy, phase)) {
        Some(set) => set[(nr / 64) as usize & (set.len() - 1)] & (1 << (nr % 64)) != 0,
        None => true,
    }
}

/// `raw_syscalls:sys_enter`, attached as a raw tracepoint (no perf buffer is
/// filled for it): arguments `(struct pt_regs *regs, long id)`.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    let Some((_, slot)) = slot() else {
        return 0;
    };
    // SAFETY: the verifier checked the pointer; the slot belongs to this
    // thread, which is in this syscall and so not writing it.
    unsafe {
        if (*slot).invocation == 0 {
            return 0;
        }
        let nr: i64 = ctx.arg(1);
        (*slot).nr = nr as u32;
        (*slot).started_ns = bpf_ktime_get_ns();
    }
    0
}

/// `raw_syscalls:sys_exit`, as a raw tracepoint.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(_ctx: RawTracePointContext) -> i32 {
    let Some((tid, slot)) = slot() else {
        return 0;
    };
    // SAFETY: as in `sys_enter`.
    unsafe {
        let nr = (*slot).nr;
        if nr == NO_SYSCALL {
            return 0;
        }
        (*slot).nr = NO_SYSCALL;
        let ns = bpf_ktime_get_ns().saturating_sub((*slot).started_ns);
        (*slot).total += 1;
        (*slot).total_ns += ns;
        let phase = (*slot).phase;
        let key = tally_key(nr, phase);
        let home = tally_home(key);
        for step in 0..TALLIES {
            let tally = &mut (*slot).tallies[(home + step) & (TALLIES - 1)];
            if tally.key == key {
                tally.count += 1;
                tally.ns += ns;
                return 0;
            }
            if tally.key == 0 {
                // The first of its kind since the last fold: the one time
                // it is checked against the policy's expected set.
                tally.key = key;
                tally.count = 1;
                tally.ns = ns;
                if !expected((*slot).policy, phase, nr) {
                    send(Event {
                        invocation: (*slot).invocation,
                        kind: event::UNEXPECTED,
                        nr,
                        phase,
                        tid,
                    });
                }
                return 0;
            }
        }
        (*slot).overflow += 1;
        if (*slot).overflow == 1 {
            send(Event {
                invocation: (*slot).invocation,
                kind: event::OVERFLOW,
                nr,
                phase,
                tid,
            });
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
