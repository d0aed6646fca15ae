//! eBPF probes (DESIGN §9): the kernel's view of every guest invocation.
//!
//! The programs of `ebpf-probes/` are embedded in the binary. At startup,
//! per `[ebpf] mode`, [`Probes::start`] loads them with aya, maps their
//! per-thread slot array into the daemon's memory and attaches the
//! `raw_syscalls` tracepoints, filtered in the kernel to this process and
//! to threads inside a stretch of a guest invocation. Each invocation the
//! evaluation path [`watch`]es gets an account. Around every poll of the
//! invocation the polling thread publishes it in its slot with plain stores
//! ([`markers`]); the programs count and time each syscall the thread makes
//! in the slot, and at the end of the poll the thread adds those tallies to
//! the account. When the invocation ends ([`end`]) the account is reported:
//! a `kernel` child span of the decision's span with per-syscall counts and
//! time, and a `kernel_syscall` audit line for each syscall outside what the
//! policy's grants explain ([`Expected`]). The ring buffer carries only the
//! unusual (an unexpected syscall, full tallies): a normal decision sends no
//! event.
//!
//! Attribution: a syscall is charged to the invocation whose future the
//! thread was polling when it made it, and to the phase the host was in
//! (guest code and its WASI calls, instantiation, teardown, `log`,
//! `http_send`, `http_read`). Work the host does for a guest elsewhere is not
//! charged: DNS resolution on tokio's blocking pool, the audit writer thread,
//! the span exporter. Nothing is lost silently: events the ring buffer could
//! not take, syscalls no tally could name, polls on a thread that got no
//! slot, and invocations that never ended are counted and shown in
//! `/v1/probes` and the metrics.

mod account;
mod btf;
mod consume;
mod enforce;
mod expected;
mod load;
pub mod markers;
mod slots;

use std::{
    path::Path,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
};
use serde::Serialize;

pub use enforce::Confinement;
pub use expected::Expected;
pub use markers::Probe;
pub use sandgate_probes_common::phase;

use crate::{
    audit::{AuditLog, Subject},
    config::EbpfMode,
    telemetry::traces::Scope,
};
use account::Account;
use consume::Shared;
use load::{TRACEPOINTS, attach};

/// The attached probes, for the evaluation path; unset when they are off.
static ATTACHED: OnceLock<Arc<Shared>> = OnceLock::new();

static NEXT_INVOCATION: AtomicU64 = AtomicU64::new(1);

/// How long past its deadline an invocation may run before its account is
/// closed as incomplete (its future was dropped without ending it).
const END_GRACE: Duration = Duration::from_secs(5);

/// The daemon's probes: attached, or off with the reason why.
#[derive(Clone)]
pub struct Probes {
    mode: EbpfMode,
    shared: Option<Arc<Shared>>,
    reason: Option<String>,
    enforcement: Arc<EnforcementReport>,
}

/// Why probes (or, with `[ebpf] enforce`, the BPF LSM and its drill) could
/// not be set up when `mode = "required"`.
#[derive(Debug, thiserror::Error)]
pub enum ProbesRequired {
    #[error("eBPF probes are required ([ebpf] mode = \"required\") but cannot be attached: {0}")]
    Probes(String),
    #[error(
        "BPF LSM enforcement is required ([ebpf] mode = \"required\", enforce = true) but \
         cannot be attached: {0}"
    )]
    Lsm(String),
    #[error(
        "BPF LSM enforcement is required ([ebpf] mode = \"required\", enforce = true) but its \
         start-up drill failed: {0}"
    )]
    Selftest(String),
}

/// `enforcement` in `GET /v1/probes` and `/readyz` (DESIGN §9).
#[derive(Clone, Debug, Serialize)]
pub struct EnforcementReport {
    /// `attached`, or why not.
    pub lsm: String,
    /// `passed`, `failed: why`, or why it did not run.
    pub selftest: String,
}

impl EnforcementReport {
    fn new(lsm: impl Into<String>, selftest: impl Into<String>) -> Arc<EnforcementReport> {
        Arc::new(EnforcementReport {
            lsm: lsm.into(),
            selftest: selftest.into(),
        })
    }
}

