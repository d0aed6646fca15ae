//! What sandgate's eBPF programs and the daemon agree on: the per-thread
//! slots the daemon publishes its current invocation in (a memory-mapped
//! array, written with plain stores), the tallies the programs keep there,
//! the expected-syscall bitmaps, and the few events the programs send
//! through the ring buffer.
//!
//! Every type is `#[repr(C)]`, holds only integers and is padded by hand, so
//! both sides see the same bytes.
#![no_std]

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

/// How many daemon threads can have a slot (map `SLOTS`).
pub const MAX_SLOTS: u32 = 512;

/// Distinct (syscall, phase) pairs one slot tallies between two folds.
pub const TALLIES: usize = 32;

/// One (syscall, phase) pair's count and time in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// [`tally_key`] of the pair; 0 while the entry is free.
    pub key: u32,
    pub count: u32,
    pub ns: u64,
}

/// The key of a tally: never 0.
#[inline(always)]
pub const fn tally_key(nr: u32, phase: u32) -> u32 {
    (nr << 3 | (phase & 7)) + 1
}

/// The (syscall, phase) pair of a tally key.
#[inline(always)]
pub const fn tally_pair(key: u32) -> (u32, u32) {
    ((key - 1) >> 3, (key - 1) & 7)
}

/// Where a tally key starts its probe in a slot's table.
#[inline(always)]
pub const fn tally_home(key: u32) -> usize {
    (key.wrapping_mul(0x9E37_79B1) >> 27) as usize & (TALLIES - 1)
}

/// One daemon thread's slot (map `SLOTS`, memory-mapped by the daemon).
///
/// The daemon's thread writes the first three fields with plain stores
/// around each stretch of an invocation it runs; the programs, running in
/// that same thread's syscalls, read them and write the rest. The daemon
/// reads and clears the tallies only between the thread's own syscalls, so
/// the two sides never write the slot at the same time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The invocation this thread runs a stretch of; 0 between stretches.
    pub invocation: u64,
    pub phase: u32,
    /// The index of the policy's expected set in `EXPECTED`, or
    /// [`NO_POLICY`].
    pub policy: u32,
    /// The syscall in progress, or [`NO_SYSCALL`].
    pub nr: u32,
    pub _pad: u32,
    /// When that syscall began.
    pub started_ns: u64,
    /// Syscalls made in stretches since the last fold, and their time.
    pub total: u64,
    pub total_ns: u64,
    /// Of those, syscalls no tally entry was free for.
    pub overflow: u64,
    pub tallies: [Tally; TALLIES],
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            invocation: 0,
            phase: 0,
            policy: NO_POLICY,
            nr: NO_SYSCALL,
            _pad: 0,
            started_ns: 0,
            total: 0,
            total_ns: 0,
            overflow: 0,
            tallies: [Tally::default(); TALLIES],
        }
    }
}

/// `Slot::nr` while no syscall is being timed.
pub const NO_SYSCALL: u32 = u32::MAX;
/// `Slot::policy` when the policy's expected set is not in the kernel.
pub const NO_POLICY: u32 = u32::MAX;

/// Syscall numbers below this have a bit in an expected set; any other is
/// unexpected.
pub const EXPECTED_BITS: u32 = 512;
/// One expected set: bit `nr` is set when syscall `nr` is expected.
pub type ExpectedSet = [u64; (EXPECTED_BITS / 64) as usize];
/// How many expected sets `EXPECTED` holds: two per policy index (the
/// guest's phases, then instantiation and teardown).
pub const MAX_EXPECTED: u32 = 256;

/// The entry of `EXPECTED` that says what `phase` of a policy may do.
#[inline(always)]
pub const fn expected_index(policy: u32, phase: u32) -> u32 {
    let runtime = (phase == phase::INSTANTIATE || phase == phase::TEARDOWN) as u32;
    policy * 2 + runtime
}

/// Event kinds.
pub mod event {
    /// The first syscall of its kind, in a stretch, outside the policy's
    /// expected set: `nr`, `phase`.
    pub const UNEXPECTED: u32 = 1;
    /// A slot's tallies were full: syscalls are counted in `overflow` only.
    pub const OVERFLOW: u32 = 2;
}

/// One record in the ring buffer (map `EVENTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub invocation: u64,
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
    /// Syscalls of a registered thread whose slot could not be read.
    pub const UNTRACKED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// The daemon's process id (thread group id), set when the programs load.
pub const TARGET_TGID: &str = "TARGET_TGID";

/// Names of the maps and programs in the object file.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const SLOTS: &str = "SLOTS";
    pub const THREADS: &str = "THREADS";
    pub const EXPECTED: &str = "EXPECTED";
    pub const SYS_ENTER: &str = "sys_enter";
    pub const SYS_EXIT: &str = "sys_exit";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding: every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::Slot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
}
