//! The daemon-wide seccomp allowlist (`[server] syscall_filter`, DESIGN §5,
//! §9): the syscalls the daemon needs once it serves, as a reviewed table
//! below, compiled with `seccompiler` and installed on every thread (TSYNC)
//! by `server` after start-up (listeners bound, probes loaded, runtime
//! threads started). A leaf: imports nothing from the crate. See
//! docs/enforcement.md for what it stops and what it does not. Longer than
//! most files: the commented table is a third of it and is reviewed with the
//! code that compiles it, and the tests that run it against the kernel.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};
use serde::Serialize;
use syscalls::Sysno;

/// `server.syscall_filter`: what a syscall outside the allowlist does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// It fails with EPERM (never kills the daemon) and is logged.
    #[default]
    Enforce,
    /// It runs, and is logged (SECCOMP_RET_LOG).
    Log,
    /// No filter.
    Off,
}

impl Mode {
    pub const NAMES: &'static str = "\"enforce\", \"log\" or \"off\"";

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }

    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "enforce" => Some(Mode::Enforce),
            "log" => Some(Mode::Log),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The syscalls the daemon makes once it serves, measured under the whole
/// test suite (a `log`-mode filter reporting every call outside the list)
/// and reviewed by hand. Grouped by who needs them; a syscall is listed once,
/// under its first user. Deliberately absent: execve/execveat, fork/vfork,
/// ptrace, process_vm_*, mount/umount2/pivot_root/chroot, setns/unshare,
/// kexec_*, init_module/finit_module/delete_module, keyctl/add_key/
/// request_key, perf_event_open, bpf's program loads are not separable from
/// map access (see `bpf` below), bind/listen (listeners are bound before),
/// setuid & co., reboot, swapon, iopl/ioperm, userfaultfd, io_uring_*.
const ALLOWED: &[(Sysno, &str)] = &[
    // Memory: the allocator, thread stacks, wasmtime's pooling allocator
    // (reserve, protect, decommit slots) and copy-on-write module images
    // (memfd_create + ftruncate + mmap of the image).
    (Sysno::mmap, "allocator, wasmtime pool and CoW images"),
    (Sysno::munmap, "allocator, wasmtime pool"),
    (Sysno::mprotect, "wasmtime: committing pool slots, code"),
    (Sysno::madvise, "wasmtime: resetting slots; allocator"),
    (Sysno::mremap, "allocator: growing buffers"),
    (Sysno::brk, "allocator"),
    (Sysno::memfd_create, "wasmtime: CoW module images"),
    (Sysno::ftruncate, "wasmtime: sizing a CoW image"),
    (Sysno::membarrier, "wasmtime: publishing compiled code"),
    // Threads and their synchronisation: tokio workers and blocking pool,
    // std threads, parking_lot/futex locks.
    (Sysno::clone, "new threads (blocking pool, compile)"),
    (Sysno::clone3, "new threads (glibc's first choice)"),
    (Sysno::set_robust_list, "thread start"),
    (Sysno::rseq, "thread start"),
    (Sysno::set_tid_address, "thread start"),
    (Sysno::futex, "locks, condvars, thread parking"),
    (Sysno::sched_yield, "spin locks, tokio"),
    (Sysno::sched_getaffinity, "available_parallelism"),
    (Sysno::gettid, "thread ids (probes' slots, logs)"),
    (Sysno::getpid, "own pid"),
    (Sysno::prctl, "thread names"),
    (Sysno::exit, "thread end"),
    (Sysno::exit_group, "daemon exit"),
    (Sysno::nanosleep, "epoch ticker, back-off"),
    (Sysno::clock_nanosleep, "epoch ticker, back-off"),
    (Sysno::clock_gettime, "time (vDSO fallback)"),
    (Sysno::clock_getres, "time"),
    (Sysno::gettimeofday, "time (vDSO fallback)"),
    (Sysno::getrandom, "hash seeds, ids, TLS"),
    // Signals: wasmtime's trap handlers run on an alternate stack; tokio's
    // SIGHUP/SIGTERM handlers; restarting an interrupted wait.
    (Sysno::rt_sigaction, "wasmtime trap handlers, tokio signals"),
    (Sysno::rt_sigprocmask, "thread start, trap handling"),
    (Sysno::rt_sigreturn, "return from a signal handler"),
    (Sysno::sigaltstack, "wasmtime: per-thread signal stack"),
    (Sysno::restart_syscall, "after a signal"),
    // Only to this process (the rule in `compile`): abort on a host bug.
    (Sysno::tgkill, "abort (raise) on a host bug"),
    // The event loop: tokio's epoll, its wakers, and the probes' ring buffer.
    (Sysno::epoll_create1, "tokio"),
    (Sysno::epoll_ctl, "tokio"),
    (Sysno::epoll_wait, "tokio"),
    (Sysno::epoll_pwait, "tokio"),
    (Sysno::epoll_pwait2, "tokio"),
    (Sysno::eventfd2, "tokio waker"),
    (Sysno::pipe2, "tokio signal pipe"),
    (Sysno::poll, "blocking reads"),
    (Sysno::ppoll, "blocking reads"),
    // Descriptors.
    (Sysno::read, "everything"),
    (Sysno::write, "everything"),
    (Sysno::readv, "sockets"),
    (Sysno::writev, "sockets, logs"),
    (Sysno::pread64, "module and cache files"),
    (Sysno::pwrite64, "cache files"),
    (Sysno::close, "everything"),
    (Sysno::fcntl, "non-blocking, close-on-exec"),
    (Sysno::ioctl, "FIONBIO, terminal checks"),
    (Sysno::dup, "std"),
    (Sysno::dup3, "std"),
    (Sysno::lseek, "files"),
    // Network: accepting connections on the bound listeners, the bridge's
    // egress, the OTLP exporter, DNS through glibc.
    (Sysno::accept4, "listeners"),
    (Sysno::socket, "bridge, OTLP export, DNS"),
    (Sysno::connect, "bridge, OTLP export, DNS"),
    (Sysno::getsockname, "sockets"),
    (Sysno::getpeername, "sockets"),
    (Sysno::setsockopt, "TCP_NODELAY, keep-alive"),
    (Sysno::getsockopt, "SO_ERROR after a connect"),
    (Sysno::sendto, "sockets"),
    (Sysno::recvfrom, "sockets"),
    (Sysno::sendmsg, "sockets"),
    (Sysno::recvmsg, "sockets"),
    (Sysno::sendmmsg, "DNS (glibc)"),
    (Sysno::shutdown, "closing connections"),
    (
        Sysno::socketpair,
        "measured once per run; its caller not pinned down",
    ),
    // Files: config and module reads at reload, policies' preopens, the
    // module cache (write, rename into place), the audit log (reopen).
    (Sysno::openat, "config, modules, cache, audit log, preopens"),
    (Sysno::open, "libc internals (probing files)"),
    // cap-std opens beneath a policy's preopen with RESOLVE_BENEATH (it
    // falls back to openat path walking when refused, which is weaker).
    (
        Sysno::openat2,
        "preopens: opens confined beneath the directory",
    ),
    (Sysno::newfstatat, "metadata"),
    (Sysno::fstat, "metadata"),
    (Sysno::statx, "metadata"),
    (
        Sysno::getdents64,
        "directories (language policies' files, cache)",
    ),
    (Sysno::readlink, "canonical paths"),
    (Sysno::readlinkat, "canonical paths"),
    (Sysno::getcwd, "relative paths"),
    (Sysno::mkdir, "cache directories"),
    (Sysno::mkdirat, "cache directories"),
    (Sysno::rename, "cache: write then rename into place"),
    (Sysno::renameat, "cache: write then rename into place"),
    (Sysno::renameat2, "cache: write then rename into place"),
    (Sysno::unlink, "cache: stale entries"),
    (Sysno::unlinkat, "cache: stale entries"),
    (Sysno::fsync, "cache, audit log"),
    (Sysno::fdatasync, "cache, audit log"),
    (Sysno::fchmod, "cache files' mode"),
    (Sysno::access, "file checks"),
    (Sysno::faccessat, "file checks"),
    (Sysno::faccessat2, "file checks"),
    (Sysno::statfs, "file systems"),
    (Sysno::fstatfs, "file systems"),
    // Reload: watching the config, modules and preopens.
    (Sysno::inotify_init1, "reload watcher"),
    (Sysno::inotify_add_watch, "reload watcher"),
    (Sysno::inotify_rm_watch, "reload watcher"),
    // Probes: map reads and updates (slots, expected syscalls per policy).
    // The kernel gives no way to allow map access but not program loads by
    // syscall number alone; `bpf` is kept, see docs/enforcement.md.
    (Sysno::bpf, "probes: map updates at reload"),
    // Identity and limits the runtime reads.
    (Sysno::getuid, "ownership checks (cache)"),
    (Sysno::geteuid, "ownership checks (cache)"),
    (Sysno::getgid, "std"),
    (Sysno::getegid, "std"),
    (Sysno::prlimit64, "descriptor limit"),
    (Sysno::getrlimit, "descriptor limit"),
    (Sysno::uname, "runtime"),
    (Sysno::sysinfo, "runtime"),
    (Sysno::getrusage, "CPU figures"),
];

