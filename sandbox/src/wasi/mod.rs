//! Capability-restricted WASI preview 1: turns a policy's `Grants` into a
//! WASI context and a linker in which only granted `wasi_snapshot_preview1`
//! functions are real. Every other function the module imports is a refusal
//! stub that audits the call (`wasi_denied`) and returns `ERRNO_NOTCAPABLE`
//! or traps, per `on_denied`. `path_open` is guarded even when granted: it
//! refuses paths that leave their preopen and writes that are not granted.
//!
//! Just over 600 lines: the guarded `path_open` and the refusal stubs share
//! the linker code and the denial record; the bounded output is in `output`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use wasmtime::{Caller, ExternType, FuncType, Linker, Module, Val};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self, WasiSnapshotPreview1};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::abi::memory;
use crate::config::{Access, Grants, OnDenied};

mod output;

pub use crate::preview1::{GROUPS, PREVIEW1, expand_grant, group_of};
pub use crate::telemetry::log::{
    GuestLine, MAX_GUEST_OUTPUT_BYTES, MAX_GUEST_OUTPUT_LINES, Source,
};
pub use output::{Collected, GuestOutput};

/// The import module of WASI preview 1.
pub const MODULE: &str = crate::abi::WASI_MODULE;

/// `ERRNO_NOTCAPABLE`: what a refused call returns under `on_denied = "errno"`.
pub const ERRNO_NOTCAPABLE: i32 = 76;
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_ACCES: i32 = 2;
const ERRNO_PERM: i32 = 63;
/// Longest path a WASI call may name before it is cut in audit lines.
pub const MAX_PATH_BYTES: usize = 4096;

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

/// The WASI state of one store: the context, what the guest may touch, and
/// what it wrote and was refused.
pub struct WasiState {
    /// Built on the guest's first WASI call ([`WasiState::ctx`]): a guest
    /// started from its snapshot usually makes none, and building it means
    /// opening every preopened directory and seeding the context's RNGs.
    ctx: Option<WasiP1Ctx>,
    /// Why the context could not be built as granted (a preopened directory
    /// that cannot be opened any more): the invocation fails with this.
    unavailable: Option<String>,
    pub grants: Arc<Grants>,
    /// Access of open directory descriptors (preopens and what was opened from them).
    pub fd_access: HashMap<u32, Access>,
    pub output: GuestOutput,
    /// The calls refused so far, in order.
    pub denials: Vec<Denial>,
    /// What `path_open` opened, in order: the new descriptor and the host
    /// path it names (what init read, for the snapshot's cache key).
    pub opened: Vec<(u32, PathBuf)>,
}

impl WasiState {
    /// The state of a fresh store under `grants`, its stdio going to `output`.
    /// Nothing is opened until the guest's first WASI call (or [`WasiState::open`]).
    pub fn new(grants: Arc<Grants>, output: GuestOutput) -> WasiState {
        WasiState {
            ctx: None,
            unavailable: None,
            fd_access: initial_fd_access(&grants),
            grants,
            output,
            denials: Vec::new(),
            opened: Vec::new(),
        }
    }

    /// Builds the context now, failing if a preopened directory cannot be
    /// opened (init uses it: a load must say why, before the guest runs).
    pub fn open(&mut self) -> anyhow::Result<()> {
        if self.ctx.is_none() {
            self.ctx = Some(context(&self.grants, &self.output)?);
        }
        Ok(())
    }

    /// The context wasmtime-wasi's functions run on, built on first use.
    /// When a preopened directory cannot be opened, the guest gets a context
    /// without preopens (its file calls fail with `EBADF`) and the
    /// invocation fails with the reason ([`WasiState::unavailable`]): never
    /// an answer computed without the files the grants promise.
    pub fn ctx(&mut self) -> &mut WasiP1Ctx {
        let WasiState {
            ctx,
            unavailable,
            grants,
            output,
            ..
        } = self;
        ctx.get_or_insert_with(|| match context(grants, output) {
            Ok(ctx) => ctx,
            Err(e) => {
                *unavailable = Some(format!("cannot open the preopened directories: {e:#}"));
                stdio_context(output)
            }
        })
    }

    /// Why the granted context could not be built, if it could not.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// The host path `fd` names: a preopened directory, or what `path_open`
    /// opened from one.
    fn host_path(&self, fd: u32) -> Option<PathBuf> {
        if let Some(preopen) = (fd as usize)
            .checked_sub(3)
            .and_then(|i| self.grants.preopens.get(i))
        {
            return Some(preopen.host.clone());
        }
        self.opened
            .iter()
            .rev()
            .find(|(opened, _)| *opened == fd)
            .map(|(_, path)| path.clone())
    }

