//! eBPF probes (DESIGN §9): the kernel's view of every guest invocation.
//!
//! The programs of `ebpf-probes/` are embedded in the binary. At startup,
//! per `[ebpf] mode`, [`Probes::start`] loads them with aya and attaches
//! uprobes to the marker functions of [`markers`] and the `raw_syscalls`
//! tracepoints, filtered in the kernel to this process and to threads inside
//! a guest invocation. Each invocation the evaluation path [`watch`]es gets
//! an account; a task folds the ring buffer's events into it and, when the
//! invocation's end event arrives, reports it: a `kernel` child span
//! of the decision's span with per-syscall counts and time, and a
//! `kernel_syscall` audit line for each syscall outside what the policy's
//! grants explain ([`Expected`]).
//!
//! Attribution: a syscall is charged to the invocation whose future the
//! thread was polling when it made it, and to the phase the host was in
//! (guest code and its WASI calls, instantiation, teardown, `log`,
//! `http_send`, `http_read`). Work the host does for a guest elsewhere is not
//! charged: DNS resolution on tokio's blocking pool, the audit writer thread,
//! the span exporter. Nothing is lost silently: events the ring buffer could
//! not take, syscalls a full per-thread map could not track, and invocations
//! whose end event never came are counted and shown in `/v1/probes` and the
//! metrics.
//!
//! Over 600 lines: loading, the ring-buffer consumer and the per-invocation
//! account with its tests are still one file, to be split by job.

mod expected;
pub mod markers;

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    path::Path,
    sync::{
        Arc, LazyLock, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, UProbe, uprobe::UProbeScope},
};
use opentelemetry::{Key, KeyValue, trace::SpanKind};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
};
use sandgate_probes_common::{Event, event, marker, names, stat};
use serde::Serialize;

pub use expected::Expected;
pub use markers::Probe;
pub use sandgate_probes_common::phase;

use crate::{
    audit::{AuditLog, AuditRecord, Subject},
    config::EbpfMode,
    fetch::error_chain,
    telemetry::traces::Scope,
    wasi,
};

/// The programs, built by `build.rs`; empty when built with `AYA_BUILD_SKIP`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sandgate-probes"));

/// The attached probes, for the evaluation path; unset when they are off.
static ATTACHED: OnceLock<Arc<Shared>> = OnceLock::new();

static NEXT_INVOCATION: AtomicU64 = AtomicU64::new(1);

/// How long past its deadline an invocation's end event may take before its
/// account is closed as incomplete.
const END_GRACE: Duration = Duration::from_secs(5);

/// The uprobe programs and the marker symbols they attach to.
const UPROBES: [(&str, &str); 6] = [
    (names::GUEST_ENTER, marker::GUEST_ENTER),
    (names::GUEST_EXIT, marker::GUEST_EXIT),
    (names::HOSTCALL_ENTER, marker::HOSTCALL_ENTER),
    (names::HOSTCALL_EXIT, marker::HOSTCALL_EXIT),
    (names::WASI_DENIED, marker::WASI_DENIED),
    (names::INVOCATION_END, marker::INVOCATION_END),
];

/// The `raw_syscalls` tracepoints, attached raw (BPF_RAW_TRACEPOINT_OPEN: no
/// perf buffer is filled per syscall, and no tracefs is needed).
const TRACEPOINTS: [(&str, &str, &str); 2] = [
    (names::SYS_ENTER, "raw_syscalls", "sys_enter"),
    (names::SYS_EXIT, "raw_syscalls", "sys_exit"),
];

/// How often the consumer reads the ring buffer. The programs never wake
/// it (a wakeup per invocation costs more than the rest of the probes), so
/// a decision's kernel span follows it by at most this much.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

const PHASES: [&str; phase::COUNT] = [
    "guest",
    "instantiate",
    "teardown",
    "log",
    "http_send",
    "http_read",
];

/// The daemon's probes: attached, or off with the reason why.
#[derive(Clone)]
pub struct Probes {
    mode: EbpfMode,
    shared: Option<Arc<Shared>>,
    reason: Option<String>,
}

/// Why probes could not be attached when `mode = "required"`.
#[derive(Debug, thiserror::Error)]
#[error("eBPF probes are required ([ebpf] mode = \"required\") but cannot be attached: {0}")]
pub struct ProbesRequired(pub String);

