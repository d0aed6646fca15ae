//! Telemetry: the Prometheus metrics of the daemon (served at `/metrics`) and,
//! in [`traces`], OpenTelemetry traces. Every metric name is defined here,
//! once, as a constant; `server` records into the handles this module hands
//! out after each evaluation, as plain [`EvaluationFigures`], and other
//! concerns (audit, probes) hand in their own counters as [`Collected`].
//!
//! Over 600 lines: every metric's name, help and registration is kept here,
//! in one place, as the style asks; its tests render the whole exposition.

mod connections;
pub mod log;
mod queue;
pub mod traces;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::decision::ErrorCode;
use traces::{ExportStats, Tracing};

pub use connections::{ConnectionMetrics, OpenConnection, TimeoutPhase};

/// Metric names as registered. Counters are exposed with the `_total` suffix
/// the exposition format adds (`sandgate_decisions_total`).
pub mod names {
    /// Counter: decisions by `policy`, `version`, `allow` and `error` (a DESIGN §3 code or `none`).
    pub const DECISIONS: &str = "sandgate_decisions";
    /// Histogram: wall time of one evaluation, instantiation included, by `policy`, `version`.
    pub const EVALUATION_SECONDS: &str = "sandgate_evaluation_duration_seconds";
    /// Histogram: time spent instantiating the module of one evaluation, by `policy`, `version`.
    pub const INSTANTIATION_SECONDS: &str = "sandgate_instantiation_duration_seconds";
    /// Counter: WASI calls refused, by `policy` and `call` (the preview1 function).
    pub const WASI_DENIALS: &str = "sandgate_wasi_denials";
    /// Counter: bridged HTTP requests refused by the egress allowlist, by `policy`.
    pub const EGRESS_DENIALS: &str = "sandgate_egress_denials";
    /// Gauge: evaluations running now, by `policy`.
    pub const IN_FLIGHT: &str = "sandgate_evaluations_in_flight";
    /// Counter: requests refused because the policy had `max_in_flight` evaluations running, by `policy`.
    pub const IN_FLIGHT_REFUSALS: &str = "sandgate_max_in_flight_refusals";
    /// Counter: requests answered with an error before any evaluation, by `error`
    /// (`policy_not_found`, `invalid_input` for oversized or malformed requests, …).
    pub const REQUEST_ERRORS: &str = "sandgate_request_errors";
    /// Gauge: 1 when the policy is loaded and serving, 0 otherwise, by `policy`.
    pub const POLICY_READY: &str = "sandgate_policy_ready";
    /// Counter: audit lines dropped because the writer fell behind.
    pub const AUDIT_DROPPED: &str = "sandgate_audit_lines_dropped";
    /// Counter: audit lines written.
    pub const AUDIT_WRITTEN: &str = "sandgate_audit_lines_written";
    /// Counter: spans the OTLP exporter delivered (only when exporting traces).
    pub const OTLP_SPANS_EXPORTED: &str = "sandgate_otlp_spans_exported";
    /// Counter: OTLP export requests that failed (collector unreachable, refused, timed out).
    pub const OTLP_EXPORT_FAILURES: &str = "sandgate_otlp_export_failures";
    /// Counter: spans dropped because the export queue was full.
    pub const OTLP_SPANS_DROPPED: &str = "sandgate_otlp_spans_dropped";
    /// Counter: reloads of the config and modules, by `result` (`ok` or `failed`).
    pub const RELOADS: &str = "sandgate_reloads";
    /// Gauge: 1 when the last reload failed (the previous generation still serves), else 0.
    pub const LAST_RELOAD_FAILED: &str = "sandgate_last_reload_failed";
    /// Gauge: the generation of config and modules serving now (1 at start, +1 per applied reload).
    pub const CONFIG_GENERATION: &str = "sandgate_config_generation";
    /// Gauge: Unix time of the last applied reload (or of the start).
    pub const LAST_RELOAD_SUCCESS_SECONDS: &str = "sandgate_last_reload_success_timestamp_seconds";
    /// Counter: decisions answered from the decision cache, by `policy`, `version`.
    pub const DECISION_CACHE_HITS: &str = "sandgate_decision_cache_hits";
    /// Counter: decision cache lookups that found nothing, by `policy`, `version`.
    pub const DECISION_CACHE_MISSES: &str = "sandgate_decision_cache_misses";
    /// Counter: lines of guest output (stdout, stderr, `log`) cut off by the
    /// per-evaluation bound, by `policy`.
    pub const GUEST_OUTPUT_DROPPED: &str = "sandgate_guest_output_dropped_lines";
    /// Counter: kept lines of guest output the log writer did not write (its
    /// queue was full, or it reached them after the evaluation's deadline).
    pub const GUEST_OUTPUT_UNWRITTEN: &str = "sandgate_guest_output_unwritten_lines";
    /// Gauge: client connections open now, by `listener` (`http`, `grpc`).
    pub const CONNECTIONS_OPEN: &str = "sandgate_connections_open";
    /// Gauge: `server.max_connections`, the cap on both listeners together.
    pub const CONNECTIONS_MAX: &str = "sandgate_connections_max";
    /// Counter: connections closed at once because the cap was reached, by `listener`.
    pub const CONNECTIONS_REFUSED: &str = "sandgate_connections_refused";
    /// Counter: connections closed by a timeout, by `listener` and `phase`
    /// (`header`: headers too slow; `idle`: no request, or an answer not read).
    pub const CONNECTION_TIMEOUTS: &str = "sandgate_connection_timeouts";
}

