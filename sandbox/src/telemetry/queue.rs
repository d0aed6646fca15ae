//! The span queue between the request workers and the OTLP exporter.
//!
//! A decision's ended spans are appended to a queue together, under a short
//! lock, waking nothing except once per filled batch. The export task, on
//! the export runtime, wakes when a batch has filled or [`SCHEDULED_DELAY`]
//! has passed, and sends the queue in batches of at most [`BATCH`] spans, up
//! to [`MAX_IN_FLIGHT`] of them at once: on a busy machine an export round
//! trip can take milliseconds, and one batch at a time would fall behind the
//! spans a loaded daemon makes. (The SDK's batch processor exports one batch
//! at a time and drops what no longer fits its queue without telling anyone.)
//!
//! A span that does not fit the full queue is dropped, counted
//! (`sandgate_otlp_spans_dropped_total`) and reported in the log at most once
//! per [`REPORT_EVERY`](super::traces::REPORT_EVERY): a trace with missing
//! spans is never silent.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tokio::sync::{Notify, Semaphore, mpsc as async_mpsc};

use super::traces::{ExportStats, Throttle};

/// Spans per export request.
pub const BATCH: usize = 1024;
/// Spans held while the collector is slow; beyond this they are dropped.
pub const MAX_QUEUE: usize = 32_768;
/// Export requests under way at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// How long a span waits in a batch that does not fill.
pub const SCHEDULED_DELAY: Duration = Duration::from_millis(500);
/// Deadline of one export request.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutdown waits for the queue to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Queues finished spans for the export task; see the module comment.
#[derive(Debug)]
pub struct SpanQueue {
    shared: Arc<Shared>,
    /// Asks the export task to stop; it answers on the sender it is given.
    shutdown: async_mpsc::UnboundedSender<mpsc::Sender<OTelSdkResult>>,
}

#[derive(Debug)]
struct Shared {
    spans: Mutex<Vec<SpanData>>,
    batch_filled: Notify,
    stats: Arc<ExportStats>,
}

impl SpanQueue {
    /// Starts the export task on `runtime`. The exporter must already have its
    /// resource: the task owns it from here on.
    pub fn start<E: SpanExporter + 'static>(
        exporter: E,
        endpoint: &str,
        stats: &Arc<ExportStats>,
        runtime: &tokio::runtime::Handle,
    ) -> SpanQueue {
        let shared = Arc::new(Shared {
            spans: Mutex::new(Vec::with_capacity(BATCH)),
            batch_filled: Notify::new(),
            stats: Arc::clone(stats),
        });
        let (shutdown, requests) = async_mpsc::unbounded_channel();
        let task = ExportTask {
            shared: Arc::clone(&shared),
            exporter: Arc::new(exporter),
            endpoint: Arc::from(endpoint),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            drops_reported: 0,
            drop_report: Throttle::default(),
        };
        runtime.spawn(task.run(requests));
        SpanQueue { shared, shutdown }
    }

    /// Queues finished spans; what does not fit a full queue is dropped and counted.
    pub fn push(&self, mut ended: Vec<SpanData>) {
        if ended.is_empty() {
            return;
        }
        let mut spans = lock(&self.shared.spans);
        let before = spans.len();
        let room = MAX_QUEUE.saturating_sub(before);
        let dropped = ended.len().saturating_sub(room);
        ended.truncate(room);
        spans.append(&mut ended);
        let filled = before < BATCH && spans.len() >= BATCH;
        drop(spans);
        if dropped > 0 {
            self.shared
                .stats
                .spans_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        if filled {
            self.shared.batch_filled.notify_one();
        }
    }

    /// Exports what is queued, stops the export task and shuts the exporter
    /// down; at once when it has stopped already.
    pub fn shutdown(&self) -> OTelSdkResult {
        let (reply, answer) = mpsc::channel();
        self.shutdown
            .send(reply)
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        match answer.recv_timeout(SHUTDOWN_TIMEOUT) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(SHUTDOWN_TIMEOUT)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(OTelSdkError::InternalFailure(
                "the OTLP export task has stopped".into(),
            )),
        }
    }
}

struct ExportTask<E> {
    shared: Arc<Shared>,
    exporter: Arc<E>,
    endpoint: Arc<str>,
    in_flight: Arc<Semaphore>,
    drops_reported: u64,
    drop_report: Throttle,
}

impl<E: SpanExporter + 'static> ExportTask<E> {
    async fn run(
        mut self,
        mut shutdown: async_mpsc::UnboundedReceiver<mpsc::Sender<OTelSdkResult>>,
    ) {
        loop {
            let request = tokio::select! {
                () = self.shared.batch_filled.notified() => None,
                () = tokio::time::sleep(SCHEDULED_DELAY) => None,
                request = shutdown.recv() => Some(request),
            };
            self.send_queue().await;
            match request {
                None => {}
                Some(Some(reply)) => {
                    self.settle().await;
                    let _ = reply.send(self.exporter.shutdown());
                    return;
                }
                // The queue is gone.
                Some(None) => {
                    self.settle().await;
                    let _ = self.exporter.shutdown();
                    return;
                }
            }
        }
    }

    /// Exports the queue, a batch per request, each batch taken when an
    /// export slot is free (spans waiting for one still count against
    /// [`MAX_QUEUE`]).
    async fn send_queue(&mut self) {
        loop {
            self.report_drops();
            let Ok(permit) = Arc::clone(&self.in_flight).acquire_owned().await else {
                return;
            };
            let batch = {
                let mut spans = lock(&self.shared.spans);
                let keep = spans.len().saturating_sub(BATCH);
                spans.split_off(keep)
            };
            if batch.is_empty() {
                return;
            }
            let exporter = Arc::clone(&self.exporter);
            let stats = Arc::clone(&self.shared.stats);
            let endpoint = Arc::clone(&self.endpoint);
            tokio::spawn(async move {
                let count = batch.len() as u64;
                let result = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch))
                    .await
                    .unwrap_or(Err(OTelSdkError::Timeout(EXPORT_TIMEOUT)));
                stats.exported(count, result, &endpoint);
                drop(permit);
            });
        }
    }

    /// Waits until no export is under way.
    async fn settle(&self) {
        if let Ok(all) = self.in_flight.acquire_many(MAX_IN_FLIGHT as u32).await {
            drop(all);
        }
    }

    fn report_drops(&mut self) {
        let dropped = self.shared.stats.spans_dropped.load(Ordering::Relaxed);
        if dropped == self.drops_reported || !self.drop_report.due() {
            return;
        }
        tracing::warn!(
            endpoint = %self.endpoint,
            dropped = dropped - self.drops_reported,
            total = dropped,
            "OTLP span queue full ({MAX_QUEUE} spans): spans dropped; the collector or the export cannot keep up"
        );
        self.drops_reported = dropped;
    }
}

/// Locks `mutex`, also after a panic elsewhere left it poisoned: the span
/// data it guards stays usable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
