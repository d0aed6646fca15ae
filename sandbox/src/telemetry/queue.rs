//! The span queue between the request workers and the OTLP exporter.
//!
//! A decision's ended spans are queued together, as the one list they were
//! collected in, under a short lock, waking nothing except once per filled
//! batch. (Copying them into a buffer shared with the export task made each
//! request worker wait for memory the export task had last read: two points
//! of traced throughput, docs/benchmarks.md.) The export task, on the export
//! runtime, wakes when a batch has filled or [`SCHEDULED_DELAY`] has passed,
//! and sends the queue, oldest first, in batches of at most [`BATCH`] spans, up
//! to [`MAX_IN_FLIGHT`] of them at once: on a busy machine an export round
//! trip can take milliseconds, and one batch at a time would fall behind the
//! spans a loaded daemon makes. (The SDK's batch processor exports one batch
//! at a time and drops what no longer fits its queue without telling anyone.)
//!
//! An export request holds at most [`BATCH`] spans and about
//! [`MAX_REQUEST_BYTES`], so that a collector takes it: a guest's logged
//! messages may make one span megabytes long. A span that does not fit the
//! full queue ([`MAX_QUEUE`] spans, [`MAX_QUEUE_BYTES`]) is dropped, counted
//! (`sandgate_otlp_spans_dropped_total`) and reported in the log at most once
//! per [`REPORT_EVERY`](super::traces::REPORT_EVERY): a trace with missing
//! spans is never silent.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use opentelemetry::InstrumentationScope;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tokio::sync::{Notify, Semaphore, mpsc as async_mpsc};

use super::traces::record::Finished;
use super::traces::{ExportStats, Throttle};

/// Spans per export request.
pub const BATCH: usize = 1024;
/// Bytes per export request, at most (as far as
/// [`SpanRecord::encoded_size`](super::traces::record::SpanRecord::encoded_size) tells),
/// unless one decision's spans alone are larger (they travel together):
/// half the 4 MiB a gRPC receiver takes by default (tonic's, the
/// OpenTelemetry Collector's and Jaeger's limit). Decisions' spans are a
/// few hundred bytes, but a guest may log 128 messages of 16 KiB into one
/// span, and a request too large for the collector would lose every other
/// span sent with it.
pub const MAX_REQUEST_BYTES: usize = 2 << 20;
/// Spans held while the collector is slow; beyond this they are dropped.
pub const MAX_QUEUE: usize = 32_768;
/// Bytes of spans held, likewise: what a guest that logs all it may in every
/// decision can make the daemon hold while the collector is slow.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;
/// Export requests under way at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// How long a span waits in a batch that does not fill.
pub const SCHEDULED_DELAY: Duration = Duration::from_millis(500);
/// Deadline of one export request.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutdown waits for the queue to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Queues finished spans for the export task; see the module comment.
pub struct SpanQueue {
    shared: Arc<Shared>,
    /// Asks the export task to stop; it answers on the sender it is given.
    shutdown: async_mpsc::UnboundedSender<mpsc::Sender<OTelSdkResult>>,
}

struct Shared {
    queue: Mutex<Queue>,
    batch_filled: Notify,
    stats: Arc<ExportStats>,
}

/// The spans waiting, as they were pushed: a decision's together, each
/// list with its encoded size. The lists are queued as they are, so a
/// request worker writes nothing into memory the export task last read.
#[derive(Default)]
struct Queue {
    lists: VecDeque<(Finished, usize)>,
    /// Spans in `lists`.
    spans: usize,
    /// Their sizes, summed.
    bytes: usize,
}

impl Queue {
    /// Queues `list`, whose spans' sizes sum to `size`.
    fn add(&mut self, list: Finished, size: usize) {
        self.spans += list.len();
        self.bytes += size;
        self.lists.push_back((list, size));
    }

    /// Takes the oldest lists for one export request: at most [`BATCH`]
    /// spans and [`MAX_REQUEST_BYTES`], and at least one list (a
    /// decision's spans travel together).
    fn take_batch(&mut self) -> Vec<Finished> {
        let (mut spans, mut bytes) = (0, 0);
        let mut lists = Vec::new();
        while let Some((list, size)) = self.lists.front() {
            let full = spans + list.len() > BATCH || bytes + size > MAX_REQUEST_BYTES;
            if full && !lists.is_empty() {
                break;
            }
            spans += list.len();
            bytes += size;
            lists.extend(self.lists.pop_front().map(|(list, _)| list));
        }
        self.spans -= spans;
        self.bytes -= bytes;
        lists
    }
}