/// Label value of `error` for a decision without error.
const NO_ERROR: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    policy: String,
    version: String,
    allow: bool,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    policy: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WasiLabels {
    policy: String,
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The daemon's metrics registry. Cheap to clone; clones share the metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// The trace exporter, which also carries the OTLP metric instruments when enabled.
    otlp: Option<Tracing>,
    decisions: Family<DecisionLabels, Counter>,
    evaluation: HistogramFamily<VersionLabels>,
    instantiation: HistogramFamily<VersionLabels>,
    wasi_denials: Family<WasiLabels, Counter>,
    egress_denials: Family<PolicyLabels, Counter>,
    in_flight: Family<PolicyLabels, Gauge>,
    refusals: Family<PolicyLabels, Counter>,
    request_errors: Family<ErrorLabels, Counter>,
    ready: Family<PolicyLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    last_reload_failed: Gauge,
    generation: Gauge,
    last_reload_success: Gauge,
    cache_hits: Family<VersionLabels, Counter>,
    cache_misses: Family<VersionLabels, Counter>,
    guest_output_dropped: Family<PolicyLabels, Counter>,
    connections: ConnectionMetrics,
}

fn evaluation_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn instantiation_histogram() -> Histogram {
    // 5 µs … ~40 ms
    Histogram::new(exponential_buckets(0.000_005, 2.0, 14))
}

