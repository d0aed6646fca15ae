//! A deliberately hostile guest, for demonstrating and testing the sandbox. Whatever its input,
//! it makes eight raw WASI calls a policy has no business making, records the errno of each
//! (0 = it worked), prints a line to stdout and one to stderr, and always denies:
//!
//! ```json
//! {"allow": false, "reason": "snoop: 8 of 8 attempts refused",
//!  "obligations": {"attempts": {"escape_passwd": 76, "absolute_passwd": 76, "environ": 76,
//!   "random": 76, "sock_accept": 76, "sock_send": 76, "write_ro_preopen": 76,
//!   "unlink_ro_preopen": 76}}}
//! ```
//!
//! Run it with only `fs_read` and a read-only preopen of `data/` at `/data` (fd 3): every attempt
//! should be refused and audited. The obligation keys are relied on by the host's tests.
//!
//! The WASI functions are declared here, not taken from std, so each attempt is exactly one
//! call with known arguments. On host builds (unit tests) nothing is attempted: every call
//! reports `ENOSYS` (52).

use std::io::Write as _;

use sandgate_guest::{Decision, Input};
use serde_json::{Map, Value};

/// The `/data` preopen: the first descriptor after stdin, stdout and stderr.
const DATA: wasi::Fd = 3;

sandgate_guest::policy!(evaluate);

fn evaluate(_input: Input) -> Decision {
    let attempts = attempt_all();
    let refused = attempts.iter().filter(|(_, errno)| *errno != 0).count();
    // Writes that fail are recorded nowhere: `println!` would panic (and trap) on a refusal.
    let _ = writeln!(std::io::stdout(), "snoop: a line on stdout");
    let _ = writeln!(std::io::stderr(), "snoop: a line on stderr");
    let attempts: Map<String, Value> = attempts
        .into_iter()
        .map(|(name, errno)| (name.to_owned(), Value::from(errno)))
        .collect();
    Decision::deny()
        .reason(format!(
            "snoop: {refused} of {} attempts refused",
            attempts.len()
        ))
        .obligation("attempts", attempts)
}

