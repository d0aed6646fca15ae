//! What sandgate's eBPF programs and the daemon agree on: the marker
//! functions the programs probe, the per-thread state the markers keep in
//! kernel maps, and the events the programs send through the ring buffer.
//!
//! Every type is `#[repr(C)]`, holds only integers and is padded by hand, so
//! both sides see the same bytes.
#![no_std]

/// Symbols of the daemon's marker functions, probed with uprobes.
pub mod marker {
    /// `(invocation: u64)`: this thread starts running a stretch of the
    /// invocation (one poll of the future that drives the guest).
    pub const GUEST_ENTER: &str = "sandgate_probe_guest_enter";
    /// `(invocation: u64)`: the stretch ends; the thread runs other work.
    pub const GUEST_EXIT: &str = "sandgate_probe_guest_exit";
    /// `(invocation: u64, phase: u32)`: inside a stretch, the host starts
    /// work of the given [`phase`](super::phase) on the guest's behalf.
    pub const HOSTCALL_ENTER: &str = "sandgate_probe_hostcall_enter";
    /// `(invocation: u64, phase: u32)`: that work ends; back to the guest.
    pub const HOSTCALL_EXIT: &str = "sandgate_probe_hostcall_exit";
    /// `(invocation: u64, call: u32)`: a WASI call was refused; `call` is its
    /// index in the daemon's list of preview 1 functions.
    pub const WASI_DENIED: &str = "sandgate_probe_wasi_denied";
    /// `(invocation: u64)`: the invocation is over; every event of it has
    /// been sent before this one.
    pub const INVOCATION_END: &str = "sandgate_probe_invocation_end";
}

/// What the host is doing for the guest when a syscall happens.
pub mod phase {
    /// Guest code and the WASI calls it makes.
    pub const GUEST: u32 = 0;
    /// Creating the instance (memory, tables, the WASI context).
    pub const INSTANTIATE: u32 = 1;
    /// Tearing the instance down (resetting its memory slot).
    pub const TEARDOWN: u32 = 2;
    /// `sandgate.log`.
    pub const LOG: u32 = 3;
    /// `sandgate.http_send`: the bridged HTTP call.
    pub const HTTP_SEND: u32 = 4;
    /// `sandgate.http_read`.
    pub const HTTP_READ: u32 = 5;
    /// How many phases there are.
    pub const COUNT: usize = 6;
}

/// The state of a daemon thread that is running a stretch of an invocation
/// (map `ACTIVE`, keyed by thread id), and the syscall it is in, if any: a
/// syscall is timed in this entry, written in place, so tracing one costs
/// two lookups and no map insert or delete.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Active {
    pub invocation: u64,
    pub phase: u32,
    /// The syscall in progress, or [`NO_SYSCALL`].
    pub nr: u32,
    /// When that syscall began.
    pub started_ns: u64,
}

/// `Active::nr` while no syscall is being timed.
pub const NO_SYSCALL: u32 = u32::MAX;

/// Event kinds.
pub mod event {
    /// A syscall made during an invocation: `nr`, `phase`, `duration_ns`.
    pub const SYSCALL: u32 = 1;
    /// A refused WASI call: `nr` is the call's index.
    pub const WASI_DENIED: u32 = 2;
    /// The invocation ended: the daemon can close its account.
    pub const END: u32 = 3;
}

/// One record in the ring buffer (map `EVENTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub invocation: u64,
    pub duration_ns: u64,
    pub kind: u32,
    pub nr: u32,
    pub phase: u32,
    pub tid: u32,
}

/// Counters the programs keep (map `STATS`, a per-CPU array indexed by these).
pub mod stat {
    /// Events written to the ring buffer.
    pub const SENT: u32 = 0;
    /// Events lost because the ring buffer was full.
    pub const DROPPED: u32 = 1;
    /// Syscalls not recorded because a per-thread map was full.
    pub const UNTRACKED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// The daemon's process id (thread group id), set when the programs load.
pub const TARGET_TGID: &str = "TARGET_TGID";

/// Names of the maps and programs in the object file.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const SYS_ENTER: &str = "sys_enter";
    pub const SYS_EXIT: &str = "sys_exit";
    pub const GUEST_ENTER: &str = "guest_enter";
    pub const GUEST_EXIT: &str = "guest_exit";
    pub const HOSTCALL_ENTER: &str = "hostcall_enter";
    pub const HOSTCALL_EXIT: &str = "hostcall_exit";
    pub const WASI_DENIED: &str = "wasi_denied";
    pub const INVOCATION_END: &str = "invocation_end";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding: every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::Active {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
}