impl Metrics {
    /// Registers every metric; the counters of `audit` and `probes` (and the
    /// trace exporter's `export` counters, when exporting) are read at scrape time.
    pub fn new(audit: &impl Collected, otlp: Option<&Tracing>, probes: &impl Collected) -> Metrics {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        let evaluation: HistogramFamily<VersionLabels> =
            Family::new_with_constructor(evaluation_histogram);
        let instantiation: HistogramFamily<VersionLabels> =
            Family::new_with_constructor(instantiation_histogram);
        let wasi_denials = Family::<WasiLabels, Counter>::default();
        let egress_denials = Family::<PolicyLabels, Counter>::default();
        let in_flight = Family::<PolicyLabels, Gauge>::default();
        let refusals = Family::<PolicyLabels, Counter>::default();
        let request_errors = Family::<ErrorLabels, Counter>::default();
        let ready = Family::<PolicyLabels, Gauge>::default();
        registry.register(
            names::DECISIONS,
            "Decisions by policy, version, allow and error code",
            decisions.clone(),
        );
        registry.register(
            names::EVALUATION_SECONDS,
            "Wall time of one evaluation, instantiation included",
            evaluation.clone(),
        );
        registry.register(
            names::INSTANTIATION_SECONDS,
            "Time spent instantiating the module of one evaluation",
            instantiation.clone(),
        );
        registry.register(
            names::WASI_DENIALS,
            "WASI calls refused to a guest, by function",
            wasi_denials.clone(),
        );
        registry.register(
            names::EGRESS_DENIALS,
            "Bridged HTTP requests refused by the egress allowlist",
            egress_denials.clone(),
        );
        registry.register(
            names::IN_FLIGHT,
            "Evaluations running now",
            in_flight.clone(),
        );
        registry.register(
            names::IN_FLIGHT_REFUSALS,
            "Requests refused because the policy already ran max_in_flight evaluations",
            refusals.clone(),
        );
        registry.register(
            names::REQUEST_ERRORS,
            "Requests answered with an error before any evaluation",
            request_errors.clone(),
        );
        registry.register(
            names::POLICY_READY,
            "1 when the policy is loaded and serving",
            ready.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        let last_reload_failed = Gauge::default();
        let generation = Gauge::default();
        let last_reload_success = Gauge::default();
        let cache_hits = Family::<VersionLabels, Counter>::default();
        let cache_misses = Family::<VersionLabels, Counter>::default();
        registry.register(
            names::RELOADS,
            "Reloads of the config and modules, by result",
            reloads.clone(),
        );
        registry.register(
            names::LAST_RELOAD_FAILED,
            "1 when the last reload failed and the previous generation still serves",
            last_reload_failed.clone(),
        );
        registry.register(
            names::CONFIG_GENERATION,
            "Generation of config and modules serving now",
            generation.clone(),
        );
        registry.register(
            names::LAST_RELOAD_SUCCESS_SECONDS,
            "Unix time of the last applied reload or of the start",
            last_reload_success.clone(),
        );
        registry.register(
            names::DECISION_CACHE_HITS,
            "Decisions answered from the decision cache",
            cache_hits.clone(),
        );
        registry.register(
            names::DECISION_CACHE_MISSES,
            "Decision cache lookups that found nothing",
            cache_misses.clone(),
        );
        let guest_output_dropped = Family::<PolicyLabels, Counter>::default();
        registry.register(
            names::GUEST_OUTPUT_DROPPED,
            "Lines of guest output cut off by the per-evaluation bound",
            guest_output_dropped.clone(),
        );
        let connections = ConnectionMetrics::register(&mut registry);
        registry.register_collector(probes.collector());
        registry.register_collector(audit.collector());
        registry.register_collector(Box::new(GuestOutputCounters));
        if let Some(tracing) = otlp {
            registry.register_collector(Box::new(ExportCounters {
                stats: Arc::clone(tracing.stats()),
            }));
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                otlp: otlp.cloned(),
                decisions,
                evaluation,
                instantiation,
                wasi_denials,
                egress_denials,
                in_flight,
                refusals,
                request_errors,
                ready,
                reloads,
                last_reload_failed,
                generation,
                last_reload_success,
                cache_hits,
                cache_misses,
                guest_output_dropped,
                connections,
            }),
        }
    }

    /// The connection gauges and counters of both listeners.
    pub fn connections(&self) -> &ConnectionMetrics {
        &self.inner.connections
    }

    /// Records a reload attempt; `generation` is the one serving afterwards.
    pub fn reloaded(&self, ok: bool, generation: u64) {
        let inner = &self.inner;
        inner
            .reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
        inner.last_reload_failed.set(i64::from(!ok));
        self.serving(generation, ok);
    }

    /// Records the generation serving now; `applied` when it just started serving.
    pub fn serving(&self, generation: u64, applied: bool) {
        let inner = &self.inner;
        inner
            .generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        if applied {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            inner
                .last_reload_success
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    /// Drops the per-policy gauges of a policy a reload removed, so no alert
    /// keeps firing for a policy that no longer exists.
    pub fn forget_policy(&self, policy: &str) {
        let labels = PolicyLabels {
            policy: policy.to_owned(),
        };
        self.inner.ready.remove(&labels);
        self.inner.in_flight.remove(&labels);
    }

    /// The handles of one policy version, bound once so the request path does
    /// not look labels up for the common cases.
    pub fn policy(&self, policy: &str, version: &str) -> PolicyMetrics {
        let inner = &self.inner;
        let version_labels = VersionLabels {
            policy: policy.to_owned(),
            version: version.to_owned(),
        };
        let policy_labels = PolicyLabels {
            policy: policy.to_owned(),
        };
        let decision = |allow: bool| {
            inner
                .decisions
                .get_or_create(&DecisionLabels {
                    policy: policy.to_owned(),
                    version: version.to_owned(),
                    allow,
                    error: NO_ERROR,
                })
                .clone()
        };
        PolicyMetrics {
            metrics: self.clone(),
            policy: policy.to_owned(),
            version: version.to_owned(),
            allowed: decision(true),
            denied: decision(false),
            evaluation: inner.evaluation.get_or_create(&version_labels).clone(),
            instantiation: inner.instantiation.get_or_create(&version_labels).clone(),
            in_flight: inner.in_flight.get_or_create(&policy_labels).clone(),
            refusals: inner.refusals.get_or_create(&policy_labels).clone(),
            ready: inner.ready.get_or_create(&policy_labels).clone(),
            egress_denials: inner.egress_denials.get_or_create(&policy_labels).clone(),
            cache_hits: inner.cache_hits.get_or_create(&version_labels).clone(),
            cache_misses: inner.cache_misses.get_or_create(&version_labels).clone(),
        }
    }

    /// Marks a configured policy as not (yet) serving, so the gauge exists from the start.
    pub fn policy_not_ready(&self, policy: &str) {
        self.inner
            .ready
            .get_or_create(&PolicyLabels {
                policy: policy.to_owned(),
            })
            .set(0);
    }

    /// Counts a request answered with `code` before any evaluation.
    pub fn request_error(&self, code: ErrorCode) {
        self.inner
            .request_errors
            .get_or_create(&ErrorLabels {
                error: code.as_str(),
            })
            .inc();
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::error!(error = %e, "metrics could not be encoded");
            out.clear();
            let _ = writeln!(out, "# metrics could not be encoded: {e}");
        }
        out
    }
}

