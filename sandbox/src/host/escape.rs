//! The escape drill (cargo feature `escape-drill`, for tests only; never in
//! a release build): the import `sandgate_escape_drill::escape(op, arg)`
//! makes a raw host syscall from inside the calling guest's invocation, on
//! the thread running it, as a host bug a guest could steer would. With
//! `[ebpf] enforce` the BPF LSM must refuse each. Returns 0 when the
//! syscall succeeded, else its errno.
//!
//! - `op` 1: `openat(AT_FDCWD, "/etc/shadow", O_RDONLY)`;
//! - `op` 2: a TCP connect to `127.0.0.1:arg`;
//! - `op` 3: `execve("/bin/true")` (on success the daemon would be
//!   replaced: that is what enforcement must prevent).

use wasmtime::{Caller, Linker};

/// The import module of the drill.
pub const MODULE: &str = "sandgate_escape_drill";

pub fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "escape",
        |_caller: Caller<'_, T>, op: i32, arg: i32| -> i32 { escape(op, arg) },
    )?;
    Ok(())
}

fn escape(op: i32, arg: i32) -> i32 {
    use syscalls::{Sysno, syscall};
    const AT_FDCWD: isize = -100;
    let errno = |result: Result<usize, syscalls::Errno>| match result {
        Ok(_) => 0,
        Err(e) => e.into_raw(),
    };
    tracing::warn!(
        op,
        arg,
        "escape drill: a guest asked for a raw host syscall"
    );
    match op {
        1 => {
            let path = c"/etc/shadow";
            // SAFETY: a NUL-terminated path; the descriptor is closed below.
            let opened = unsafe { syscall!(Sysno::openat, AT_FDCWD, path.as_ptr(), 0) };
            if let Ok(fd) = opened {
                // SAFETY: the descriptor just opened.
                let _ = unsafe { syscall!(Sysno::close, fd) };
            }
            errno(opened)
        }
        2 => {
            let port = u16::try_from(arg).unwrap_or(0);
            let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            match std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(1)) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            }
        }
        3 => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<std::ffi::c_char>()];
            // SAFETY: NUL-terminated path, NULL-terminated argv and envp.
            errno(unsafe { syscall!(Sysno::execve, path.as_ptr(), argv.as_ptr(), envp.as_ptr()) })
        }
        _ => 22,
    }
}
