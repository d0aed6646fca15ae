//! The audit and decision log of DESIGN §7: one JSON object per line.
//!
//! `AuditLog` is a cheap handle; lines go through a bounded queue to one
//! writer thread, so recording never blocks an evaluation. When the writer
//! falls behind, lines are dropped and counted (`dropped()`), never queued
//! without bound. `reopen()` reopens the file after rotation.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::config::AuditTarget;
use crate::decision::DecisionError;

/// Lines that may wait for the writer before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 16 * 1024;
/// After writing a batch, the writer lets lines collect this long before it
/// waits on the queue again: under load a request then queues its line
/// without waking the writer, and lines reach the file in batches of many
/// (one write and one flush each). An idle daemon's line is written at once.
const BATCH_WINDOW: Duration = Duration::from_millis(2);

/// What one audit line is about; serialised with its `kind`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditRecord {
    Decision {
        allow: bool,
        duration_us: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<DecisionError>,
    },
    WasiDenied {
        call: String,
        detail: String,
        args: Value,
    },
    EgressDenied {
        url: String,
        reason: String,
    },
    KernelSyscall {
        syscall: String,
        count: u64,
    },
    /// An operation the kernel (BPF LSM) refused on a thread inside the
    /// invocation: `file_open`, `socket_connect`, `exec`, `ptrace`, `mount`
    /// or `bpf`, with the path or address.
    KernelDenied {
        operation: String,
        detail: String,
    },
}

/// Who an audit line is about: one evaluation of one policy version.
#[derive(Clone, Debug, Serialize)]
pub struct Subject {
    pub policy: String,
    pub version: String,
    pub digest: String,
    pub decision_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Subject {
    /// `digest` is the module's sha256 as hex (a policy keeps it formatted).
    pub fn new(policy: &str, version: &str, digest: &str, decision_id: String) -> Subject {
        Subject {
            policy: policy.to_owned(),
            version: version.to_owned(),
            digest: digest.to_owned(),
            decision_id,
            trace_id: None,
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    subject: &'a Subject,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

enum Message {
    Line(Vec<u8>),
    Reopen,
    Flush(SyncSender<()>),
}

/// Handle to the audit log. Clones share one writer.
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: SyncSender<Message>,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl AuditLog {
    /// A log that records nothing (evaluations without `--audit`).
    pub fn disabled() -> AuditLog {
        AuditLog { inner: None }
    }

    /// Opens (appends to) the target and starts the writer thread.
    pub fn open(target: &AuditTarget) -> io::Result<AuditLog> {
        let sink = Sink::open(target)?;
        let (tx, rx) = sync_channel(QUEUE_CAPACITY);
        let written = Arc::new(AtomicU64::new(0));
        let worker = {
            let written = Arc::clone(&written);
            std::thread::Builder::new()
                .name("sandgate-audit".into())
                .spawn(move || write_lines(sink, rx, &written))?
        };
        Ok(AuditLog {
            inner: Some(Arc::new(Inner {
                tx,
                dropped: AtomicU64::new(0),
                written,
                worker: Mutex::new(Some(worker)),
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues one line; never blocks. A full queue drops the line and counts it.
    pub fn record(&self, subject: &Subject, record: &AuditRecord) {
        let Some(inner) = &self.inner else {
            return;
        };
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut bytes = match serde_json::to_vec(&Line {
            ts,
            subject,
            record,
        }) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "audit line could not be serialised");
                inner.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        bytes.push(b'\n');
        match inner.tx.try_send(Message::Line(bytes)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "audit writer is behind; audit lines dropped");
                }
            }
        }
    }

    /// Asks the writer to reopen its file (after log rotation).
    pub fn reopen(&self) {
        if let Some(inner) = &self.inner
            && inner.tx.try_send(Message::Reopen).is_err()
        {
            tracing::warn!("audit reopen request dropped: writer queue full");
        }
    }

    /// Waits until every line queued so far is written and flushed.
    pub fn flush(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let (done_tx, done_rx) = sync_channel(1);
        if inner.tx.send(Message::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.written.load(Ordering::Relaxed))
    }

    /// Flushes and stops the writer; later records are dropped.
    pub fn close(&self) {
        self.flush();
        if let Some(inner) = &self.inner
            && let Ok(mut worker) = inner.worker.lock()
            && let Some(handle) = worker.take()
        {
            // Dropping the last sender ends the thread; other clones may still
            // hold one, so only join when the queue is flushed.
            drop(handle);
        }
    }
}

impl crate::telemetry::Collected for AuditLog {
    fn collector(&self) -> Box<dyn prometheus_client::collector::Collector> {
        Box::new(AuditCounters {
            audit: self.clone(),
        })
    }
}

/// Reads the audit log's counters when `/metrics` is scraped.
struct AuditCounters {
    audit: AuditLog,
}

impl std::fmt::Debug for AuditCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditCounters").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for AuditCounters {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use crate::telemetry::names;
        crate::telemetry::encode_counters(
            &mut encoder,
            &[
                (
                    names::AUDIT_DROPPED,
                    "Audit lines dropped because the writer fell behind",
                    self.audit.dropped(),
                ),
                (
                    names::AUDIT_WRITTEN,
                    "Audit lines written",
                    self.audit.written(),
                ),
            ],
        )
    }
}

enum Sink {
    Stdout(io::Stdout),
    File { path: PathBuf, out: BufWriter<File> },
}

impl Sink {
    fn open(target: &AuditTarget) -> io::Result<Sink> {
        Ok(match target {
            AuditTarget::Stdout => Sink::Stdout(io::stdout()),
            AuditTarget::File(path) => Sink::File {
                path: path.clone(),
                out: BufWriter::new(open_append(path)?),
            },
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.lock().write_all(bytes),
            Sink::File { out, .. } => out.write_all(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.lock().flush(),
            Sink::File { out, .. } => out.flush(),
        }
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Sink::File { path, out } = self {
            out.flush()?;
            *out = BufWriter::new(open_append(path)?);
        }
        Ok(())
    }
}

fn open_append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("audit log {}: {e}", path.display())))
}

fn write_lines(mut sink: Sink, rx: Receiver<Message>, written: &AtomicU64) {
    let report = |what: &str, e: io::Error| {
        tracing::error!(error = %e, "audit log {what} failed");
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Drain what is queued, then flush once.
        while let Some(message) = next.take() {
            match message {
                Message::Line(bytes) => match sink.write_all(&bytes) {
                    Ok(()) => {
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => report("write", e),
                },
                Message::Reopen => {
                    if let Err(e) = sink.reopen() {
                        report("reopen", e);
                    }
                }
                Message::Flush(done) => {
                    if let Err(e) = sink.flush() {
                        report("flush", e);
                    }
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = sink.flush() {
            report("flush", e);
        }
        std::thread::sleep(BATCH_WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::config::Digest;
    use crate::telemetry::Collected as _;

    #[test]
    fn metrics_read_the_audit_lines_written_and_dropped_when_scraped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit =
            AuditLog::open(&AuditTarget::File(dir.path().join("audit.jsonl"))).expect("audit");
        let mut registry = Registry::default();
        registry.register_collector(audit.collector());
        let subject = Subject::new("p", "v1", &Digest::of(b"m").to_string(), "d".into());
        let record = AuditRecord::KernelSyscall {
            syscall: "connect".into(),
            count: 1,
        };
        audit.record(&subject, &record);
        audit.flush();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
        for needle in [
            "sandgate_audit_lines_written_total 1",
            "sandgate_audit_lines_dropped_total 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
