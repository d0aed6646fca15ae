//! The `sandgate::log` import: a guest's log messages go to its bounded
//! output (written to the daemon log after the evaluation) and, up to
//! `MAX_LOG_CALLS`, to its span as events. Linked through an accessor, like
//! every host module, so it never names the embedder's store type.

use wasmtime::{Caller, Linker};

use crate::abi::memory::read_guest_string;
use crate::probes::Probe;
use crate::telemetry::traces::Scope;
use crate::wasi::GuestOutput;
use sandgate_probes_common::phase;

pub use crate::abi::{MAX_LOG_BYTES, MAX_LOG_CALLS};

/// What `log` reaches in the embedder's store: its call count, the
/// evaluation's output, span and probe.
pub struct LogView<'a> {
    /// Guest `log` calls made so far.
    pub calls: &'a mut u32,
    pub output: &'a GuestOutput,
    pub trace: &'a Scope,
    pub probe: Probe,
}

/// Adds `log` to `module` (the `sandgate` import module); `get` finds its
/// view of the store.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    module: &str,
    get: fn(&mut T) -> LogView<'_>,
) -> wasmtime::Result<()> {
    linker.func_wrap(
        module,
        "log",
        move |mut caller: Caller<'_, T>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let message = read_guest_string(&mut caller, ptr, len, MAX_LOG_BYTES)?;
            let view = get(caller.data_mut());
            let probe = view.probe;
            probe.phase(phase::LOG, || log(view, level, &message));
            Ok(())
        },
    )?;
    Ok(())
}

/// A guest `log` call: kept in the evaluation's bounded output and, up to
/// `MAX_LOG_CALLS`, a span event (the span bounds its own events too).
fn log(view: LogView<'_>, level: i32, message: &str) {
    *view.calls += 1;
    view.output.log(level, message);
    if *view.calls <= MAX_LOG_CALLS {
        view.trace.guest_log(level, message);
    }
}
