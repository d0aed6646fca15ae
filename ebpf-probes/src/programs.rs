//! Uprobes on the daemon's marker functions keep, per thread, which guest
//! invocation (and which phase of it) the thread is running; the
//! `raw_syscalls` tracepoints charge every syscall such a thread makes to
//! that invocation and send it, timed, through the ring buffer.
//!
//! Only the daemon's own threads are considered (`TARGET_TGID`), and only
//! while they are inside a stretch of an invocation: everything else returns
//! after one comparison.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint, uprobe},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RawTracePointContext},
};
use sandgate_probes_common::{Active, Event, NO_SYSCALL, event, phase, stat};

/// The daemon's pid; set by the loader.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// Per thread id: the invocation the thread is running a stretch of, and
/// the syscall it is in.
#[map]
static ACTIVE: HashMap<u32, Active> = HashMap::with_max_entries(16_384, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

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

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: nothing else writes it concurrently.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn send(record: Event, flags: u64) {
    // Reservation takes no flags; the wakeup policy is the commit's.
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(record);
            entry.submit(flags);
            count(stat::SENT);
        }
        None => count(stat::DROPPED),
    }
}

#[uprobe]
pub fn guest_enter(ctx: ProbeContext) -> u32 {
    if let (Some(tid), Some(invocation)) = (daemon_thread(), ctx.arg::<u64>(0)) {
        let active = Active {
            invocation,
            phase: phase::GUEST,
            nr: NO_SYSCALL,
            started_ns: 0,
        };
        if ACTIVE.insert(tid, active, 0).is_err() {
            count(stat::UNTRACKED);
        }
    }
    0
}

#[uprobe]
pub fn guest_exit(_ctx: ProbeContext) -> u32 {
    if let Some(tid) = daemon_thread() {
        let _ = ACTIVE.remove(tid);
    }
    0
}

#[inline(always)]
fn set_phase(tid: u32, value: u32) {
    if let Some(active) = ACTIVE.get_ptr_mut(tid) {
        // SAFETY: the entry belongs to this thread; only it writes it.
        unsafe { (*active).phase = value };
    }
}

#[uprobe]
pub fn hostcall_enter(ctx: ProbeContext) -> u32 {
    if let (Some(tid), Some(value)) = (daemon_thread(), ctx.arg::<u32>(1)) {
        set_phase(tid, value);
    }
    0
}

#[uprobe]
pub fn hostcall_exit(_ctx: ProbeContext) -> u32 {
    if let Some(tid) = daemon_thread() {
        set_phase(tid, phase::GUEST);
    }
    0
}

#[uprobe]
pub fn wasi_denied(ctx: ProbeContext) -> u32 {
    if let (Some(tid), Some(invocation), Some(call)) =
        (daemon_thread(), ctx.arg::<u64>(0), ctx.arg::<u32>(1))
    {
        let record = Event {
            invocation,
            duration_ns: 0,
            kind: event::WASI_DENIED,
            nr: call,
            phase: phase::GUEST,
            tid,
        };
        send(record, u64::from(BPF_RB_NO_WAKEUP));
    }
    0
}

#[uprobe]
pub fn invocation_end(ctx: ProbeContext) -> u32 {
    if let (Some(tid), Some(invocation)) = (daemon_thread(), ctx.arg::<u64>(0)) {
        let record = Event {
            invocation,
            duration_ns: 0,
            kind: event::END,
            nr: 0,
            phase: phase::GUEST,
            tid,
        };
        // The daemon reads the ring buffer on its own schedule: no wakeup.
        send(record, u64::from(BPF_RB_NO_WAKEUP));
    }
    0
}

/// `uprobe(2)` on x86-64, which the kernel's uprobe trampoline calls.
const UPROBE_SYSCALL: i64 = 336;

/// `raw_syscalls:sys_enter`, attached as a raw tracepoint (no perf buffer is
/// filled for it): arguments `(struct pt_regs *regs, long id)`.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    let Some(tid) = daemon_thread() else {
        return 0;
    };
    let Some(active) = ACTIVE.get_ptr_mut(tid) else {
        return 0;
    };
    let nr: i64 = ctx.arg(1);
    // The optimized uprobes on the markers enter the kernel this way: the
    // probes' own cost, not the guest's.
    if nr == UPROBE_SYSCALL {
        return 0;
    }
    // SAFETY: the entry belongs to this thread; only it writes it, and the
    // verifier checked the pointer.
    unsafe {
        (*active).nr = nr as u32;
        (*active).started_ns = bpf_ktime_get_ns();
    }
    0
}

/// `raw_syscalls:sys_exit`, as a raw tracepoint.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(_ctx: RawTracePointContext) -> i32 {
    let Some(tid) = daemon_thread() else {
        return 0;
    };
    let Some(active) = ACTIVE.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: as in `sys_enter`.
    let (invocation, started_ns, nr, phase) = unsafe {
        let entry = *active;
        (*active).nr = NO_SYSCALL;
        (entry.invocation, entry.started_ns, entry.nr, entry.phase)
    };
    if nr == NO_SYSCALL {
        return 0;
    }
    let record = Event {
        invocation,
        // SAFETY: a helper without arguments.
        duration_ns: unsafe { bpf_ktime_get_ns() }.saturating_sub(started_ns),
        kind: event::SYSCALL,
        nr,
        phase,
        tid,
    };
    send(record, u64::from(BPF_RB_NO_WAKEUP));
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
