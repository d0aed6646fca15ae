//! What a policy may send through the egress bridge: `[policy.egress]`
//! resolved (`EgressSettings`, `Credential`) and the allowlist prefix
//! `EgressRule` with its URL matcher. Built by `resolve`; `bridge` checks
//! every request and redirect hop with `EgressRule::matches`.

use std::fmt;
use std::time::Duration;

use url::{Host, Url};

use super::defaults;

/// `[policy.egress]`: where a guest may send HTTP requests through the bridge.
#[derive(Clone, Debug)]
pub struct EgressSettings {
    pub allow: Vec<EgressRule>,
    pub timeout: Duration,
    pub max_response_bytes: u64,
    pub max_calls: u32,
    /// Follow redirects (each hop checked against `allow`); off by default.
    pub allow_redirects: bool,
    /// Cache responses this long (bounded by the response's `max-age`).
    pub cache_ttl: Option<Duration>,
    pub credentials: Vec<Credential>,
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            allow: Vec::new(),
            timeout: Duration::from_millis(defaults::EGRESS_TIMEOUT_MS),
            max_response_bytes: defaults::EGRESS_MAX_RESPONSE_BYTES,
            max_calls: defaults::EGRESS_MAX_CALLS,
            allow_redirects: false,
            cache_ttl: None,
            credentials: Vec::new(),
        }
    }
}

/// A header the bridge adds to requests matching `prefix`; the guest never sees it.
#[derive(Clone)]
pub struct Credential {
    pub prefix: EgressRule,
    /// Lower-case header name.
    pub header: String,
    pub value: String,
    /// Where the value came from (`env NAME` or `file PATH`), for `check`.
    pub source: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("prefix", &self.prefix)
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

/// One `egress.allow` prefix, parsed: a URL matches when scheme, host and
/// port are equal and the prefix's path segments are a prefix of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRule {
    text: String,
    scheme: String,
    host: Host<String>,
    port: u16,
    segments: Vec<String>,
}

impl EgressRule {
    /// Parses an allowlist prefix such as `http://127.0.0.1:8080/introspect`.
    pub fn parse(text: &str) -> Result<EgressRule, String> {
        let url = Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!(
                "`{text}` must be an http:// or https:// URL prefix"
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("`{text}` must not carry user information"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("`{text}` must not have a query or fragment"));
        }
        let (Some(host), Some(port)) = (url.host(), url.port_or_known_default()) else {
            return Err(format!("`{text}` has no host"));
        };
        Ok(EgressRule {
            text: text.to_owned(),
            scheme: url.scheme().to_owned(),
            host: host.to_owned(),
            port,
            segments: segments(&url),
        })
    }

    /// Whether `url` falls under this prefix.
    pub fn matches(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && url.username().is_empty()
            && url.password().is_none()
            && url.host().is_some_and(|host| self.is_host(&host))
            && url.port_or_known_default() == Some(self.port)
            && self.is_path_prefix_of(url)
    }

    fn is_host(&self, host: &Host<&str>) -> bool {
        match (host, &self.host) {
            (Host::Domain(a), Host::Domain(b)) => a == b,
            (Host::Ipv4(a), Host::Ipv4(b)) => a == b,
            (Host::Ipv6(a), Host::Ipv6(b)) => a == b,
            _ => false,
        }
    }

    /// Whether this prefix's segments begin `url`'s path. Trailing empty
    /// segments (`/a/`) need no trimming here: the prefix's own last segment
    /// is never empty, so it cannot end inside them.
    ///
    /// Under a path prefix, a URL a server could read as another path is
    /// refused: an encoded `/`, `\` or NUL, or a `..;x`-style dot segment
    /// (servers that drop `;` parameters walk it up), so `/api/..%2fadmin`
    /// does not pass for `/api`.
    fn is_path_prefix_of(&self, url: &Url) -> bool {
        let Some(mut path) = url.path_segments() else {
            return self.segments.is_empty();
        };
        if !self.segments.is_empty() && path.clone().any(is_ambiguous_segment) {
            return false;
        }
        self.segments
            .iter()
            .all(|want| path.next() == Some(want.as_str()))
    }

