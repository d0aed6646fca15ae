//! Capability-restricted WASI preview 1: turns a policy's `Grants` into a
//! WASI context and a linker in which only granted `wasi_snapshot_preview1`
//! functions are real. Every other function the module imports is a refusal
//! stub that audits the call (`wasi_denied`) and returns `ERRNO_NOTCAPABLE`
//! or traps, per `on_denied`. `path_open` is guarded even when granted: it
//! refuses paths that leave their preopen and writes that are not granted.

use std::collections::HashMap;

use serde_json::{Value, json};
use wasmtime::{Caller, ExternType, FuncType, Linker, Module, Val};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self, WasiSnapshotPreview1};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::abi::{self, Invocation};
use crate::config::{Access, Grants, OnDenied};

/// The import module of WASI preview 1.
pub const MODULE: &str = "wasi_snapshot_preview1";

/// `ERRNO_NOTCAPABLE`: what a refused call returns under `on_denied = "errno"`.
pub const ERRNO_NOTCAPABLE: i32 = 76;
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_ACCES: i32 = 2;
const ERRNO_PERM: i32 = 63;

/// Bytes of stdout/stderr kept per evaluation for the daemon log.
pub const MAX_GUEST_OUTPUT: usize = 64 * 1024;

/// Every function of `wasi_snapshot_preview1`.
pub const PREVIEW1: [&str; 46] = [
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// The groups of DESIGN §5 and the exact functions each grants.
pub const GROUPS: [(&str, &[&str]); 9] = [
    ("args", &["args_get", "args_sizes_get"]),
    ("env", &["environ_get", "environ_sizes_get"]),
    ("clock", &["clock_res_get", "clock_time_get"]),
    ("random", &["random_get"]),
    (
        "fs_read",
        &[
            "fd_advise",
            "fd_close",
            "fd_fdstat_get",
            "fd_fdstat_set_flags",
            "fd_fdstat_set_rights",
            "fd_filestat_get",
            "fd_pread",
            "fd_prestat_get",
            "fd_prestat_dir_name",
            "fd_read",
            "fd_readdir",
            "fd_renumber",
            "fd_seek",
            "fd_tell",
            "path_filestat_get",
            "path_open",
            "path_readlink",
        ],
    ),
    (
        "fs_write",
        &[
            "fd_allocate",
            "fd_datasync",
            "fd_filestat_set_size",
            "fd_filestat_set_times",
            "fd_pwrite",
            "fd_sync",
            "fd_write",
            "path_create_directory",
            "path_filestat_set_times",
            "path_link",
            "path_remove_directory",
            "path_rename",
            "path_symlink",
            "path_unlink_file",
        ],
    ),
    ("poll", &["poll_oneoff", "sched_yield"]),
    (
        "sock",
        &["sock_accept", "sock_recv", "sock_send", "sock_shutdown"],
    ),
    ("proc_exit", &["proc_exit", "proc_raise"]),
];

/// Expands one `wasi.allow` entry (a group or an exact function name).
pub fn expand_grant(word: &str) -> Option<&'static [&'static str]> {
    if let Some((_, functions)) = GROUPS.iter().find(|(g, _)| *g == word) {
        return Some(functions);
    }
    PREVIEW1
        .iter()
        .position(|f| *f == word)
        .map(|i| std::slice::from_ref(&PREVIEW1[i]))
}

/// The group a function belongs to, for telling an operator what to grant.
pub fn group_of(function: &str) -> Option<&'static str> {
    GROUPS
        .iter()
        .find(|(_, fs)| fs.contains(&function))
        .map(|(g, _)| *g)
}

/// A refused WASI call, as audited and reported in the decision's trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Denial {
    pub call: &'static str,
    pub detail: String,
    pub args: Value,
}

/// The trap raised by a refused call under `on_denied = "trap"`.
#[derive(Debug, thiserror::Error)]
#[error("WASI call `{call}` is not granted ({detail})")]
pub struct WasiDenied {
    pub call: &'static str,
    pub detail: String,
}

