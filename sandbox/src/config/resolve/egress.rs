//! Resolves `[policy.egress]`: allowlist prefixes, credentials (from the
//! environment or a file, checked to fall within the allowlist) and limits.

use std::time::Duration;

use super::{MAX_TIMEOUT_MS, Resolver, SpannedU32};
use crate::config::raw::RawEgress;
use crate::config::{ConfigError, Credential, EgressRule, EgressSettings};

impl Resolver<'_> {
    pub(super) fn egress(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: Option<RawEgress>,
    ) -> Result<EgressSettings, ConfigError> {
        let mut egress = EgressSettings::default();
        let Some(raw) = raw else {
            return Ok(egress);
        };
        for prefix in &raw.allow {
            let rule = EgressRule::parse(prefix.get_ref()).or_else(|m| {
                self.error(Some(prefix.span()), format!("{}: {m}", key("egress.allow")))
            })?;
            egress.allow.push(rule);
        }
        for c in &raw.credentials {
            let span = Some(c.span());
            let c = c.get_ref();
            let prefix = EgressRule::parse(&c.prefix).or_else(|m| {
                self.error(
                    span.clone(),
                    format!("{}: {m}", key("egress.credentials.prefix")),
                )
            })?;
            if !egress.allow.iter().any(|rule| rule.covers(&prefix)) {
                return self.error(
                    span,
                    format!(
                        "{}: `{}` is not within egress.allow, so this credential would never be sent",
                        key("egress.credentials.prefix"),
                        c.prefix
                    ),
                );
            }
            let header = c.header.to_ascii_lowercase();
            if header.is_empty()
                || !header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            {
                return self.error(
                    span,
                    format!(
                        "{}: `{}` is not a header name",
                        key("egress.credentials.header"),
                        c.header
                    ),
                );
            }
            let (value, source) = match (&c.value_env, &c.value_file) {
                (Some(var), None) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => (v, format!("env {var}")),
                    _ => {
                        return self.error(
                            span,
                            format!(
                                "{}: environment variable `{var}` is not set",
                                key("egress.credentials.value_env")
                            ),
                        );
                    }
                },
                (None, Some(file)) => {
                    let path = self.relative(file);
                    match std::fs::read_to_string(&path) {
                        Ok(v) if !v.trim_end_matches(['\r', '\n']).is_empty() => (
                            v.trim_end_matches(['\r', '\n']).to_owned(),
                            format!("file {}", path.display()),
                        ),
                        Ok(_) => {
                            return self.error(
                                span,
                                format!(
                                    "{}: {} is empty",
                                    key("egress.credentials.value_file"),
                                    path.display()
                                ),
                            );
                        }
                        Err(e) => {
                            return self.error(
                                span,
                                format!(
                                    "{}: {}: {e}",
                                    key("egress.credentials.value_file"),
                                    path.display()
                                ),
                            );
                        }
                    }
                }
                _ => {
                    return self.error(
                        span,
                        format!(
                            "{}: give exactly one of `value_env` and `value_file`",
                            key("egress.credentials")
                        ),
                    );
                }
            };
            if http_value_invalid(&value) {
                return self.error(
                    span,
                    format!(
                        "{}: the value ({source}) is not a valid header value",
                        key("egress.credentials")
                    ),
                );
            }
            egress.credentials.push(Credential {
                prefix,
                header,
                value,
                source,
            });
        }
        egress.allow_redirects = raw.allow_redirects.unwrap_or(false);
        if let Some(v) = &raw.cache_ttl_ms {
            egress.cache_ttl = Some(Duration::from_millis(self.ranged(
                &key("egress.cache_ttl_ms"),
                v,
                1,
                86_400_000,
            )?));
        }
        if let Some(v) = &raw.timeout_ms {
            egress.timeout = Duration::from_millis(self.ranged(
                &key("egress.timeout_ms"),
                v,
                1,
                MAX_TIMEOUT_MS,
            )?);
        }
        if let Some(v) = &raw.max_response_bytes {
            egress.max_response_bytes =
                self.ranged(&key("egress.max_response_bytes"), v, 1, 1 << 30)?;
        }
        if let Some(v) = &raw.max_calls {
            egress.max_calls = self.ranged(&key("egress.max_calls"), &v.map_u64(), 0, 1000)? as u32;
        }
        Ok(egress)
    }
}

fn http_value_invalid(value: &str) -> bool {
    value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}