/// The syscall numbers of the allowlist, sorted, without duplicates.
pub fn allowlist() -> Vec<Sysno> {
    let mut list: Vec<Sysno> = ALLOWED.iter().map(|(s, _)| *s).collect();
    list.sort_unstable();
    list.dedup();
    list
}

/// What the filter is doing, for the start-up line, `/readyz` and
/// `/v1/probes` (`enforcement.seccomp`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The configured mode.
    pub mode: Mode,
    /// Whether a filter is on every thread of the daemon.
    pub installed: bool,
    /// What it does, or why it is not installed.
    pub detail: String,
    /// Calls outside the allowlist the daemon saw in the kernel's log since
    /// start (logged in `log` mode, refused in `enforce` mode).
    pub violations: u64,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.mode,
            if self.installed {
                "installed"
            } else {
                "not installed"
            },
            self.detail
        )
    }
}

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    #[error(
        "cannot install the seccomp filter on every thread: {0}; set `[server] syscall_filter = \"off\"` to run without it"
    )]
    Install(std::io::Error),
}

/// The installed filter (or why there is none) and the count of calls the
/// kernel reported outside it.
#[derive(Clone, Debug)]
pub struct Filter {
    mode: Mode,
    installed: bool,
    detail: String,
    violations: Arc<AtomicU64>,
}

