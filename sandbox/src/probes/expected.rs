//! Which syscalls an invocation of a policy is expected to make, from its
//! grants. Anything else the probes see during the invocation is reported
//! (`kernel_syscall` audit line): a guest reaches the kernel only through the
//! host, so an unexpected syscall means the host did something for it that
//! its grants do not explain.

use std::borrow::Cow;

use std::sync::OnceLock;

use sandgate_probes_common::{EXPECTED_BITS, ExpectedSet, phase};
use syscalls::{Sysno, SysnoSet};

use crate::config::{EgressSettings, Grants};

/// What any invocation may cause: memory, synchronisation with the
/// runtime's other threads, time, randomness for the WASI context, and the
/// daemon's own log lines (guest output and warnings are written on the
/// evaluating thread).
const BASE: SysnoSet = SysnoSet::new(&[
    Sysno::futex,
    Sysno::sched_yield,
    Sysno::mmap,
    Sysno::munmap,
    Sysno::mprotect,
    Sysno::madvise,
    Sysno::mremap,
    Sysno::brk,
    Sysno::clock_gettime,
    Sysno::clock_nanosleep,
    Sysno::nanosleep,
    Sysno::gettid,
    Sysno::getpid,
    Sysno::rt_sigprocmask,
    Sysno::rt_sigaction,
    Sysno::sigaltstack,
    Sysno::getrandom,
    Sysno::write,
    Sysno::writev,
]);

/// Creating and tearing down an instance: mapping and resetting its memory
/// slot (PAGEMAP_SCAN is an ioctl on the process's pagemap).
const RUNTIME: SysnoSet = SysnoSet::new(&[
    Sysno::ioctl,
    Sysno::close,
    Sysno::read,
    Sysno::pread64,
    Sysno::memfd_create,
    Sysno::ftruncate,
    Sysno::fallocate,
]);

/// File access inside preopened directories.
const FILES: SysnoSet = SysnoSet::new(&[
    Sysno::openat,
    Sysno::openat2,
    Sysno::open,
    Sysno::read,
    Sysno::readv,
    Sysno::pread64,
    Sysno::preadv,
    Sysno::preadv2,
    Sysno::write,
    Sysno::writev,
    Sysno::pwrite64,
    Sysno::pwritev,
    Sysno::pwritev2,
    Sysno::lseek,
    Sysno::close,
    Sysno::fstat,
    Sysno::newfstatat,
    Sysno::stat,
    Sysno::lstat,
    Sysno::statx,
    Sysno::fstatfs,
    Sysno::statfs,
    Sysno::getdents64,
    Sysno::readlinkat,
    Sysno::readlink,
    Sysno::fcntl,
    Sysno::fadvise64,
    Sysno::fsync,
    Sysno::fdatasync,
    Sysno::ftruncate,
    Sysno::fallocate,
    Sysno::unlinkat,
    Sysno::mkdirat,
    Sysno::renameat,
    Sysno::renameat2,
    Sysno::linkat,
    Sysno::symlinkat,
    Sysno::utimensat,
    Sysno::faccessat,
    Sysno::faccessat2,
    Sysno::flock,
    Sysno::ioctl,
]);

/// HTTP through the bridge: sockets and the runtime's I/O driver.
const NETWORK: SysnoSet = SysnoSet::new(&[
    Sysno::socket,
    Sysno::connect,
    Sysno::getsockopt,
    Sysno::setsockopt,
    Sysno::getsockname,
    Sysno::getpeername,
    Sysno::sendto,
    Sysno::recvfrom,
    Sysno::sendmsg,
    Sysno::recvmsg,
    Sysno::sendmmsg,
    Sysno::recvmmsg,
    Sysno::read,
    Sysno::readv,
    Sysno::write,
    Sysno::writev,
    Sysno::close,
    Sysno::shutdown,
    Sysno::epoll_ctl,
    Sysno::fcntl,
    Sysno::ioctl,
    Sysno::poll,
    Sysno::ppoll,
]);

/// The syscalls one policy's invocations are expected to make.
#[derive(Clone, Debug)]
pub struct Expected {
    guest: SysnoSet,
    runtime: SysnoSet,
    /// Where these sets are in the kernel's `EXPECTED` map, once written.
    pub(super) kernel_index: OnceLock<u32>,
}

impl Expected {
    pub fn for_policy(grants: &Grants, egress: &EgressSettings) -> Expected {
        let mut guest = BASE;
        if !grants.preopens.is_empty() {
            guest = guest.union(&FILES);
        }
        if !egress.allow.is_empty() {
            guest = guest.union(&NETWORK);
        }
        // Instantiation and teardown may do anything the guest may (the
        // WASI context is built on the guest's first WASI call, in whichever
        // phase that falls), plus the runtime's own work.
        Expected {
            runtime: guest.clone().union(&RUNTIME),
            guest,
            kernel_index: OnceLock::new(),
        }
    }