impl Probes {
    /// Attaches the probes per `mode`, and with `enforce` the BPF LSM
    /// programs, then runs the drill that proves they refuse (its
    /// `kernel_denied` lines go to `audit`). With `auto`, a failure is
    /// logged with its precise reason and the daemon runs without what
    /// failed; with `required` it is an error. Needs a Tokio runtime (the
    /// event consumer is a task).
    pub fn start(
        mode: EbpfMode,
        enforce: bool,
        audit: &AuditLog,
    ) -> Result<Probes, ProbesRequired> {
        let not_enforcing = "not enabled: [ebpf] enforce = false";
        if mode == EbpfMode::Off {
            let why = "not attached: [ebpf] mode = \"off\"";
            return Ok(Probes {
                mode,
                shared: None,
                reason: Some("disabled by [ebpf] mode = \"off\"".into()),
                enforcement: EnforcementReport::new(
                    if enforce { why } else { not_enforcing },
                    "not run",
                ),
            });
        }
        let required = mode == EbpfMode::Required;
        match attach(enforce) {
            Ok((shared, lsm_error)) => {
                let shared = ATTACHED.get_or_init(|| shared);
                tracing::info!(
                    programs = TRACEPOINTS.len(),
                    "eBPF probes attached: guest invocations and their syscalls are traced"
                );
                let enforcement = match (enforce, lsm_error) {
                    (false, _) => EnforcementReport::new(not_enforcing, "not run"),
                    (true, Some(reason)) if required => return Err(ProbesRequired::Lsm(reason)),
                    (true, Some(reason)) => {
                        tracing::warn!("BPF LSM enforcement is off: {reason}");
                        EnforcementReport::new(format!("not attached: {reason}"), "not run")
                    }
                    (true, None) => {
                        tracing::info!(
                            programs = sandgate_probes_common::names::LSM.len(),
                            "BPF LSM programs attached: invocations are refused what their \
                             grants do not explain"
                        );
                        match enforce::drill(audit) {
                            Ok(()) => {
                                tracing::info!(
                                    "BPF LSM drill passed: the kernel refused the drill's open \
                                     and connect"
                                );
                                EnforcementReport::new("attached", "passed")
                            }
                            Err(why) if required => return Err(ProbesRequired::Selftest(why)),
                            Err(why) => {
                                tracing::warn!("BPF LSM drill failed: {why}");
                                EnforcementReport::new("attached", format!("failed: {why}"))
                            }
                        }
                    }
                };
                Ok(Probes {
                    mode,
                    shared: Some(Arc::clone(shared)),
                    reason: None,
                    enforcement,
                })
            }
            Err(reason) if required => Err(ProbesRequired::Probes(reason)),
            Err(reason) => {
                tracing::warn!("eBPF probes are off: {reason}");
                let enforcement = if enforce {
                    EnforcementReport::new(
                        format!("not attached: the eBPF probes are off: {reason}"),
                        "not run",
                    )
                } else {
                    EnforcementReport::new(not_enforcing, "not run")
                };
                Ok(Probes {
                    mode,
                    shared: None,
                    reason: Some(reason),
                    enforcement,
                })
            }
        }
    }

    /// Probes that are off, for callers that never start them (CLI, tests).
    pub fn off(reason: &str) -> Probes {
        Probes {
            mode: EbpfMode::Off,
            shared: None,
            reason: Some(reason.to_owned()),
            enforcement: EnforcementReport::new(format!("not attached: {reason}"), "not run"),
        }
    }

    /// Whether the BPF LSM programs are attached.
    pub fn is_enforcing(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.lsm.is_some())
    }

    pub fn is_attached(&self) -> bool {
        self.shared.is_some()
    }

    /// The BPF LSM layer and its start-up drill, as settled at start (the
    /// `enforcement` part of `GET /v1/probes` and `/readyz`), without
    /// building the rest of the report.
    pub fn enforcement(&self) -> &EnforcementReport {
        &self.enforcement
    }

    /// What `GET /v1/probes` shows.
    pub fn report(&self) -> ProbeReport {
        let mode = match self.mode {
            EbpfMode::Auto => "auto",
            EbpfMode::Required => "required",
            EbpfMode::Off => "off",
        };
        let mut programs = Vec::new();
        if let Some(shared) = &self.shared {
            if shared.lsm.is_some() {
                programs.extend(sandgate_probes_common::names::LSM.iter().map(|hook| {
                    ProgramReport {
                        name: hook,
                        kind: "lsm",
                        target: (*hook).to_owned(),
                    }
                }));
            }
            programs.extend(
                TRACEPOINTS
                    .iter()
                    .map(|(program, category, name)| ProgramReport {
                        name: program,
                        kind: "raw_tracepoint",
                        target: format!("{category}:{name}"),
                    }),
            );
        }
        ProbeReport {
            mode,
            attached: self.shared.is_some(),
            reason: self.reason.clone(),
            kernel_btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            programs,
            counters: self.shared.as_ref().map(|s| s.counters()),
        }
    }
}

impl crate::telemetry::Collected for Probes {
    /// The probes' counters as Prometheus metrics, read at scrape time.
    fn collector(&self) -> Box<dyn Collector> {
        Box::new(ProbeMetrics {
            probes: self.clone(),
        })
    }
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("mode", &self.mode)
            .field("attached", &self.is_attached())
            .field("reason", &self.reason)
            .finish()
    }
}

/// The body of `GET /v1/probes` (and the `probes` section of `/readyz`).
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    pub mode: &'static str,
    pub attached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub kernel_btf: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
}

#[derive(Debug, Serialize)]
pub struct ProgramReport {
    pub name: &'static str,
    pub kind: &'static str,
    pub target: String,
}

