//! The decision metrics as OpenTelemetry instruments, exported over OTLP on
//! the traces' endpoint when `otlp_metrics_interval` is set. [`Tracing::start`]
//! starts them; `telemetry`'s `PolicyMetrics` records into them.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;

use super::http_signal_url;
use crate::config::{OtlpProtocol, TelemetrySettings};
use crate::telemetry::queue::EXPORT_TIMEOUT;

/// The daemon's decision metrics as OpenTelemetry instruments, exported over
/// OTLP on the traces' endpoint beside the Prometheus endpoint. Names follow
/// OpenTelemetry conventions (`sandgate.decisions`, …); the labels are those
/// of `/metrics`.
pub struct OtlpMetrics {
    pub(super) provider: SdkMeterProvider,
    decisions: Counter<u64>,
    evaluation: Histogram<f64>,
    wasi_denials: Counter<u64>,
    egress_denials: Counter<u64>,
}

impl OtlpMetrics {
    pub(super) fn start(
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
