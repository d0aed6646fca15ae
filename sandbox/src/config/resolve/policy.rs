//! Resolves one `[[policy]]`: its name, versions and module sources, routing,
//! limits and decision cache; WASI grants and egress are resolved by the
//! sibling modules `wasi` and `egress`.
//!
//! Just over 600 lines with the unit tests of every error path of its keys
//! (a third of the file).

use std::time::Duration;

use serde_spanned::Spanned;

use super::{MAX_TIMEOUT_MS, Resolver, SpannedU32, is_header_name};
use crate::config::raw::{RawPolicy, RawVersions};
use crate::config::{
    ConfigError, DecisionCacheSettings, Digest, EgressSettings, EngineSettings, ModuleSource,
    PolicySpec, Routing, StickyKey, VersionSpec, defaults,
};

impl Resolver<'_> {
    pub(super) fn policy(
        &self,
        index: usize,
        raw: RawPolicy,
        engine: &EngineSettings,
    ) -> Result<PolicySpec, ConfigError> {
        let name = raw.name.get_ref().clone();
        self.check_name(&format!("policy[{index}].name"), &name, raw.name.span())?;
        let key = |k: &str| format!("policy[{index}].{k} (policy `{name}`)");
        let language = self.language(&key, &raw)?;
        let versions = match &language {
            Some(language) => self.language_version(&key, &raw, language)?,
            None => self.versions(&key, &raw, engine)?,
        };
        let routing = self.routing(&key, &raw)?;
        let timeout_ms = match &raw.timeout_ms {
            Some(v) => self.ranged(&key("timeout_ms"), v, 1, MAX_TIMEOUT_MS)?,
            None => defaults::TIMEOUT_MS,
        };
        let max_mb = engine.max_memory_bytes >> 20;
        let memory_limit_mb = match &raw.memory_limit_mb {
            Some(v) => self.ranged(&key("memory_limit_mb"), v, 1, max_mb)?,
            None => defaults::MEMORY_LIMIT_MB.min(max_mb),
        };
        let max_input_bytes = match &raw.max_input_bytes {
            Some(v) => self.ranged(&key("max_input_bytes"), v, 2, 1 << 30)?,
            None => defaults::MAX_INPUT_BYTES,
        };
        let max_output_bytes = match &raw.max_output_bytes {
            Some(v) => self.ranged(&key("max_output_bytes"), v, 16, 1 << 30)?,
            None => defaults::MAX_OUTPUT_BYTES,
        };
        let max_in_flight = match &raw.max_in_flight {
            Some(v) => self.ranged(&key("max_in_flight"), &v.map_u64(), 1, 100_000)? as u32,
            None => defaults::MAX_IN_FLIGHT,
        };
        let mut grants = self.grants(&key, raw.wasi)?;
        if let Some(language) = &language {
            self.mount_files(language, &mut grants);
        }
        let egress = self.egress(&key, raw.egress)?;
        let abi = self.abi(&key, &raw.abi, &raw.plugin_config, raw.proxy_wasm, &egress)?;
        let decision_cache = self.decision_cache(
            &key,
            &raw.decision_cache_ttl_ms,
            &raw.decision_cache_max_entries,
            raw.decision_cache_force,
            &egress,
            raw.name.span(),
        )?;
        let first = versions[0].clone();
        Ok(PolicySpec {
            name,
            version: first.name,
            module: first.module,
            sha256: first.sha256,
            versions,
            routing,
            decision_cache,
            timeout: Duration::from_millis(timeout_ms),
            memory_limit_bytes: memory_limit_mb << 20,
            max_input_bytes,
            max_output_bytes,
            max_in_flight,
            fail_mode: raw.fail_mode.unwrap_or_default(),
            grants,
            egress,
            abi,
            language,
        })
    }

    /// The versions of a policy: its `[[policy.version]]` tables, or the one
    /// its `version`/`module`/`sha256` keys describe.
    pub(super) fn versions(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: &RawPolicy,
        engine: &EngineSettings,
    ) -> Result<Vec<VersionSpec>, ConfigError> {
        let tables = match raw.version.as_ref().map(|v| (v.span(), v.get_ref())) {
            Some((span, RawVersions::Tables(tables))) => {
                for (given, k) in [
                    (raw.module.as_ref().map(Spanned::span), "module"),
                    (raw.sha256.as_ref().map(Spanned::span), "sha256"),
                ] {
                    if let Some(given) = given {
                        return self.error(
                            Some(given),
                            format!(
                                "{}: the policy defines [[policy.version]] tables; give each version its own `{k}` instead",
                                key(k)
                            ),
                        );
                    }
                }
                if tables.is_empty() {
                    return self.error(
                        Some(span),
                        format!("{}: define at least one version", key("version")),
                    );
                }
                tables
            }
            other => {
                let name = match other {
                    Some((span, RawVersions::Name(n))) => {
                        self.check_name(&key("version"), n, span)?;
                        n.clone()
                    }
                    _ => defaults::VERSION.to_owned(),
                };
                let Some(module) = &raw.module else {
                    return self.error(
                        Some(raw.name.span()),
                        format!(
                            "{}: missing; give the policy a `module` or [[policy.version]] tables",
                            key("module")
                        ),
                    );
                };
                let sha256 = self.digest(&key("sha256"), raw.sha256.as_ref())?;
                let module = self.module_source(&key("module"), module, sha256, engine)?;
                return Ok(vec![VersionSpec {
                    name,
                    module,
                    sha256,
                    weight: defaults::VERSION_WEIGHT,
                }]);
            }
        };
        let mut versions: Vec<VersionSpec> = Vec::with_capacity(tables.len());
        for (i, table) in tables.iter().enumerate() {
            let table = table.get_ref();
            let vkey = |k: &str| key(&format!("version[{i}].{k}"));
            let name = table.name.get_ref();
            self.check_name(&vkey("name"), name, table.name.span())?;
            if versions.iter().any(|v| &v.name == name) {
                return self.error(
                    Some(table.name.span()),
                    format!("{}: duplicate version name `{name}`", vkey("name")),
                );
            }
            let sha256 = self.digest(&vkey("sha256"), table.sha256.as_ref())?;
            let module = self.module_source(&vkey("module"), &table.module, sha256, engine)?;
            let weight = match &table.weight {
                Some(w) => self.ranged(&vkey("weight"), w, 0, 1_000_000)? as u32,
                None => defaults::VERSION_WEIGHT,
            };
            versions.push(VersionSpec {
                name: name.clone(),
                module,
                sha256,
                weight,
            });
        }
        if versions.iter().all(|v| v.weight == 0) {
            let span = raw.version.as_ref().map(Spanned::span);
            return self.error(
                span,
                format!(
                    "{}: every version has weight 0, so a request without the version header could not be answered; give at least one a weight",
                    key("version")
                ),
            );
        }
        Ok(versions)
    }

    /// A policy or version name: it appears in metrics, spans and the
    /// version header, so it is kept to a plain token.
    pub(super) fn check_name(
        &self,
        key: &str,
        name: &str,
        span: std::ops::Range<usize>,
    ) -> Result<(), ConfigError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return self.error(
                Some(span),
                format!(
                    "{key}: `{name}` must be non-empty and use only letters, digits, '-', '_' and '.'"
                ),
            );
        }
        Ok(())
    }

    pub(super) fn digest(
        &self,
        key: &str,
        raw: Option<&Spanned<String>>,
    ) -> Result<Option<Digest>, ConfigError> {
        match raw {
            Some(s) => Digest::parse(s.get_ref())
                .map(Some)
                .or_else(|m| self.error(Some(s.span()), format!("{key}: {m}"))),
            None => Ok(None),
        }
    }

    /// A module path (relative to the config file) or a pinned URL:
    /// `https://`, or `http://` to a loopback host when
    /// `engine.allow_insecure_http` is set.
    pub(super) fn module_source(
        &self,
        key: &str,
        raw: &Spanned<String>,
        sha256: Option<Digest>,
        engine: &EngineSettings,
    ) -> Result<ModuleSource, ConfigError> {
        let text = raw.get_ref();
        let span = Some(raw.span());
        let insecure = text.starts_with("http://");
        if !(insecure || text.starts_with("https://")) {
            if text.is_empty() {
                return self.error(span, format!("{key}: must not be empty"));
            }
            return Ok(ModuleSource::File(self.relative(text)));
        }
        if sha256.is_none() {
            return self.error(
                span,
                format!("{key}: a module fetched from a URL must be pinned with `sha256`"),
            );
        }
        let url = match url::Url::parse(text) {
            Ok(url) if url.host().is_some() => url,
            _ => return self.error(span, format!("{key}: `{text}` is not a valid URL")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return self.error(
                span,
                format!("{key}: `{text}` carries user information; module URLs must not"),
            );
        }
        if insecure {
            if !is_loopback(&url) {
                return self.error(
                    span,
                    format!(
                        "{key}: `{text}` is plain http:// to a host that is not loopback; modules are fetched over https://"
                    ),
                );
            }
            if !engine.allow_insecure_http {
                return self.error(
                    span,
                    format!(
                        "{key}: `{text}` is plain http://; set `allow_insecure_http = true` in [engine] to fetch modules from a loopback host without TLS"
                    ),
                );
            }
        }
        Ok(ModuleSource::Url(text.clone()))
    }

    pub(super) fn routing(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: &RawPolicy,
    ) -> Result<Routing, ConfigError> {
        let sticky =
            match &raw.sticky {
                None => None,
                Some(text) => Some(parse_sticky(text.get_ref()).or_else(|m| {
                    self.error(Some(text.span()), format!("{}: {m}", key("sticky")))
                })?),
            };
        Ok(Routing {
            version_header: raw.version_header.unwrap_or(true),
            sticky,
        })
    }

    pub(super) fn decision_cache(
        &self,
        key: &dyn Fn(&str) -> String,
        ttl: &Option<Spanned<u64>>,
        max_entries: &Option<Spanned<u64>>,
        force: Option<bool>,
        egress: &EgressSettings,
        policy_span: std::ops::Range<usize>,
    ) -> Result<Option<DecisionCacheSettings>, ConfigError> {
        let Some(ttl) = ttl else {
            if let Some(m) = max_entries {
                return self.error(
                    Some(m.span()),
                    format!(
                        "{}: has no effect without decision_cache_ttl_ms",
                        key("decision_cache_max_entries")
                    ),
                );
            }
            if force.is_some() {
                return self.error(
                    Some(policy_span),
                    format!(
                        "{}: has no effect without decision_cache_ttl_ms",
                        key("decision_cache_force")
                    ),
                );
            }
            return Ok(None);
        };
        let ttl_ms = self.ranged(&key("decision_cache_ttl_ms"), ttl, 1, 86_400_000)?;
        if !egress.allow.is_empty() && force != Some(true) {
            return self.error(
                Some(ttl.span()),
                format!(
                    "{}: the policy calls external services ([policy.egress]), whose answers can change while a cached decision is reused; set decision_cache_force = true to cache anyway",
                    key("decision_cache_ttl_ms")
                ),
            );
        }
        let max_entries = match max_entries {
            Some(m) => self.ranged(&key("decision_cache_max_entries"), m, 1, 10_000_000)?,
            None => defaults::DECISION_CACHE_MAX_ENTRIES,
        };
        Ok(Some(DecisionCacheSettings {
            ttl: Duration::from_millis(ttl_ms),
            max_entries,
        }))
    }
}

