//! OpenTelemetry traces (DESIGN §8): one `sandgate.evaluate` span per
//! decision with `instantiate` and `evaluate` children, a client span per
//! bridged HTTP call, and span events for refused WASI and egress calls and
//! for guest log lines. A decision's spans are queued together when its own
//! span ends, without waking anything (the `queue` module), and the export
//! runs on a one-thread runtime of its own, so a slow or unreachable
//! collector never delays a decision; export failures and dropped spans are
//! counted and reported in the log at most once per [`REPORT_EVERY`].
//!
//! [`Scope`] is what the evaluation path carries: the context of the span now
//! open, plus the tracer that makes children. Without a tracer (`[telemetry]`
//! has no endpoint, or `sandgate eval`) a scope still carries the caller's W3C
//! trace context, so decisions name the caller's trace id and bridged calls
//! propagate it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample, SpanData, SpanEvents,
    SpanExporter, SpanLinks,
};
use smallvec::SmallVec;

use super::queue::{EXPORT_TIMEOUT, SpanQueue, lock};
use crate::config::{OtlpProtocol, TelemetrySettings};

/// How often a failing exporter, or a full span queue, may say so in the log.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The daemon's tracer: an OTLP exporter behind the span queue. Cheap to clone.
#[derive(Clone)]
pub struct Tracing {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("guest_log_level", &self.inner.guest_log_level)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Where finished spans go; the export task takes them from there.
    queue: SpanQueue,
    /// Parent-based ratio sampling, decided once per decision.
    sampler: Sampler,
    ids: RandomIdGenerator,
    /// `sandgate` and its version, the scope every span is reported under.
    scope: InstrumentationScope,
    /// The metrics exported over OTLP beside Prometheus, when configured.
    metrics: Option<OtlpMetrics>,
    /// Guest `log` calls at or above this level (0 trace … 4 error) become span events.
    guest_log_level: i32,
    stats: Arc<ExportStats>,
    /// Last, so the queue and the metrics provider above, dropped first,
    /// still flush through it.
    _runtime: ExportRuntime,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Spans still queued are exported (a stopped task answers at once).
        let _ = self.queue.shutdown();
    }
}

/// The runtime the exports run on: a current-thread runtime driven by a
/// thread of its own, `sandgate-otlp`. Dropping it tells that thread to stop
/// and does not wait for it: that may happen on a thread of another runtime
/// (the last `Tracing` clone, or `Tracing::start` failing half way), where
/// nothing may block.
struct ExportRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ExportRuntime {
    fn start() -> std::io::Result<ExportRuntime> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("sandgate-otlp".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
                runtime.shutdown_background();
            })?;
        Ok(ExportRuntime {
            handle,
            stop: Some(stop),
        })
    }
}

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Counters of the OTLP exporter, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub spans_exported: AtomicU64,
    pub export_failures: AtomicU64,
    /// Spans that found the export queue full.
    pub spans_dropped: AtomicU64,
    /// Failures not yet reported in the log, and when the log last heard of them.
    unreported: AtomicU64,
    failure_report: Throttle,
}

/// Lets a repeated warning into the log at most once per [`REPORT_EVERY`].
#[derive(Debug, Default)]
pub(super) struct Throttle(Mutex<Option<Instant>>);

