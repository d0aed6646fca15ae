//! The spans of one decision: the caller's W3C context ([`Parent`]) and the
//! [`Scope`] the evaluation path carries, which records a decision's spans
//! as plain data and queues them together when its own span ends. `policy`,
//! `abi`, `bridge`, `probes` and `server` open spans here.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, SamplingDecision, ShouldSample, SpanEvents};

use super::Tracing;
use super::record::{Deferred, Finished, SpanRecord};
use crate::telemetry::queue::lock;

/// The caller's W3C trace context (`traceparent`, `tracestate`), if it sent a valid one.
#[derive(Clone, Debug, Default)]
pub struct Parent(Option<SpanContext>);

impl Parent {
    pub fn from_headers(headers: &http::HeaderMap) -> Parent {
        Self::extracted(&TraceContextPropagator::new().extract(&HeaderExtractor(headers)))
    }

    /// From a map with lower-case header names (the ext_authz request's headers).
    pub fn from_map(headers: &HashMap<String, String>) -> Parent {
        Self::extracted(&TraceContextPropagator::new().extract(headers))
    }

    fn extracted(cx: &Context) -> Parent {
        let span = cx.span().span_context().clone();
        Parent(span.is_valid().then_some(span))
    }

    pub fn trace_id(&self) -> Option<String> {
        self.0.as_ref().map(|s| s.trace_id().to_string())
    }

    fn context(&self) -> Context {
        match &self.0 {
            Some(span) => Context::new().with_remote_span_context(span.clone()),
            None => Context::new(),
        }
    }
}

/// At most this many events are kept per span (the SDK's default limit);
/// more are counted as dropped, so a guest that logs without end cannot grow
/// a span without bound.
const MAX_EVENTS_PER_SPAN: usize = 128;

/// The span an evaluation is in now. Cheap to clone; every method is a no-op
/// on spans that are not recorded (no tracer, or not sampled).
///
/// A sampled decision's spans are recorded as plain data in one list the
/// decision owns ([`record`](super::record)), under one lock taken only by
/// the threads working on that decision; the SDK's [`SpanData`] is made from
/// it on the exporting thread. (Through the SDK's tracer each span start and
/// end updates reference counts all request workers share, and two workers
/// tracing at once keep taking those cache lines from each other.)
///
/// [`SpanData`]: opentelemetry_sdk::trace::SpanData
#[derive(Clone)]
pub struct Scope {
    /// The context of this scope's span: what children descend from and
    /// bridged calls propagate. Invalid without a tracer or caller's trace.
    cx: SpanContext,
    /// The trace's recorder, when its spans are exported.
    trace: Option<Arc<Trace>>,
    /// This scope's own span, its place in the trace's list; `None` for the
    /// caller's remote span and for spans not sampled.
    span: Option<usize>,
}

impl Default for Scope {
    fn default() -> Self {
        Scope {
            cx: SpanContext::empty_context(),
            trace: None,
            span: None,
        }
    }
}

/// What a sampled decision's spans share: the tracer, referenced once per
/// decision rather than once per span, and the spans themselves. Those that
/// end before the decision's own span (all of them, the probes' `kernel`
/// span included: it is reported when the invocation ends, before the
/// decision's span does) are queued for export with it, so the queue's lock
/// is taken once per decision and the trace arrives whole; any that end
/// after it are queued one by one. A span still open when the last scope of
/// its trace is dropped ends then.
struct Trace {
    tracing: Tracing,
    trace_id: TraceId,
    flags: TraceFlags,
    trace_state: TraceState,
    record: Mutex<Record>,
}

struct Record {
    /// The trace's spans, by the place their scopes know them by; `None`
    /// once queued.
    spans: Vec<Option<SpanRecord>>,
    /// Whether the decision's own span (the first) has ended.
    decision_ended: bool,
}

impl Trace {
    /// Runs `f` on span `index` while it is open.
    fn with<R>(&self, index: usize, f: impl FnOnce(&mut SpanRecord) -> R) -> Option<R> {
        let mut record = lock(&self.record);
        match record.spans.get_mut(index) {
            Some(Some(span)) if span.end.is_none() => Some(f(span)),
            _ => None,
        }
    }

    /// Opens a span; its place in the list.
    fn open(&self, span: SpanRecord) -> usize {
        let mut record = lock(&self.record);
        record.spans.push(Some(span));
        record.spans.len() - 1
    }

