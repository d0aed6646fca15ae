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

mod metrics;
pub(super) mod record;
mod scope;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{RandomIdGenerator, Sampler, SpanExporter};

use super::queue::{EXPORT_TIMEOUT, SpanQueue, lock};
use crate::config::{OtlpProtocol, TelemetrySettings};
pub use metrics::OtlpMetrics;
pub use record::attribute_size;
pub use scope::{Parent, Scope};

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
        // `sandgate` and its version, the scope every span is reported under.
        let scope = InstrumentationScope::builder("sandgate")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let queue = match settings.otlp_protocol {
            OtlpProtocol::Grpc => {
                let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()?;
                exporter.set_resource(&resource);
                SpanQueue::start(exporter, scope, endpoint, &stats, &handle)
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
                SpanQueue::start(exporter, scope, &url, &stats, &handle)
            }
        };
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_ratio,
        )));
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

/// OTLP/HTTP sends traces to `<base>/v1/traces`; an endpoint given with a
/// path is used as it is.
fn http_traces_url(endpoint: &str) -> String {
    http_signal_url(endpoint, "/v1/traces")
}

pub(super) fn http_signal_url(endpoint: &str, path: &str) -> String {
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
}