/// Makes every attempt, in order, and returns `(obligation key, errno)` for each.
fn attempt_all() -> [(&'static str, wasi::Errno); 8] {
    [
        (
            "escape_passwd",
            wasi::open(DATA, "../../etc/passwd", 0, wasi::RIGHT_FD_READ),
        ),
        (
            "absolute_passwd",
            wasi::open(DATA, "/etc/passwd", 0, wasi::RIGHT_FD_READ),
        ),
        ("environ", wasi::environ_sizes()),
        ("random", wasi::random(&mut [0; 16])),
        ("sock_accept", wasi::sock_accept(DATA)),
        ("sock_send", wasi::sock_send(DATA, b"snoop was here")),
        (
            "write_ro_preopen",
            wasi::open(DATA, "pwned.txt", wasi::OFLAGS_CREAT, wasi::RIGHT_FD_WRITE),
        ),
        ("unlink_ro_preopen", wasi::unlink(DATA, "readme.txt")),
    ]
}

/// Safe wrappers over single `wasi_snapshot_preview1` calls, each returning the call's errno.
/// Descriptors that an attempt opens are closed again.
mod wasi {
    /// A WASI file descriptor.
    pub type Fd = i32;
    /// A WASI errno; 0 is success.
    pub type Errno = i32;

    /// `oflags::creat`.
    pub const OFLAGS_CREAT: i32 = 1;
    /// `rights::fd_read`.
    pub const RIGHT_FD_READ: u64 = 1 << 1;
    /// `rights::fd_write`.
    pub const RIGHT_FD_WRITE: u64 = 1 << 6;

    #[cfg(target_arch = "wasm32")]
    mod raw {
        /// `ciovec`: a buffer to send.
        #[repr(C)]
        pub struct Ciovec {
            pub buf: *const u8,
            pub buf_len: usize,
        }

        #[link(wasm_import_module = "wasi_snapshot_preview1")]
        unsafe extern "C" {
            pub fn path_open(
                fd: i32,
                dirflags: i32,
                path: *const u8,
                path_len: usize,
                oflags: i32,
                fs_rights_base: u64,
                fs_rights_inheriting: u64,
                fdflags: i32,
                opened_fd: *mut i32,
            ) -> i32;
            pub fn fd_close(fd: i32) -> i32;
            pub fn environ_sizes_get(count: *mut usize, buf_size: *mut usize) -> i32;
            pub fn random_get(buf: *mut u8, buf_len: usize) -> i32;
            pub fn sock_accept(fd: i32, flags: i32, accepted_fd: *mut i32) -> i32;
            pub fn sock_send(
                fd: i32,
                si_data: *const Ciovec,
                si_data_len: usize,
                si_flags: i32,
                so_datalen: *mut usize,
            ) -> i32;
            pub fn path_unlink_file(fd: i32, path: *const u8, path_len: usize) -> i32;
        }
    }

    /// `path_open` of `path` under `dir` (no symlink following).
    #[cfg(target_arch = "wasm32")]
    pub fn open(dir: Fd, path: &str, oflags: i32, rights: u64) -> Errno {
        let mut opened = -1;
        // SAFETY: `path` is borrowed for the call and `opened` is a live, writable i32.
        let errno = unsafe {
            raw::path_open(
                dir,
                0,
                path.as_ptr(),
                path.len(),
                oflags,
                rights,
                0,
                0,
                &mut opened,
            )
        };
        if errno == 0 {
            // SAFETY: no pointers; closes the descriptor this attempt opened.
            unsafe { raw::fd_close(opened) };
        }
        errno
    }

    /// `environ_sizes_get`: how much environment there is to read.
    #[cfg(target_arch = "wasm32")]
    pub fn environ_sizes() -> Errno {
        let (mut count, mut size) = (0, 0);
        // SAFETY: both out-pointers are live, writable usizes (WASI `size`, 32 bits).
        unsafe { raw::environ_sizes_get(&mut count, &mut size) }
    }

    /// `random_get` into `buf`.
    #[cfg(target_arch = "wasm32")]
    pub fn random(buf: &mut [u8]) -> Errno {
        // SAFETY: the host writes at most `buf.len()` bytes into `buf`, borrowed mutably.
        unsafe { raw::random_get(buf.as_mut_ptr(), buf.len()) }
    }

    /// `sock_accept` on `fd`.
    #[cfg(target_arch = "wasm32")]
    pub fn sock_accept(fd: Fd) -> Errno {
        let mut accepted = -1;
        // SAFETY: `accepted` is a live, writable i32.
        let errno = unsafe { raw::sock_accept(fd, 0, &mut accepted) };
        if errno == 0 {
            // SAFETY: no pointers; closes the descriptor this attempt accepted.
            unsafe { raw::fd_close(accepted) };
        }
        errno
    }

    /// `sock_send` of `data` on `fd`.
    #[cfg(target_arch = "wasm32")]
    pub fn sock_send(fd: Fd, data: &[u8]) -> Errno {
        let iov = raw::Ciovec {
            buf: data.as_ptr(),
            buf_len: data.len(),
        };
        let mut sent = 0;
        // SAFETY: `iov` describes `data`, both borrowed for the call; `sent` is writable.
        unsafe { raw::sock_send(fd, &iov, 1, 0, &mut sent) }
    }

    /// `path_unlink_file` of `path` under `dir`.
    #[cfg(target_arch = "wasm32")]
    pub fn unlink(dir: Fd, path: &str) -> Errno {
        // SAFETY: `path` is borrowed for the call.
        unsafe { raw::path_unlink_file(dir, path.as_ptr(), path.len()) }
    }

    /// `ENOSYS`: what every attempt reports on host builds, where nothing is attempted.
    #[cfg(not(target_arch = "wasm32"))]
    const ENOSYS: Errno = 52;

    /// Host stand-in: nothing is attempted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(_dir: Fd, _path: &str, _oflags: i32, _rights: u64) -> Errno {
        ENOSYS
    }

    /// Host stand-in: nothing is attempted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn environ_sizes() -> Errno {
        ENOSYS
    }

    /// Host stand-in: nothing is attempted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn random(_buf: &mut [u8]) -> Errno {
        ENOSYS
    }

    /// Host stand-in: nothing is attempted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn sock_accept(_fd: Fd) -> Errno {
        ENOSYS
    }

    /// Host stand-in: nothing is attempted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn sock_send(_fd: Fd, _data: &[u8]) -> Errno {
        ENOSYS
    }

    /// Host stand-in: nothing is attempted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn unlink(_dir: Fd, _path: &str) -> Errno {
        ENOSYS
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn attempts_are_made_in_the_documented_order() {
        let names = attempt_all().map(|(name, _)| name);
        assert_eq!(
            names,
            [
                "escape_passwd",
                "absolute_passwd",
                "environ",
                "random",
                "sock_accept",
                "sock_send",
                "write_ro_preopen",
                "unlink_ro_preopen",
            ]
        );
    }

    #[test]
    fn always_denies_and_reports_every_errno() {
        let output = sandgate_evaluate_document(br#"{"input":{"anything":true}}"#);
        let decision: Value = serde_json::from_slice(&output).expect("json");
        assert_eq!(
            decision,
            json!({
                "allow": false,
                "reason": "snoop: 8 of 8 attempts refused",
                "obligations": {"attempts": {
                    "escape_passwd": 52, "absolute_passwd": 52, "environ": 52, "random": 52,
                    "sock_accept": 52, "sock_send": 52, "write_ro_preopen": 52,
                    "unlink_ro_preopen": 52
                }}
            })
        );
    }
}