/// Captured stdout/stderr of a guest, for the daemon log.
pub struct GuestOutput {
    pub stdout: MemoryOutputPipe,
    pub stderr: MemoryOutputPipe,
}

impl GuestOutput {
    pub fn new() -> GuestOutput {
        GuestOutput {
            stdout: MemoryOutputPipe::new(MAX_GUEST_OUTPUT),
            stderr: MemoryOutputPipe::new(MAX_GUEST_OUTPUT),
        }
    }

    fn append(&self, fd: i32, bytes: &[u8]) {
        use wasmtime_wasi::p2::{OutputStream, StreamError};
        let mut pipe = if fd == 1 {
            self.stdout.clone()
        } else {
            self.stderr.clone()
        };
        let room = pipe.check_write().unwrap_or(0);
        let take = bytes.len().min(room);
        let r: Result<(), StreamError> = pipe.write(bytes::Bytes::copy_from_slice(&bytes[..take]));
        let _ = r;
    }
}

impl Default for GuestOutput {
    fn default() -> Self {
        GuestOutput::new()
    }
}

/// Builds the WASI context of one evaluation: no args, only the listed
/// environment, the preopens with their access, stdio captured, no network.
pub fn context(grants: &Grants, output: &GuestOutput) -> anyhow::Result<WasiP1Ctx> {
    let mut builder = WasiCtxBuilder::new();
    // File operations run on the evaluating thread: no blocking-pool hop per
    // call, and each syscall stays attributable to the invocation.
    builder
        .allow_blocking_current_thread(true)
        .stdout(output.stdout.clone())
        .stderr(output.stderr.clone());
    for (name, value) in &grants.env {
        builder.env(name, value);
    }
    for p in &grants.preopens {
        let perms = match p.access {
            Access::ReadOnly => FsPerms::ReadOnly,
            Access::ReadWrite => FsPerms::ReadWrite,
        };
        builder.preopened_dir(&p.host, &p.guest, perms)?;
    }
    Ok(builder.build_p1())
}

/// Access of the descriptors the guest starts with: preopens are fds 3, 4, …
pub fn initial_fd_access(grants: &Grants) -> HashMap<u32, Access> {
    grants
        .preopens
        .iter()
        .enumerate()
        .map(|(i, p)| (3 + i as u32, p.access))
        .collect()
}

