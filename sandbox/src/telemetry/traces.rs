//! OpenTelemetry traces (DESIGN §8): one `sandgate.evaluate` span per
//! decision with `instantiate` and `evaluate` children, a client span per
//! bridged HTTP call, and span events for refused WASI and egress calls and
//! for guest log lines. A finished span is queued without waking anything
//! (the `queue` module), and the export runs on a one-thread runtime of its
//! own, so a slow or unreachable collector never delays a decision; export
//! failures and dropped spans are counted and reported in the log at most
//! once per [`REPORT_EVERY`].
//!
//! [`Scope`] is what the evaluation path carries: the context of the span now
//! open, plus the tracer that makes children. Without a tracer (`[telemetry]`
//! has no endpoint, or `sandgate eval`) a scope still carries the caller's W3C
//! trace context, so decisions name the caller's trace id and bridged calls
//! propagate it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter};

use super::queue::{EXPORT_TIMEOUT, SpanQueue};
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
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// The metrics exported over OTLP beside Prometheus, when configured.
    metrics: Option<OtlpMetrics>,
    /// Guest `log` calls at or above this level (0 trace … 4 error) become span events.
    guest_log_level: i32,
    stats: Arc<ExportStats>,
    /// Last, so the providers above, dropped first, still flush through it.
    _runtime: ExportRuntime,
}

/// The one-thread runtime the exports run on. It stops without waiting for
/// its thread when dropped: that may happen on a thread of another runtime
/// (the last `Tracing` clone, or `Tracing::start` failing half way), where
/// a runtime cannot be dropped by blocking.
struct ExportRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
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
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sandgate-otlp")
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start the OTLP export thread: {e}"))?;
        let handle = runtime.handle().clone();
        let runtime = ExportRuntime(Some(runtime));
        // The tonic exporter makes its channel in the runtime it will use.
        let exporting = handle.enter();
        let resource = resource(&settings.service_name);
        let processor = match settings.otlp_protocol {
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
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .with_resource(resource.clone())
            .build();
        let tracer = provider.tracer("sandgate");
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
                provider,
                tracer,
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
        if let Err(e) = self.inner.provider.shutdown() {
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

/// The span an evaluation is in now. Cheap to clone; every method is a no-op
/// on spans that are not recorded (no tracer, or not sampled).
#[derive(Clone)]
pub struct Scope {
    tracing: Option<Tracing>,
    cx: Context,
}

impl Default for Scope {
    fn default() -> Self {
        Scope {
            tracing: None,
            cx: Context::new(),
        }
    }
}

/// Span attributes are passed as closures throughout, so the evaluation path
/// builds none of them when it is not traced.
impl Scope {
    /// Opens the `sandgate.evaluate` span of one decision under `parent`.
    pub fn evaluation(
        tracing: Option<&Tracing>,
        parent: &Parent,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Scope {
        let parent_cx = parent.context();
        let Some(tracing) = tracing else {
            return Scope {
                tracing: None,
                cx: parent_cx,
            };
        };
        let tracer = &tracing.inner.tracer;
        let span = tracer
            .span_builder("sandgate.evaluate")
            .with_kind(SpanKind::Server)
            .with_attributes(attributes())
            .start_with_context(tracer, &parent_cx);
        Scope {
            tracing: Some(tracing.clone()),
            cx: parent_cx.with_span(span),
        }
    }

    /// Opens a child span; without a tracer the child is this scope itself.
    pub fn child(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Scope {
        self.start_child(name, kind, None, attributes)
    }

    /// Opens a child span that started at `start` (for work observed after
    /// the fact, such as the kernel's view of an invocation).
    pub fn child_at(
        &self,
        name: &'static str,
        kind: SpanKind,
        start: std::time::SystemTime,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Scope {
        self.start_child(name, kind, Some(start), attributes)
    }

    fn start_child(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        start: Option<std::time::SystemTime>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Scope {
        let Some(tracing) = &self.tracing else {
            return self.clone();
        };
        let tracer = &tracing.inner.tracer;
        let mut builder = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes());
        if let Some(start) = start {
            builder = builder.with_start_time(start);
        }
        let span = builder.start_with_context(tracer, &self.cx);
        Scope {
            tracing: Some(tracing.clone()),
            cx: self.cx.with_span(span),
        }
    }

    /// The trace id decisions and audit lines carry: this trace's when
    /// tracing, else the caller's.
    pub fn trace_id(&self) -> Option<String> {
        let span = self.cx.span().span_context().clone();
        span.is_valid().then(|| span.trace_id().to_string())
    }

    /// Whether spans of this trace are exported, even after this scope's
    /// own span ended (children may still be added then).
    pub fn is_sampled(&self) -> bool {
        self.tracing.is_some() && self.cx.span().span_context().is_sampled()
    }

    pub fn is_recording(&self) -> bool {
        self.cx.span().is_recording()
    }

    pub fn event(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        let span = self.cx.span();
        if span.is_recording() {
            span.add_event(name, attributes());
        }
    }

    /// A guest `log` call, as an event when at or above the configured level.
    pub fn guest_log(&self, level: i32, message: &str) {
        let Some(tracing) = &self.tracing else {
            return;
        };
        if level < tracing.inner.guest_log_level || !self.is_recording() {
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
        let span = self.cx.span();
        if span.is_recording() {
            span.set_attributes(attributes());
        }
    }

    /// Marks the span failed with a DESIGN §3 error code.
    pub fn fail(&self, code: &str, message: &str) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("error.code", code.to_owned()));
        span.set_status(Status::error(format!("{code}: {message}")));
    }

    /// Ends this scope's own span at `end` (work observed after the fact).
    pub fn end_at(&self, end: std::time::SystemTime) {
        if self.tracing.is_some() {
            self.cx.span().end_with_timestamp(end);
        }
    }

    /// Ends this scope's own span (never the caller's remote span).
    pub fn end(&self) {
        if self.tracing.is_some() {
            self.cx.span().end();
        }
    }

    /// Adds `traceparent` (and `tracestate`) naming this span, replacing any
    /// the guest set, so the called service joins the trace.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        if self.cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&self.cx, &mut HeaderInjector(headers));
        }
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