/// `header:NAME` or `input:a.b.c`.
fn parse_sticky(text: &str) -> Result<StickyKey, String> {
    if let Some(header) = text.strip_prefix("header:") {
        let header = header.to_ascii_lowercase();
        if !is_header_name(&header) {
            return Err(format!("`{text}`: `{header}` is not a header name"));
        }
        return Ok(StickyKey::Header(header));
    }
    if let Some(path) = text.strip_prefix("input:") {
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!(
                "`{text}`: the input path must be field names separated by '.', like input:subject.id"
            ));
        }
        return Ok(StickyKey::Input(segments));
    }
    Err(format!(
        "`{text}` must be \"header:NAME\" or \"input:FIELD.PATH\""
    ))
}

/// Whether a URL's host is a loopback address (`localhost` included).
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{POLICY, assert_all_refused};

    const PINNED: &str = "[[policy]]\nname = \"a\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";

    fn policy(extra: &str) -> String {
        format!("{POLICY}{extra}")
    }

    fn pinned(module: &str) -> String {
        format!("{PINNED}module = \"{module}\"\n")
    }

    #[test]
    fn policy_names_versions_and_modules_errors_name_key_and_line() {
        assert_all_refused(&[
            (
                "[[policy]]\nname = \"a b\"\nmodule = \"a.wasm\"\n",
                Some(2),
                "policy[0].name: `a b` must be non-empty",
                "",
            ),
            (
                &policy("[[policy.version]]\nname = \"v1\"\nmodule = \"v1.wasm\"\n"),
                Some(3),
                "policy[0].module (policy `a`)",
                "give each version its own `module`",
            ),
            (
                &format!("{PINNED}[[policy.version]]\nname = \"v1\"\nmodule = \"v1.wasm\"\n"),
                Some(3),
                "policy[0].sha256 (policy `a`)",
                "give each version its own `sha256`",
            ),
            (
                "[[policy]]\nname = \"a\"\nversion = []\n",
                Some(3),
                "policy[0].version (policy `a`)",
                "define at least one version",
            ),
            (
                &policy("version = \"v 1\"\n"),
                Some(4),
                "policy[0].version (policy `a`)",
                "`v 1` must be non-empty and use only",
            ),
            (
                "[[policy]]\nname = \"a\"\n",
                Some(2),
                "policy[0].module (policy `a`)",
                "missing; give the policy a `module` or [[policy.version]] tables",
            ),
            (
                &policy("sha256 = \"abc\"\n"),
                Some(4),
                "policy[0].sha256 (policy `a`)",
                "`abc` is not a sha256 digest (64 hex digits)",
            ),
            (
                "[[policy]]\nname = \"a\"\nmodule = \"\"\n",
                Some(3),
                "policy[0].module (policy `a`)",
                "must not be empty",
            ),
            (
                "[[policy]]\nname = \"a\"\nmodule = \"https://h/a.wasm\"\n",
                Some(3),
                "policy[0].module (policy `a`)",
                "must be pinned with `sha256`",
            ),
            (
                &pinned("https://"),
                Some(4),
                "policy[0].module (policy `a`)",
                "`https://` is not a valid URL",
            ),
            (
                &pinned("https://u:p@h/a.wasm"),
                Some(4),
                "policy[0].module (policy `a`)",
                "carries user information",
            ),
            (
                &pinned("http://h/a.wasm"),
                Some(4),
                "policy[0].module (policy `a`)",
                "plain http:// to a host that is not loopback",
            ),
            (
                &pinned("http://127.0.0.1/a.wasm"),
                Some(4),
                "policy[0].module (policy `a`)",
                "set `allow_insecure_http = true` in [engine]",
            ),
        ]);
    }

    #[test]
    fn version_table_errors_name_key_and_line() {
        let table = |body: &str| format!("[[policy]]\nname = \"a\"\n[[policy.version]]\n{body}");
        assert_all_refused(&[
            (
                &table("name = \"v 1\"\nmodule = \"v.wasm\"\n"),
                Some(4),
                "policy[0].version[0].name (policy `a`)",
                "must be non-empty",
            ),
            (
                &table(
                    "name = \"v1\"\nmodule = \"v.wasm\"\n[[policy.version]]\nname = \"v1\"\nmodule = \"w.wasm\"\n",
                ),
                Some(7),
                "policy[0].version[1].name (policy `a`)",
                "duplicate version name `v1`",
            ),
            (
                &table("name = \"v1\"\nmodule = \"v.wasm\"\nsha256 = \"x\"\n"),
                Some(6),
                "policy[0].version[0].sha256 (policy `a`)",
                "is not a sha256 digest",
            ),
            (
                &table("name = \"v1\"\nmodule = \"v.wasm\"\nweight = 1000001\n"),
                Some(6),
                "policy[0].version[0].weight (policy `a`)",
                "allowed 0..=1000000",
            ),
            (
                &table("name = \"v1\"\nmodule = \"v.wasm\"\nweight = 0\n"),
                Some(3),
                "policy[0].version (policy `a`)",
                "every version has weight 0",
            ),
        ]);
    }

    #[test]
    fn policy_limits_routing_and_cache_errors_name_key_and_line() {
        assert_all_refused(&[
            (
                &policy("timeout_ms = 0\n"),
                Some(4),
                "policy[0].timeout_ms (policy `a`)",
                "allowed 1..=60000",
            ),
            (
                &policy("memory_limit_mb = 257\n"),
                Some(4),
                "policy[0].memory_limit_mb (policy `a`)",
                "allowed 1..=256",
            ),
            (
                &policy("max_input_bytes = 1\n"),
                Some(4),
                "policy[0].max_input_bytes (policy `a`)",
                "allowed 2..=1073741824",
            ),
            (
                &policy("max_output_bytes = 15\n"),
                Some(4),
                "policy[0].max_output_bytes (policy `a`)",
                "allowed 16..=1073741824",
            ),
            (
                &policy("max_in_flight = 0\n"),
                Some(4),
                "policy[0].max_in_flight (policy `a`)",
                "allowed 1..=100000",
            ),
            (
                &policy("sticky = \"header:\"\n"),
                Some(4),
                "policy[0].sticky (policy `a`)",
                "is not a header name",
            ),
            (
                &policy("sticky = \"input:a..b\"\n"),
                Some(4),
                "policy[0].sticky (policy `a`)",
                "field names separated by '.'",
            ),
            (
                &policy("sticky = \"cookie:id\"\n"),
                Some(4),
                "policy[0].sticky (policy `a`)",
                "must be \"header:NAME\" or \"input:FIELD.PATH\"",
            ),
            (
                &policy("decision_cache_max_entries = 10\n"),
                Some(4),
                "policy[0].decision_cache_max_entries (policy `a`)",
                "has no effect without decision_cache_ttl_ms",
            ),
            // A boolean carries no span: the policy's name locates it.
            (
                &policy("decision_cache_force = true\n"),
                Some(2),
                "policy[0].decision_cache_force (policy `a`)",
                "has no effect without decision_cache_ttl_ms",
            ),
            (
                &policy("decision_cache_ttl_ms = 0\n"),
                Some(4),
                "policy[0].decision_cache_ttl_ms (policy `a`)",
                "allowed 1..=86400000",
            ),
            (
                &policy("decision_cache_ttl_ms = 1000\n[policy.egress]\nallow = [\"http://h/\"]\n"),
                Some(4),
                "policy[0].decision_cache_ttl_ms (policy `a`)",
                "set decision_cache_force = true to cache anyway",
            ),
            (
                &policy("decision_cache_ttl_ms = 1000\ndecision_cache_max_entries = 0\n"),
                Some(5),
                "policy[0].decision_cache_max_entries (policy `a`)",
                "allowed 1..=10000000",
            ),
        ]);
    }
}
