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
//!
//! Over 600 lines: the exporter set-up, the span scope and the export
//! metrics are still one file, with their tests; to be split by job.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
/// that end before the decision's own span are queued for export with it, so
/// the queue's lock is taken once per decision and the trace arrives whole;
/// those that end after it (the kernel's view of the invocation) one by one.
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