impl SpanQueue {
    /// Starts the export task on `runtime`. The exporter must already have its
    /// resource: the task owns it from here on.
    pub fn start<E: SpanExporter + 'static>(
        exporter: E,
        scope: InstrumentationScope,
        endpoint: &str,
        stats: &Arc<ExportStats>,
        runtime: &tokio::runtime::Handle,
    ) -> SpanQueue {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            batch_filled: Notify::new(),
            stats: Arc::clone(stats),
        });
        let (shutdown, requests) = async_mpsc::unbounded_channel();
        let task = ExportTask {
            shared: Arc::clone(&shared),
            exporter: Arc::new(exporter),
            scope,
            endpoint: Arc::from(endpoint),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            drops_reported: 0,
            drop_report: Throttle::default(),
        };
        runtime.spawn(task.run(requests));
        SpanQueue { shared, shutdown }
    }

    /// Queues finished spans; what does not fit a full queue is dropped and counted.
    pub fn push(&self, mut ended: Finished) {
        if ended.is_empty() {
            return;
        }
        let all = ended.sizes().sum();
        let mut queue = lock(&self.shared.queue);
        let (spans, bytes) = (queue.spans, queue.bytes);
        let mut fits = ended.len().min(MAX_QUEUE.saturating_sub(spans));
        let mut added = if fits == ended.len() {
            all
        } else {
            ended.sizes().take(fits).sum()
        };
        while bytes + added > MAX_QUEUE_BYTES {
            fits -= 1;
            added -= ended.spans[fits].encoded_size();
        }
        let dropped = ended.len() - fits;
        ended.truncate(fits);
        if fits > 0 {
            queue.add(ended, added);
        }
        // Wakes the export task once per request's worth of spans.
        let filled = (spans < BATCH && queue.spans >= BATCH)
            || (bytes < MAX_REQUEST_BYTES && queue.bytes >= MAX_REQUEST_BYTES);
        drop(queue);
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
    /// `sandgate` and its version, the scope every span is reported under.
    scope: InstrumentationScope,
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
            let lists = lock(&self.shared.queue).take_batch();
            if lists.is_empty() {
                return;
            }
            // Made into the SDK's spans outside the lock, in one pass: request
            // workers never wait on it.
            let mut batch: Vec<SpanData> =
                Vec::with_capacity(lists.iter().map(Finished::len).sum());
            for list in lists {
                list.export_into(&self.scope, &mut batch);
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
            "OTLP span queue full ({MAX_QUEUE} spans or {} MiB): spans dropped; the collector or the export cannot keep up",
            MAX_QUEUE_BYTES >> 20
        );
        self.drops_reported = dropped;
    }
}

