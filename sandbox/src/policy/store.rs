//! The store of one evaluation (or one init run): the `Invocation` that
//! composes each concern's state under the policy's grants and limits, with
//! the epoch deadline and memory limiter wired in.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Store, UpdateDeadline};

use crate::audit::{AuditLog, Subject};
use crate::bridge::{Bridge, EgressState};
use crate::config::{Abi, PolicySpec};
use crate::engine::{Engine, MemoryLimiter};
use crate::host::Invocation;
use crate::probes::{self, Probe};
use crate::proxywasm;
use crate::telemetry::traces::Scope;
use crate::wasi::{self, WasiState};

/// A store for one instance of a policy: its WASI context, limits, deadline
/// and host state. Evaluations and init (with its own grants) both use it.
#[allow(clippy::too_many_arguments)]
pub(super) fn new_store(
    engine: &Engine,
    spec: &PolicySpec,
    grants: Arc<crate::config::Grants>,
    bridge: Arc<Bridge>,
    subject: Subject,
    audit: AuditLog,
    trace: Scope,
    probe: Probe,
) -> Store<Invocation> {
    let output = wasi::GuestOutput::new();
    // Instantiation starts with the store and ends when `run` has the
    // instance. The WASI context is built on the guest's first WASI call.
    probe.enter(probes::phase::INSTANTIATE);
    let filter = match &spec.abi {
        Abi::ProxyWasm(settings) => proxywasm::FilterState::new(
            settings,
            &spec.name,
            &subject.decision_id,
            spec.max_output_bytes,
        ),
        Abi::SandgateV1 => proxywasm::FilterState::default(),
    };
    let invocation = Invocation {
        filter,
        wasi: WasiState::new(grants, output),
        egress: EgressState::new(bridge),
        limiter: MemoryLimiter::new(spec.memory_limit_bytes),
        audit,
        subject,
        log_calls: 0,
        trace,
        epochs: 0,
        probe,
    };
    let mut store = Store::new(engine.wasmtime(), invocation);
    store.limiter(|inv| &mut inv.limiter);
    // Every epoch tick the guest yields to the executor, so a guest that
    // computes for its whole `timeout_ms` shares the worker threads with
    // every other evaluation instead of holding one; past its deadline
    // the next tick interrupts it.
    let deadline = Instant::now() + spec.timeout;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |mut store| {
        store.data_mut().epochs += 1;
        if Instant::now() >= deadline {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        }
    });
    store
}
