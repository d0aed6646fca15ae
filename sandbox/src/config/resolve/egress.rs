//! Resolves `[policy.egress]`: allowlist prefixes, credentials (from the
//! environment or a file, checked to fall within the allowlist) and limits.

use std::time::Duration;

use super::{MAX_TIMEOUT_MS, Resolver, SpannedU32, is_header_name};
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
            if !is_header_name(&header) {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{POLICY, Scratch, assert_all_refused, assert_refused};

    fn egress(body: &str) -> String {
        format!("{POLICY}[policy.egress]\n{body}")
    }

    /// An egress section allowing `http://h/api` with one credential whose
    /// fields are `fields`, on line 6.
    fn credential(fields: &str) -> String {
        egress(&format!(
            "allow = [\"http://h/api\"]\ncredentials = [{{ {fields} }}]\n"
        ))
    }

    #[test]
    fn egress_errors_name_key_and_line() {
        assert_all_refused(&[
            (
                &egress("allow = [\"http://h/\", \"ftp://h/\"]\n"),
                Some(5),
                "policy[0].egress.allow (policy `a`)",
                "`ftp://h/` must be an http:// or https:// URL prefix",
            ),
            (
                &credential("prefix = \"nope\", header = \"x\", value_env = \"HOME\""),
                Some(6),
                "policy[0].egress.credentials.prefix (policy `a`)",
                "`nope` is not a URL",
            ),
            (
                &credential("prefix = \"http://h/other\", header = \"x\", value_env = \"HOME\""),
                Some(6),
                "policy[0].egress.credentials.prefix (policy `a`)",
                "`http://h/other` is not within egress.allow",
            ),
            (
                &credential("prefix = \"http://h/api\", header = \"x y\", value_env = \"HOME\""),
                Some(6),
                "policy[0].egress.credentials.header (policy `a`)",
                "`x y` is not a header name",
            ),
            (
                &credential(
                    "prefix = \"http://h/api\", header = \"x\", value_env = \"SANDGATE_CONFIG_TEST_NEVER_SET\"",
                ),
                Some(6),
                "policy[0].egress.credentials.value_env (policy `a`)",
                "environment variable `SANDGATE_CONFIG_TEST_NEVER_SET` is not set",
            ),
            (
                &credential("prefix = \"http://h/api\", header = \"x\""),
                Some(6),
                "policy[0].egress.credentials (policy `a`)",
                "give exactly one of `value_env` and `value_file`",
            ),
            (
                &credential(
                    "prefix = \"http://h/api\", header = \"x\", value_env = \"HOME\", value_file = \"f\"",
                ),
                Some(6),
                "policy[0].egress.credentials (policy `a`)",
                "give exactly one of `value_env` and `value_file`",
            ),
            (
                &egress("cache_ttl_ms = 0\n"),
                Some(5),
                "policy[0].egress.cache_ttl_ms (policy `a`)",
                "allowed 1..=86400000",
            ),
            (
                &egress("timeout_ms = 60001\n"),
                Some(5),
                "policy[0].egress.timeout_ms (policy `a`)",
                "allowed 1..=60000",
            ),
            (
                &egress("max_response_bytes = 0\n"),
                Some(5),
                "policy[0].egress.max_response_bytes (policy `a`)",
                "allowed 1..=1073741824",
            ),
            (
                &egress("max_calls = 1001\n"),
                Some(5),
                "policy[0].egress.max_calls (policy `a`)",
                "allowed 0..=1000",
            ),
        ]);
    }

    #[test]
    fn credential_files_that_are_empty_missing_or_invalid_are_refused_at_their_line() {
        let scratch = Scratch::new("credential-file");
        scratch.write("empty", "\n");
        scratch.write("control", "a\u{1}b\n");
        let from_file = |file: &str| {
            credential(&format!(
                "prefix = \"http://h/api\", header = \"x\", value_file = \"{file}\""
            ))
        };
        let key = "policy[0].egress.credentials.value_file (policy `a`)";
        let path = |name: &str| scratch.0.join(name).display().to_string();
        let config = scratch.config();
        assert_refused(
            &config,
            &from_file("empty"),
            Some(6),
            key,
            &format!("{} is empty", path("empty")),
        );
        let says = format!("{}: No such file", path("missing"));
        assert_refused(&config, &from_file("missing"), Some(6), key, &says);
        let says = format!(
            "the value (file {}) is not a valid header value",
            path("control")
        );
        let key = "policy[0].egress.credentials (policy `a`)";
        assert_refused(&config, &from_file("control"), Some(6), key, &says);
    }
}
