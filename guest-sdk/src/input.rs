//! The input document the host passes to `sandgate_evaluate` (ABI v1): the caller's `input`,
//! typed by the policy author, and the evaluation `context`; plus the shape of the HTTP request
//! that forward-auth and ext_authz put in `input`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// The whole input document: `{"input": <T>, "context": {...}}`.
///
/// `T` is the author's own type for the caller's input (any `Deserialize`, including types that
/// borrow from the document); the default, [`Value`], accepts any JSON. A document whose `input`
/// does not fit `T` never reaches the policy function: the export glue denies it with a reason
/// naming the problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Input<T = Value> {
    /// The caller's input: the evaluate body, or [`ForwardAuth`] for forward-auth and ext_authz.
    pub input: T,
    /// Which policy and version is evaluating, and when. Empty when the host sent none.
    #[serde(default)]
    pub context: Context,
}

impl<T> Input<T> {
    /// An input with an empty context, for calling a policy function directly in a test.
    pub fn new(input: T) -> Self {
        Self {
            input,
            context: Context::default(),
        }
    }
}

/// The evaluation context the host adds to every input. Every field may be missing, `null` or
/// empty: strings then read as `""` and [`trace_id`](Self::trace_id) as `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Context {
    /// The policy name from the configuration, e.g. `orders`.
    #[serde(deserialize_with = "null_as_empty")]
    pub policy: String,
    /// The policy version evaluating, e.g. `v2`.
    #[serde(deserialize_with = "null_as_empty")]
    pub version: String,
    /// The host's time of the evaluation, RFC 3339 (`2026-11-23T10:00:00Z`).
    #[serde(deserialize_with = "null_as_empty")]
    pub time: String,
    /// The id the host gives this decision in its answer and audit log.
    #[serde(deserialize_with = "null_as_empty")]
    pub decision_id: String,
    /// The W3C trace id when the host is tracing; `None` when absent or empty.
    #[serde(
        deserialize_with = "empty_as_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub trace_id: Option<String>,
}

/// The `input` of a forward-auth or ext_authz evaluation: `{"request": {...}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ForwardAuth {
    /// The HTTP request being authorised.
    pub request: Request,
}

/// The HTTP request being authorised (forward-auth, ext_authz). Missing fields read as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Request {
    /// The original method, e.g. `GET`.
    #[serde(deserialize_with = "null_as_empty")]
    pub method: String,
    /// The original path without the query, e.g. `/api/orders/7`.
    #[serde(deserialize_with = "null_as_empty")]
    pub path: String,
    /// The raw query string without `?`, e.g. `a=1`; not percent-decoded.
    #[serde(deserialize_with = "null_as_empty")]
    pub query: String,
    /// The `Host` the client asked for.
    #[serde(deserialize_with = "null_as_empty")]
    pub host: String,
    /// The request headers, names lower-case. Prefer [`header`](Self::header) for lookups.
    pub headers: BTreeMap<String, String>,
    /// Where the request came from.
    pub source: Source,
}

/// The peer of an authorised request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Source {
    /// The client address as the host saw it (`ip:port` or `ip`).
    #[serde(deserialize_with = "null_as_empty")]
    pub address: String,
}

impl Request {
    /// The value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        if let Some(value) = self.headers.get(name) {
            return Some(value);
        }
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), or
    /// `None` when there is no such header or the token is empty.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("authorization")?.trim_start();
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }

    /// The non-empty segments of the path: `/api/orders/7` gives `api`, `orders`, `7`.
    /// Segments are not percent-decoded.
    pub fn path_segments(&self) -> impl Iterator<Item = &str> {
        let path = self.path.split('?').next().unwrap_or_default();
        path.split('/').filter(|segment| !segment.is_empty())
    }
}

fn null_as_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_default())
}

fn empty_as_none<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.filter(|value| !value.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: for<'de> Deserialize<'de>>(json: &str) -> Input<T> {
        serde_json::from_str(json).expect("valid input document")
    }

    #[test]
    fn context_fields_are_read() {
        let input: Input = parse(
            r#"{"input":{"a":1},"context":{"policy":"orders","version":"v2",
                "time":"2026-11-23T10:00:00Z","decision_id":"d-1","trace_id":"t-1"}}"#,
        );
        assert_eq!(input.input["a"], 1);
        assert_eq!(input.context.policy, "orders");
        assert_eq!(input.context.version, "v2");
        assert_eq!(input.context.time, "2026-11-23T10:00:00Z");
        assert_eq!(input.context.decision_id, "d-1");
        assert_eq!(input.context.trace_id.as_deref(), Some("t-1"));
    }

    #[test]
    fn missing_null_and_empty_context_fields_are_tolerated() {
        let input: Input = parse(r#"{"input":null}"#);
        assert_eq!(input.context, Context::default());
        let input: Input =
            parse(r#"{"input":1,"context":{"policy":null,"trace_id":"","extra":true}}"#);
        assert_eq!(input.context, Context::default());
        let input: Input = parse(r#"{"input":1,"context":{"trace_id":null}}"#);
        assert_eq!(input.context.trace_id, None);
    }

    #[test]
    fn author_types_may_borrow_from_the_document() {
        #[derive(Deserialize)]
        struct Ask<'a> {
            user: &'a str,
        }
        let document = r#"{"input":{"user":"alice"}}"#;
        let input: Input<Ask<'_>> = serde_json::from_str(document).expect("valid");
        assert_eq!(input.input.user, "alice");
    }

    #[test]
    fn forward_auth_request_is_read() {
        let input: Input<ForwardAuth> = parse(
            r#"{"input":{"request":{"method":"GET","path":"/api/orders/7","query":"a=1",
                "host":"shop.local","headers":{"authorization":"Bearer abc","x-user":"alice"},
                "source":{"address":"10.0.0.1:5555"}}}}"#,
        );
        let request = input.input.request;
        assert_eq!(request.method, "GET");
        assert_eq!(request.query, "a=1");
        assert_eq!(request.host, "shop.local");
        assert_eq!(request.source.address, "10.0.0.1:5555");
        assert_eq!(
            request.path_segments().collect::<Vec<_>>(),
            ["api", "orders", "7"]
        );
    }

    #[test]
    fn request_fields_may_be_missing() {
        let input: Input<ForwardAuth> = parse(r#"{"input":{"request":{"path":"/"}}}"#);
        assert_eq!(input.input.request.method, "");
        assert!(input.input.request.headers.is_empty());
        assert_eq!(input.input.request.path_segments().count(), 0);
    }

    #[test]
    fn header_lookup_ignores_case() {
        let mut request = Request::default();
        request.headers.insert("x-user".into(), "alice".into());
        request.headers.insert("X-Odd".into(), "1".into());
        assert_eq!(request.header("x-user"), Some("alice"));
        assert_eq!(request.header("X-User"), Some("alice"));
        assert_eq!(request.header("x-odd"), Some("1"));
        assert_eq!(request.header("x-missing"), None);
    }

    #[test]
    fn bearer_token_is_extracted() {
        let mut request = Request::default();
        assert_eq!(request.bearer_token(), None);
        request
            .headers
            .insert("authorization".into(), "bearer  abc.def ".into());
        assert_eq!(request.bearer_token(), Some("abc.def"));
        request
            .headers
            .insert("authorization".into(), "Basic abc".into());
        assert_eq!(request.bearer_token(), None);
        request
            .headers
            .insert("authorization".into(), "Bearer ".into());
        assert_eq!(request.bearer_token(), None);
    }
}