/// What one finished evaluation amounts to for the metrics, in plain
/// figures: the evaluating module converts its own result into this.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvaluationFigures {
    pub allow: bool,
    /// The DESIGN §3 code of a failed evaluation, `None` for a decision.
    pub error: Option<ErrorCode>,
    /// Wall time of the evaluation, instantiation included.
    pub duration: Duration,
    /// Time spent instantiating the module (zero when none was needed).
    pub instantiate: Duration,
    /// The preview1 function of each WASI call refused, in order.
    pub denied_calls: Vec<&'static str>,
    /// Bridged HTTP requests refused by the egress allowlist.
    pub egress_denied: u32,
    /// Lines of guest output cut off by the per-evaluation bound.
    pub guest_output_dropped: u64,
}

/// A concern that keeps its own counters (the audit log, the probes) and
/// lets the metrics read them at scrape time through a collector.
pub trait Collected {
    /// A collector encoding this concern's counters when `/metrics` is scraped.
    fn collector(&self) -> Box<dyn Collector>;
}

/// Content type of [`Metrics::render`].
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metric handles of one policy version.
#[derive(Clone)]
pub struct PolicyMetrics {
    metrics: Metrics,
    policy: String,
    version: String,
    allowed: Counter,
    denied: Counter,
    evaluation: Histogram,
    instantiation: Histogram,
    in_flight: Gauge,
    refusals: Counter,
    ready: Gauge,
    egress_denials: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
}

impl PolicyMetrics {
    /// Records one finished evaluation: its decision, latencies, WASI and egress denials.
    pub fn evaluated(&self, evaluation: impl Into<EvaluationFigures>) {
        let evaluation = evaluation.into();
        self.decision(evaluation.allow, evaluation.error);
        if let Some(otlp) = self.otlp() {
            otlp.evaluated(
                &self.policy,
                &self.version,
                evaluation.duration,
                &evaluation.denied_calls,
                evaluation.egress_denied,
            );
        }
        self.evaluation.observe(evaluation.duration.as_secs_f64());
        if evaluation.instantiate > Duration::ZERO {
            self.instantiation
                .observe(evaluation.instantiate.as_secs_f64());
        }
        if evaluation.guest_output_dropped > 0 {
            self.metrics
                .inner
                .guest_output_dropped
                .get_or_create(&PolicyLabels {
                    policy: self.policy.clone(),
                })
                .inc_by(evaluation.guest_output_dropped);
        }
        if evaluation.egress_denied > 0 {
            self.egress_denials
                .inc_by(u64::from(evaluation.egress_denied));
        }
        for &call in &evaluation.denied_calls {
            self.metrics
                .inner
                .wasi_denials
                .get_or_create(&WasiLabels {
                    policy: self.policy.clone(),
                    call,
                })
                .inc();
        }
    }

    fn otlp(&self) -> Option<&traces::OtlpMetrics> {
        self.metrics.inner.otlp.as_ref().and_then(Tracing::metrics)
    }

    /// Counts a decision the daemon answered for this policy.
    pub fn decision(&self, allow: bool, error: Option<ErrorCode>) {
        if let Some(otlp) = self.otlp() {
            let code = error.map_or(NO_ERROR, ErrorCode::as_str);
            otlp.decision(&self.policy, &self.version, allow, code);
        }
        match error {
            None if allow => {
                self.allowed.inc();
            }
            None => {
                self.denied.inc();
            }
            Some(code) => {
                self.metrics
                    .inner
                    .decisions
                    .get_or_create(&DecisionLabels {
                        policy: self.policy.clone(),
                        version: self.version.clone(),
                        allow,
                        error: code.as_str(),
                    })
                    .inc();
            }
        }
    }

    /// Counts a decision answered from the decision cache.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    /// Counts a decision cache lookup that found nothing.
    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    /// Counts a request refused because `max_in_flight` evaluations were running.
    pub fn refused(&self) {
        self.refusals.inc();
    }

