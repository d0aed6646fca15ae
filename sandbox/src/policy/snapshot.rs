//! A policy's initialised snapshot (DESIGN §2, `sandgate_init`). At load the
//! module is instrumented (wasmtime-wizer exports its globals and memories),
//! instantiated once with the policy's grants minus clocks and randomness,
//! and its `_initialize` and `sandgate_init` run under the policy's deadline;
//! the instance's memory and globals are then written back into a new module.
//! `Policy::load` compiles that module and starts every evaluation from it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Instance, Module, Store, Val};
use wasmtime_wizer::{InstanceState, SnapshotVal, ValType, Wizer};

use super::{DEADLINE_MARGIN, classify, hand_off_output, link, new_store};
use crate::abi;
use crate::audit::{AuditLog, Subject};
use crate::bridge::Bridge;
use crate::config::{Digest, Grants, ModuleSource, PolicySpec};
use crate::engine::Engine;
use crate::host::Invocation;
use crate::probes::Probe;
use crate::telemetry::traces::Scope;
use crate::wasi::Source;

pub use crate::abi::call::{INIT_EXPORT, INITIALIZE_EXPORT};
/// WASI functions refused while init runs, whatever the grants: a snapshot
/// must not freeze a secret or a time.
pub const REFUSED_AT_INIT: [&str; 3] = ["clock_res_get", "clock_time_get", "random_get"];
/// Guest log lines and stderr lines quoted in a refused load.
const REASON_LINES: usize = 5;

/// What init needs to run for a module, decided from its exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Neither `_initialize` nor `sandgate_init`: nothing to keep.
    Nothing,
    /// Run what the module exports once and start evaluations from the result.
    Snapshot { sandgate_init: bool },
}

impl Plan {
    /// The plan for `module`; a proxy-wasm filter always has state to keep
    /// (its configured root context).
    pub fn of(module: &Module) -> Plan {
        let sandgate_init = module.get_export(INIT_EXPORT).is_some();
        let filter = crate::proxywasm::abi_version(module).is_some();
        if sandgate_init || filter || module.get_export(INITIALIZE_EXPORT).is_some() {
            Plan::Snapshot { sandgate_init }
        } else {
            Plan::Nothing
        }
    }
}

/// Why no snapshot was made.
#[derive(Debug)]
pub enum InitError {
    /// The module uses something a snapshot cannot capture (wizer refuses it:
    /// a table mutation, `data.drop`, an imported memory, …).
    Unsupported(String),
    /// Init ran and failed: non-zero return, trap, deadline, refused call.
    Failed(String),
}

/// The initialised module: the original with its memory, globals and the
/// removed `_initialize`/`sandgate_init` exports rewritten by the snapshot.
pub struct Initialised {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    /// How long instrumenting, init and the snapshot took.
    pub took: Duration,
    /// The host paths init opened through its preopens.
    pub reads: Vec<PathBuf>,
    /// Whether init made a bridged HTTP call (its result then depends on
    /// more than the module and its files).
    pub bridged: bool,
}

/// The grants init runs with: the policy's, without clocks and randomness.
/// The one exception is a built-in guest whose std hash tables draw their
/// keys at init ([`crate::language::Language::seeds_hash_tables_at_init`]): it gets
/// `random_get`, answered by the host's CSPRNG, for this init only.
pub fn init_grants(spec: &PolicySpec) -> Grants {
    let mut grants = spec.grants.clone();
    let seeds = matches!(&spec.module, ModuleSource::Builtin(l) if l.seeds_hash_tables_at_init());
    grants.functions.retain(|f| !REFUSED_AT_INIT.contains(f));
    if seeds {
        grants.functions.insert(RANDOM_GET);
    }
    grants
}

/// The WASI function a built-in guest may call at init to seed its hash tables.
const RANDOM_GET: &str = "random_get";

