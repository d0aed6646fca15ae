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
    /// The policy's grants in the enforcement maps (`FILES`, `ADDRESSES`),
    /// or [`NO_GRANTS`]: read by the LSM programs.
    pub grants: u32,
    /// When that syscall began.
    pub started_ns: u64,
    /// Syscalls made in stretches since the last fold, and their time.
    pub total: u64,
    pub total_ns: u64,
    /// Of those, syscalls no tally entry was free for.
    pub overflow: u64,
    pub tallies: [Tally; TALLIES],
    /// Operations the LSM programs refused since the last fold; the first
    /// [`MAX_DENIALS`] are described in `denials`.
    pub denied: u32,
    pub _pad: u32,
    pub denials: [Denial; MAX_DENIALS],
}

/// Refusals one slot describes between two folds; more are only counted.
pub const MAX_DENIALS: usize = 4;
/// Bytes of a refused file's name (its last path component) kept.
pub const DENIAL_NAME: usize = 64;

/// One operation the LSM programs refused (`Slot::denials`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denial {
    /// One of [`operation`].
    pub operation: u32,
    /// For a connect: the address family (`AF_INET`, `AF_INET6`, …) and the
    /// port (network byte order).
    pub family: u16,
    pub port: u16,
    /// For a file: the kernel's device number (`MAJOR << 20 | MINOR`) and
    /// inode; whether it was opened for writing.
    pub dev: u32,
    pub write: u32,
    pub ino: u64,
    /// For a connect: the address, as in [`AddressKey`].
    pub addr: [u64; 2],
    /// For a file: its name; for an exec: the path asked for. NUL-ended
    /// unless it fills the array.
    pub name: [u8; DENIAL_NAME],
}

impl Default for Denial {
    fn default() -> Denial {
        Denial {
            operation: 0,
            family: 0,
            port: 0,
            dev: 0,
            write: 0,
            ino: 0,
            addr: [0; 2],
            name: [0; DENIAL_NAME],
        }
    }
}

/// What an LSM program refused.
pub mod operation {
    pub const FILE_OPEN: u32 = 1;
    pub const SOCKET_CONNECT: u32 = 2;
    pub const EXEC: u32 = 3;
    pub const PTRACE: u32 = 4;
    pub const MOUNT: u32 = 5;
    pub const BPF: u32 = 6;

    /// The name the audit line and span event use (DESIGN §7).
    pub const fn name(operation: u32) -> &'static str {
        match operation {
            FILE_OPEN => "file_open",
            SOCKET_CONNECT => "socket_connect",
            EXEC => "exec",
            PTRACE => "ptrace",
            MOUNT => "mount",
            BPF => "bpf",
            _ => "unknown",
        }
    }
}

/// `Slot::grants` when the thread's policy has no entry in the enforcement
/// maps: everything a policy could be granted is refused.
pub const NO_GRANTS: u32 = u32::MAX;

/// Key of `FILES`: a directory or file a policy's preopens grant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub grants: u32,
    /// The kernel's device number (`MAJOR << 20 | MINOR`).
    pub dev: u32,
    pub ino: u64,
}

/// Values of `FILES`: what the preopen allows beneath that directory.
pub mod access {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
}

/// Key of `ADDRESSES`: an address a policy's egress resolved to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddressKey {
    pub grants: u32,
    pub family: u16,
    /// Network byte order, as in the `sockaddr`.
    pub port: u16,
    /// The address's bytes as in the `sockaddr`, read as two native
    /// `u64`s: IPv4 in the low 4 bytes of the first (the rest 0), IPv6 in
    /// both. (Scalars, not a byte array: the programs build the key without
    /// a `memset`, which BPF cannot call.)
    pub addr: [u64; 2],
}

/// How many policies' grants the enforcement maps hold at once.
pub const MAX_GRANTS: u32 = 1024;
/// Entries of `FILES` and of `ADDRESSES`.
pub const MAX_FILES: u32 = 16384;
pub const MAX_ADDRESSES: u32 = 16384;
/// How many directories above an opened file `file_open` looks at for a
/// preopened one.
pub const MAX_DEPTH: u32 = 32;

/// Byte offsets of the kernel structure fields the LSM programs read,
/// found in the running kernel's BTF by the loader (global `OFFSETS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub file_f_path_dentry: u32,
    pub file_f_inode: u32,
    pub file_f_mode: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub super_block_s_dev: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    pub dentry_d_name_name: u32,
    pub linux_binprm_filename: u32,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            invocation: 0,
            phase: 0,
            policy: NO_POLICY,
            nr: NO_SYSCALL,
            grants: NO_GRANTS,
            started_ns: 0,
            total: 0,
            total_ns: 0,
            overflow: 0,
            tallies: [Tally::default(); TALLIES],
            denied: 0,
            _pad: 0,
            denials: [Denial::default(); MAX_DENIALS],
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
/// The kernel structure offsets ([`Offsets`]), set when the programs load.
pub const OFFSETS: &str = "OFFSETS";

/// Names of the maps and programs in the object file.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const SLOTS: &str = "SLOTS";
    pub const THREADS: &str = "THREADS";
    pub const EXPECTED: &str = "EXPECTED";
    pub const SYS_ENTER: &str = "sys_enter";
    pub const SYS_EXIT: &str = "sys_exit";
    pub const FILES: &str = "FILES";
    pub const ADDRESSES: &str = "ADDRESSES";
    /// The LSM programs, each named after its hook.
    pub const LSM: [&str; 6] = [
        "file_open",
        "socket_connect",
        "bprm_check_security",
        "ptrace_access_check",
        "sb_mount",
        "bpf",
    ];
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding: every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::Slot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FileKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddressKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Offsets {}
}