impl Throttle {
    /// Whether a warning may be logged now; if so, the next waits its turn.
    pub(super) fn due(&self) -> bool {
        let mut last = lock(&self.0);
        let due = last.is_none_or(|at| at.elapsed() >= REPORT_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

impl Tracing {
    /// Starts exporting per `settings`; `None` when no `otlp_endpoint` is set.
    pub fn start(settings: &TelemetrySettings) -> anyhow::Result<Option<Tracing>> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let stats = Arc::new(ExportStats::default());
        // Exports run on a runtime of their own: the OTLP clients' connection
        // tasks and each batch's encoding never queue behind decisions on the
        // request workers, nor wake them.
        let runtime = ExportRuntime::start()
            .map_err(|e| anyhow::anyhow!("cannot start the OTLP export thread: {e}"))?;
        let handle = runtime.handle.clone();
        // The tonic exporter makes its channel in the runtime it will use.
        let exporting = handle.enter();
        let resource = resource(&settings.service_name);
        let queue = match settings.otlp_protocol {
            OtlpProtocol::Grpc => {
                let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()?;
                exporter.set_resource(&resource);
                SpanQueue::start(exporter, endpoint, &stats, &handle)
            }
            OtlpProtocol::HttpProtobuf => {
                let url = http_traces_url(endpoint);
                crate::install_tls_provider();
                let client = reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build()?;
                let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client)
                    .with_endpoint(url.clone())
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()?;
                exporter.set_resource(&resource);
                SpanQueue::start(exporter, &url, &stats, &handle)
            }
        };
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_ratio,
        )));
        let scope = InstrumentationScope::builder("sandgate")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let metrics = match settings.otlp_metrics_interval {
            None => None,
            Some(interval) => Some(OtlpMetrics::start(settings, endpoint, interval, resource)?),
        };
        tracing::info!(
            endpoint = %endpoint,
            protocol = ?settings.otlp_protocol,
            sampling_ratio = settings.sampling_ratio,
            "exporting traces over OTLP"
        );
        drop(exporting);
        Ok(Some(Tracing {
            inner: Arc::new(Inner {
                queue,
                sampler,
                ids: RandomIdGenerator::default(),
                scope,
                metrics,
                guest_log_level: settings.guest_log_level,
                stats,
                _runtime: runtime,
            }),
        }))
    }

    pub fn stats(&self) -> &Arc<ExportStats> {
        &self.inner.stats
    }

    /// The OTLP metric instruments, when `otlp_metrics` is on.
    pub fn metrics(&self) -> Option<&OtlpMetrics> {
        self.inner.metrics.as_ref()
    }

    /// Exports what is buffered and stops the exporters (at daemon shutdown).
    pub fn shutdown(&self) {
        if let Err(e) = self.inner.queue.shutdown() {
            tracing::warn!("trace exporter shutdown: {e}");
        }
        if let Some(metrics) = &self.inner.metrics
            && let Err(e) = metrics.provider.shutdown()
        {
            tracing::warn!("metric exporter shutdown: {e}");
        }
    }
}

/// The daemon's decision metrics as OpenTelemetry instruments, exported over
/// OTLP on the traces' endpoint beside the Prometheus endpoint. Names follow
/// OpenTelemetry conventions (`sandgate.decisions`, …); the labels are those
/// of `/metrics`.
pub struct OtlpMetrics {
    provider: SdkMeterProvider,
    decisions: Counter<u64>,
    evaluation: Histogram<f64>,
    wasi_denials: Counter<u64>,
    egress_denials: Counter<u64>,
}

impl OtlpMetrics {
    fn start(
        settings: &TelemetrySettings,
        endpoint: &str,
        interval: Duration,
        resource: Resource,
    ) -> anyhow::Result<OtlpMetrics> {
        let builder = opentelemetry_otlp::MetricExporter::builder();
        let exporter = match settings.otlp_protocol {
            OtlpProtocol::Grpc => builder
                .with_tonic()
                .with_endpoint(endpoint.to_owned())
                .with_timeout(EXPORT_TIMEOUT)
                .build()?,
            OtlpProtocol::HttpProtobuf => {
                crate::install_tls_provider();
                let client = reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build()?;
                builder
                    .with_http()
                    .with_http_client(client)
                    .with_endpoint(http_signal_url(endpoint, "/v1/metrics"))
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()?
            }
        };
        let reader = opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_interval(interval)
        .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let meter = provider.meter("sandgate");
        Ok(OtlpMetrics {
            decisions: meter
                .u64_counter("sandgate.decisions")
                .with_description("Decisions by policy, version, allow and error code")
                .build(),
            evaluation: meter
                .f64_histogram("sandgate.evaluation.duration")
                .with_unit("s")
                .with_description("Wall time of one evaluation, instantiation included")
                .build(),
            wasi_denials: meter
                .u64_counter("sandgate.wasi.denials")
                .with_description("WASI calls refused to a guest, by function")
                .build(),
            egress_denials: meter
                .u64_counter("sandgate.egress.denials")
                .with_description("Bridged HTTP requests refused by the egress allowlist")
                .build(),
            provider,
        })
    }

