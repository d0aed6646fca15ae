//! Forward-auth, shared by the HTTP endpoint (`/v1/authz/{name}`: nginx
//! `auth_request`, Traefik ForwardAuth, Envoy HTTP ext_authz) and the gRPC
//! ext_authz service: the request document of DESIGN §2 a guest sees, and how
//! an answer becomes a status and headers for the proxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use super::{Answer, Outcome};
use crate::config::ForwardAuthHeaders;
use crate::decision::{DEFAULT_DENY_STATUS, Decision};

/// Header carrying the DESIGN §3 error code of a failed or refused decision.
pub(crate) const ERROR_HEADER: &str = "x-sandgate-error";
/// Header carrying the decision id (the audit log's `decision_id`).
pub(crate) const DECISION_ID_HEADER: &str = "x-sandgate-decision-id";

const ORIGINAL_METHOD: &str = "x-original-method";
const ORIGINAL_URI: &str = "x-original-uri";
const REAL_IP: &str = "x-real-ip";
const FORWARDED_METHOD: &str = "x-forwarded-method";
const FORWARDED_URI: &str = "x-forwarded-uri";
const FORWARDED_FOR: &str = "x-forwarded-for";
/// The headers of each convention, which the other one ignores.
const X_ORIGINAL: &[&str] = &[ORIGINAL_METHOD, ORIGINAL_URI, REAL_IP];
const X_FORWARDED: &[&str] = &[FORWARDED_METHOD, FORWARDED_URI, FORWARDED_FOR];

/// What one header convention says about the original request.
struct Claimed {
    method: Option<String>,
    uri: Option<String>,
    address: Option<String>,
}

impl Claimed {
    /// Each field from whichever convention has it; an error naming both
    /// headers when the two conventions say different things.
    fn agree(self, other: Claimed) -> Result<Claimed, String> {
        fn one(
            names: (&str, &str),
            a: Option<String>,
            b: Option<String>,
            same: impl Fn(&str, &str) -> bool,
        ) -> Result<Option<String>, String> {
            match (a, b) {
                (Some(a), Some(b)) if !same(&a, &b) => Err(format!(
                    "{} `{}` and {} `{}` disagree: a client may have set one of them; \
                     set server.forward_auth_headers to the convention of the proxy in front \
                     (\"x-original\" for nginx, \"x-forwarded\" for Traefik and Caddy)",
                    names.0,
                    super::truncated(&a, 128),
                    names.1,
                    super::truncated(&b, 128)
                )),
                (a, b) => Ok(a.or(b)),
            }
        }
        Ok(Claimed {
            method: one(
                ("X-Original-Method", "X-Forwarded-Method"),
                self.method,
                other.method,
                |a, b| a.eq_ignore_ascii_case(b),
            )?,
            uri: one(
                ("X-Original-URI", "X-Forwarded-Uri"),
                self.uri,
                other.uri,
                |a, b| a == b,
            )?,
            address: one(
                ("X-Real-IP", "the last X-Forwarded-For hop"),
                self.address,
                other.address,
                |a, b| match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => a == b,
                },
            )?,
        })
    }
}

/// The original request a proxy asks about: `{"request": {…}}` of DESIGN §2.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ForwardRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub host: String,
    /// Lower-case names; repeated headers joined with ", " (cookies with "; ").
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Source {
    pub address: String,
}

#[derive(Serialize)]
struct Document<'a> {
    request: &'a ForwardRequest,
}

