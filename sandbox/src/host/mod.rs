//! The host side of one evaluation: `Invocation`, the store's data, which
//! only composes the state each concern owns (WASI, egress, memory limiter)
//! and the handles they share (audit log, subject, span, probe), and the
//! linking of every host module for a policy: WASI preview 1 as granted, the
//! `sandgate` imports (`log` here, the HTTP functions from `bridge`). `policy`
//! builds one per evaluation; each host module reaches its part through an
//! accessor and never names this type.

use opentelemetry::KeyValue;
use wasmtime::{Linker, Module};

use self::log::LogView;
use crate::abi::MODULE;
use crate::audit::{AuditLog, AuditRecord, Subject};
use crate::bridge::{self, EgressState, EgressView};
use crate::engine::MemoryLimiter;
use crate::proxywasm::{self, FilterState, FilterView};
use crate::telemetry::log::Escaped;
use crate::telemetry::traces::Scope;
use crate::wasi::{self, Denial, WasiState};

#[cfg(feature = "escape-drill")]
pub mod escape;
pub mod log;

/// The host state of one evaluation: the state of each concern, and the
/// handles they share (audit log, subject, span, probe).
pub struct Invocation {
    pub wasi: WasiState,
    pub egress: EgressState,
    pub limiter: MemoryLimiter,
    pub audit: AuditLog,
    pub subject: Subject,
    /// Guest `log` calls made.
    pub log_calls: u32,
    /// The span the guest runs in (its `evaluate` span once instantiated).
    pub trace: Scope,
    /// Epoch ticks the guest ran through (`wasm.fuel_or_epochs`).
    pub epochs: u64,
    /// This invocation as the eBPF probes know it.
    pub probe: crate::probes::Probe,
    /// The filter's state when the policy is a proxy-wasm filter.
    pub filter: FilterState,
}

impl Invocation {
    /// Records a refused WASI call: audit line, daemon log, trace event and
    /// probe (`wasi` keeps it in its own list of denials).
    fn refused(&mut self, denial: &Denial) {
        if self.probe.is_watched()
            && let Some(index) = wasi::PREVIEW1.iter().position(|f| *f == denial.call)
        {
            self.probe.wasi_denied(index);
        }
        tracing::warn!(
            policy = %self.subject.policy,
            version = %self.subject.version,
            decision_id = %self.subject.decision_id,
            call = denial.call,
            detail = %Escaped(&denial.detail),
            "wasi call refused"
        );
        self.trace.event("wasi_denied", || {
            vec![
                KeyValue::new("wasi.call", denial.call),
                KeyValue::new("wasi.detail", denial.detail.clone()),
            ]
        });
        self.audit.record(
            &self.subject,
            &AuditRecord::WasiDenied {
                call: denial.call.to_owned(),
                detail: denial.detail.clone(),
                args: denial.args.clone(),
            },
        );
    }

    fn log(&mut self) -> LogView<'_> {
        LogView {
            calls: &mut self.log_calls,
            output: &self.wasi.output,
            trace: &self.trace,
            probe: self.probe,
        }
    }

    fn filter(&mut self) -> FilterView<'_> {
        FilterView {
            state: &mut self.filter,
            output: &self.wasi.output,
            trace: &self.trace,
            clock: self.wasi.grants.allows("clock_time_get"),
            on_denied: self.wasi.grants.on_denied,
        }
    }

    /// A refused proxy-wasm host call: reported like a refused WASI call and
    /// kept with them, so the decision's metrics count it too.
    fn filter_refused(&mut self, denial: &Denial) {
        self.refused(denial);
        self.wasi.denials.push(denial.clone());
    }

    fn filter_state(&mut self) -> &mut FilterState {
        &mut self.filter
    }

    fn egress(&mut self) -> EgressView<'_> {
        EgressView {
            state: &mut self.egress,
            audit: &self.audit,
            subject: &self.subject,
            trace: &self.trace,
            probe: self.probe,
        }
    }
}

/// Links every host module for `module`: WASI preview 1 as `grants` allow,
/// and the `sandgate` import module (`log` here, the HTTP functions from
/// `bridge`). Errors name what cannot be linked.
pub fn add_to_linker(
    linker: &mut Linker<Invocation>,
    module: &Module,
    grants: &crate::config::Grants,
) -> Result<(), String> {
    add_sandgate_to_linker(linker)
        .map_err(|e| format!("cannot link the sandgate imports: {e:#}"))?;
    let host = wasi::Host {
        state: |inv: &mut Invocation| &mut inv.wasi,
        refused: Invocation::refused,
    };
    wasi::add_to_linker(linker, module, grants, host)
}

/// Links every host module for a proxy-wasm filter (DESIGN §2b): WASI
/// preview 1 as `grants` allow, and the proxy-wasm host functions of `env`.
pub fn add_filter_to_linker(
    linker: &mut Linker<Invocation>,
    module: &Module,
    grants: &crate::config::Grants,
) -> Result<(), String> {
    let host = proxywasm::Host {
        view: Invocation::filter,
        egress: Invocation::egress,
        refused: Invocation::filter_refused,
    };
    proxywasm::add_to_linker(linker, module, host)?;
    let host = wasi::Host {
        state: |inv: &mut Invocation| &mut inv.wasi,
        refused: Invocation::refused,
    };
    wasi::add_to_linker(linker, module, grants, host)
}

/// The accessor of the filter's state, for `proxywasm::call`.
pub const FILTER_STATE: fn(&mut Invocation) -> &mut FilterState = Invocation::filter_state;

/// Adds the `sandgate` import module: `log`, and the HTTP functions from `bridge`.
fn add_sandgate_to_linker(linker: &mut Linker<Invocation>) -> wasmtime::Result<()> {
    log::add_to_linker(linker, MODULE, Invocation::log)?;
    #[cfg(feature = "escape-drill")]
    escape::add_to_linker(linker)?;
    bridge::add_to_linker(linker, MODULE, Invocation::egress)
}