    pub fn decision(&self, policy: &str, version: &str, allow: bool, error: &'static str) {
        self.decisions.add(
            1,
            &[
                KeyValue::new("policy", policy.to_owned()),
                KeyValue::new("version", version.to_owned()),
                KeyValue::new("allow", allow),
                KeyValue::new("error", error),
            ],
        );
    }

    pub fn evaluated(
        &self,
        policy: &str,
        version: &str,
        duration: Duration,
        denials: &[&'static str],
        egress_denied: u32,
    ) {
        let labels = [
            KeyValue::new("policy", policy.to_owned()),
            KeyValue::new("version", version.to_owned()),
        ];
        self.evaluation.record(duration.as_secs_f64(), &labels);
        for call in denials {
            self.wasi_denials.add(
                1,
                &[
                    KeyValue::new("policy", policy.to_owned()),
                    KeyValue::new("call", *call),
                ],
            );
        }
        if egress_denied > 0 {
            self.egress_denials.add(
                u64::from(egress_denied),
                &[KeyValue::new("policy", policy.to_owned())],
            );
        }
    }
}

/// OTLP/HTTP sends traces to `<base>/v1/traces`; an endpoint given with a
/// path is used as it is.
fn http_traces_url(endpoint: &str) -> String {
    http_signal_url(endpoint, "/v1/traces")
}

fn http_signal_url(endpoint: &str, path: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(url) if url.path() == "/" || url.path().is_empty() => {
            format!("{}{path}", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_owned(),
    }
}

fn resource(service_name: &str) -> Resource {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let mut attributes = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
    ];
    if !host.is_empty() {
        attributes.push(KeyValue::new("host.name", host));
    }
    Resource::builder()
        .with_service_name(service_name.to_owned())
        .with_attributes(attributes)
        .build()
}

impl ExportStats {
    /// Counts one export request's outcome and reports failures in the
    /// log, at most once per [`REPORT_EVERY`].
    pub(super) fn exported(&self, spans: u64, result: OTelSdkResult, endpoint: &str) {
        let Err(e) = result else {
            self.spans_exported.fetch_add(spans, Ordering::Relaxed);
            return;
        };
        self.export_failures.fetch_add(1, Ordering::Relaxed);
        self.unreported.fetch_add(1, Ordering::Relaxed);
        if self.failure_report.due() {
            let unreported = self.unreported.swap(0, Ordering::Relaxed);
            tracing::warn!(
                endpoint = %endpoint,
                failures = unreported,
                "OTLP trace export failed ({spans} spans dropped); decisions are unaffected: {e}"
            );
        }
    }
}

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

/// Distinct strings [`interned`] keeps for the process's life, at most.
const MAX_INTERNED: usize = 4096;

/// `text` as a span attribute value that copies as a plain reference: the
/// same text every time it is asked for, kept for the process's life. For
/// what every span of a loaded policy carries (its name, version and
/// digest): a string shared by reference count instead would have each
/// decision's span bump a count that the other request workers and the
/// export thread keep bumping too. Past [`MAX_INTERNED`] distinct strings
/// (a daemon that has loaded thousands of module versions) new ones are
/// shared by reference count, so what is kept stays bounded.
pub fn interned(text: &str) -> opentelemetry::StringValue {
    static KEPT: Mutex<Option<std::collections::HashSet<&'static str>>> = Mutex::new(None);
    let mut kept = lock(&KEPT);
    let kept = kept.get_or_insert_with(Default::default);
    if let Some(&text) = kept.get(text) {
        return text.into();
    }
    if kept.len() >= MAX_INTERNED {
        return Arc::<str>::from(text).into();
    }
    let text: &'static str = Box::leak(text.into());
    kept.insert(text);
    text.into()
}

/// At most this many events are kept per span (the SDK's default limit);
/// more are counted as dropped, so a guest that logs without end cannot grow
/// a span without bound.
const MAX_EVENTS_PER_SPAN: usize = 128;

/// The span an evaluation is in now. Cheap to clone; every method is a no-op
/// on spans that are not recorded (no tracer, or not sampled). A span ends
/// when [`Scope::end`] says so, at the latest when its last scope is dropped.
///
/// A decision's spans are recorded straight into the SDK's [`SpanData`],
/// which the OTLP exporter takes as it is, in one list the decision's
/// [`Trace`] holds: a span is written where it is exported from, never moved
/// or allocated on its own, and the decision's scopes share one reference to
/// the tracer. (Through the SDK's tracer each span start and end updates
/// reference counts all request workers share, and two workers tracing at
/// once keep taking those cache lines from each other.)
pub struct Scope {
    /// The context of this scope's span: what children descend from and
    /// bridged calls propagate. Invalid without a tracer or caller's trace.
    cx: SpanContext,
    /// The trace's recorder, when its spans are exported.
    trace: Option<Arc<Trace>>,
    /// Whether `cx` names a span recorded in `trace` that this scope keeps
    /// open; false for the caller's remote span and for spans not sampled.
    recording: bool,
}

impl Default for Scope {
    fn default() -> Self {
        Scope::unrecorded(SpanContext::empty_context())
    }
}

impl Clone for Scope {
    fn clone(&self) -> Self {
        if let Some(trace) = self.recorded() {
            trace.retain(self.cx.span_id());
        }
        Scope {
            cx: self.cx.clone(),
            trace: self.trace.clone(),
            recording: self.recording,
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(trace) = self.recorded() {
            trace.release(self.cx.span_id());
        }
    }
}

/// What a sampled decision's spans share: the tracer, referenced once per
/// decision rather than once per span, and the spans themselves. When the
/// decision's own span ends, the spans that have ended are queued for export
/// as the list they were recorded in, so the queue's lock is taken once per
/// decision and the trace arrives whole; spans that end after it (the
/// kernel's view of the invocation) are queued as they end.
struct Trace {
    tracing: Tracing,
    spans: Mutex<Spans>,
}

struct Spans {
    /// The spans not yet queued, in the order they opened.
    data: Vec<SpanData>,
    /// What is known of each span in `data`, in the same order.
    state: SmallVec<[SpanState; 4]>,
    /// Whether the `sandgate.evaluate` span has ended.
    decision_ended: bool,
}

#[derive(Clone, Copy)]
struct SpanState {
    /// Scopes of the span alive: the span ends when the last is dropped.
    scopes: u32,
    ended: bool,
    /// Whether this is the decision's own span, the root of its trace here.
    decision: bool,
}

impl Spans {
    /// Room for the decision's own span and its instantiate and evaluate children.
    fn new() -> Spans {
        Spans {
            data: Vec::with_capacity(3),
            state: SmallVec::new(),
            decision_ended: false,
        }
    }