    /// The two sets as the programs read them (the guest's phases, then
    /// instantiation and teardown): bit `nr` set when `nr` is expected.
    pub(super) fn kernel_sets(&self) -> [ExpectedSet; 2] {
        [&self.guest, &self.runtime].map(|set| {
            let mut bits = ExpectedSet::default();
            for nr in 0..EXPECTED_BITS {
                if Sysno::new(nr as usize).is_some_and(|s| set.contains(s)) {
                    bits[(nr / 64) as usize] |= 1 << (nr % 64);
                }
            }
            bits
        })
    }

    /// Whether syscall `nr`, made in `phase` of an invocation, is expected.
    pub fn allows(&self, phase: u32, nr: u32) -> bool {
        let Some(sysno) = Sysno::new(nr as usize) else {
            return false;
        };
        match phase {
            phase::INSTANTIATE | phase::TEARDOWN => self.runtime.contains(sysno),
            _ => self.guest.contains(sysno),
        }
    }
}

/// The name of syscall `nr` on this architecture.
pub fn name(nr: u32) -> Cow<'static, str> {
    Sysno::new(nr as usize).map_or_else(|| format!("syscall_{nr}").into(), |s| s.name().into())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{Access, Preopen};

    fn grants(preopens: bool) -> Grants {
        Grants {
            requested: Vec::new(),
            functions: Default::default(),
            on_denied: crate::config::OnDenied::Errno,
            env: Default::default(),
            env_missing: Vec::new(),
            preopens: if preopens {
                vec![Preopen {
                    host: PathBuf::from("data"),
                    guest: "/data".into(),
                    access: Access::ReadOnly,
                }]
            } else {
                Vec::new()
            },
        }
    }

    fn nr(sysno: Sysno) -> u32 {
        sysno.id() as u32
    }

    #[test]
    fn grants_decide_which_syscalls_are_expected() {
        let no_egress = EgressSettings::default();
        let compute = Expected::for_policy(&grants(false), &no_egress);
        assert!(compute.allows(phase::GUEST, nr(Sysno::futex)));
        assert!(!compute.allows(phase::GUEST, nr(Sysno::openat)));
        assert!(!compute.allows(phase::GUEST, nr(Sysno::connect)));
        assert!(!compute.allows(phase::GUEST, nr(Sysno::execve)));
        assert!(compute.allows(phase::TEARDOWN, nr(Sysno::ioctl)));
        assert!(!compute.allows(phase::GUEST, nr(Sysno::ioctl)));

        let files = Expected::for_policy(&grants(true), &no_egress);
        assert!(files.allows(phase::GUEST, nr(Sysno::openat)));
        assert!(files.allows(phase::INSTANTIATE, nr(Sysno::openat)));
        assert!(!compute.allows(phase::INSTANTIATE, nr(Sysno::openat)));
        assert!(!files.allows(phase::GUEST, nr(Sysno::connect)));
        assert!(!files.allows(phase::HTTP_SEND, nr(Sysno::execve)));
        assert!(!files.allows(phase::GUEST, 100_000));
        assert_eq!(name(nr(Sysno::openat)), "openat");
        assert_eq!(name(100_000), "syscall_100000");
    }

    #[test]
    fn the_sets_written_to_the_kernel_say_what_allows_says() {
        use sandgate_probes_common::{expected_index, tally_home, tally_key, tally_pair};
        let no_egress = EgressSettings::default();
        for expected in [
            Expected::for_policy(&grants(false), &no_egress),
            Expected::for_policy(&grants(true), &no_egress),
        ] {
            let sets = expected.kernel_sets();
            for phase in 0..phase::COUNT as u32 {
                let set = &sets[(expected_index(0, phase) % 2) as usize];
                for nr in 0..EXPECTED_BITS {
                    let bit = set[(nr / 64) as usize] & (1 << (nr % 64)) != 0;
                    assert_eq!(bit, expected.allows(phase, nr), "{} in {phase}", name(nr));
                }
            }
        }
        assert_eq!(expected_index(3, phase::GUEST), 6);
        assert_eq!(expected_index(3, phase::TEARDOWN), 7);
        let key = tally_key(nr(Sysno::openat2), phase::HTTP_READ);
        assert_ne!(key, 0);
        assert_eq!(tally_pair(key), (nr(Sysno::openat2), phase::HTTP_READ));
        assert!(tally_home(key) < sandgate_probes_common::TALLIES);
    }
}