impl Filter {
    /// No filter (`syscall_filter = "off"`, or a command that does not serve).
    pub fn off() -> Filter {
        Filter {
            mode: Mode::Off,
            installed: false,
            detail: "no filter: every syscall is allowed".to_owned(),
            violations: Arc::default(),
        }
    }

    /// Installs the allowlist in `mode` on every thread of the process.
    /// Threads started later inherit it. `enforce` that cannot be installed
    /// is an error (the daemon refuses to start); `log` that cannot be
    /// installed runs without, and says why in its status.
    pub fn install(mode: Mode) -> Result<Filter, SeccompError> {
        if mode == Mode::Off {
            return Ok(Filter::off());
        }
        let violations = Arc::new(AtomicU64::new(0));
        // Opened before the filter: the reader needs only `read` after.
        let kernel_log = KernelLog::open();
        let installed = compile(mode).and_then(|program| apply(mode, &program));
        let mut filter = Filter {
            mode,
            installed: false,
            detail: String::new(),
            violations: Arc::clone(&violations),
        };
        match installed {
            Ok(()) => filter.installed = true,
            Err(e) if mode == Mode::Enforce => return Err(e),
            Err(e) => {
                filter.detail = format!("{e}; running without a filter");
                return Ok(filter);
            }
        }
        let action = match mode {
            Mode::Enforce => "fails with EPERM",
            _ => "runs",
        };
        let reported = match kernel_log {
            Ok(log) => {
                log.follow(mode, violations);
                "reported in this log with its name".to_owned()
            }
            Err(e) => format!(
                "recorded by the kernel's audit log only (type=1326; cannot read /dev/kmsg: {e})"
            ),
        };
        filter.detail = format!(
            "{} syscalls allowed; any other {action} and is {reported}",
            allowlist().len()
        );
        Ok(filter)
    }

    pub fn status(&self) -> Status {
        Status {
            mode: self.mode,
            installed: self.installed,
            detail: self.detail.clone(),
            violations: self.violations.load(Ordering::Relaxed),
        }
    }
}

/// The BPF program of the allowlist in `mode`.
fn compile(mode: Mode) -> Result<seccompiler::BpfProgram, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    // `tgkill(tgid, …)` may signal any process the daemon's user may; the
    // daemon only ever signals itself.
    let own_process = SeccompRule::new(vec![
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(std::process::id()),
        )
        .map_err(build)?,
    ])
    .map_err(build)?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowlist()
        .into_iter()
        .map(|s| {
            let conditions = match s {
                Sysno::tgkill => vec![own_process.clone()],
                _ => Vec::new(),
            };
            (i64::from(s.id()), conditions)
        })
        .collect();
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Errno(libc::EPERM as u32),
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| {
        SeccompError::Build(format!("architecture {}: {e}", std::env::consts::ARCH))
    })?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    filter.try_into().map_err(build)
}