/// What the probes saw, and what they could not.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    /// Events the programs wrote to the ring buffer.
    pub events_sent: u64,
    /// Events the daemon read from it.
    pub events_received: u64,
    /// Events lost because the ring buffer was full.
    pub events_dropped: u64,
    /// Syscalls of a registered thread the programs could not charge.
    pub syscalls_untracked: u64,
    /// Syscalls counted in an invocation's totals but not by name (its
    /// slot's tallies were full).
    pub syscalls_untallied: u64,
    /// Polls of an invocation on a thread that could not get a slot (their
    /// syscalls are unseen; the invocation is reported incomplete).
    pub stretches_unslotted: u64,
    /// Worker threads holding a slot.
    pub slots_in_use: u64,
    /// Invocations watched, reported, and closed without their end event.
    pub invocations_watched: u64,
    pub invocations_reported: u64,
    pub invocations_incomplete: u64,
    /// Invocations still open.
    pub invocations_open: u64,
    /// Distinct syscalls outside the expected set, per invocation (each
    /// also an audit line).
    pub unexpected_syscalls: u64,
    /// Operations the kernel refused inside invocations (BPF LSM; each an
    /// audit line).
    pub kernel_denied: u64,
}

/// What one evaluation hands over to be watched.
pub struct Watch {
    pub subject: Subject,
    pub audit: AuditLog,
    pub trace: Scope,
    pub expected: Arc<Expected>,
    /// The policy's grants as the BPF LSM programs see them.
    pub confinement: Arc<Confinement>,
    /// The policy's `timeout_ms` (plus margin): the invocation ends by then.
    pub deadline: Duration,
}

/// Starts an account for one invocation when probes are attached; the
/// returned [`Probe`] marks its polls. `make` runs only then.
pub fn watch(make: impl FnOnce() -> Watch) -> Probe {
    let Some(shared) = ATTACHED.get() else {
        return Probe::NONE;
    };
    let id = NEXT_INVOCATION.fetch_add(1, Ordering::Relaxed);
    let watch = make();
    let policy = shared.expected_index(&watch.expected);
    let grants = watch.confinement.index();
    let expires = Instant::now() + watch.deadline + END_GRACE;
    let account = Account::new(watch, expires);
    shared.lock_accounts(id).insert(id, account);
    shared.watched.fetch_add(1, Ordering::Relaxed);
    Probe { id, policy, grants }
}

/// Says the invocation is over and reports its account: every stretch of
/// it has ended, and each added its tallies when it did.
pub fn end(probe: Probe) {
    if !probe.is_watched() {
        return;
    }
    let Some(shared) = ATTACHED.get() else {
        return;
    };
    let account = shared.lock_accounts(probe.id).remove(&probe.id);
    if let Some(mut account) = account {
        account.ended = Some(SystemTime::now());
        shared.report(account, true);
    }
}

/// The probes' counters at scrape time.
#[derive(Debug)]
struct ProbeMetrics {
    probes: Probes,
}

impl Collector for ProbeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let attached = ConstGauge::new(i64::from(self.probes.is_attached()));
        let metric = encoder.encode_descriptor(
            "sandgate_probes_attached",
            "Whether the eBPF probes are attached (1) or off (0; /v1/probes says why)",
            None,
            attached.metric_type(),
        )?;
        attached.encode(metric)?;
        let Some(shared) = &self.probes.shared else {
            return Ok(());
        };
        let c = shared.counters();
        crate::telemetry::encode_counters(
            &mut encoder,
            &[
                (
                    "sandgate_probe_events",
                    "Events the eBPF programs sent",
                    c.events_sent,
                ),
                (
                    "sandgate_probe_events_received",
                    "eBPF events the daemon read",
                    c.events_received,
                ),
                (
                    "sandgate_probe_events_dropped",
                    "eBPF events lost because the ring buffer was full",
                    c.events_dropped,
                ),
                (
                    "sandgate_probe_syscalls_untracked",
                    "Syscalls of a daemon thread the eBPF programs could not charge",
                    c.syscalls_untracked,
                ),
                (
                    "sandgate_probe_syscalls_untallied",
                    "Syscalls counted in an invocation's totals but not by name (its slot's tallies were full)",
                    c.syscalls_untallied,
                ),
                (
                    "sandgate_probe_stretches_unslotted",
                    "Polls of an invocation on a thread without an eBPF slot (their syscalls unseen)",
                    c.stretches_unslotted,
                ),
                (
                    "sandgate_probe_invocations_incomplete",
                    "Invocations reported with syscalls unseen or unnamed, or never ended",
                    c.invocations_incomplete,
                ),
                (
                    "sandgate_kernel_unexpected_syscalls",
                    "Syscalls seen during invocations outside what the policies' grants explain",
                    c.unexpected_syscalls,
                ),
                (
                    "sandgate_kernel_denied",
                    "Operations the kernel (BPF LSM) refused inside invocations",
                    c.kernel_denied,
                ),
            ],
        )
    }
}