    fn end(&self, index: usize, at: SystemTime) {
        let mut record = lock(&self.record);
        let Some(Some(span)) = record.spans.get_mut(index) else {
            return;
        };
        if span.end.is_some() {
            return;
        }
        span.end = Some(at);
        let spans = if index == 0 {
            record.decision_ended = true;
            take_ended(&mut record.spans)
        } else if record.decision_ended {
            record.spans[index].take().into_iter().collect()
        } else {
            return;
        };
        drop(record);
        self.queue(spans);
    }

    fn queue(&self, spans: Vec<SpanRecord>) {
        self.tracing.inner.queue.push(Finished {
            trace_id: self.trace_id,
            flags: self.flags,
            trace_state: self.trace_state.clone(),
            spans,
        });
    }
}

/// Takes the spans that have ended out of `spans`.
fn take_ended(spans: &mut [Option<SpanRecord>]) -> Vec<SpanRecord> {
    let mut ended = Vec::with_capacity(spans.len());
    for place in spans {
        if place.as_ref().is_some_and(|span| span.end.is_some()) {
            ended.extend(place.take());
        }
    }
    ended
}

impl Drop for Trace {
    fn drop(&mut self) {
        let record = self
            .record
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = SystemTime::now();
        let spans: Vec<SpanRecord> = record
            .spans
            .drain(..)
            .flatten()
            .map(|mut span| {
                span.end.get_or_insert(now);
                span
            })
            .collect();
        if !spans.is_empty() {
            self.queue(spans);
        }
    }
}

