//! Resolves `[telemetry]`: the OTLP endpoint and protocol, sampling, the
//! guest log level and metrics export.

use super::Resolver;
use crate::config::raw::RawTelemetry;
use crate::config::{ConfigError, OtlpProtocol, TelemetrySettings};

impl Resolver<'_> {
    pub(super) fn telemetry(&self, t: RawTelemetry) -> Result<TelemetrySettings, ConfigError> {
        let defaults = TelemetrySettings::default();
        let otlp_protocol = t.otlp_protocol.unwrap_or(defaults.otlp_protocol);
        let otlp_endpoint = match t.otlp_endpoint {
            None => None,
            Some(e) => {
                let v = e.get_ref();
                let scheme = match url::Url::parse(v) {
                    Ok(url) if url.host_str().is_some() => url.scheme().to_owned(),
                    _ => String::new(),
                };
                if scheme != "http" && scheme != "https" {
                    return self.error(
                        Some(e.span()),
                        format!(
                            "telemetry.otlp_endpoint: `{v}` must be an http:// or https:// URL"
                        ),
                    );
                }
                if scheme == "https" && otlp_protocol == OtlpProtocol::Grpc {
                    return self.error(
                        Some(e.span()),
                        format!(
                            "telemetry.otlp_endpoint: `{v}`: this build exports OTLP/gRPC over plain http:// only; \
                             use otlp_protocol = \"http/protobuf\" for https:// or a local collector"
                        ),
                    );
                }
                Some(v.clone())
            }
        };
        let sampling_ratio = match t.sampling_ratio {
            None => defaults.sampling_ratio,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                return self.error(
                    Some(r.span()),
                    format!(
                        "telemetry.sampling_ratio: {} must be between 0.0 and 1.0",
                        r.get_ref()
                    ),
                );
            }
        };
        let service_name = match t.service_name {
            None => defaults.service_name,
            Some(n) if n.get_ref().trim().is_empty() => {
                return self.error(
                    Some(n.span()),
                    "telemetry.service_name: must not be empty".into(),
                );
            }
            Some(n) => n.into_inner(),
        };
        let guest_log_level = match t.guest_log_level {
            None => defaults.guest_log_level,
            Some(l) => match l.get_ref().as_str() {
                "trace" => 0,
                "debug" => 1,
                "info" => 2,
                "warn" => 3,
                "error" => 4,
                "off" => i32::MAX,
                other => {
                    return self.error(
                        Some(l.span()),
                        format!(
                            "telemetry.guest_log_level: `{other}` is not one of trace, debug, info, warn, error, off"
                        ),
                    );
                }
            },
        };
        let otlp_metrics_interval = match (t.otlp_metrics, t.otlp_metrics_interval_ms) {
            (Some(true), None) => Some(std::time::Duration::from_secs(10)),
            (Some(true), Some(ms)) if *ms.get_ref() >= 100 => {
                Some(std::time::Duration::from_millis(*ms.get_ref()))
            }
            (_, Some(ms)) if *ms.get_ref() < 100 => {
                return self.error(
                    Some(ms.span()),
                    format!(
                        "telemetry.otlp_metrics_interval_ms: {} is below the minimum of 100",
                        ms.get_ref()
                    ),
                );
            }
            (None | Some(false), Some(ms)) => {
                return self.error(
                    Some(ms.span()),
                    "telemetry.otlp_metrics_interval_ms: set otlp_metrics = true to export metrics over OTLP".into(),
                );
            }
            _ => None,
        };
        if otlp_metrics_interval.is_some() && otlp_endpoint.is_none() {
            return self.error(
                None,
                "telemetry.otlp_metrics: needs telemetry.otlp_endpoint".into(),
            );
        }
        Ok(TelemetrySettings {
            otlp_metrics_interval,
            otlp_endpoint,
            otlp_protocol,
            sampling_ratio,
            service_name,
            guest_log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::assert_all_refused;

    #[test]
    fn telemetry_errors_name_key_and_line() {
        assert_all_refused(&[
            (
                "[telemetry]\notlp_endpoint = \"collector:4317\"\n",
                Some(2),
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL",
            ),
            (
                "[telemetry]\notlp_endpoint = \"https://collector:4317\"\n",
                Some(2),
                "telemetry.otlp_endpoint",
                "OTLP/gRPC over plain http:// only",
            ),
            (
                "[telemetry]\nsampling_ratio = 1.5\n",
                Some(2),
                "telemetry.sampling_ratio",
                "1.5 must be between 0.0 and 1.0",
            ),
            (
                "[telemetry]\nservice_name = \" \"\n",
                Some(2),
                "telemetry.service_name",
                "must not be empty",
            ),
            (
                "[telemetry]\nguest_log_level = \"loud\"\n",
                Some(2),
                "telemetry.guest_log_level",
                "`loud` is not one of trace, debug, info, warn, error, off",
            ),
            (
                "[telemetry]\notlp_endpoint = \"http://c:4317\"\notlp_metrics = true\notlp_metrics_interval_ms = 99\n",
                Some(4),
                "telemetry.otlp_metrics_interval_ms",
                "99 is below the minimum of 100",
            ),
            (
                "[telemetry]\notlp_endpoint = \"http://c:4317\"\notlp_metrics_interval_ms = 1000\n",
                Some(3),
                "telemetry.otlp_metrics_interval_ms",
                "set otlp_metrics = true",
            ),
            // Two keys are at fault together, so no single line is named.
            (
                "[telemetry]\notlp_metrics = true\n",
                None,
                "telemetry.otlp_metrics",
                "needs telemetry.otlp_endpoint",
            ),
        ]);
    }
}
