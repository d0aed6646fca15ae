//! A decision's spans as plain data, the form they are recorded in on the
//! request path and queued in, and their conversion into the SDK's
//! [`SpanData`] on the exporting thread, a batch at a time, just before the
//! OTLP exporter takes them.
//!
//! On the request path a span is an entry in its decision's [`Finished`]
//! list: ids, name, kind, times, the attributes the evaluation set, events
//! and status, with nothing of the SDK's per-span machinery (span contexts,
//! trace state and instrumentation scope are the trace's, and are attached
//! once per span on the exporting thread). A span whose attributes are many
//! and derived (the `kernel` span's per-syscall counts) carries the data they
//! are derived from and a function that makes them there, so the request
//! worker neither builds nor frees them.

use std::borrow::Cow;
use std::time::SystemTime;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

/// Appends attributes made from data recorded with the span; run on the
/// exporting thread.
pub type Deferred = Box<dyn FnOnce(&mut Vec<KeyValue>) + Send>;

/// One span of a decision, as recorded.
pub struct SpanRecord {
    pub(in crate::telemetry) span_id: SpanId,
    /// [`SpanId::INVALID`] for a root span.
    pub(in crate::telemetry) parent_span_id: SpanId,
    pub(in crate::telemetry) parent_is_remote: bool,
    pub(in crate::telemetry) name: Cow<'static, str>,
    pub(in crate::telemetry) kind: SpanKind,
    pub(in crate::telemetry) start: SystemTime,
    /// `None` while the span is open.
    pub(in crate::telemetry) end: Option<SystemTime>,
    pub(in crate::telemetry) attributes: Vec<KeyValue>,
    /// Attributes made on the exporting thread, with an upper bound of
    /// their encoded size (for the queue's byte bound).
    pub(in crate::telemetry) deferred: Option<(Deferred, usize)>,
    pub(in crate::telemetry) events: SpanEvents,
    pub(in crate::telemetry) status: Status,
}

/// Spans of one trace that have ended, queued for export together.
pub struct Finished {
    pub(in crate::telemetry) trace_id: TraceId,
    pub(in crate::telemetry) flags: TraceFlags,
    pub(in crate::telemetry) trace_state: TraceState,
    pub(in crate::telemetry) spans: Vec<SpanRecord>,
}

impl Finished {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The [`encoded_size`](SpanRecord::encoded_size) of each span.
    pub fn sizes(&self) -> impl Iterator<Item = usize> + '_ {
        self.spans.iter().map(SpanRecord::encoded_size)
    }

    /// Keeps the first `n` spans (those that fit a full queue).
    pub fn truncate(&mut self, n: usize) {
        self.spans.truncate(n);
    }

    /// Appends the spans, in the SDK's form, to `batch`.
    pub fn export_into(self, scope: &InstrumentationScope, batch: &mut Vec<SpanData>) {
        let Finished {
            trace_id,
            flags,
            trace_state,
            spans,
        } = self;
        batch.extend(spans.into_iter().map(|span| {
            let mut attributes = span.attributes;
            if let Some((deferred, _)) = span.deferred {
                deferred(&mut attributes);
            }
            SpanData {
                span_context: SpanContext::new(
                    trace_id,
                    span.span_id,
                    flags,
                    false,
                    trace_state.clone(),
                ),
                parent_span_id: span.parent_span_id,
                parent_span_is_remote: span.parent_is_remote,
                span_kind: span.kind,
                name: span.name,
                start_time: span.start,
                end_time: span.end.unwrap_or(span.start),
                attributes,
                dropped_attributes_count: 0,
                events: span.events,
                links: SpanLinks::default(),
                status: span.status,
                instrumentation_scope: scope.clone(),
            }
        }));
    }
}

impl SpanRecord {
    /// About the bytes the span takes in an OTLP export request: its
    /// strings, plus a share for ids, times and protobuf framing. Errs high
    /// rather than low.
    pub fn encoded_size(&self) -> usize {
        const SPAN: usize = 96;
        const EVENT: usize = 24;
        let message = match &self.status {
            Status::Error { description } => description.len(),
            _ => 0,
        };
        SPAN + self.name.len()
            + message
            + attributes_size(&self.attributes)
            + self.deferred.as_ref().map_or(0, |(_, size)| *size)
            + self
                .events
                .iter()
                .map(|e| EVENT + e.name.len() + attributes_size(&e.attributes))
                .sum::<usize>()
    }
}

fn attributes_size(attributes: &[KeyValue]) -> usize {
    attributes
        .iter()
        .map(|kv| attribute_size(kv.key.as_str(), &kv.value))
        .sum()
}

/// About the bytes one attribute takes encoded (errs high).
pub fn attribute_size(key: &str, value: &Value) -> usize {
    const ATTRIBUTE: usize = 12;
    let value = match value {
        Value::String(s) => s.as_str().len(),
        Value::Array(Array::String(list)) => list.iter().map(|s| s.as_str().len() + 4).sum(),
        Value::Array(Array::Bool(list)) => 2 * list.len(),
        Value::Array(Array::I64(list)) => 11 * list.len(),
        Value::Array(Array::F64(list)) => 9 * list.len(),
        _ => 11,
    };
    ATTRIBUTE + key.len() + value
}
