//! Capability-restricted WASI preview 1: turns a policy's `Grants` into a
//! WASI context and a linker in which only granted `wasi_snapshot_preview1`
//! functions are real. Every other function the module imports is a refusal
//! stub that audits the call (`wasi_denied`) and returns `ERRNO_NOTCAPABLE`
//! or traps, per `on_denied`. `path_open` is guarded even when granted: it
//! refuses paths that leave their preopen and writes that are not granted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use wasmtime::{Caller, ExternType, FuncType, Linker, Module, Val};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self, WasiSnapshotPreview1};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
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

/// Bytes of guest output (stdout, stderr and `log` messages together) kept
/// per evaluation for the daemon log; the rest is counted and dropped.
pub const MAX_GUEST_OUTPUT_BYTES: usize = 16 * 1024;
/// Lines of guest output kept per evaluation; the rest are counted and dropped.
pub const MAX_GUEST_OUTPUT_LINES: usize = 100;

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

/// Where a line of guest output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Stdout,
    Stderr,
    /// The `sandgate::log` import, with its level (0 trace … 4 error).
    Log(i32),
}

/// One line a guest wrote, without its newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLine {
    pub source: Source,
    pub text: String,
}

/// What a guest wrote to stdout, stderr and `log` during one evaluation,
/// bounded by `MAX_GUEST_OUTPUT_LINES` and `MAX_GUEST_OUTPUT_BYTES` together:
/// every write is accepted (a guest never blocks or retries on its output),
/// what exceeds the bound is counted, not kept. Clones share the buffer.
#[derive(Clone, Default)]
pub struct GuestOutput {
    collected: Arc<Mutex<Collected>>,
}

/// The bounded output of one evaluation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub lines: Vec<GuestLine>,
    /// Lines cut off by the bound (newlines written past it, `log` calls).
    pub dropped_lines: u64,
    /// Bytes cut off by the bound.
    pub dropped_bytes: u64,
    kept_bytes: usize,
    /// The unfinished last line of stdout and stderr.
    partial: [Vec<u8>; 2],
    /// Whether that unfinished line was already cut.
    partial_cut: [bool; 2],
}

impl Collected {
    fn full(&self) -> bool {
        self.lines.len() >= MAX_GUEST_OUTPUT_LINES
    }

    fn write(&mut self, stream: usize, bytes: &[u8]) {
        let mut offset = 0;
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            if self.full() {
                let rest = &bytes[offset..];
                self.dropped_bytes += rest.len() as u64;
                self.dropped_lines += rest.iter().filter(|b| **b == b'\n').count() as u64;
                return;
            }
            offset += piece.len();
            let complete = piece.ends_with(b"\n");
            let content = &piece[..piece.len() - usize::from(complete)];
            let room = MAX_GUEST_OUTPUT_BYTES.saturating_sub(self.kept_bytes);
            let take = content.len().min(room);
            self.partial[stream].extend_from_slice(&content[..take]);
            self.kept_bytes += take;
            if take < content.len() {
                self.dropped_bytes += (content.len() - take) as u64;
                self.partial_cut[stream] = true;
            }
            if complete {
                self.end_line(stream);
            }
        }
    }

    /// Ends the unfinished line of `stream` (a newline, or the evaluation's end).
    fn end_line(&mut self, stream: usize) {
        let bytes = std::mem::take(&mut self.partial[stream]);
        let cut = std::mem::take(&mut self.partial_cut[stream]);
        if cut && bytes.is_empty() {
            self.dropped_lines += 1;
            return;
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if cut {
            text.push('…');
        }
        let source = if stream == 0 {
            Source::Stdout
        } else {
            Source::Stderr
        };
        self.lines.push(GuestLine { source, text });
    }

    fn log(&mut self, level: i32, message: &str) -> bool {
        let room = MAX_GUEST_OUTPUT_BYTES.saturating_sub(self.kept_bytes);
        if self.full() || room == 0 {
            self.dropped_lines += 1;
            self.dropped_bytes += message.len() as u64;
            return false;
        }
        let mut take = message.len().min(room);
        while !message.is_char_boundary(take) {
            take -= 1;
        }
        let mut text = message[..take].to_owned();
        if take < message.len() {
            self.dropped_bytes += (message.len() - take) as u64;
            text.push('…');
        }
        self.kept_bytes += take;
        self.lines.push(GuestLine {
            source: Source::Log(level),
            text,
        });
        true
    }
}