/// Installs `program` on every thread (TSYNC). In `enforce` mode the refusals
/// are also logged by the kernel (SECCOMP_FILTER_FLAG_LOG), so the reader of
/// the kernel log can name them; `log` mode's action is logged anyway.
fn apply(mode: Mode, program: &seccompiler::BpfProgram) -> Result<(), SeccompError> {
    const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
    const SECCOMP_FILTER_FLAG_TSYNC: libc::c_ulong = 1;
    const SECCOMP_FILTER_FLAG_LOG: libc::c_ulong = 2;
    let len = u16::try_from(program.len())
        .map_err(|_| SeccompError::Build(format!("{} instructions", program.len())))?;
    let prog = libc::sock_fprog {
        len,
        // seccompiler's `sock_filter` is `#[repr(C)]` with the kernel's layout.
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    let flags = match mode {
        Mode::Enforce => SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG,
        _ => SECCOMP_FILTER_FLAG_TSYNC,
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::Install(std::io::Error::last_os_error()));
    }
    // SAFETY: `prog` points at `program`, alive for the call; the kernel
    // copies the instructions before returning.
    let result = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    match result {
        0 => Ok(()),
        r if r > 0 => Err(SeccompError::Install(std::io::Error::other(format!(
            "thread {r} could not be synchronised"
        )))),
        _ => Err(SeccompError::Install(std::io::Error::last_os_error())),
    }
}

/// The kernel's log, where seccomp's audit records (type=1326) land when no
/// audit daemon takes them.
struct KernelLog(std::fs::File);

impl KernelLog {
    /// Opens `/dev/kmsg` positioned after the records already there.
    fn open() -> std::io::Result<KernelLog> {
        use std::io::Seek;
        let mut file = std::fs::File::open("/dev/kmsg")?;
        file.seek(std::io::SeekFrom::End(0))?;
        Ok(KernelLog(file))
    }

    /// Reports every seccomp record of this process on a thread of its own.
    fn follow(self, mode: Mode, violations: Arc<AtomicU64>) {
        let pid = std::process::id();
        let spawned = std::thread::Builder::new()
            .name("seccomp-log".to_owned())
            .spawn(move || {
                let mut reader = BufReader::new(self.0);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) => return,
                        Ok(_) => {}
                        // EPIPE: records were overwritten before we read them.
                        Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "seccomp: stopped reading the kernel log");
                            return;
                        }
                    }
                    if let Some(record) = Violation::parse(&line, pid) {
                        violations.fetch_add(1, Ordering::Relaxed);
                        record.report(mode);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "seccomp: cannot start the kernel log reader");
        }
    }
}

/// One seccomp audit record of this process.
#[derive(Debug, PartialEq, Eq)]
struct Violation {
    nr: u32,
    /// The filter's action (`code=`): SECCOMP_RET_LOG or SECCOMP_RET_ERRNO.
    code: u32,
}

impl Violation {
    /// The record in a `/dev/kmsg` line (`…;audit: type=1326 … pid=N …
    /// syscall=NR … code=0x…`), when it is one of process `pid`.
    fn parse(line: &str, pid: u32) -> Option<Violation> {
        let (_, message) = line.split_once(';')?;
        if !message.contains("type=1326 ") {
            return None;
        }
        let field = |name: &str| {
            message
                .split_ascii_whitespace()
                .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
        };
        if field("pid")?.parse::<u32>().ok()? != pid {
            return None;
        }
        let nr = field("syscall")?.parse().ok()?;
        let code = field("code")?.strip_prefix("0x")?;
        let code = u32::from_str_radix(code, 16).ok()?;
        Some(Violation { nr, code })
    }

    fn name(&self) -> String {
        Sysno::new(self.nr as usize)
            .map_or_else(|| format!("syscall_{}", self.nr), |s| s.name().to_owned())
    }