impl ForwardRequest {
    /// The request an HTTP forward-auth call is about. The original method,
    /// URI and client address come from the headers of the proxy convention
    /// `trusted` names (`server.forward_auth_headers`), else from the call
    /// itself (`own_method`, and `own_path`/`own_query`: the path under the
    /// `/v1/authz/{name}` prefix, and the peer):
    /// - nginx: `X-Original-Method`, `X-Original-URI`, `X-Real-IP`;
    /// - Traefik, Caddy: `X-Forwarded-Method`, `X-Forwarded-Uri`, the last
    ///   `X-Forwarded-For` hop (the one the proxy appended).
    ///
    /// A proxy passes every other header of its client through, so under one
    /// convention the other's headers are ignored and not shown to the guest.
    /// With `any`, both are read and a pair that disagrees is refused (the
    /// error says which): a client cannot override what the proxy set.
    /// The host is `X-Forwarded-Host`, else `Host`.
    pub(crate) fn from_http(
        own_method: &str,
        own_path: &str,
        own_query: &str,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
        trusted: ForwardAuthHeaders,
    ) -> Result<ForwardRequest, String> {
        let text = |name: &str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let last_hop = |hops: String| {
            hops.rsplit(',')
                .map(str::trim)
                .find(|h| !h.is_empty())
                .map(str::to_owned)
        };
        let nginx = || Claimed {
            method: text(ORIGINAL_METHOD),
            uri: text(ORIGINAL_URI),
            address: text(REAL_IP),
        };
        let traefik = || Claimed {
            method: text(FORWARDED_METHOD),
            uri: text(FORWARDED_URI),
            address: text(FORWARDED_FOR).and_then(last_hop),
        };
        let (claimed, ignored) = match trusted {
            ForwardAuthHeaders::XOriginal => (nginx(), X_FORWARDED),
            ForwardAuthHeaders::XForwarded => (traefik(), X_ORIGINAL),
            ForwardAuthHeaders::Any => (nginx().agree(traefik())?, &[][..]),
        };
        let (path, query) = match claimed.uri {
            Some(uri) => split_target(&uri),
            None => (own_path.to_owned(), own_query.to_owned()),
        };
        let host = text("x-forwarded-host")
            .or_else(|| text("host"))
            .unwrap_or_default();
        let address = claimed.address.or_else(|| peer.map(|p| p.ip().to_string()));
        let mut headers = collect_headers(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
        for name in ignored {
            headers.remove(*name);
        }
        Ok(ForwardRequest {
            method: claimed
                .method
                .unwrap_or_else(|| own_method.to_owned())
                .to_ascii_uppercase(),
            path,
            query,
            host,
            headers,
            source: address.map(|address| Source { address }),
        })
    }

    /// The caller's input for the guest (the host wraps it in `{"input": …}`).
    pub(crate) fn to_input(&self) -> Vec<u8> {
        // Serialising plain strings and maps cannot fail.
        serde_json::to_vec(&Document { request: self }).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// The guest input of a forward-auth call, as `/v1/authz/{name}` builds it
/// under the `trusted` header convention, or why it is refused as
/// `invalid_input` (public for the fuzz targets).
pub fn forward_auth_input(
    own_method: &str,
    own_path: &str,
    own_query: &str,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    trusted: ForwardAuthHeaders,
) -> Result<Vec<u8>, String> {
    ForwardRequest::from_http(own_method, own_path, own_query, headers, peer, trusted)
        .map(|request| request.to_input())
}

/// Splits a request target (`/a/b?x=1`, or an absolute URI) into path and query.
pub(crate) fn split_target(target: &str) -> (String, String) {
    let target = target.split('#').next().unwrap_or_default();
    let without_authority = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            let rest = target
                .get(..scheme.len())?
                .eq_ignore_ascii_case(scheme)
                .then(|| &target[scheme.len()..])?;
            Some(rest.find(['/', '?']).map_or("/", |i| &rest[i..]))
        })
        .unwrap_or(target);
    let (path, query) = without_authority
        .split_once('?')
        .unwrap_or((without_authority, ""));
    let path = if path.is_empty() { "/" } else { path };
    (path.to_owned(), query.to_owned())
}

/// Lower-cases names, decodes values lossily (invalid UTF-8 never fails a
/// request) and joins repeated headers.
pub(crate) fn collect_headers<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> BTreeMap<String, String> {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in pairs {
        if name.starts_with(':') {
            continue; // HTTP/2 pseudo-headers are given as method, path and host
        }
        let name = name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(value);
        match headers.get_mut(&name) {
            Some(existing) => {
                existing.push_str(if name == "cookie" { "; " } else { ", " });
                existing.push_str(&value);
            }
            None => {
                headers.insert(name, value.into_owned());
            }
        }
    }
    headers
}

/// The status a proxy gets for an answer: 200 on allow; on deny the decision's
/// status (403 default) for an evaluated request, 404 for an unknown policy,
/// 413/400 for a bad request, 503 when the policy cannot evaluate now.
/// A deny never maps to a 1xx/2xx status, which proxies would read as allow.
pub(crate) fn proxy_status(answer: &Answer) -> u16 {
    if answer.decision.allow {
        return 200;
    }
    match answer.outcome {
        Outcome::Evaluated => deny_status(&answer.decision),
        Outcome::NotFound => 404,
        Outcome::TooLarge => 413,
        Outcome::BadRequest => 400,
        Outcome::Loading | Outcome::NotLoaded | Outcome::Overloaded => 503,
    }
}

/// The decision's deny status, kept within 300..=599.
pub(crate) fn deny_status(decision: &Decision) -> u16 {
    match decision.deny_status() {
        status @ 300..=599 => status,
        _ => DEFAULT_DENY_STATUS,
    }
}

/// Headers a guest may not set: they frame the HTTP message or are ours.
fn reserved(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "upgrade"
            | "te"
            | "trailer"
            | "host"
    ) || name.as_str().starts_with("proxy-")
        || name.as_str().starts_with("x-sandgate-")
}