impl GuestOutput {
    pub fn new() -> GuestOutput {
        GuestOutput::default()
    }

    /// Appends what the guest wrote to fd 1 (stdout) or 2 (stderr).
    pub fn write(&self, fd: i32, bytes: &[u8]) {
        if let Ok(mut collected) = self.collected.lock() {
            collected.write(usize::from(fd != 1), bytes);
        }
    }

    /// Records a guest `log` message; false when the bound dropped it.
    pub fn log(&self, level: i32, message: &str) -> bool {
        self.collected
            .lock()
            .map(|mut c| c.log(level, message))
            .unwrap_or(false)
    }

    /// The lines kept so far, left in place (a refused init quotes them).
    pub fn kept_lines(&self) -> Vec<GuestLine> {
        self.collected
            .lock()
            .map(|c| c.lines.clone())
            .unwrap_or_default()
    }

    /// Everything kept and counted, unfinished lines ended.
    pub fn finish(&self) -> Collected {
        let Ok(mut collected) = self.collected.lock() else {
            return Collected::default();
        };
        for stream in 0..2 {
            if !collected.partial[stream].is_empty() || collected.partial_cut[stream] {
                if collected.full() {
                    collected.dropped_lines += 1;
                } else {
                    collected.end_line(stream);
                }
            }
        }
        std::mem::take(&mut *collected)
    }

    fn stream(&self, fd: i32) -> GuestStream {
        GuestStream {
            output: self.clone(),
            fd,
        }
    }
}

/// The guest's stdout or stderr as wasmtime-wasi sees it: always ready, every
/// write accepted into the evaluation's bounded [`GuestOutput`].
struct GuestStream {
    output: GuestOutput,
    fd: i32,
}

/// The most one `write` may be handed at a time (wasmtime-wasi copies in
/// chunks of at most 4 KiB anyway).
const STREAM_PERMIT: usize = 64 * 1024;

impl OutputStream for GuestStream {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.output.write(self.fd, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(STREAM_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.output.write(self.fd, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The stdout (fd 1) or stderr (fd 2) handed to the WASI context.
struct StdioSink {
    output: GuestOutput,
    fd: i32,
}

impl IsTerminal for StdioSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StdioSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.output.stream(self.fd))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.output.stream(self.fd))
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
        .stdout(StdioSink {
            output: output.clone(),
            fd: 1,
        })
        .stderr(StdioSink {
            output: output.clone(),
            fd: 2,
        });
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
                let errno =
                    match abi::gather_iovecs(&mut caller, arg(1), arg(2), MAX_GUEST_OUTPUT_BYTES) {
                        Ok(bytes) => {
                            caller.data().output.write(fd, &bytes);
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
    fn guest_output_is_bounded_in_lines_and_bytes_and_counts_the_rest() {
        let output = GuestOutput::new();
        output.write(1, &[b'\n'; 64 * 1024]);
        output.write(2, b"late\n");
        assert!(!output.log(2, "late too"));
        let collected = output.finish();
        assert_eq!(collected.lines.len(), MAX_GUEST_OUTPUT_LINES);
        assert_eq!(collected.dropped_lines, (64 * 1024 - 100) + 1 + 1);
        assert_eq!(collected.dropped_bytes, (64 * 1024 - 100) + 5 + 8);

        let output = GuestOutput::new();
        output.write(2, b"first ");
        output.write(2, &vec![b'x'; MAX_GUEST_OUTPUT_BYTES]);
        output.write(2, b"\nafter");
        let collected = output.finish();
        let texts: Vec<&str> = collected.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            texts.len(),
            1,
            "the line over the byte bound is cut, the next dropped"
        );
        assert!(texts[0].starts_with("first xxx") && texts[0].ends_with('…'));
        assert_eq!(collected.lines[0].source, Source::Stderr);
        assert_eq!(collected.dropped_lines, 1);
        assert_eq!(collected.dropped_bytes, 6 + 5);
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
