//! The per-invocation account: the syscalls one invocation made, by phase,
//! added up from the tallies of each of its stretches, folded into a summary
//! and reported as the decision's `kernel` child span (per-syscall counts and
//! time as attributes) and a `kernel_syscall` audit line for each syscall its
//! grants do not explain. The invocation's end reports it.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    sync::{LazyLock, Mutex},
    time::{Instant, SystemTime},
};

use opentelemetry::{Key, KeyValue, trace::SpanKind};

use crate::telemetry::traces::attribute_size;

use super::{Watch, enforce::Refusal, expected, phase, slots::Taken};
use crate::{audit::AuditRecord, preview1 as wasi};

const PHASES: [&str; phase::COUNT] = [
    "guest",
    "instantiate",
    "teardown",
    "log",
    "http_send",
    "http_read",
];

/// One invocation's syscalls so far.
pub(super) struct Account {
    pub(super) watch: Watch,
    pub(super) started: SystemTime,
    /// When the daemon saw the invocation end (the span's end).
    pub(super) ended: Option<SystemTime>,
    pub(super) expires: Instant,
    /// (syscall nr, phase) → (count, nanoseconds in the kernel).
    pub(super) syscalls: BTreeMap<(u32, u32), (u64, u64)>,
    /// Every syscall charged, and their time, including the untallied.
    pub(super) total: u64,
    pub(super) total_ns: u64,
    /// Syscalls in `total` but not in `syscalls`: a slot's tallies were full.
    pub(super) untallied: u64,
    /// A stretch ran on a thread without a slot: syscalls went unseen.
    pub(super) unslotted: bool,
    pub(super) wasi_denied: Vec<u32>,
    /// What the kernel refused (BPF LSM), in order.
    pub(super) refusals: Vec<Refusal>,
}