/// Runs `_initialize` and (when exported) `sandgate_init` of `wasm` once,
/// with the grants of `spec` minus [`REFUSED_AT_INIT`], and returns the
/// module rewritten from the resulting state. Refused WASI calls are audited
/// to `audit` under the decision id `init`.
pub async fn initialise(
    engine: &Engine,
    spec: &PolicySpec,
    wasm: &[u8],
    digest: &Digest,
    audit: &AuditLog,
) -> Result<Initialised, InitError> {
    let started = Instant::now();
    // Modules may be given as text; the rewrite works on the binary form.
    let wasm = wat::parse_bytes(wasm)
        .map_err(|e| InitError::Unsupported(format!("cannot read the module: {e}")))?;
    let mut wizer = Wizer::new();
    wizer.init_func(INIT_EXPORT);
    let (cx, instrumented) = wizer
        .instrument(&wasm)
        .map_err(|e| InitError::Unsupported(format!("{e:#}")))?;
    let failed = |m: String| InitError::Failed(m);
    let module = {
        let engine = engine.clone();
        let digest = Digest::of(&instrumented);
        tokio::task::spawn_blocking(move || engine.compile(&instrumented, &digest))
            .await
            .map_err(|e| failed(format!("compile task failed: {e}")))?
            .map_err(|e| failed(e.to_string()))?
            .0
    };
    let grants = Arc::new(init_grants(spec));
    let pre = link(engine, &module, &grants, &spec.abi).map_err(failed)?;
    let bridge = Arc::new(Bridge::new(&spec.egress).map_err(|e| failed(e.to_string()))?);
    let subject = Subject::new(
        &spec.name,
        &spec.version,
        &digest.to_string(),
        "init".into(),
    );
    let mut store = new_store(
        engine,
        spec,
        grants,
        bridge,
        subject,
        audit.clone(),
        Scope::default(),
        Probe::NONE,
    );
    store
        .data_mut()
        .wasi
        .open()
        .map_err(|e| failed(format!("cannot prepare an instance: {e:#}")))?;

    let sandgate_init = module.get_export(INIT_EXPORT).is_some();
    let filter = matches!(spec.abi, crate::config::Abi::ProxyWasm(_));
    let run = run_init(&mut store, &pre, sandgate_init, filter);
    let ran = match tokio::time::timeout(spec.timeout + DEADLINE_MARGIN, run).await {
        Ok(Ok(instance)) => Ok(instance),
        Ok(Err(RunError::Refused(message))) => Err(message),
        Ok(Err(RunError::Guest(e))) => Err(classify(&e, store.data()).1),
        Err(_) => Err(format!(
            "init exceeded timeout_ms = {}",
            spec.timeout.as_millis()
        )),
    };
    let instance = match ran {
        Ok(instance) => instance,
        Err(message) => {
            let reason = reason(store.data());
            hand_off_output(store.data(), Instant::now() + spec.timeout);
            return Err(failed(format!("init failed: {message}{reason}")));
        }
    };
    hand_off_output(store.data(), Instant::now() + spec.timeout);
    let reads = store.data().wasi.opened_paths();
    let bridged = store.data().egress.calls > 0;
    let mut state = State {
        store: &mut store,
        instance,
        missing: None,
    };
    let bytes = wizer
        .snapshot(&cx, &mut state)
        .await
        .map_err(|e| failed(format!("cannot snapshot the initialised instance: {e:#}")))?;
    if let Some(name) = state.missing {
        return Err(failed(format!(
            "cannot snapshot the initialised instance: `{name}` is not exported"
        )));
    }
    Ok(Initialised {
        digest: Digest::of(&bytes),
        bytes,
        took: started.elapsed(),
        reads,
        bridged,
    })
}

enum RunError {
    /// `sandgate_init` answered, but not 0.
    Refused(String),
    Guest(anyhow::Error),
}

impl From<wasmtime::Error> for RunError {
    fn from(e: wasmtime::Error) -> RunError {
        RunError::Guest(e.into())
    }
}

async fn run_init(
    store: &mut Store<Invocation>,
    pre: &wasmtime::InstancePre<Invocation>,
    sandgate_init: bool,
    filter: bool,
) -> Result<Instance, RunError> {
    let instance = pre.instantiate_async(&mut *store).await?;
    abi::call::initialize(&mut *store, instance).await?;
    if filter {
        // A proxy-wasm filter's root context, started and configured.
        crate::proxywasm::call::configure(&mut *store, instance, crate::host::FILTER_STATE)
            .await
            .map_err(RunError::Guest)?
            .map_err(RunError::Refused)?;
    }
    if sandgate_init {
        let status = abi::call::init(&mut *store, instance).await?;
        if status != 0 {
            return Err(RunError::Refused(format!(
                "{INIT_EXPORT} returned {status}"
            )));
        }
    }
    Ok(instance)
}

/// The guest's own words about a failed init: its last log messages and
/// stderr lines (a Rust panic message lands there).
fn reason(inv: &Invocation) -> String {
    let lines: Vec<String> = inv
        .wasi
        .output
        .kept_lines()
        .into_iter()
        .filter(|l| l.source != Source::Stdout && !l.text.trim().is_empty())
        .map(|l| l.text)
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let skip = lines.len().saturating_sub(REASON_LINES);
    format!("; the guest said: {}", lines[skip..].join(" | "))
}

/// The initialised instance as wizer reads it. Every name it asks for was
/// exported by its own instrumentation; should one be missing the snapshot is
/// refused rather than the host panicking.
struct State<'a> {
    store: &'a mut Store<Invocation>,
    instance: Instance,
    missing: Option<String>,
}

impl InstanceState for State<'_> {
    async fn global_get(&mut self, name: &str, _type_hint: ValType) -> SnapshotVal {
        let value = self
            .instance
            .get_global(&mut *self.store, name)
            .map(|g| g.get(&mut *self.store));
        match value {
            Some(Val::I32(x)) => SnapshotVal::I32(x),
            Some(Val::I64(x)) => SnapshotVal::I64(x),
            Some(Val::F32(x)) => SnapshotVal::F32(x),
            Some(Val::F64(x)) => SnapshotVal::F64(x),
            Some(Val::V128(x)) => SnapshotVal::V128(x.as_u128()),
            _ => {
                self.missing.get_or_insert_with(|| name.to_owned());
                SnapshotVal::I32(0)
            }
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        match self.instance.get_memory(&mut *self.store, name) {
            Some(memory) => contents(memory.data(&*self.store)),
            None => {
                self.missing.get_or_insert_with(|| name.to_owned());
                contents(&[]);
            }
        }
    }
}