/// Span attributes are passed as closures throughout, so the evaluation path
/// builds none of them when it is not traced.
impl Scope {
    /// Opens the `sandgate.evaluate` span of one decision under `parent`,
    /// sampled per `sampling_ratio` unless the caller decided already.
    pub fn evaluation(
        tracing: Option<&Tracing>,
        parent: &Parent,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Scope {
        let Some(tracing) = tracing else {
            return Scope {
                cx: parent.0.clone().unwrap_or_else(SpanContext::empty_context),
                trace: None,
                span: None,
            };
        };
        let inner = &tracing.inner;
        let (trace_id, parent_cx) = match &parent.0 {
            Some(remote) => (remote.trace_id(), parent.context()),
            None => (inner.ids.new_trace_id(), Context::new()),
        };
        let name = "sandgate.evaluate";
        let sampling = inner.sampler.should_sample(
            Some(&parent_cx),
            trace_id,
            name,
            &SpanKind::Server,
            &[],
            &[],
        );
        let sampled = sampling.decision == SamplingDecision::RecordAndSample;
        let flags = TraceFlags::default().with_sampled(sampled);
        let cx = SpanContext::new(
            trace_id,
            inner.ids.new_span_id(),
            flags,
            false,
            sampling.trace_state,
        );
        if !sampled {
            return Scope {
                cx,
                trace: None,
                span: None,
            };
        }
        // The decision's own span, its instantiate and evaluate children and
        // the probes' `kernel` span.
        let mut spans = Vec::with_capacity(4);
        spans.push(Some(record(
            &cx,
            parent.0.as_ref(),
            name.into(),
            SpanKind::Server,
            SystemTime::now(),
            attributes(),
        )));
        let trace = Arc::new(Trace {
            tracing: tracing.clone(),
            trace_id,
            flags,
            trace_state: cx.trace_state().clone(),
            record: Mutex::new(Record {
                spans,
                decision_ended: false,
            }),
        });
        Scope {
            cx,
            trace: Some(trace),
            span: Some(0),
        }
    }

    /// Opens a child span; without a tracer the child is this scope itself.
    pub fn child(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Scope {
        self.start_child(name.into(), kind, SystemTime::now(), attributes, None)
    }

    /// Opens a child span that started at `start`, for work observed after
    /// the fact (such as the kernel's view of an invocation), whose
    /// attributes `deferred` makes on the exporting thread from the data it
    /// holds; `size` is at least their encoded size (what
    /// [`attribute_size`](super::record::attribute_size) says of each).
    pub fn child_deferred(
        &self,
        name: &'static str,
        kind: SpanKind,
        start: SystemTime,
        size: usize,
        deferred: impl FnOnce(&mut Vec<KeyValue>) + Send + 'static,
    ) -> Scope {
        if self.trace.is_none() {
            return self.clone();
        }
        let deferred: Deferred = Box::new(deferred);
        self.start_child(name.into(), kind, start, Vec::new, Some((deferred, size)))
    }

    /// A child of a sampled span is sampled: the parent-based sampler's
    /// answer, without asking it.
    fn start_child(
        &self,
        name: Cow<'static, str>,
        kind: SpanKind,
        start: SystemTime,
        attributes: impl FnOnce() -> Vec<KeyValue>,
        deferred: Option<(Deferred, usize)>,
    ) -> Scope {
        let Some(trace) = &self.trace else {
            return self.clone();
        };
        let cx = SpanContext::new(
            self.cx.trace_id(),
            trace.tracing.inner.ids.new_span_id(),
            self.cx.trace_flags(),
            false,
            self.cx.trace_state().clone(),
        );
        let mut span = record(&cx, Some(&self.cx), name, kind, start, attributes());
        span.deferred = deferred;
        let index = trace.open(span);
        Scope {
            cx,
            trace: Some(Arc::clone(trace)),
            span: Some(index),
        }
    }

    /// The trace id decisions and audit lines carry: this trace's when
    /// tracing, else the caller's.
    pub fn trace_id(&self) -> Option<String> {
        self.cx.is_valid().then(|| self.cx.trace_id().to_string())
    }

    /// Whether spans of this trace are exported, even after this scope's
    /// own span ended (children may still be added then).
    pub fn is_sampled(&self) -> bool {
        self.trace.is_some()
    }

    /// Runs `f` on this scope's own span while it is open.
    fn with(&self, f: impl FnOnce(&mut SpanRecord)) {
        if let (Some(trace), Some(index)) = (&self.trace, self.span) {
            trace.with(index, f);
        }
    }

    pub fn event(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        self.with(|span| {
            if span.events.events.len() < MAX_EVENTS_PER_SPAN {
                let event = Event::new(name, SystemTime::now(), attributes(), 0);
                span.events.events.push(event);
            } else {
                span.events.dropped_count += 1;
            }
        });
    }

    /// A guest `log` call, as an event when at or above the configured level.
    pub fn guest_log(&self, level: i32, message: &str) {
        let Some(trace) = &self.trace else {
            return;
        };
        if level < trace.tracing.inner.guest_log_level {
            return;
        }
        let name = match level {
            i32::MIN..=0 => "trace",
            1 => "debug",
            2 => "info",
            3 => "warn",
            _ => "error",
        };
        self.event("guest.log", || {
            vec![
                KeyValue::new("log.severity", name),
                KeyValue::new("log.message", message.to_owned()),
            ]
        });
    }

    pub fn set_attributes(&self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        self.with(|span| span.attributes.extend(attributes()));
    }

    /// Marks the span failed with a DESIGN §3 error code.
    pub fn fail(&self, code: &str, message: &str) {
        self.with(|span| {
            span.attributes
                .push(KeyValue::new("error.code", code.to_owned()));
            span.status = Status::error(format!("{code}: {message}"));
        });
    }

    /// Ends this scope's own span at `end` (work observed after the fact).
    pub fn end_at(&self, end: SystemTime) {
        if let (Some(trace), Some(index)) = (&self.trace, self.span) {
            trace.end(index, end);
        }
    }

    /// Ends this scope's own span (never the caller's remote span).
    pub fn end(&self) {
        self.end_at(SystemTime::now());
    }

    /// Adds `traceparent` (and `tracestate`) naming this span, replacing any
    /// the guest set, so the called service joins the trace.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        if self.cx.is_valid() {
            let cx = Context::new().with_remote_span_context(self.cx.clone());
            TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        }
    }
}

/// The record of the span `cx` under `parent` (the caller's remote span, a
/// span of this process, or none), open from `start`.
fn record(
    cx: &SpanContext,
    parent: Option<&SpanContext>,
    name: Cow<'static, str>,
    kind: SpanKind,
    start: SystemTime,
    attributes: Vec<KeyValue>,
) -> SpanRecord {
    SpanRecord {
        span_id: cx.span_id(),
        parent_span_id: parent.map_or(SpanId::INVALID, SpanContext::span_id),
        parent_is_remote: parent.is_some_and(SpanContext::is_remote),
        name,
        kind,
        start,
        end: None,
        attributes,
        deferred: None,
        events: SpanEvents::default(),
        status: Status::Unset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_traceparent_is_propagated_without_a_tracer() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let parent = Parent::from_headers(&headers);
        assert_eq!(
            parent.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let scope = Scope::evaluation(None, &parent, Vec::new);
        let child = scope.child("evaluate", SpanKind::Internal, Vec::new);
        let mut out = http::HeaderMap::new();
        child.inject(&mut out);
        assert_eq!(
            out.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", http::HeaderValue::from_static(bad));
            assert_eq!(Parent::from_headers(&headers).trace_id(), None, "{bad}");
        }
    }
}