    /// Records `span`, open, with one scope.
    fn open(&mut self, span: SpanData, decision: bool) {
        self.data.push(span);
        self.state.push(SpanState {
            scopes: 1,
            ended: false,
            decision,
        });
    }

    fn find(&self, id: SpanId) -> Option<usize> {
        self.data
            .iter()
            .position(|span| span.span_context.span_id() == id)
    }

    /// Ends span `i` at `at`; answers the spans to queue now, if any.
    fn end(&mut self, i: usize, at: SystemTime) -> Option<Vec<SpanData>> {
        let state = &mut self.state[i];
        if state.ended {
            return None;
        }
        state.ended = true;
        self.decision_ended |= state.decision;
        self.data[i].end_time = at;
        if !self.decision_ended {
            return None;
        }
        if self.state.iter().all(|state| state.ended) {
            self.state.clear();
            return Some(std::mem::take(&mut self.data));
        }
        // A span outlives the decision's: the others go, it stays.
        let mut ended = Vec::new();
        let mut j = 0;
        while j < self.data.len() {
            if self.state[j].ended {
                self.state.remove(j);
                ended.push(self.data.remove(j));
            } else {
                j += 1;
            }
        }
        Some(ended)
    }
}

impl Trace {
    fn spans(&self) -> MutexGuard<'_, Spans> {
        lock(&self.spans)
    }