/// An account folded for reporting.
#[derive(Debug, PartialEq)]
pub(super) struct Summary {
    total: u64,
    total_ns: u64,
    /// (syscall, count) of syscalls outside the expected set.
    pub(super) unexpected: Vec<(Cow<'static, str>, u64)>,
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
    pub(super) fn new(watch: Watch, expires: Instant) -> Account {
        Account {
            watch,
            started: SystemTime::now(),
            ended: None,
            expires,
            syscalls: BTreeMap::new(),
            total: 0,
            total_ns: 0,
            untallied: 0,
            unslotted: false,
            wasi_denied: Vec::new(),
            refusals: Vec::new(),
        }
    }

    /// Adds what the programs tallied in one stretch.
    pub(super) fn add(&mut self, taken: &Taken) {
        self.total += taken.total;
        self.total_ns += taken.total_ns;
        self.untallied += taken.overflow;
        if taken.denied != 0 {
            let described = taken.denials();
            self.refusals
                .extend(described.iter().map(Refusal::from_denial));
            let more = u64::from(taken.denied) - described.len() as u64;
            if more > 0 {
                self.refusals.push(Refusal::undescribed(more));
            }
        }
        for (nr, phase, count, ns) in taken.tallies() {
            let entry = self.syscalls.entry((nr, phase)).or_default();
            entry.0 += count;
            entry.1 += ns;
        }
    }

    /// Whether every syscall of the invocation was seen and named.
    pub(super) fn is_complete(&self) -> bool {
        !self.unslotted && self.untallied == 0
    }

    pub(super) fn summarise(&self) -> Summary {
        let mut unexpected: BTreeMap<Cow<'static, str>, u64> = BTreeMap::new();
        let (total, total_ns) = (self.total, self.total_ns);
        for (&(nr, phase), &(count, _)) in &self.syscalls {
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
    #[cfg(test)]
    fn rows(&self) -> Vec<Row> {
        rows(&self.syscalls)
    }
}

/// Each syscall's count and time in each phase of `syscalls`, by syscall
/// name then phase.
fn rows(syscalls: &BTreeMap<(u32, u32), (u64, u64)>) -> Vec<Row> {
    let mut rows: Vec<Row> = syscalls
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

fn phase_name(phase: u32) -> &'static str {
    PHASES.get(phase as usize).copied().unwrap_or("unknown")
}

/// The most a row's two attributes take encoded: syscall names are at most
/// 23 characters (`set_mempolicy_home_node`; `syscall_<nr>` at most 18),
/// phases 11.
const MAX_ROW_SIZE: usize = 2 * (12 + "syscall.".len() + 32 + 1 + 11 + ".time_ns".len() + 11);

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
    pub(super) fn emit(&self, mut account: Account, complete: bool) {
        let watch = &account.watch;
        for refusal in &account.refusals {
            tracing::warn!(
                policy = %watch.subject.policy,
                decision_id = %watch.subject.decision_id,
                operation = refusal.operation,
                detail = ?refusal.detail,
                "the kernel refused an operation the policy's grants do not explain"
            );
            watch.audit.record(
                &watch.subject,
                &AuditRecord::KernelDenied {
                    operation: refusal.operation.to_owned(),
                    detail: refusal.detail.clone(),
                },
            );
            watch.trace.event("kernel_denied", || {
                vec![
                    KeyValue::new("operation", refusal.operation),
                    KeyValue::new("detail", refusal.detail.clone()),
                ]
            });
        }
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
        // They are made on the exporting thread from the account's counters,
        // moved there as they are: the request worker that ends the
        // invocation only hands them over.
        let totals = [
            KeyValue::new("kernel.syscalls.count", self.total as i64),
            KeyValue::new("kernel.syscalls.time_ns", self.total_ns as i64),
            KeyValue::new("kernel.complete", complete),
            KeyValue::new("kernel.unexpected", self.unexpected.len() as i64),
            KeyValue::new("kernel.wasi_denied", self.wasi_denied.len() as i64),
        ];
        let syscalls = std::mem::take(&mut account.syscalls);
        let size = totals
            .iter()
            .map(|kv| attribute_size(kv.key.as_str(), &kv.value))
            .sum::<usize>()
            + syscalls.len() * MAX_ROW_SIZE;
        let span = watch.trace.child_deferred(
            "kernel",
            SpanKind::Internal,
            account.started,
            size,
            move |attributes| {
                let rows = rows(&syscalls);
                attributes.reserve(totals.len() + 2 * rows.len());
                attributes.extend(totals);
                push_syscall_attributes(&rows, attributes);
            },
        );
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

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::audit::{AuditLog, Subject};
    use crate::config::{Digest, Grants};
    use crate::probes::Expected;
    use crate::telemetry::traces::Scope;

    fn account(grants: &Grants) -> Account {
        account_audited(grants, AuditLog::disabled())
    }

    fn account_audited(grants: &Grants, audit: AuditLog) -> Account {
        let subject = Subject::new("p", "v1", &Digest::of(b"m").to_string(), "d".into());
        Account::new(
            Watch {
                subject,
                audit,
                trace: Scope::default(),
                expected: Arc::new(Expected::for_policy(grants, &Default::default())),
                confinement: Arc::new(crate::probes::Confinement::nothing()),
                deadline: Duration::from_millis(50),
            },
            Instant::now(),
        )
    }

    fn insert(account: &mut Account, nr: u32, phase: u32, count: u64, ns: u64) {
        account.syscalls.insert((nr, phase), (count, ns));
        account.total += count;
        account.total_ns += ns;
    }

    #[test]
    fn a_rows_attributes_fit_the_size_the_queue_counts_for_them() {
        for nr in 0..1024 {
            let name = expected::name(nr);
            for phase in 0..phase::COUNT as u32 {
                let prefix = format!("syscall.{name}.{}", phase_name(phase));
                let made = [
                    KeyValue::new(format!("{prefix}.count"), i64::MAX),
                    KeyValue::new(format!("{prefix}.time_ns"), i64::MAX),
                ];
                let size: usize = made
                    .iter()
                    .map(|kv| attribute_size(kv.key.as_str(), &kv.value))
                    .sum();
                assert!(size <= MAX_ROW_SIZE, "{prefix}: {size}");
            }
        }
    }

    #[test]
    fn accounts_fold_per_syscall_and_phase_and_flag_the_unexpected() {
        use syscalls::Sysno;
        let mut account = account(&Grants::default());
        let nr = |s: Sysno| s.id() as u32;
        insert(&mut account, nr(Sysno::futex), phase::GUEST, 2, 300);
        insert(&mut account, nr(Sysno::ioctl), phase::TEARDOWN, 1, 50);
        insert(&mut account, nr(Sysno::openat), phase::GUEST, 3, 900);
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
        insert(
            &mut account,
            Sysno::connect.id() as u32,
            phase::GUEST,
            2,
            10,
        );
        insert(&mut account, Sysno::futex.id() as u32, phase::GUEST, 5, 10);
        account.summarise().emit(account, true);
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