/// Adds WASI preview 1 to `linker` as `grants` allow it for `module`: granted
/// functions are wasmtime-wasi's, every other import of the module a refusal.
/// Errors name an import the module should not have.
pub fn add_to_linker(
    linker: &mut Linker<Invocation>,
    module: &Module,
    grants: &Grants,
) -> Result<(), String> {
    wasmtime_wasi::p1::add_to_linker_async(linker, |inv: &mut Invocation| &mut inv.wasi)
        .map_err(|e| format!("cannot link WASI: {e:#}"))?;
    linker.allow_shadowing(true);
    for import in module.imports().filter(|i| i.module() == MODULE) {
        let name = import.name();
        let Some(call) = PREVIEW1.iter().copied().find(|f| *f == name) else {
            return Err(format!(
                "imports `{MODULE}::{name}`, which is not a WASI preview 1 function"
            ));
        };
        let ExternType::Func(ty) = import.ty() else {
            return Err(format!(
                "imports `{MODULE}::{name}` as something other than a function"
            ));
        };
        let defined = if grants.allows(call) {
            if call == "path_open" {
                define_guarded_path_open(linker, grants.on_denied)
            } else {
                Ok(())
            }
        } else if call == "fd_write" {
            define_stdio_fd_write(linker, ty, grants.on_denied)
        } else {
            define_refusal(linker, call, ty, grants.on_denied)
        };
        defined.map_err(|e| format!("cannot link `{MODULE}::{name}`: {e:#}"))?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

fn refuse(
    caller: &mut Caller<'_, Invocation>,
    call: &'static str,
    detail: String,
    args: Value,
    on_denied: OnDenied,
    results: &mut [Val],
) -> wasmtime::Result<()> {
    caller.data_mut().refuse(Denial {
        call,
        detail: detail.clone(),
        args,
    });
    match on_denied {
        OnDenied::Trap => Err(WasiDenied { call, detail }.into()),
        OnDenied::Errno => {
            for (i, r) in results.iter_mut().enumerate() {
                *r = match r {
                    Val::I64(_) => Val::I64(0),
                    Val::F32(_) => Val::F32(0),
                    Val::F64(_) => Val::F64(0),
                    _ if i == 0 => Val::I32(ERRNO_NOTCAPABLE),
                    _ => Val::I32(0),
                };
            }
            Ok(())
        }
    }
}

fn define_refusal(
    linker: &mut Linker<Invocation>,
    call: &'static str,
    ty: FuncType,
    on_denied: OnDenied,
) -> wasmtime::Result<()> {
    linker.func_new(MODULE, call, ty, move |mut caller, params, results| {
        let (detail, args) = describe(&mut caller, call, params);
        refuse(&mut caller, call, detail, args, on_denied, results)
    })?;
    Ok(())
}

/// `fd_write` without `fs_write`: stdout and stderr still reach the daemon
/// log; any other descriptor is refused.
fn define_stdio_fd_write(
    linker: &mut Linker<Invocation>,
    ty: FuncType,
    on_denied: OnDenied,
) -> wasmtime::Result<()> {
    linker.func_new(
        MODULE,
        "fd_write",
        ty,
        move |mut caller, params, results| {
            let arg = |i: usize| params.get(i).and_then(Val::i32).unwrap_or(-1);
            let fd = arg(0);
            if fd == 1 || fd == 2 {
                let errno = match abi::gather_iovecs(&mut caller, arg(1), arg(2), MAX_GUEST_OUTPUT)
                {
                    Ok(bytes) => {
                        caller.data().output.append(fd, &bytes);
                        let written = (bytes.len() as u32).to_le_bytes();
                        match abi::write_guest(&mut caller, arg(3), &written) {
                            Ok(()) => ERRNO_SUCCESS,
                            Err(_) => 21, // ERRNO_FAULT
                        }
                    }
                    Err(_) => 21,
                };
                if let Some(r) = results.first_mut() {
                    *r = Val::I32(errno);
                }
                return Ok(());
            }
            let (detail, args) = describe(&mut caller, "fd_write", params);
            refuse(&mut caller, "fd_write", detail, args, on_denied, results)
        },
    )?;
    Ok(())
}

const OFLAGS_WRITE: i32 = 0x1 /* CREAT */ | 0x4 /* EXCL */ | 0x8 /* TRUNC */;
const RIGHTS_WRITE: i64 = 1 /* FD_DATASYNC */ | (1 << 6) /* FD_WRITE */
    | (1 << 8) /* FD_ALLOCATE */ | (1 << 22) /* FD_FILESTAT_SET_SIZE */;
const FDFLAGS_APPEND: i32 = 0x1;

/// Whether a `path_open` asks to create, truncate or write.
fn wants_write(oflags: i32, rights_base: i64, fdflags: i32) -> bool {
    oflags & OFLAGS_WRITE != 0 || rights_base & RIGHTS_WRITE != 0 || fdflags & FDFLAGS_APPEND != 0
}

/// Whether `path`, resolved lexically from its directory, leaves it.
fn leaves_directory(path: &str) -> bool {
    if path.starts_with('/') {
        return true;
    }
    let mut depth: i64 = 0;
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

type PathOpenParams = (i32, i32, i32, i32, i32, i64, i64, i32, i32);

fn define_guarded_path_open(
    linker: &mut Linker<Invocation>,
    on_denied: OnDenied,
) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        MODULE,
        "path_open",
        move |mut caller: Caller<'_, Invocation>, params: PathOpenParams| {
            Box::new(async move {
                let (
                    fd,
                    dirflags,
                    path_ptr,
                    path_len,
                    oflags,
                    rights_base,
                    rights_inheriting,
                    fdflags,
                    fd_out,
                ) = params;
                let path =
                    abi::read_guest_string(&mut caller, path_ptr, path_len, abi::MAX_PATH_BYTES)
                        .unwrap_or_default();
                let write = wants_write(oflags, rights_base, fdflags);
                let dir_access = caller.data().fd_access.get(&(fd as u32)).copied();
                let is_preopen_root =
                    fd >= 3 && (fd as usize) < 3 + caller.data().grants.preopens.len();
                let refusal = if is_preopen_root && leaves_directory(&path) {
                    Some("path leaves its preopened directory")
                } else if write && !caller.data().grants.allows("fd_write") {
                    Some("write access is not granted (fs_write)")
                } else if write && dir_access == Some(Access::ReadOnly) {
                    Some("the preopened directory is read-only")
                } else {
                    None
                };
                let args = json!({"fd": fd, "path": path, "write": write});
                if let Some(reason) = refusal {
                    let mut results = [Val::I32(0)];
                    let mut args = args;
                    args["reason"] = json!(reason);
                    refuse(
                        &mut caller,
                        "path_open",
                        path,
                        args,
                        on_denied,
                        &mut results,
                    )?;
                    return Ok(results[0].i32().unwrap_or(ERRNO_NOTCAPABLE));
                }
                let Some(memory) = abi::memory(&mut caller) else {
                    return Ok(21);
                };
                // What wasmtime-wasi's own glue does before each call: the
                // budget bounding how much guest data one hostcall may copy.
                let fuel = wasmtime::AsContextMut::as_context_mut(&mut caller).hostcall_fuel();
                let (data, inv) = memory.data_and_store_mut(&mut caller);
                WasiSnapshotPreview1::set_hostcall_fuel(&mut inv.wasi, fuel);
                let errno = wasi_snapshot_preview1::path_open(
                    &mut inv.wasi,
                    &mut wiggle::GuestMemory::Unshared(data),
                    fd,
                    dirflags,
                    path_ptr,
                    path_len,
                    oflags,
                    rights_base,
                    rights_inheriting,
                    fdflags,
                    fd_out,
                )
                .await?;
                match errno {
                    ERRNO_SUCCESS => {
                        if let Ok(bytes) = abi::read_guest(&mut caller, fd_out, 4) {
                            let new_fd =
                                u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                            let access = dir_access.unwrap_or(Access::ReadOnly);
                            caller.data_mut().fd_access.insert(new_fd, access);
                        }
                    }
                    ERRNO_NOTCAPABLE | ERRNO_PERM | ERRNO_ACCES => {
                        // Refused by the filesystem sandbox itself (a symlink
                        // out of the preopen, a read-only directory): audit it.
                        let mut args = args;
                        args["reason"] =
                            json!(format!("refused by the filesystem sandbox (errno {errno})"));
                        caller.data_mut().refuse(Denial {
                            call: "path_open",
                            detail: path,
                            args,
                        });
                    }
                    _ => {}
                }
                Ok(errno)
            })
        },
    )?;
    Ok(())
}