    /// Applies `f` to span `id` while it is open.
    fn with_open<R>(&self, id: SpanId, f: impl FnOnce(&mut SpanData) -> R) -> Option<R> {
        let mut spans = self.spans();
        let i = spans.find(id)?;
        if spans.state[i].ended {
            return None;
        }
        Some(f(&mut spans.data[i]))
    }

    fn end(&self, id: SpanId, at: SystemTime) {
        let ready = {
            let mut spans = self.spans();
            let Some(i) = spans.find(id) else {
                return;
            };
            spans.end(i, at)
        };
        self.queue(ready);
    }

    /// One more scope of span `id`.
    fn retain(&self, id: SpanId) {
        let mut spans = self.spans();
        if let Some(i) = spans.find(id) {
            spans.state[i].scopes += 1;
        }
    }

    /// One scope of span `id` fewer: the last ends the span.
    fn release(&self, id: SpanId) {
        let ready = {
            let mut spans = self.spans();
            let Some(i) = spans.find(id) else {
                return;
            };
            let state = &mut spans.state[i];
            state.scopes -= 1;
            if state.scopes > 0 || state.ended {
                return;
            }
            spans.end(i, SystemTime::now())
        };
        self.queue(ready);
    }

    fn queue(&self, ready: Option<Vec<SpanData>>) {
        if let Some(spans) = ready {
            self.tracing.inner.queue.push(spans);
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
            return Scope::unrecorded(parent.0.clone().unwrap_or_else(SpanContext::empty_context));
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
            return Scope::unrecorded(cx);
        }
        let span = span_data(
            &inner.scope,
            &cx,
            parent.0.as_ref(),
            name.into(),
            SpanKind::Server,
            SystemTime::now(),
            attributes(),
        );
        let mut spans = Spans::new();
        spans.open(span, true);
        let trace = Arc::new(Trace {
            tracing: tracing.clone(),
            spans: Mutex::new(spans),
        });
        Scope {
            cx,
            trace: Some(trace),
            recording: true,
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
        let inner = &trace.tracing.inner;
        let cx = SpanContext::new(
            self.cx.trace_id(),
            inner.ids.new_span_id(),
            self.cx.trace_flags(),
            false,
            self.cx.trace_state().clone(),
        );
        let span = span_data(
            &inner.scope,
            &cx,
            Some(&self.cx),
            name,
            kind,
            start,
            attributes(),
        );
        trace.spans().open(span, false);
        Scope {
            cx,
            trace: Some(Arc::clone(trace)),
            recording: true,
        }
    }

    /// A scope of span `cx` whose spans are not exported.
    fn unrecorded(cx: SpanContext) -> Scope {
        Scope {
            cx,
            trace: None,
            recording: false,
        }
    }

    /// The trace this scope's span is recorded in, if it is.
    fn recorded(&self) -> Option<&Trace> {
        self.trace.as_deref().filter(|_| self.recording)
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

    /// Applies `f` to this scope's span while it is open.
    fn with_span(&self, f: impl FnOnce(&mut SpanData)) {
        if let Some(trace) = self.recorded() {
            trace.with_open(self.cx.span_id(), f);
        }
    }

    pub fn event(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        self.with_span(|data| {
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

    pub fn set_attributes<I: IntoIterator<Item = KeyValue>>(&self, attributes: impl FnOnce() -> I) {
        self.with_span(|data| data.attributes.extend(attributes()));
    }

    /// Marks the span failed with a DESIGN §3 error code.
    pub fn fail(&self, code: &str, message: &str) {
        self.with_span(|data| {
            data.attributes
                .push(KeyValue::new("error.code", code.to_owned()));
            data.status = Status::error(format!("{code}: {message}"));
        });
    }

    /// Ends this scope's own span at `end` (work observed after the fact).
    pub fn end_at(&self, end: SystemTime) {
        if let Some(trace) = self.recorded() {
            trace.end(self.cx.span_id(), end);
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

/// The record of span `cx`, open, under `parent` (the caller's remote span,
/// a span of this process, or none).
fn span_data(
    scope: &InstrumentationScope,
    cx: &SpanContext,
    parent: Option<&SpanContext>,
    name: Cow<'static, str>,
    span_kind: SpanKind,
    start_time: SystemTime,
    attributes: Vec<KeyValue>,
) -> SpanData {
    SpanData {
        span_context: cx.clone(),
        parent_span_id: parent.map_or(SpanId::INVALID, SpanContext::span_id),
        parent_span_is_remote: parent.is_some_and(SpanContext::is_remote),
        span_kind,
        name,
        start_time,
        end_time: start_time,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_endpoints_get_the_traces_path_unless_they_name_one() {
        assert_eq!(
            http_traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("http://collector/otlp/v1/traces"),
            "http://collector/otlp/v1/traces"
        );
    }

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

    /// Records an open span `id` in `spans`.
    fn record(spans: &mut Spans, id: u64, decision: bool) {
        let cx = SpanContext::new(
            opentelemetry::trace::TraceId::from(1),
            SpanId::from(id),
            TraceFlags::SAMPLED,
            false,
            Default::default(),
        );
        let scope = InstrumentationScope::builder("sandgate").build();
        let kind = SpanKind::Internal;
        let data = span_data(
            &scope,
            &cx,
            None,
            "span".into(),
            kind,
            SystemTime::now(),
            vec![],
        );
        spans.open(data, decision);
    }

    fn ids(spans: &[SpanData]) -> Vec<SpanId> {
        spans.iter().map(|s| s.span_context.span_id()).collect()
    }

    #[test]
    fn a_decisions_spans_are_queued_together_when_its_own_span_ends() {
        let mut spans = Spans::new();
        record(&mut spans, 1, true);
        record(&mut spans, 2, false);
        record(&mut spans, 3, false);
        let at = SystemTime::now();
        assert!(
            spans.end(1, at).is_none(),
            "the decision's span is still open"
        );
        assert!(spans.end(2, at).is_none());
        let queued = spans.end(0, at).expect("the decision ended");
        assert_eq!(ids(&queued), [1, 2, 3].map(SpanId::from));
        assert!(queued.iter().all(|s| s.end_time == at));
        assert!(spans.data.is_empty() && spans.state.is_empty());
    }

    #[test]
    fn a_span_that_outlives_its_decision_is_queued_when_it_ends() {
        let mut spans = Spans::new();
        record(&mut spans, 1, true);
        record(&mut spans, 2, false);
        record(&mut spans, 3, false);
        let at = SystemTime::now();
        assert!(spans.end(1, at).is_none());
        let queued = spans.end(0, at).expect("the decision ended");
        assert_eq!(ids(&queued), [1, 2].map(SpanId::from));
        assert_eq!(ids(&spans.data), [SpanId::from(3)], "the open span stays");
        assert_eq!(
            spans.end(0, at).map(|q| ids(&q)),
            Some(vec![SpanId::from(3)])
        );
        // Opened after the decision (the kernel's view of it): queued alone.
        record(&mut spans, 4, false);
        let i = spans.find(SpanId::from(4)).expect("recorded");
        assert_eq!(
            spans.end(i, at).map(|q| ids(&q)),
            Some(vec![SpanId::from(4)])
        );
        assert!(
            spans.find(SpanId::from(3)).is_none(),
            "queued spans are gone"
        );
    }

    #[test]
    fn interned_text_is_kept_once() {
        let (a, b) = (interned(&"rbac-".repeat(3)), interned(&"rbac-".repeat(3)));
        assert_eq!(a.as_str(), "rbac-rbac-rbac-");
        assert!(std::ptr::eq(a.as_str(), b.as_str()), "the same kept string");
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