    /// Whether every URL under `other` is also under this prefix.
    pub fn covers(&self, other: &EgressRule) -> bool {
        self.scheme == other.scheme
            && self.host == other.host
            && self.port == other.port
            && other.segments.starts_with(&self.segments)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Whether a (serialised) path segment may name a different path once a
/// server decodes it: see `EgressRule::is_path_prefix_of`.
fn is_ambiguous_segment(segment: &str) -> bool {
    let lower = segment.to_ascii_lowercase();
    if ["%2f", "%5c", "%00"].iter().any(|e| lower.contains(e)) {
        return true;
    }
    let bare = lower
        .split(';')
        .next()
        .unwrap_or_default()
        .replace("%2e", ".");
    lower.contains(';') && (bare == "." || bare == "..")
}

fn segments(url: &Url) -> Vec<String> {
    let mut segs: Vec<String> = url
        .path_segments()
        .map(|s| s.map(str::to_owned).collect())
        .unwrap_or_default();
    while segs.last().is_some_and(String::is_empty) {
        segs.pop();
    }
    segs
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn prefixes_match_whole_segments_of_normalised_urls() {
        let rule =
            EgressRule::parse("http://127.0.0.1:8080/introspect").unwrap_or_else(|e| panic!("{e}"));
        assert!(rule.matches(&url("http://127.0.0.1:8080/introspect")));
        assert!(rule.matches(&url("http://127.0.0.1:8080/introspect/x?y=1")));
        assert!(!rule.matches(&url("http://127.0.0.1:8080/introspection")));
        assert!(!rule.matches(&url("http://127.0.0.1:8081/introspect")));
        assert!(!rule.matches(&url("https://127.0.0.1:8080/introspect")));
        assert!(!rule.matches(&url("http://127.0.0.1:8080/introspect/../admin")));
        assert!(!rule.matches(&url("http://127.0.0.1:8080/introspect/%2e%2e/admin")));
        assert!(!rule.matches(&url("http://127.0.0.1:8080/introspect%2F..%2Fadmin")));
        assert!(!rule.matches(&url("http://127.0.0.1:8080@evil.example/introspect")));
        assert!(!rule.matches(&url("http://user@127.0.0.1:8080/introspect")));
        assert!(!rule.matches(&url("http://[::ffff:127.0.0.1]:8080/introspect")));
        assert!(!rule.matches(&url("http://localhost:8080/introspect")));
        // Other spellings of the same IPv4 address normalise to it.
        assert!(rule.matches(&url("http://2130706433:8080/introspect")));
        assert!(rule.matches(&url("http://0x7f.0.0.1:8080/introspect")));
        // A trailing slash names the same directory; the root prefix covers the host.
        let dir = EgressRule::parse("http://auth.example/api/").unwrap_or_else(|e| panic!("{e}"));
        assert!(dir.matches(&url("http://auth.example/api")));
        assert!(dir.matches(&url("http://auth.example/api/v1/")));
        assert!(!dir.matches(&url("http://auth.example/apiv1")));
        assert!(!dir.matches(&url("http://auth.example.evil/api")));
        let root = EgressRule::parse("http://auth.example").unwrap_or_else(|e| panic!("{e}"));
        assert!(root.matches(&url("http://auth.example/anything/else")));
        assert!(!root.matches(&url("http://other.example/")));
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(EgressRule::parse("ftp://h/x").is_err());
        assert!(EgressRule::parse("http://u:p@h/x").is_err());
        assert!(EgressRule::parse("http://h/x?q=1").is_err());
        assert!(EgressRule::parse("not a url").is_err());
        let a = EgressRule::parse("http://h/a").unwrap_or_else(|e| panic!("{e}"));
        let ab = EgressRule::parse("http://h/a/b/").unwrap_or_else(|e| panic!("{e}"));
        assert!(a.covers(&ab) && !ab.covers(&a));
    }
}