/// Locks `mutex`, also after a panic elsewhere left it poisoned: the span
/// data it guards stays usable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::SystemTime;

    use opentelemetry::KeyValue;
    use opentelemetry::trace::{Event, SpanId, SpanKind, Status, TraceFlags, TraceId};
    use opentelemetry_sdk::trace::SpanEvents;
    use prost::Message as _;

    use super::*;
    use crate::telemetry::traces::record::{SpanRecord, attribute_size};

    /// A decision's span with `events` guest log events of `message` bytes.
    fn span(events: usize, message: usize) -> SpanRecord {
        let mut logged = SpanEvents::default();
        logged.events = (0..events)
            .map(|_| {
                let attributes = vec![
                    KeyValue::new("log.severity", "info"),
                    KeyValue::new("log.message", "m".repeat(message)),
                ];
                Event::new("guest.log", SystemTime::now(), attributes, 0)
            })
            .collect();
        SpanRecord {
            span_id: SpanId::from(9),
            parent_span_id: SpanId::from(7),
            parent_is_remote: false,
            kind: SpanKind::Internal,
            name: Cow::Borrowed("evaluate"),
            start: SystemTime::now(),
            end: Some(SystemTime::now()),
            attributes: vec![
                KeyValue::new("policy", "rbac"),
                KeyValue::new("digest", "sha256:".to_owned() + &"0".repeat(64)),
                KeyValue::new("duration_us", 41_i64),
                KeyValue::new("decision.allow", true),
            ],
            deferred: None,
            events: logged,
            status: Status::error("internal: a message"),
        }
    }

    fn finished(spans: Vec<SpanRecord>) -> Finished {
        Finished {
            trace_id: TraceId::from(5),
            flags: TraceFlags::SAMPLED,
            trace_state: Default::default(),
            spans,
        }
    }

    /// What `span` is encoded into, in the OTLP request.
    fn encoded_len(span: SpanRecord) -> usize {
        let mut batch = Vec::new();
        let scope = InstrumentationScope::builder("sandgate").build();
        finished(vec![span]).export_into(&scope, &mut batch);
        let span = batch.pop().expect("one span");
        opentelemetry_proto::tonic::trace::v1::Span::from(span).encoded_len()
    }

    #[test]
    fn the_size_estimate_is_never_below_the_encoded_size() {
        for (events, message) in [(0, 0), (1, 10), (128, 16 * 1024), (3, 200_000)] {
            let record = span(events, message);
            let estimate = record.encoded_size();
            let encoded = encoded_len(record);
            assert!(
                estimate >= encoded && estimate < encoded + encoded / 2 + 256,
                "{events} events of {message} bytes: estimate {estimate}, encoded {encoded}"
            );
        }
    }

    #[test]
    fn deferred_attributes_are_made_at_export_and_counted_in_the_estimate() {
        let made = [
            KeyValue::new("syscall.openat.guest.count", 3_i64),
            KeyValue::new("syscall.openat.guest.time_ns", 4_100_i64),
        ];
        let size: usize = made
            .iter()
            .map(|kv| attribute_size(kv.key.as_str(), &kv.value))
            .sum();
        let mut record = span(0, 0);
        let plain = record.encoded_size();
        let moved = made.to_vec();
        record.deferred = Some((Box::new(move |out| out.extend(moved)), size));
        assert_eq!(record.encoded_size(), plain + size);
        let estimate = record.encoded_size();
        let mut batch = Vec::new();
        let scope = InstrumentationScope::builder("sandgate").build();
        finished(vec![record]).export_into(&scope, &mut batch);
        let data = batch.pop().expect("one span");
        assert_eq!(&data.attributes[4..], &made);
        assert_eq!(data.span_context.trace_id(), TraceId::from(5));
        assert_eq!(data.span_context.span_id(), SpanId::from(9));
        assert_eq!(data.parent_span_id, SpanId::from(7));
        let encoded = opentelemetry_proto::tonic::trace::v1::Span::from(data).encoded_len();
        assert!(
            estimate >= encoded,
            "estimate {estimate}, encoded {encoded}"
        );
    }

    /// A queue of `lists`, sized as `push` sizes them.
    fn queue(lists: Vec<Vec<SpanRecord>>) -> Queue {
        let mut queue = Queue::default();
        for list in lists {
            let list = finished(list);
            let size = list.sizes().sum();
            queue.add(list, size);
        }
        queue
    }

    fn decision() -> Vec<SpanRecord> {
        vec![span(0, 0), span(0, 0), span(0, 0)]
    }

    #[test]
    fn requests_take_the_oldest_decisions_up_to_the_count_and_byte_limits() {
        let mut small = queue((0..1000).map(|_| decision()).collect());
        let first = small.take_batch();
        assert_eq!(
            first.len(),
            BATCH / 3,
            "whole decisions, at most {BATCH} spans"
        );
        assert_eq!(small.spans, 3 * (1000 - BATCH / 3));
        assert_eq!(small.bytes, small.spans * span(0, 0).encoded_size());
        while !small.take_batch().is_empty() {}
        assert_eq!((small.spans, small.bytes), (0, 0));

        // A 2 MiB span per decision: one decision per request.
        let loud = || vec![span(0, 0), span(128, 16 * 1024), span(0, 0)];
        let mut loud = queue(vec![loud(), loud(), decision()]);
        assert_eq!(loud.take_batch().len(), 1);
        assert_eq!(loud.take_batch().len(), 1);
        assert_eq!(loud.take_batch().len(), 1);
        assert_eq!((loud.spans, loud.bytes), (0, 0));

        // Larger than a request may be: sent alone all the same.
        let mut huge = queue(vec![vec![span(1, 3 * MAX_REQUEST_BYTES)], decision()]);
        assert_eq!(huge.take_batch()[0].len(), 1);
        assert_eq!(huge.take_batch()[0].len(), 3);
        assert!(huge.take_batch().is_empty());
    }
}
