//! The spans of one decision: the caller's W3C context ([`Parent`]) and the
//! [`Scope`] the evaluation path carries, which records spans straight into
//! the SDK's span data and queues a decision's spans together when its own
//! span ends. `policy`, `abi`, `bridge`, `probes` and `server` open spans here.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, SamplingDecision, ShouldSample, SpanData, SpanEvents, SpanLinks,
};

use super::Tracing;
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
/// Spans are recorded straight into the SDK's [`SpanData`], which the OTLP
/// exporter takes as it is: a decision's spans share one reference to the
/// tracer, and the shared queue is locked once per decision. (Through the
/// SDK's tracer each span start and end updates reference counts all request
/// workers share, and two workers tracing at once keep taking those cache
/// lines from each other.)
#[derive(Clone)]
pub struct Scope {
    /// The context of this scope's span: what children descend from and
    /// bridged calls propagate. Invalid without a tracer or caller's trace.
    cx: SpanContext,
    /// The trace's recorder, when its spans are exported.
    trace: Option<Arc<Trace>>,
    /// This scope's own span, while recording; `None` for the caller's
    /// remote span and for spans not sampled.
    span: Option<Arc<OpenSpan>>,
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
/// decision rather than once per span, and the spans that have ended. Those
/// that end before the decision's own span (all of them, the probes'
/// `kernel` span included: it is reported when the invocation ends, before
/// the decision's span does) are queued for export with it, so the queue's
/// lock is taken once per decision and the trace arrives whole; any that
/// end after it are queued one by one.
struct Trace {
    tracing: Tracing,
    ended: Mutex<Ended>,
}

struct Ended {
    spans: Vec<SpanData>,
    /// Whether the `sandgate.evaluate` span has ended.
    decision: bool,
}

impl Trace {
    fn ended(&self, span: SpanData, decision: bool) {
        let mut ended = lock(&self.ended);
        ended.spans.push(span);
        ended.decision |= decision;
        if ended.decision {
            let spans = std::mem::take(&mut ended.spans);
            drop(ended);
            self.tracing.inner.queue.push(spans);
        }
    }
}

/// A span being recorded; it ends at the latest when its last scope is
/// dropped.
struct OpenSpan {
    data: Mutex<Option<SpanData>>,
    trace: Arc<Trace>,
    /// Whether this is the decision's own span, the root of its trace here.
    decision: bool,
}

impl OpenSpan {
    fn with<R>(&self, f: impl FnOnce(&mut SpanData) -> R) -> Option<R> {
        lock(&self.data).as_mut().map(f)
    }

    fn end(&self, at: SystemTime) {
        let data = lock(&self.data).take();
        if let Some(mut data) = data {
            data.end_time = at;
            self.trace.ended(data, self.decision);
        }
    }
}

impl Drop for OpenSpan {
    fn drop(&mut self) {
        self.end(SystemTime::now());
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
        let cx = SpanContext::new(
            trace_id,
            inner.ids.new_span_id(),
            TraceFlags::default().with_sampled(sampled),
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
        let trace = Arc::new(Trace {
            tracing: tracing.clone(),
            // The decision's own span and its instantiate and evaluate children.
            ended: Mutex::new(Ended {
                spans: Vec::with_capacity(3),
                decision: false,
            }),
        });
        let span = open(
            &trace,
            &cx,
            parent.0.as_ref(),
            name.into(),
            SpanKind::Server,
            SystemTime::now(),
            attributes(),
        );
        Scope {
            cx,
            trace: Some(trace),
            span: Some(span),
        }
    }

    /// Opens a child span; without a tracer the child is this scope itself.
    pub fn child(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Scope {
        self.start_child(name.into(), kind, SystemTime::now(), attributes)
    }

    /// Opens a child span that started at `start` (for work observed after
    /// the fact, such as the kernel's view of an invocation).
    pub fn child_at(
        &self,
        name: &'static str,
        kind: SpanKind,
        start: SystemTime,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Scope {
        self.start_child(name.into(), kind, start, attributes)
    }

    /// A child of a sampled span is sampled: the parent-based sampler's
    /// answer, without asking it.
    fn start_child(
        &self,
        name: Cow<'static, str>,
        kind: SpanKind,
        start: SystemTime,
        attributes: impl FnOnce() -> Vec<KeyValue>,
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
        let span = open(trace, &cx, Some(&self.cx), name, kind, start, attributes());
        Scope {
            cx,
            trace: Some(Arc::clone(trace)),
            span: Some(span),
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

    pub fn event(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        let Some(span) = &self.span else {
            return;
        };
        span.with(|data| {
            if data.events.events.len() < MAX_EVENTS_PER_SPAN {
                let event = Event::new(name, SystemTime::now(), attributes(), 0);
                data.events.events.push(event);
            } else {
                data.events.dropped_count += 1;
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
        if let Some(span) = &self.span {
            span.with(|data| data.attributes.extend(attributes()));
        }
    }

    /// Marks the span failed with a DESIGN §3 error code.
    pub fn fail(&self, code: &str, message: &str) {
        if let Some(span) = &self.span {
            span.with(|data| {
                data.attributes
                    .push(KeyValue::new("error.code", code.to_owned()));
                data.status = Status::error(format!("{code}: {message}"));
            });
        }
    }

    /// Ends this scope's own span at `end` (work observed after the fact).
    pub fn end_at(&self, end: SystemTime) {
        if let Some(span) = &self.span {
            span.end(end);
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

/// Starts recording the span `cx` under `parent` (the caller's remote span,
/// a span of this process, or none).
fn open(
    trace: &Arc<Trace>,
    cx: &SpanContext,
    parent: Option<&SpanContext>,
    name: Cow<'static, str>,
    span_kind: SpanKind,
    start_time: SystemTime,
    attributes: Vec<KeyValue>,
) -> Arc<OpenSpan> {
    let parent_span_is_remote = parent.is_some_and(SpanContext::is_remote);
    let data = SpanData {
        span_context: cx.clone(),
        parent_span_id: parent.map_or(SpanId::INVALID, SpanContext::span_id),
        parent_span_is_remote,
        span_kind,
        name,
        start_time,
        end_time: start_time,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: trace.tracing.inner.scope.clone(),
    };
    Arc::new(OpenSpan {
        data: Mutex::new(Some(data)),
        trace: Arc::clone(trace),
        // Only the decision's span has no parent in this process.
        decision: parent.is_none() || parent_span_is_remote,
    })
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