impl Probes {
    /// Attaches the probes per `mode`. With `auto`, a failure is logged with
    /// its precise reason and the daemon runs without them; with `required`
    /// it is an error. Needs a Tokio runtime (the event consumer is a task).
    pub fn start(mode: EbpfMode) -> Result<Probes, ProbesRequired> {
        if mode == EbpfMode::Off {
            return Ok(Probes {
                mode,
                shared: None,
                reason: Some("disabled by [ebpf] mode = \"off\"".into()),
            });
        }
        match attach() {
            Ok(shared) => {
                let shared = ATTACHED.get_or_init(|| shared);
                tracing::info!(
                    programs = UPROBES.len() + TRACEPOINTS.len(),
                    "eBPF probes attached: guest invocations and their syscalls are traced"
                );
                Ok(Probes {
                    mode,
                    shared: Some(Arc::clone(shared)),
                    reason: None,
                })
            }
            Err(reason) if mode == EbpfMode::Required => Err(ProbesRequired(reason)),
            Err(reason) => {
                tracing::warn!("eBPF probes are off: {reason}");
                Ok(Probes {
                    mode,
                    shared: None,
                    reason: Some(reason),
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
        }
    }

    pub fn is_attached(&self) -> bool {
        self.shared.is_some()
    }

    /// What `GET /v1/probes` shows.
    pub fn report(&self) -> ProbeReport {
        let mode = match self.mode {
            EbpfMode::Auto => "auto",
            EbpfMode::Required => "required",
            EbpfMode::Off => "off",
        };
        let mut programs = Vec::new();
        if self.shared.is_some() {
            programs.extend(UPROBES.iter().map(|(program, symbol)| ProgramReport {
                name: program,
                kind: "uprobe",
                target: format!("{symbol} (/proc/self/exe)"),
            }));
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

    /// The probes' counters as Prometheus metrics, read at scrape time.
    pub fn collector(&self) -> Box<dyn Collector> {
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
    /// Syscalls not tracked because a per-thread map was full.
    pub syscalls_untracked: u64,
    /// Invocations watched, reported, and closed without their end event.
    pub invocations_watched: u64,
    pub invocations_reported: u64,
    pub invocations_incomplete: u64,
    /// Invocations still open.
    pub invocations_open: u64,
    /// Syscalls outside the expected set (each also an audit line).
    pub unexpected_syscalls: u64,
}

/// What one evaluation hands over to be watched.
pub struct Watch {
    pub subject: Subject,
    pub audit: AuditLog,
    pub trace: Scope,
    pub expected: Arc<Expected>,
    /// The policy's `timeout_ms` (plus margin): the end event is due by then.
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
    let account = Account {
        expires: Instant::now() + watch.deadline + END_GRACE,
        started: SystemTime::now(),
        ended: None,
        watch,
        syscalls: BTreeMap::new(),
        wasi_denied: Vec::new(),
    };
    shared.lock_accounts().insert(id, account);
    shared.watched.fetch_add(1, Ordering::Relaxed);
    Probe(id)
}

/// Says the invocation is over: its account is reported once the programs'
/// end event, which follows all of its other events, is read.
pub fn end(probe: Probe) {
    if !probe.is_watched() {
        return;
    }
    if let Some(shared) = ATTACHED.get()
        && let Some(account) = shared.lock_accounts().get_mut(&probe.0)
    {
        account.ended = Some(SystemTime::now());
    }
    markers::sandgate_probe_invocation_end(probe.0);
}

/// State shared by the consumer task, the evaluation path and the reports.
struct Shared {
    accounts: Mutex<HashMap<u64, Account>>,
    stats: PerCpuArray<MapData, u64>,
    received: AtomicU64,
    watched: AtomicU64,
    reported: AtomicU64,
    incomplete: AtomicU64,
    unexpected: AtomicU64,
    /// Keeps the programs loaded and attached.
    _ebpf: Mutex<Ebpf>,
}

impl Shared {
    fn lock_accounts(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Account>> {
        self.accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn kernel_stat(&self, index: u32) -> u64 {
        self.stats
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    fn counters(&self) -> Counters {
        Counters {
            events_sent: self.kernel_stat(stat::SENT),
            events_received: self.received.load(Ordering::Relaxed),
            events_dropped: self.kernel_stat(stat::DROPPED),
            syscalls_untracked: self.kernel_stat(stat::UNTRACKED),
            invocations_watched: self.watched.load(Ordering::Relaxed),
            invocations_reported: self.reported.load(Ordering::Relaxed),
            invocations_incomplete: self.incomplete.load(Ordering::Relaxed),
            invocations_open: self.lock_accounts().len() as u64,
            unexpected_syscalls: self.unexpected.load(Ordering::Relaxed),
        }
    }

    /// Folds every event waiting in the ring buffer; returns the accounts
    /// whose invocations ended.
    fn drain(&self, ring: &mut RingBuf<MapData>) -> Vec<Account> {
        let mut ended = Vec::new();
        let mut received = 0;
        let mut accounts = self.lock_accounts();
        while let Some(item) = ring.next() {
            received += 1;
            if item.len() < size_of::<Event>() {
                continue;
            }
            // SAFETY: the programs write whole `Event`s (plain integers);
            // the length was checked and the read does not assume alignment.
            let record = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
            match record.kind {
                event::SYSCALL => {
                    if let Some(account) = accounts.get_mut(&record.invocation) {
                        let entry = account
                            .syscalls
                            .entry((record.nr, record.phase))
                            .or_default();
                        entry.0 += 1;
                        entry.1 += record.duration_ns;
                    }
                }
                event::WASI_DENIED => {
                    if let Some(account) = accounts.get_mut(&record.invocation) {
                        account.wasi_denied.push(record.nr);
                    }
                }
                event::END => {
                    if let Some(account) = accounts.remove(&record.invocation) {
                        ended.push(account);
                    }
                }
                _ => {}
            }
        }
        drop(accounts);
        self.received.fetch_add(received, Ordering::Relaxed);
        ended
    }

    /// Closes the accounts whose end event is overdue (it was dropped).
    fn overdue(&self) -> Vec<Account> {
        let now = Instant::now();
        let mut accounts = self.lock_accounts();
        let ids: Vec<u64> = accounts
            .iter()
            .filter(|(_, a)| a.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.iter().filter_map(|id| accounts.remove(id)).collect()
    }

    fn report(&self, account: Account, complete: bool) {
        let counter = if complete {
            &self.reported
        } else {
            &self.incomplete
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let summary = account.summarise();
        self.unexpected
            .fetch_add(summary.unexpected.len() as u64, Ordering::Relaxed);
        summary.emit(&account, complete);
    }
}

/// One invocation's syscalls so far.
struct Account {
    watch: Watch,
    started: SystemTime,
    /// When the daemon saw the invocation end (the span's end).
    ended: Option<SystemTime>,
    expires: Instant,
    /// (syscall nr, phase) → (count, nanoseconds in the kernel).
    syscalls: BTreeMap<(u32, u32), (u64, u64)>,
    wasi_denied: Vec<u32>,
}

/// An account folded for reporting.
#[derive(Debug, PartialEq)]
struct Summary {
    total: u64,
    total_ns: u64,
    /// (syscall, count) of syscalls outside the expected set.
    unexpected: Vec<(Cow<'static, str>, u64)>,
    wasi_denied: Vec<&'static str>,
}

/// One syscall's count and kernel time in one phase of an invocation.
#[derive(Debug, PartialEq)]
struct Row {
    nr: u32,
    phase: u32,
    name: Cow<'static, str>,
    count: u64,
    ns: u64,
}

impl Account {
    fn summarise(&self) -> Summary {
        let mut unexpected: BTreeMap<Cow<'static, str>, u64> = BTreeMap::new();
        let (mut total, mut total_ns) = (0, 0);
        for (&(nr, phase), &(count, ns)) in &self.syscalls {
            total += count;
            total_ns += ns;
            if !self.watch.expected.allows(phase, nr) {
                *unexpected.entry(expected::name(nr)).or_default() += count;
            }
        }
        Summary {
            total,
            total_ns,
            unexpected: unexpected.into_iter().collect(),
            wasi_denied: self
                .wasi_denied
                .iter()
                .map(|&call| {
                    wasi::PREVIEW1
                        .get(call as usize)
                        .copied()
                        .unwrap_or("unknown")
                })
                .collect(),
        }
    }

    /// Each syscall's count and time in each phase, by syscall name then
    /// phase: what a sampled decision's `kernel` span lists.
    fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .syscalls
            .iter()
            .map(|(&(nr, phase), &(count, ns))| Row {
                nr,
                phase,
                name: expected::name(nr),
                count,
                ns,
            })
            .collect();
        rows.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then(phase_name(a.phase).cmp(phase_name(b.phase)))
        });
        rows
    }
}

fn phase_name(phase: u32) -> &'static str {
    PHASES.get(phase as usize).copied().unwrap_or("unknown")
}

/// At most this many (syscall, phase) pairs get their attribute keys made
/// once and kept; past that (never, with the kernel's few hundred syscalls
/// and the six phases) each span makes its own.
const MAX_INTERNED_KEYS: usize = 4096;

/// Appends each row's `syscall.<name>.<phase>.count` and
/// `syscall.<name>.<phase>.time_ns` attributes of a `kernel` span.
/// The keys are made once per syscall and phase and kept for the life of the
/// process, so that a span's attributes are made, and copied for export,
/// without a string allocated per syscall.
fn push_syscall_attributes(rows: &[Row], attributes: &mut Vec<KeyValue>) {
    /// (syscall nr, phase) → its two keys.
    type Kept = HashMap<(u32, u32), [&'static str; 2]>;
    static KEYS: LazyLock<Mutex<Kept>> = LazyLock::new(Mutex::default);
    let mut keys = KEYS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for row in rows {
        let [count, time] = match keys.get(&(row.nr, row.phase)) {
            Some(known) => known.map(Key::from_static_str),
            None => {
                let prefix = format!("syscall.{}.{}", row.name, phase_name(row.phase));
                let made = [format!("{prefix}.count"), format!("{prefix}.time_ns")];
                if keys.len() >= MAX_INTERNED_KEYS {
                    made.map(Key::from)
                } else {
                    let kept = made.map(|key| &*Box::leak(key.into_boxed_str()));
                    keys.insert((row.nr, row.phase), kept);
                    kept.map(Key::from_static_str)
                }
            }
        };
        attributes.push(KeyValue::new(count, row.count as i64));
        attributes.push(KeyValue::new(time, row.ns as i64));
    }
}

impl Summary {
    /// The `kernel` span under the decision's span, and an audit
    /// line per unexpected syscall.
    fn emit(&self, account: &Account, complete: bool) {
        let watch = &account.watch;
        for (syscall, count) in &self.unexpected {
            tracing::warn!(
                policy = %watch.subject.policy,
                decision_id = %watch.subject.decision_id,
                %syscall,
                count,
                "syscall outside what the policy's grants explain"
            );
            watch.audit.record(
                &watch.subject,
                &AuditRecord::KernelSyscall {
                    syscall: syscall.to_string(),
                    count: *count,
                },
            );
        }
        if !watch.trace.is_sampled() {
            return;
        }
        // Per-syscall counts and times are attributes, not an event per
        // syscall: an event costs the export about ten allocations and the
        // receiver a message of its own, and attributes can be searched on.
        let span = watch
            .trace
            .child_at("kernel", SpanKind::Internal, account.started, || {
                let rows = account.rows();
                let mut attributes = Vec::with_capacity(5 + 2 * rows.len());
                attributes.extend([
                    KeyValue::new("kernel.syscalls.count", self.total as i64),
                    KeyValue::new("kernel.syscalls.time_ns", self.total_ns as i64),
                    KeyValue::new("kernel.complete", complete),
                    KeyValue::new("kernel.unexpected", self.unexpected.len() as i64),
                    KeyValue::new("kernel.wasi_denied", self.wasi_denied.len() as i64),
                ]);
                push_syscall_attributes(&rows, &mut attributes);
                attributes
            });
        for (syscall, count) in &self.unexpected {
            span.event("kernel_syscall", || {
                vec![
                    KeyValue::new("syscall.name", syscall.clone()),
                    KeyValue::new("syscall.count", *count as i64),
                ]
            });
        }
        span.end_at(account.ended.unwrap_or_else(SystemTime::now));
    }
}

/// Loads the programs, attaches them and starts the consumer task; the
/// error is the precise reason they cannot run here.
fn attach() -> Result<Arc<Shared>, String> {
    if OBJECT.is_empty() {
        return Err("this sandgate binary was built without eBPF probes (AYA_BUILD_SKIP)".into());
    }
    if let Some(missing) = missing_capabilities() {
        return Err(missing);
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        return Err("the kernel has no uprobe support (CONFIG_UPROBE_EVENTS)".into());
    }
    let pid = std::process::id();
    let target = NonZeroU32::new(pid).ok_or("process id 0")?;
    let mut ebpf = EbpfLoader::new()
        .override_global(sandgate_probes_common::TARGET_TGID, &pid, true)
        .load(OBJECT)
        .map_err(|e| format!("loading the eBPF programs failed: {}", error_chain(&e)))?;
    for (program, symbol) in UPROBES {
        let uprobe: &mut UProbe = ebpf
            .program_mut(program)
            .ok_or_else(|| format!("program {program} is missing from the eBPF object"))?
            .try_into()
            .map_err(|e| format!("program {program}: {}", error_chain(&e)))?;
        uprobe
            .load()
            .map_err(|e| format!("loading uprobe {program}: {}", error_chain(&e)))?;
        uprobe
            .attach(symbol, "/proc/self/exe", UProbeScope::OneProcess(target))
            .map_err(|e| format!("attaching a uprobe to {symbol}: {}", error_chain(&e)))?;
    }
    for (program, category, name) in TRACEPOINTS {
        let tracepoint: &mut RawTracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| format!("program {program} is missing from the eBPF object"))?
            .try_into()
            .map_err(|e| format!("program {program}: {}", error_chain(&e)))?;
        tracepoint
            .load()
            .map_err(|e| format!("loading tracepoint program {program}: {}", error_chain(&e)))?;
        tracepoint.attach(name).map_err(|e| {
            format!(
                "attaching to tracepoint {category}:{name}: {}",
                error_chain(&e)
            )
        })?;
    }
    let take = |ebpf: &mut Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| format!("map {name} is missing from the eBPF object"))
    };
    let ring = RingBuf::try_from(take(&mut ebpf, names::EVENTS)?)
        .map_err(|e| format!("map {}: {}", names::EVENTS, error_chain(&e)))?;
    let stats = PerCpuArray::try_from(take(&mut ebpf, names::STATS)?)
        .map_err(|e| format!("map {}: {}", names::STATS, error_chain(&e)))?;
    let shared = Arc::new(Shared {
        accounts: Mutex::new(HashMap::new()),
        stats,
        received: AtomicU64::new(0),
        watched: AtomicU64::new(0),
        reported: AtomicU64::new(0),
        incomplete: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        _ebpf: Mutex::new(ebpf),
    });
    tokio::spawn(consume(Arc::clone(&shared), ring));
    Ok(shared)
}

/// Reads the ring buffer every [`DRAIN_EVERY`], reports the invocations
/// that ended, and once a second closes the accounts whose end never came.
async fn consume(shared: Arc<Shared>, mut ring: RingBuf<MapData>) {
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = Instant::now();
    loop {
        tick.tick().await;
        for account in shared.drain(&mut ring) {
            shared.report(account, true);
        }
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            for account in shared.overdue() {
                shared.report(account, false);
            }
        }
    }
}

/// Why this process may not load and attach the programs, if it may not:
/// it needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN.
fn missing_capabilities() -> Option<String> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| *name)
        .collect();
    Some(format!(
        "missing {} (or CAP_SYS_ADMIN): effective capabilities are {effective:#x}; run as root \
         or grant CAP_BPF and CAP_PERFMON",
        missing.join(" and ")
    ))
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
                    "Syscalls not tracked because a per-thread eBPF map was full",
                    c.syscalls_untracked,
                ),
                (
                    "sandgate_probe_invocations_incomplete",
                    "Invocations whose end event never arrived (reported without it)",
                    c.invocations_incomplete,
                ),
                (
                    "sandgate_kernel_unexpected_syscalls",
                    "Syscalls seen during invocations outside what the policies' grants explain",
                    c.unexpected_syscalls,
                ),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Digest, Grants};

    fn account(grants: &Grants) -> Account {
        account_audited(grants, AuditLog::disabled())
    }

    fn account_audited(grants: &Grants, audit: AuditLog) -> Account {
        let subject = Subject::new("p", "v1", &Digest::of(b"m").to_string(), "d".into());
        Account {
            watch: Watch {
                subject,
                audit,
                trace: Scope::default(),
                expected: Arc::new(Expected::for_policy(grants, &Default::default())),
                deadline: Duration::from_millis(50),
            },
            started: SystemTime::now(),
            ended: None,
            expires: Instant::now(),
            syscalls: BTreeMap::new(),
            wasi_denied: Vec::new(),
        }
    }

    #[test]
    fn accounts_fold_per_syscall_and_phase_and_flag_the_unexpected() {
        use syscalls::Sysno;
        let mut account = account(&Grants::default());
        let nr = |s: Sysno| s.id() as u32;
        account
            .syscalls
            .insert((nr(Sysno::futex), phase::GUEST), (2, 300));
        account
            .syscalls
            .insert((nr(Sysno::ioctl), phase::TEARDOWN), (1, 50));
        account
            .syscalls
            .insert((nr(Sysno::openat), phase::GUEST), (3, 900));
        account.wasi_denied.push(
            wasi::PREVIEW1
                .iter()
                .position(|f| *f == "path_open")
                .unwrap_or(0) as u32,
        );
        let summary = account.summarise();
        assert_eq!(summary.total, 6);
        assert_eq!(summary.total_ns, 1250);
        assert_eq!(summary.unexpected, vec![("openat".into(), 3)]);
        assert_eq!(summary.wasi_denied, vec!["path_open"]);
        let rows = account.rows();
        let rows: Vec<_> = rows
            .iter()
            .map(|r| (&*r.name, phase_name(r.phase), r.count, r.ns))
            .collect();
        assert_eq!(
            rows,
            [
                ("futex", "guest", 2, 300),
                ("ioctl", "teardown", 1, 50),
                ("openat", "guest", 3, 900)
            ]
        );
    }

    #[test]
    fn syscall_attribute_keys_name_the_syscall_and_phase_and_are_made_once() {
        use syscalls::Sysno;
        let row = |nr: u32, phase: u32, count: u64| Row {
            nr,
            phase,
            name: expected::name(nr),
            count,
            ns: 10 * count,
        };
        let rows = [
            row(Sysno::openat.id() as u32, phase::INSTANTIATE, 1),
            row(100_000, 99, 2),
        ];
        let made = |rows: &[Row]| {
            let mut attributes = Vec::new();
            push_syscall_attributes(rows, &mut attributes);
            attributes
        };
        let first = made(&rows);
        let listed: Vec<(&str, String)> = first
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.to_string()))
            .collect();
        assert_eq!(
            listed,
            [
                ("syscall.openat.instantiate.count", "1".to_owned()),
                ("syscall.openat.instantiate.time_ns", "10".to_owned()),
                ("syscall.syscall_100000.unknown.count", "2".to_owned()),
                ("syscall.syscall_100000.unknown.time_ns", "20".to_owned()),
            ]
        );
        let again = made(&rows[..1]);
        assert!(
            std::ptr::eq(first[0].key.as_str(), again[0].key.as_str()),
            "the key is kept, not made again"
        );
    }

    #[test]
    fn unexpected_syscalls_become_kernel_syscall_audit_lines() {
        use syscalls::Sysno;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let audit = AuditLog::open(&crate::config::AuditTarget::File(path.clone())).expect("audit");
        let mut account = account_audited(&Grants::default(), audit.clone());
        account
            .syscalls
            .insert((Sysno::connect.id() as u32, phase::GUEST), (2, 10));
        account
            .syscalls
            .insert((Sysno::futex.id() as u32, phase::GUEST), (5, 10));
        account.summarise().emit(&account, true);
        audit.flush();
        let text = std::fs::read_to_string(&path).expect("audit text");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line = &lines[0];
        assert_eq!(line["kind"], "kernel_syscall");
        assert_eq!(line["syscall"], "connect");
        assert_eq!(line["count"], 2);
        assert_eq!(line["policy"], "p");
        assert_eq!(line["decision_id"], "d");
        assert!(
            line["digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:"))
        );
    }
}