/// The decision's headers that are valid HTTP headers and not reserved, each
/// name once (`X-User` and `x-user` are one header: the first spelling in
/// byte order is kept); the others are skipped with a warning (a guest cannot
/// break the answer nor forge the host's `x-sandgate-*` headers).
pub(crate) fn decision_headers(answer: &Answer) -> Vec<(HeaderName, HeaderValue)> {
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(answer.decision.headers.len());
    for (name, value) in &answer.decision.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value))
                if !reserved(&name) && !out.iter().any(|(seen, _)| *seen == name) =>
            {
                out.push((name, value))
            }
            _ => tracing::warn!(
                policy = %answer.policy,
                decision_id = %answer.decision_id,
                header = %crate::telemetry::log::Escaped(&super::truncated(name, 64)),
                "decision header skipped: not a valid or permitted HTTP header, or a repeated name"
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_uri_headers_win_over_the_call_itself() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-original-uri",
            HeaderValue::from_static("/api/orders/7?a=1"),
        );
        headers.insert("x-original-method", HeaderValue::from_static("delete"));
        headers.insert("x-forwarded-host", HeaderValue::from_static("shop.example"));
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.1, 10.0.0.2"),
        );
        headers.append("cookie", HeaderValue::from_static("a=1"));
        headers.append("cookie", HeaderValue::from_static("b=2"));
        headers.insert(
            "x-bin",
            HeaderValue::from_bytes(b"caf\xe9").expect("opaque bytes are a value"),
        );
        let request =
            ForwardRequest::from_http("GET", "/", "", &headers, None, ForwardAuthHeaders::Any)
                .expect("one convention only");
        assert_eq!(request.method, "DELETE");
        assert_eq!(
            (request.path.as_str(), request.query.as_str()),
            ("/api/orders/7", "a=1")
        );
        assert_eq!(request.host, "shop.example");
        assert_eq!(
            request.source.map(|s| s.address).as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(request.headers["cookie"], "a=1; b=2");
        assert_eq!(request.headers["x-bin"], "caf\u{fffd}");
    }

    #[test]
    fn targets_split_into_path_and_query() {
        for (target, path, query) in [
            ("/a/b?x=1&y", "/a/b", "x=1&y"),
            ("/a", "/a", ""),
            ("", "/", ""),
            ("http://h:1/p?q", "/p", "q"),
            ("HTTPS://h?q", "/", "q"),
            ("/p#frag", "/p", ""),
        ] {
            assert_eq!(
                split_target(target),
                (path.to_owned(), query.to_owned()),
                "{target}"
            );
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    const BOTH: &[(&str, &str)] = &[
        ("x-original-method", "GET"),
        ("x-original-uri", "/api/orders/7"),
        ("x-real-ip", "10.0.0.9"),
        ("x-forwarded-method", "DELETE"),
        ("x-forwarded-uri", "/api/orders/8?all"),
        ("x-forwarded-for", "10.0.0.1, 10.0.0.2"),
    ];

    #[test]
    fn a_named_convention_reads_only_its_own_headers_and_hides_the_others() {
        let peer = Some(SocketAddr::from(([127, 0, 0, 1], 4000)));
        let trusted = |convention| {
            ForwardRequest::from_http("GET", "/", "", &headers(BOTH), peer, convention)
                .expect("a named convention ignores the other one")
        };
        let nginx = trusted(ForwardAuthHeaders::XOriginal);
        assert_eq!(
            (nginx.method.as_str(), nginx.path.as_str()),
            ("GET", "/api/orders/7")
        );
        assert_eq!(nginx.source.map(|s| s.address).as_deref(), Some("10.0.0.9"));
        for hidden in X_FORWARDED {
            assert!(!nginx.headers.contains_key(*hidden), "{hidden}");
        }
        let caddy = trusted(ForwardAuthHeaders::XForwarded);
        assert_eq!(
            (
                caddy.method.as_str(),
                caddy.path.as_str(),
                caddy.query.as_str()
            ),
            ("DELETE", "/api/orders/8", "all")
        );
        assert_eq!(caddy.source.map(|s| s.address).as_deref(), Some("10.0.0.2"));
        for hidden in X_ORIGINAL {
            assert!(!caddy.headers.contains_key(*hidden), "{hidden}");
        }
        // Without its headers, the call itself is the request.
        let bare = ForwardRequest::from_http(
            "put",
            "/p",
            "q",
            &headers(&BOTH[..3]),
            peer,
            ForwardAuthHeaders::XForwarded,
        )
        .expect("no headers of the convention");
        assert_eq!(
            (
                bare.method.as_str(),
                bare.path.as_str(),
                bare.query.as_str()
            ),
            ("PUT", "/p", "q")
        );
        assert_eq!(bare.source.map(|s| s.address).as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn with_any_convention_disagreeing_pairs_are_refused_and_agreeing_ones_accepted() {
        for (index, named) in [
            (
                0,
                ["X-Original-Method `GET`", "X-Forwarded-Method `DELETE`"],
            ),
            (
                1,
                [
                    "X-Original-URI `/api/orders/7`",
                    "X-Forwarded-Uri `/api/orders/8?all`",
                ],
            ),
            (
                2,
                ["X-Real-IP `10.0.0.9`", "X-Forwarded-For hop `10.0.0.2`"],
            ),
        ] {
            let pairs = [BOTH[index], BOTH[index + 3]];
            let refused = ForwardRequest::from_http(
                "GET",
                "/",
                "",
                &headers(&pairs),
                None,
                ForwardAuthHeaders::Any,
            )
            .expect_err("the pairs disagree");
            for name in named {
                assert!(refused.contains(name), "{refused}");
            }
            assert!(refused.contains("server.forward_auth_headers"), "{refused}");
        }
        let agreeing = ForwardRequest::from_http(
            "GET",
            "/",
            "",
            &headers(&[
                ("x-original-method", "delete"),
                ("x-forwarded-method", "DELETE"),
                ("x-original-uri", "/a?b"),
                ("x-forwarded-uri", "/a?b"),
                ("x-real-ip", "::1"),
                ("x-forwarded-for", "10.1.1.1, 0:0::1"),
            ]),
            None,
            ForwardAuthHeaders::Any,
        )
        .expect("the pairs agree");
        assert_eq!(
            (agreeing.method.as_str(), agreeing.path.as_str()),
            ("DELETE", "/a")
        );
        assert_eq!(agreeing.source.map(|s| s.address).as_deref(), Some("::1"));
    }
}