/// The arguments worth knowing of a refused call: a one-line `detail` and
/// the decoded arguments.
fn describe(caller: &mut Caller<'_, Invocation>, call: &str, params: &[Val]) -> (String, Value) {
    let arg = |i: usize| -> i64 {
        params
            .get(i)
            .and_then(|v| v.i32().map(i64::from).or_else(|| v.i64()))
            .unwrap_or(-1)
    };
    let mut path_at = |ptr: usize, len: usize| -> String {
        abi::read_guest_string(
            caller,
            arg(ptr) as i32,
            arg(len) as i32,
            abi::MAX_PATH_BYTES,
        )
        .unwrap_or_else(|_| "<unreadable path>".to_owned())
    };
    match call {
        "path_open" | "path_filestat_get" | "path_filestat_set_times" => {
            let path = path_at(2, 3);
            (path.clone(), json!({"fd": arg(0), "path": path}))
        }
        "path_create_directory"
        | "path_readlink"
        | "path_remove_directory"
        | "path_unlink_file" => {
            let path = path_at(1, 2);
            (path.clone(), json!({"fd": arg(0), "path": path}))
        }
        "path_rename" => {
            let (old, new) = (path_at(1, 2), path_at(4, 5));
            (
                format!("{old} -> {new}"),
                json!({"fd": arg(0), "path": old, "new_fd": arg(3), "new_path": new}),
            )
        }
        "path_link" => {
            let (old, new) = (path_at(2, 3), path_at(5, 6));
            (
                format!("{old} -> {new}"),
                json!({"fd": arg(0), "path": old, "new_fd": arg(4), "new_path": new}),
            )
        }
        "path_symlink" => {
            let (target, link) = (path_at(0, 1), path_at(3, 4));
            (
                format!("{link} -> {target}"),
                json!({"fd": arg(2), "path": link, "target": target}),
            )
        }
        "environ_get" | "environ_sizes_get" => ("environment".to_owned(), json!({})),
        "args_get" | "args_sizes_get" => ("arguments".to_owned(), json!({})),
        "random_get" => (format!("{} bytes", arg(1)), json!({"len": arg(1)})),
        "clock_time_get" | "clock_res_get" => {
            let clock = match arg(0) {
                0 => "realtime",
                1 => "monotonic",
                2 => "process_cputime",
                3 => "thread_cputime",
                _ => "unknown",
            };
            (format!("clock {clock}"), json!({"clock": clock}))
        }
        "poll_oneoff" => (
            format!("{} subscriptions", arg(2)),
            json!({"nsubscriptions": arg(2)}),
        ),
        "proc_exit" => (format!("exit code {}", arg(0)), json!({"code": arg(0)})),
        "proc_raise" => (format!("signal {}", arg(0)), json!({"signal": arg(0)})),
        "sched_yield" => (String::new(), json!({})),
        _ if call.starts_with("fd_") || call.starts_with("sock_") => {
            (format!("fd {}", arg(0)), json!({"fd": arg(0)}))
        }
        _ => (String::new(), json!({})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_names_only_preview1_functions_and_covers_them_all() {
        let mut covered: Vec<&str> = GROUPS
            .iter()
            .flat_map(|(_, fs)| fs.iter().copied())
            .collect();
        for f in &covered {
            assert!(PREVIEW1.contains(f), "{f} is not a preview1 function");
        }
        covered.sort_unstable();
        let mut all = PREVIEW1.to_vec();
        all.sort_unstable();
        assert_eq!(covered, all, "each function belongs to exactly one group");
    }

    #[test]
    fn grants_expand_groups_and_exact_names() {
        assert_eq!(
            expand_grant("clock"),
            Some(&["clock_res_get", "clock_time_get"][..])
        );
        assert_eq!(expand_grant("random_get"), Some(&["random_get"][..]));
        assert_eq!(expand_grant("network"), None);
        assert_eq!(group_of("path_open"), Some("fs_read"));
    }

    #[test]
    fn escapes_are_recognised_lexically() {
        assert!(leaves_directory("../../etc/passwd"));
        assert!(leaves_directory("/etc/passwd"));
        assert!(leaves_directory("a/../../b"));
        assert!(!leaves_directory("a/../b"));
        assert!(!leaves_directory("./roles.json"));
    }

    #[test]
    fn write_intent_is_recognised() {
        assert!(wants_write(1, 0, 0));
        assert!(wants_write(0, 1 << 6, 0));
        assert!(wants_write(0, 0, 1));
        // What Rust's std sends for a read-only open: read, readdir and its
        // fixed set (advise, set flags, filestat, seek, sync, tell, path_*).
        let std_read: i64 = (1 << 1)
            | (1 << 14)
            | (1 << 7)
            | (1 << 3)
            | (1 << 21)
            | (1 << 2)
            | (1 << 4)
            | (1 << 5)
            | (1 << 9)
            | (1 << 10);
        assert!(!wants_write(0, std_read, 0));
        assert!(wants_write(0, std_read | 1, 0));
    }
}