    /// The host paths `path_open` opened, each once, in order.
    pub fn opened_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = Vec::with_capacity(self.opened.len());
        for (_, path) in &self.opened {
            if !paths.contains(path) {
                paths.push(path.clone());
            }
        }
        paths
    }
}

/// How the WASI host functions reach the embedder's store `T` without naming
/// it: `state` finds their [`WasiState`], `refused` reports a refusal beyond
/// it (audit, daemon log, trace), which the embedder owns.
pub struct Host<T> {
    pub state: fn(&mut T) -> &mut WasiState,
    pub refused: fn(&mut T, &Denial),
}

impl<T> Clone for Host<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Host<T> {}

/// Builds the WASI context of one evaluation: no args, only the listed
/// environment, the preopens with their access, stdio captured, no network.
pub fn context(grants: &Grants, output: &GuestOutput) -> anyhow::Result<WasiP1Ctx> {
    let mut builder = stdio_builder(output);
    for (name, value) in &grants.env {
        builder.env(name, value);
    }
    for p in &grants.preopens {
        let perms = match p.access {
            Access::ReadOnly => FsPerms::ReadOnly,
            Access::ReadWrite => FsPerms::ReadWrite,
        };
        builder
            .preopened_dir(&p.host, &p.guest, perms)
            .map_err(|e| {
                anyhow::anyhow!("{} (preopened as {}): {e:#}", p.host.display(), p.guest)
            })?;
    }
    Ok(builder.build_p1())
}

/// A context with only the captured stdio: what a guest gets when its
/// granted context cannot be built.
fn stdio_context(output: &GuestOutput) -> WasiP1Ctx {
    stdio_builder(output).build_p1()
}

fn stdio_builder(output: &GuestOutput) -> WasiCtxBuilder {
    let mut builder = WasiCtxBuilder::new();
    // File operations run on the evaluating thread: no blocking-pool hop per
    // call, and each syscall stays attributable to the invocation.
    builder
        .allow_blocking_current_thread(true)
        .stdout(output.sink(1))
        .stderr(output.sink(2));
    builder
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
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    module: &Module,
    grants: &Grants,
    host: Host<T>,
) -> Result<(), String> {
    let state = host.state;
    wasmtime_wasi::p1::add_to_linker_async(linker, move |t: &mut T| state(t).ctx())
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
                define_guarded_path_open(linker, host, grants.on_denied)
            } else {
                Ok(())
            }
        } else if call == "fd_write" {
            define_stdio_fd_write(linker, host, ty, grants.on_denied)
        } else {
            define_refusal(linker, host, call, ty, grants.on_denied)
        };
        defined.map_err(|e| format!("cannot link `{MODULE}::{name}`: {e:#}"))?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

fn refuse<T>(
    caller: &mut Caller<'_, T>,
    host: Host<T>,
    call: &'static str,
    detail: String,
    args: Value,
    on_denied: OnDenied,
    results: &mut [Val],
) -> wasmtime::Result<()> {
    record(
        caller.data_mut(),
        host,
        Denial {
            call,
            detail: detail.clone(),
            args,
        },
    );
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

/// Reports a refused call to the embedder and keeps it for the decision.
fn record<T>(store: &mut T, host: Host<T>, denial: Denial) {
    (host.refused)(store, &denial);
    (host.state)(store).denials.push(denial);
}

fn define_refusal<T: Send + 'static>(
    linker: &mut Linker<T>,
    host: Host<T>,
    call: &'static str,
    ty: FuncType,
    on_denied: OnDenied,
) -> wasmtime::Result<()> {
    linker.func_new(MODULE, call, ty, move |mut caller, params, results| {
        let (detail, args) = describe(&mut caller, call, params);
        refuse(&mut caller, host, call, detail, args, on_denied, results)
    })?;
    Ok(())
}

