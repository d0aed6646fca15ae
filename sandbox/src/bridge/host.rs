//! The guest side of the bridge: the `http_send` and `http_read` imports and
//! the egress state of one store (calls made and refused, the pending
//! response). `abi` links them through an accessor, so this module never
//! names the embedder's store type; the calls themselves go to [`Bridge`].

use std::sync::Arc;

use wasmtime::{Caller, Linker};

use super::{
    BUDGET_EXHAUSTED, Bridge, EGRESS_DENIED, HttpCall, INVALID_REQUEST, MAX_REQUEST_BYTES,
};
use crate::abi::memory::{self, AbiViolation};
use crate::audit::{AuditLog, Subject};
use crate::probes::Probe;
use crate::telemetry::traces::Scope;

/// The egress state of one store: the policy's bridge and this evaluation's
/// use of it.
pub struct EgressState {
    /// The policy's HTTP egress path.
    pub bridge: Arc<Bridge>,
    /// Bridged calls made (counted against `max_calls`).
    pub calls: u32,
    /// Bridged requests refused by the allowlist during this evaluation.
    pub denied: u32,
    /// The response `http_read` will copy.
    pub pending: Option<Vec<u8>>,
    pub http_calls: Vec<HttpCall>,
}

impl EgressState {
    pub fn new(bridge: Arc<Bridge>) -> EgressState {
        EgressState {
            bridge,
            calls: 0,
            denied: 0,
            pending: None,
            http_calls: Vec::new(),
        }
    }
}

/// What the `http_*` imports reach in the embedder's store without naming
/// it: their state, and the evaluation's audit log, subject, span and probe,
/// which the embedder owns.
pub struct EgressView<'a> {
    pub state: &'a mut EgressState,
    pub audit: &'a AuditLog,
    pub subject: &'a Subject,
    pub trace: &'a Scope,
    pub probe: Probe,
}

/// Adds `http_send` and `http_read` to `module` (the `sandgate` import
/// module); `get` finds their view of the store.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    module: &str,
    get: fn(&mut T) -> EgressView<'_>,
) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        module,
        "http_send",
        move |mut caller: Caller<'_, T>, (ptr, len): (i32, i32)| {
            Box::new(async move {
                let len = usize::try_from(len)
                    .map_err(|_| AbiViolation(format!("negative length {len}")))?;
                get(caller.data_mut()).state.pending = None;
                if len > MAX_REQUEST_BYTES {
                    return Ok(INVALID_REQUEST);
                }
                let raw = memory::read_guest(&mut caller, ptr, len)?;
                let result = send(caller.data_mut(), get, &raw).await;
                let state = get(caller.data_mut()).state;
                Ok(match result {
                    Ok(document) => {
                        let n = document.len() as i64;
                        state.pending = Some(document);
                        n
                    }
                    Err(code) => code,
                })
            })
        },
    )?;
    linker.func_wrap(
        module,
        "http_read",
        move |mut caller: Caller<'_, T>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let probe = get(caller.data_mut()).probe;
            probe.phase(crate::probes::phase::HTTP_READ, || {
                http_read(&mut caller, get, ptr, len)
            })
        },
    )?;
    Ok(())
}

/// Sends one HttpRequest document (DESIGN §2) through the policy's bridge on
/// behalf of the store's guest: the call budget, the allowlist, credentials,
/// limits and the audit of [`Bridge`]. The `Ok` document is the
/// HttpResponse; the `Err` is the contract's negative code. Other host
/// modules (the proxy-wasm `dispatch_http_call`) send through here too.
pub async fn send<T>(
    data: &mut T,
    get: fn(&mut T) -> EgressView<'_>,
    raw: &[u8],
) -> Result<Vec<u8>, i64> {
    let view = get(data);
    if view.state.calls >= view.state.bridge.settings.max_calls {
        tracing::warn!(policy = %view.subject.policy, decision_id = %view.subject.decision_id, "egress call budget exhausted");
        return Err(BUDGET_EXHAUSTED);
    }
    view.state.calls += 1;
    let (bridge, audit, subject, trace, probe) = (
        Arc::clone(&view.state.bridge),
        view.audit.clone(),
        view.subject.clone(),
        view.trace.clone(),
        view.probe,
    );
    let mut calls = Vec::new();
    let sent = bridge.send(raw, &audit, &subject, &mut calls, &trace);
    let result = probe.hostcall(crate::probes::phase::HTTP_SEND, sent).await;
    let state = get(data).state;
    state.http_calls.append(&mut calls);
    if result == Err(EGRESS_DENIED) {
        state.denied += 1;
    }
    result
}

/// `http_read`: copies the pending response document into the guest.
fn http_read<T>(
    caller: &mut Caller<'_, T>,
    get: fn(&mut T) -> EgressView<'_>,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    let Some(document) = get(caller.data_mut()).state.pending.take() else {
        return Ok(INVALID_REQUEST as i32);
    };
    let len = usize::try_from(len).map_err(|_| AbiViolation(format!("negative length {len}")))?;
    let n = document.len().min(len);
    memory::write_guest(caller, ptr, &document[..n])?;
    Ok(n as i32)
}
