//! Resolves a policy's `abi` and what a proxy-wasm filter is configured with:
//! `plugin_config` and `[policy.proxy_wasm.clusters]` (DESIGN §5, round 2).
//! Some path under each cluster's base URL must be within `egress.allow`.

use std::collections::BTreeMap;

use serde_spanned::Spanned;

use super::Resolver;
use crate::config::raw::RawProxyWasm;
use crate::config::{Abi, ConfigError, EgressRule, EgressSettings, ProxyWasmSettings};

impl Resolver<'_> {
    pub(super) fn abi(
        &self,
        key: &dyn Fn(&str) -> String,
        abi: &Option<Spanned<String>>,
        plugin_config: &Option<Spanned<String>>,
        proxy_wasm: Option<Spanned<RawProxyWasm>>,
        egress: &EgressSettings,
    ) -> Result<Abi, ConfigError> {
        let proxy = match abi.as_ref().map(|a| (a.get_ref().as_str(), a.span())) {
            None | Some(("sandgate-v1", _)) => false,
            Some(("proxy-wasm", _)) => true,
            Some((other, span)) => {
                return self.error(
                    Some(span),
                    format!(
                        "{}: unknown ABI `{other}`; use \"sandgate-v1\" (the default) or \"proxy-wasm\"",
                        key("abi")
                    ),
                );
            }
        };
        if !proxy {
            if let Some(given) = plugin_config {
                return self.error(
                    Some(given.span()),
                    format!(
                        "{}: only a proxy-wasm filter reads it; set abi = \"proxy-wasm\" or remove it",
                        key("plugin_config")
                    ),
                );
            }
            if let Some(given) = &proxy_wasm {
                return self.error(
                    Some(given.span()),
                    format!(
                        "{}: only a proxy-wasm filter dispatches HTTP calls; set abi = \"proxy-wasm\" or remove it",
                        key("proxy_wasm")
                    ),
                );
            }
            return Ok(Abi::SandgateV1);
        }
        let mut clusters = BTreeMap::new();
        let raw_clusters = proxy_wasm
            .map(|p| p.into_inner().clusters)
            .unwrap_or_default();
        for (name, base) in raw_clusters {
            let ckey = key(&format!("proxy_wasm.clusters.{name}"));
            let span = Some(base.span());
            let text = base.get_ref().trim_end_matches('/');
            if name.is_empty() {
                return self.error(span, format!("{ckey}: a cluster needs a name"));
            }
            let rule = EgressRule::parse(text)
                .or_else(|m| self.error(span.clone(), format!("{ckey}: {m}")))?;
            // Some path under the cluster must be allowed; each call is still
            // checked against egress.allow by the bridge.
            let reachable = egress
                .allow
                .iter()
                .any(|allowed| allowed.covers(&rule) || rule.covers(allowed));
            if !reachable {
                return self.error(
                    span,
                    format!(
                        "{ckey}: `{text}` no path under it is within egress.allow, so every call to this cluster would be refused; add it to [policy.egress] allow"
                    ),
                );
            }
            clusters.insert(name, text.to_owned());
        }
        Ok(Abi::ProxyWasm(ProxyWasmSettings {
            plugin_config: plugin_config
                .as_ref()
                .map(|c| c.get_ref().as_str())
                .unwrap_or_default()
                .into(),
            clusters: clusters.into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Abi;
    use crate::config::resolve::testing::{POLICY, assert_all_refused};

    #[test]
    fn proxy_wasm_keys_resolve_with_clusters_inside_egress() {
        let toml = format!(
            "{POLICY}abi = \"proxy-wasm\"\nplugin_config = '{{\"k\": 1}}'\n[policy.egress]\nallow = [\"http://127.0.0.1:8080/auth\"]\n[policy.proxy_wasm.clusters]\nauthsvc = \"http://127.0.0.1:8080/auth/\"\n"
        );
        let config = crate::config::parse(&toml, std::path::Path::new("sandgate.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let Abi::ProxyWasm(settings) = &config.policies[0].abi else {
            panic!("not proxy-wasm: {:?}", config.policies[0].abi);
        };
        assert_eq!(&*settings.plugin_config, "{\"k\": 1}");
        assert_eq!(settings.clusters["authsvc"], "http://127.0.0.1:8080/auth");
        let plain = crate::config::parse(POLICY, std::path::Path::new("sandgate.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.policies[0].abi, Abi::SandgateV1);
    }

    #[test]
    fn bad_abi_and_proxy_wasm_keys_are_refused_with_their_key_and_line() {
        let unknown = format!("{POLICY}abi = \"wasi-http\"\n");
        let config_without = format!("{POLICY}plugin_config = \"x\"\n");
        let clusters_without =
            format!("{POLICY}[policy.proxy_wasm.clusters]\na = \"http://127.0.0.1:1\"\n");
        let outside = format!(
            "{POLICY}abi = \"proxy-wasm\"\n[policy.egress]\nallow = [\"http://127.0.0.1:8080/auth\"]\n[policy.proxy_wasm.clusters]\nauthsvc = \"http://127.0.0.1:8080/admin\"\n"
        );
        let no_egress = format!(
            "{POLICY}abi = \"proxy-wasm\"\n[policy.proxy_wasm.clusters]\nauthsvc = \"http://127.0.0.1:8080\"\n"
        );
        let not_url = format!(
            "{POLICY}abi = \"proxy-wasm\"\n[policy.egress]\nallow = [\"http://127.0.0.1:8080\"]\n[policy.proxy_wasm.clusters]\nauthsvc = \"ftp://127.0.0.1:8080\"\n"
        );
        let unknown_key =
            format!("{POLICY}abi = \"proxy-wasm\"\n[policy.proxy_wasm]\ncluster = {{}}\n");
        assert_all_refused(&[
            (
                &unknown,
                Some(4),
                "policy[0].abi (policy `a`)",
                "unknown ABI `wasi-http`",
            ),
            (
                &config_without,
                Some(4),
                "policy[0].plugin_config (policy `a`)",
                "set abi = \"proxy-wasm\"",
            ),
            (
                &clusters_without,
                Some(4),
                "policy[0].proxy_wasm (policy `a`)",
                "set abi = \"proxy-wasm\"",
            ),
            (
                &outside,
                Some(8),
                "policy[0].proxy_wasm.clusters.authsvc (policy `a`)",
                "no path under it is within egress.allow",
            ),
            (
                &no_egress,
                Some(6),
                "policy[0].proxy_wasm.clusters.authsvc (policy `a`)",
                "no path under it is within egress.allow",
            ),
            (
                &not_url,
                Some(8),
                "policy[0].proxy_wasm.clusters.authsvc (policy `a`)",
                "http:// or https://",
            ),
        ]);
        let message = crate::config::parse(&unknown_key, std::path::Path::new("sandgate.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("unknown field `cluster`"), "{message}");
    }
}