/// `fd_write` without `fs_write`: stdout and stderr still reach the daemon
/// log; any other descriptor is refused.
fn define_stdio_fd_write<T: Send + 'static>(
    linker: &mut Linker<T>,
    host: Host<T>,
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
                let errno = match memory::gather_iovecs(
                    &mut caller,
                    arg(1),
                    arg(2),
                    MAX_GUEST_OUTPUT_BYTES,
                ) {
                    Ok(bytes) => {
                        (host.state)(caller.data_mut()).output.write(fd, &bytes);
                        let written = (bytes.len() as u32).to_le_bytes();
                        match memory::write_guest(&mut caller, arg(3), &written) {
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
            refuse(
                &mut caller,
                host,
                "fd_write",
                detail,
                args,
                on_denied,
                results,
            )
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

fn define_guarded_path_open<T: Send + 'static>(
    linker: &mut Linker<T>,
    host: Host<T>,
    on_denied: OnDenied,
) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        MODULE,
        "path_open",
        move |mut caller: Caller<'_, T>, params: PathOpenParams| {
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
                    memory::read_guest_string(&mut caller, path_ptr, path_len, MAX_PATH_BYTES)
                        .unwrap_or_default();
                let write = wants_write(oflags, rights_base, fdflags);
                let state = (host.state)(caller.data_mut());
                let dir_access = state.fd_access.get(&(fd as u32)).copied();
                let is_preopen_root = fd >= 3 && (fd as usize) < 3 + state.grants.preopens.len();
                let may_write = state.grants.allows("fd_write");
                let refusal = if is_preopen_root && leaves_directory(&path) {
                    Some("path leaves its preopened directory")
                } else if write && !may_write {
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
                        host,
                        "path_open",
                        path,
                        args,
                        on_denied,
                        &mut results,
                    )?;
                    return Ok(results[0].i32().unwrap_or(ERRNO_NOTCAPABLE));
                }
                let Some(guest_memory) = memory::memory(&mut caller) else {
                    return Ok(21);
                };
                // What wasmtime-wasi's own glue does before each call: the
                // budget bounding how much guest data one hostcall may copy.
                let fuel = wasmtime::AsContextMut::as_context_mut(&mut caller).hostcall_fuel();
                let (data, store) = guest_memory.data_and_store_mut(&mut caller);
                let ctx = (host.state)(store).ctx();
                WasiSnapshotPreview1::set_hostcall_fuel(&mut *ctx, fuel);
                let errno = wasi_snapshot_preview1::path_open(
                    ctx,
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
                        if let Ok(bytes) = memory::read_guest(&mut caller, fd_out, 4) {
                            let new_fd =
                                u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                            let access = dir_access.unwrap_or(Access::ReadOnly);
                            let state = (host.state)(caller.data_mut());
                            state.fd_access.insert(new_fd, access);
                            if let Some(dir) = state.host_path(fd as u32) {
                                state.opened.push((new_fd, dir.join(&path)));
                            }
                        }
                    }
                    ERRNO_NOTCAPABLE | ERRNO_PERM | ERRNO_ACCES => {
                        // Refused by the filesystem sandbox itself (a symlink
                        // out of the preopen, a read-only directory): audit it.
                        let mut args = args;
                        args["reason"] =
                            json!(format!("refused by the filesystem sandbox (errno {errno})"));
                        record(
                            caller.data_mut(),
                            host,
                            Denial {
                                call: "path_open",
                                detail: path,
                                args,
                            },
                        );
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
fn describe<T>(caller: &mut Caller<'_, T>, call: &str, params: &[Val]) -> (String, Value) {
    let arg = |i: usize| -> i64 {
        params
            .get(i)
            .and_then(|v| v.i32().map(i64::from).or_else(|| v.i64()))
            .unwrap_or(-1)
    };
    let mut path_at = |ptr: usize, len: usize| -> String {
        memory::read_guest_string(caller, arg(ptr) as i32, arg(len) as i32, MAX_PATH_BYTES)
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

    /// A store that is not the daemon's: WASI links into any embedder.
    struct Embedder {
        wasi: WasiState,
        reported: Vec<&'static str>,
    }

    #[tokio::test]
    async fn links_into_any_store_and_reports_refusals_through_its_hook() {
        let engine = wasmtime::Engine::default();
        let wat = r#"(module
            (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "run") (result i32) (call $random (i32.const 0) (i32.const 8))))"#;
        let module = Module::new(&engine, wat::parse_str(wat).expect("wat")).expect("module");
        let grants = Grants::default();
        let mut linker = Linker::new(&engine);
        let host = Host {
            state: |e: &mut Embedder| &mut e.wasi,
            refused: |e: &mut Embedder, denial: &Denial| e.reported.push(denial.call),
        };
        add_to_linker(&mut linker, &module, &grants, host).expect("link");
        let wasi = WasiState::new(Arc::new(grants), GuestOutput::new());
        let mut store = wasmtime::Store::new(
            &engine,
            Embedder {
                wasi,
                reported: Vec::new(),
            },
        );
        let instance = linker
            .instantiate_async(&mut store, &module)
            .await
            .expect("instance");
        let run = instance
            .get_typed_func::<(), i32>(&mut store, "run")
            .expect("run");
        assert_eq!(
            run.call_async(&mut store, ()).await.ok(),
            Some(ERRNO_NOTCAPABLE)
        );
        assert_eq!(store.data().reported, ["random_get"]);
        let denials = &store.data().wasi.denials;
        assert_eq!(denials.len(), 1);
        assert_eq!(denials[0].detail, "8 bytes");
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