    /// Marks the policy as loaded and serving (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Counts one evaluation as running until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight {
            gauge: self.in_flight.clone(),
        }
    }
}

/// Decrements the in-flight gauge when dropped (also when the request is cancelled).
pub struct InFlight {
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Reads the guest log writer's counter at scrape time.
#[derive(Debug)]
struct GuestOutputCounters;

impl Collector for GuestOutputCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_counters(
            &mut encoder,
            &[(
                names::GUEST_OUTPUT_UNWRITTEN,
                "Kept lines of guest output the log writer did not write",
                log::unwritten_lines(),
            )],
        )
    }
}

/// Encodes constant counters read at scrape time: (name, help, value).
pub(crate) fn encode_counters(
    encoder: &mut DescriptorEncoder,
    counters: &[(&str, &str, u64)],
) -> Result<(), std::fmt::Error> {
    for &(name, help, value) in counters {
        let counter = ConstCounter::new(value);
        let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
        counter.encode(metric)?;
    }
    Ok(())
}

/// Reads the OTLP exporter's counters at scrape time.
#[derive(Debug)]
struct ExportCounters {
    stats: Arc<ExportStats>,
}

impl Collector for ExportCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_counters(
            &mut encoder,
            &[
                (
                    names::OTLP_SPANS_EXPORTED,
                    "Spans delivered to the OTLP collector",
                    self.stats.spans_exported.load(Ordering::Relaxed),
                ),
                (
                    names::OTLP_EXPORT_FAILURES,
                    "OTLP span export requests that failed",
                    self.stats.export_failures.load(Ordering::Relaxed),
                ),
                (
                    names::OTLP_SPANS_DROPPED,
                    "Spans dropped because the OTLP export queue was full",
                    self.stats.spans_dropped.load(Ordering::Relaxed),
                ),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters another concern keeps (as the audit log and the probes do).
    struct Counted(&'static str);

    impl Collected for Counted {
        fn collector(&self) -> Box<dyn Collector> {
            Box::new(CountedCollector(self.0))
        }
    }

    #[derive(Debug)]
    struct CountedCollector(&'static str);

    impl Collector for CountedCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_counters(&mut encoder, &[(self.0, "help", 7)])
        }
    }

    fn metrics() -> Metrics {
        Metrics::new(
            &Counted("sandgate_test_audit_counter"),
            None,
            &Counted("sandgate_test_probe_counter"),
        )
    }

    #[test]
    fn metrics_render_with_their_contract_labels() {
        let metrics = metrics();
        let policy = metrics.policy("orders", "v2");
        policy.decision(true, None);
        policy.decision(false, Some(ErrorCode::EvalTimeout));
        policy.refused();
        metrics.request_error(ErrorCode::PolicyNotFound);
        let text = metrics.render();
        for needle in [
            r#"sandgate_decisions_total{policy="orders",version="v2",allow="true",error="none"} 1"#,
            r#"sandgate_decisions_total{policy="orders",version="v2",allow="false",error="eval_timeout"} 1"#,
            r#"sandgate_max_in_flight_refusals_total{policy="orders"} 1"#,
            r#"sandgate_request_errors_total{error="policy_not_found"} 1"#,
            "sandgate_test_audit_counter_total 7",
            "sandgate_test_probe_counter_total 7",
            "sandgate_guest_output_unwritten_lines_total ",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }

    #[test]
    fn an_evaluations_figures_count_its_decision_and_denials() {
        let metrics = metrics();
        metrics.policy("orders", "v2").evaluated(EvaluationFigures {
            allow: false,
            error: None,
            duration: Duration::from_millis(3),
            instantiate: Duration::from_millis(1),
            denied_calls: vec!["path_open", "sock_accept", "path_open"],
            egress_denied: 2,
            guest_output_dropped: 5,
        });
        let text = metrics.render();
        for needle in [
            r#"sandgate_decisions_total{policy="orders",version="v2",allow="false",error="none"} 1"#,
            r#"sandgate_wasi_denials_total{policy="orders",call="path_open"} 2"#,
            r#"sandgate_wasi_denials_total{policy="orders",call="sock_accept"} 1"#,
            r#"sandgate_egress_denials_total{policy="orders"} 2"#,
            r#"sandgate_guest_output_dropped_lines_total{policy="orders"} 5"#,
            r#"sandgate_evaluation_duration_seconds_count{policy="orders",version="v2"} 1"#,
            r#"sandgate_instantiation_duration_seconds_count{policy="orders",version="v2"} 1"#,
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