    fn report(&self, mode: Mode) {
        const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;
        const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
        let refused = self.code & SECCOMP_RET_ACTION_FULL == SECCOMP_RET_ERRNO;
        let syscall = self.name();
        if refused {
            tracing::warn!(
                syscall = %syscall,
                nr = self.nr,
                mode = %mode,
                "seccomp: a syscall outside the allowlist was refused with EPERM"
            );
        } else {
            tracing::warn!(
                syscall = %syscall,
                nr = self.nr,
                mode = %mode,
                "seccomp: a syscall outside the allowlist ran (log mode; `enforce` would refuse it)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_holds_none_of_the_calls_the_daemon_never_needs() {
        let list = allowlist();
        for never in [
            Sysno::execve,
            Sysno::execveat,
            Sysno::fork,
            Sysno::vfork,
            Sysno::ptrace,
            Sysno::process_vm_readv,
            Sysno::process_vm_writev,
            Sysno::mount,
            Sysno::umount2,
            Sysno::pivot_root,
            Sysno::chroot,
            Sysno::setns,
            Sysno::unshare,
            Sysno::kexec_load,
            Sysno::kexec_file_load,
            Sysno::init_module,
            Sysno::finit_module,
            Sysno::delete_module,
            Sysno::keyctl,
            Sysno::add_key,
            Sysno::request_key,
            Sysno::perf_event_open,
            Sysno::bind,
            Sysno::listen,
            Sysno::setuid,
            Sysno::setgid,
            Sysno::reboot,
            Sysno::userfaultfd,
            Sysno::io_uring_setup,
        ] {
            assert!(!list.contains(&never), "{} is allowed", never.name());
        }
    }

    #[test]
    fn the_allowlist_compiles_in_both_modes() {
        for mode in [Mode::Enforce, Mode::Log] {
            let program = compile(mode).expect("compiles");
            assert!(program.len() > allowlist().len() && program.len() < 4096);
        }
    }

    #[test]
    fn a_kernel_record_of_this_process_is_read_and_others_are_not() {
        let line = "5,1234,239985513,-;audit: type=1326 audit(1796579025.794:1): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=10000 comm=\"sandgate\" exe=\"/usr/bin/sandgate\" sig=0 arch=c000003e syscall=110 compat=0 ip=0x7faa034f34f7 code=0x7ffc0000\n";
        assert_eq!(
            Violation::parse(line, 10000),
            Some(Violation {
                nr: 110,
                code: 0x7ffc_0000
            })
        );
        assert_eq!(Violation::parse(line, 10001), None);
        assert_eq!(
            Violation::parse(
                "6,1,2,-;audit: type=1400 pid=10000 syscall=1 code=0x0\n",
                10000
            ),
            None
        );
        assert_eq!(Violation { nr: 110, code: 0 }.name(), "getppid");
    }

    /// Runs `child_under_filter` in a process of its own (a filter cannot
    /// be removed, and would confine this test binary's other tests).
    fn in_child(mode: Mode) {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "seccomp::tests::child_under_filter",
                "--ignored",
                "--nocapture",
            ])
            .env("SANDGATE_SECCOMP_CHILD", mode.as_str())
            .output()
            .expect("run the child");
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn enforce_refuses_a_call_outside_the_allowlist_with_eperm_and_reports_it() {
        in_child(Mode::Enforce);
    }

    #[test]
    fn log_lets_a_call_outside_the_allowlist_run_and_reports_it() {
        in_child(Mode::Log);
    }

    /// Installs the filter, calls `getppid` (not in the allowlist) and waits
    /// until the kernel's record of it was read back and counted.
    #[test]
    #[ignore = "run in a process of its own by the tests above"]
    fn child_under_filter() {
        let mode = std::env::var("SANDGATE_SECCOMP_CHILD")
            .ok()
            .and_then(|m| Mode::parse(&m))
            .expect("SANDGATE_SECCOMP_CHILD names a mode");
        let filter = Filter::install(mode).expect("installs");
        let status = filter.status();
        assert!(status.installed, "{status}");
        assert!(status.detail.contains("reported in this log"), "{status}");
        // SAFETY: getppid takes no argument.
        let result = unsafe { libc::syscall(libc::SYS_getppid) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        match mode {
            Mode::Enforce => assert_eq!((result, errno), (-1, Some(libc::EPERM))),
            _ => assert!(result > 0, "getppid ran: {result}"),
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while filter.status().violations == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the kernel's record of getppid was not read back"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn modes_read_and_print_as_configured() {
        for mode in [Mode::Enforce, Mode::Log, Mode::Off] {
            assert_eq!(Mode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(Mode::parse("strict"), None);
    }
}
