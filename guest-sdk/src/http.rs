//! Outbound HTTP through the host's audited bridge (`sandgate.http_send` / `http_read`).
//!
//! The host sends the request only when the policy's `[policy.egress] allow` list has a prefix
//! of its URL, injects any secrets itself, and enforces the timeout, the response size limit and
//! the per-evaluation call budget. Each refusal comes back as an [`Error`].
//!
//! ```no_run
//! use sandgate_guest::http;
//!
//! # fn main() -> Result<(), http::Error> {
//! #[derive(serde::Deserialize)]
//! struct Introspection {
//!     active: bool,
//! }
//!
//! let response = http::Request::post("http://127.0.0.1:8080/introspect")
//!     .header("content-type", "application/x-www-form-urlencoded")
//!     .body("token=abc")
//!     .send()?;
//! let introspection: Introspection = response.json()?;
//! # let _ = introspection.active;
//! # Ok(())
//! # }
//! ```
//!
//! On host builds (unit tests) there is no bridge: [`send`](Request::send) fails with
//! [`Error::EgressDenied`], like a policy without egress grants, unless a test installs a
//! [`mock`].

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// An outbound request: method, URL, headers and body, sent with [`send`](Self::send).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Request {
    /// The method, e.g. `POST`.
    pub method: String,
    /// The full URL, e.g. `http://127.0.0.1:8080/introspect`.
    pub url: String,
    /// Header name/value pairs in order; names may repeat.
    pub headers: Vec<(String, String)>,
    /// The body bytes; `None` sends no body.
    pub body: Option<Vec<u8>>,
}

impl Request {
    /// A request with `method` to `url`, no headers and no body.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// A `GET` request to `url`.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` request to `url`.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new("POST", url)
    }

    /// Appends a header (names may repeat).
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body bytes.
    #[must_use]
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets the body to `value` as JSON and, unless already set, `content-type: application/json`.
    ///
    /// Fails with [`Error::Encode`] when `value` cannot be serialised (e.g. a map with
    /// non-string keys).
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, Error> {
        let body = serde_json::to_vec(value).map_err(|err| Error::Encode(err.to_string()))?;
        if !self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        {
            self = self.header("content-type", "application/json");
        }
        Ok(self.body(body))
    }

    /// Sends the request through the host's bridge and waits for the response.
    ///
    /// Any HTTP status is a response (check [`Response::status`]); an [`Error`] means the host
    /// refused or could not complete the call.
    pub fn send(&self) -> Result<Response, Error> {
        let response = exchange(&self.encode())?;
        Response::decode(&response)
    }

    /// The HttpRequest document of ABI v1:
    /// `{"method":…,"url":…,"headers":[[k,v],…],"body":"<base64>"}`.
    fn encode(&self) -> Vec<u8> {
        let wire = WireRequest {
            method: &self.method,
            url: &self.url,
            headers: &self.headers,
            body: self.body.as_deref().map(|body| BASE64.encode(body)),
        };
        // Strings and string pairs always serialise.
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}

/// A response from the bridge: status, headers and body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// Header name/value pairs as the host reported them.
    pub headers: Vec<(String, String)>,
    /// The body bytes (empty when there was none).
    pub body: Vec<u8>,
}

impl Response {
    /// A response with `status` and `body` and no headers (for [`mock`] handlers).
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body as UTF-8 text; [`Error::Decode`] when it is not UTF-8.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.body).map_err(|err| Error::Decode(err.to_string()))
    }

    /// The body parsed as JSON into `T`; [`Error::Decode`] when it does not fit.
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|err| Error::Decode(err.to_string()))
    }

    fn decode(document: &[u8]) -> Result<Self, Error> {
        let wire: WireResponse = serde_json::from_slice(document)
            .map_err(|err| Error::MalformedResponse(err.to_string()))?;
        let body = match wire.body {
            Some(body) => BASE64
                .decode(body)
                .map_err(|err| Error::MalformedResponse(format!("body is not base64: {err}")))?,
            None => Vec::new(),
        };
        Ok(Self {
            status: wire.status,
            headers: wire.headers,
            body,
        })
    }

    #[cfg(any(not(target_arch = "wasm32"), doc))]
    fn encode(&self) -> Vec<u8> {
        let wire = WireResponse {
            status: self.status,
            headers: self.headers.clone(),
            body: (!self.body.is_empty()).then(|| BASE64.encode(&self.body)),
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}

/// Why an HTTP call through the bridge failed.
///
/// The first six variants are the host's negative return codes (`-1` … `-6`); the others are
/// found by the SDK.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// `-1`: the URL is not in the policy's egress allow list.
    EgressDenied,
    /// `-2`: the peer did not answer within the egress timeout.
    Timeout,
    /// `-3`: the connection failed (refused, reset, DNS).
    Connection,
    /// `-4`: the response exceeded the policy's `max_response_bytes`.
    ResponseTooLarge,
    /// `-5`: the host could not accept the request (bad method, URL or document).
    InvalidRequest,
    /// `-6`: this evaluation has used all the HTTP calls it may make.
    BudgetExhausted,
    /// A negative code this SDK does not know (from a newer host).
    Unknown(i64),
    /// The host's response document was not a valid HttpResponse.
    MalformedResponse(String),
    /// The request body could not be serialised ([`Request::json`]).
    Encode(String),
    /// The response body is not what the caller asked for ([`Response::json`],
    /// [`Response::text`]).
    Decode(String),
}

impl Error {
    /// The error for a negative return code of `http_send`/`http_read`.
    pub fn from_code(code: i64) -> Self {
        match code {
            -1 => Self::EgressDenied,
            -2 => Self::Timeout,
            -3 => Self::Connection,
            -4 => Self::ResponseTooLarge,
            -5 => Self::InvalidRequest,
            -6 => Self::BudgetExhausted,
            other => Self::Unknown(other),
        }
    }

    /// The host's return code for this error, when it came from the host.
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::EgressDenied => Some(-1),
            Self::Timeout => Some(-2),
            Self::Connection => Some(-3),
            Self::ResponseTooLarge => Some(-4),
            Self::InvalidRequest => Some(-5),
            Self::BudgetExhausted => Some(-6),
            Self::Unknown(code) => Some(*code),
            Self::MalformedResponse(_) | Self::Encode(_) | Self::Decode(_) => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EgressDenied => {
                f.write_str("egress denied: the url is not in the policy's egress allow list")
            }
            Self::Timeout => f.write_str("http call timed out"),
            Self::Connection => f.write_str("http connection failed"),
            Self::ResponseTooLarge => {
                f.write_str("http response exceeds the policy's max_response_bytes")
            }
            Self::InvalidRequest => f.write_str("the host refused the http request as invalid"),
            Self::BudgetExhausted => f.write_str("http call budget of this evaluation exhausted"),
            Self::Unknown(code) => write!(f, "http call failed with unknown host code {code}"),
            Self::MalformedResponse(detail) => {
                write!(f, "malformed http response from the host: {detail}")
            }
            Self::Encode(detail) => write!(f, "http request body could not be encoded: {detail}"),
            Self::Decode(detail) => write!(f, "http response body could not be decoded: {detail}"),
        }
    }
}

impl std::error::Error for Error {}

#[derive(Serialize)]
struct WireRequest<'a> {
    method: &'a str,
    url: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    headers: &'a [(String, String)],
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireResponse {
    status: u16,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

#[cfg(target_arch = "wasm32")]
fn exchange(request: &[u8]) -> Result<Vec<u8>, Error> {
    crate::sys::http_exchange(request).map_err(Error::from_code)
}

#[cfg(not(target_arch = "wasm32"))]
fn exchange(request: &[u8]) -> Result<Vec<u8>, Error> {
    mock::exchange(request)
}

// Documented on every target, so the docs of a wasm32 build say what host tests can use.
#[cfg(any(not(target_arch = "wasm32"), doc))]
pub use mock::{MockGuard, mock};

/// Host builds only: a stand-in for the bridge, so policies that call out can be unit-tested.
/// The request and response still cross the ABI's JSON encoding both ways.
#[cfg(any(not(target_arch = "wasm32"), doc))]
mod mock {
    use std::cell::RefCell;

    use base64::Engine as _;

    use super::{BASE64, Error, Request, Response};

    type Handler = Box<dyn Fn(&Request) -> Result<Response, Error>>;

    thread_local! {
        static HANDLER: RefCell<Option<Handler>> = const { RefCell::new(None) };
    }

    /// Host builds only: answers this thread's [`Request::send`] calls with `handler` until the
    /// returned guard is dropped (then the previous handler, if any, is back).
    ///
    /// ```
    /// use sandgate_guest::http::{self, Request, Response};
    ///
    /// let _bridge = http::mock(|request| {
    ///     assert_eq!(request.url, "http://auth.local/introspect");
    ///     Ok(Response::new(200, r#"{"active":true}"#))
    /// });
    /// let response = Request::post("http://auth.local/introspect").send().unwrap();
    /// assert_eq!(response.text().unwrap(), r#"{"active":true}"#);
    /// ```
    pub fn mock<F>(handler: F) -> MockGuard
    where
        F: Fn(&Request) -> Result<Response, Error> + 'static,
    {
        let previous = HANDLER.with(|slot| slot.replace(Some(Box::new(handler))));
        MockGuard { previous }
    }

    /// Restores the previous mock handler when dropped; see [`mock`].
    #[must_use = "the mock is removed when the guard is dropped"]
    pub struct MockGuard {
        previous: Option<Handler>,
    }

    impl Drop for MockGuard {
        fn drop(&mut self) {
            let previous = self.previous.take();
            HANDLER.with(|slot| *slot.borrow_mut() = previous);
        }
    }

    impl std::fmt::Debug for MockGuard {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("MockGuard")
        }
    }

    pub(super) fn exchange(document: &[u8]) -> Result<Vec<u8>, Error> {
        let request = decode_request(document).ok_or(Error::InvalidRequest)?;
        HANDLER.with(|slot| match &*slot.borrow() {
            Some(handler) => handler(&request).map(|response| response.encode()),
            None => Err(Error::EgressDenied),
        })
    }

    /// What the host does with an HttpRequest document; `None` is the host's `-5`.
    fn decode_request(document: &[u8]) -> Option<Request> {
        #[derive(serde::Deserialize)]
        struct Wire {
            method: String,
            url: String,
            #[serde(default)]
            headers: Vec<(String, String)>,
            #[serde(default)]
            body: Option<String>,
        }
        let wire: Wire = serde_json::from_slice(document).ok()?;
        let body = match wire.body {
            Some(body) => Some(BASE64.decode(body).ok()?),
            None => None,
        };
        Some(Request {
            method: wire.method,
            url: wire.url,
            headers: wire.headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn request_encodes_to_the_abi_document() {
        let request = Request::post("http://auth.local/introspect")
            .header("accept", "application/json")
            .body("token=abc");
        let document: Value = serde_json::from_slice(&request.encode()).expect("json");
        assert_eq!(
            document,
            json!({
                "method": "POST",
                "url": "http://auth.local/introspect",
                "headers": [["accept", "application/json"]],
                "body": "dG9rZW49YWJj"
            })
        );
    }

    #[test]
    fn request_without_headers_or_body_leaves_them_out() {
        let document: Value =
            serde_json::from_slice(&Request::get("http://a/").encode()).expect("json");
        assert_eq!(document, json!({"method": "GET", "url": "http://a/"}));
    }

    #[test]
    fn json_body_sets_content_type_once() {
        let request = Request::post("http://a/")
            .json(&json!({"token": "abc"}))
            .expect("encodes");
        assert_eq!(request.body.as_deref(), Some(&br#"{"token":"abc"}"#[..]));
        assert_eq!(
            request.headers,
            [("content-type".to_owned(), "application/json".to_owned())]
        );
        let request = Request::post("http://a/")
            .header("Content-Type", "application/merge-patch+json")
            .json(&json!({}))
            .expect("encodes");
        assert_eq!(request.headers.len(), 1);
    }

    #[test]
    fn json_body_that_cannot_encode_is_an_error() {
        let mut map = std::collections::BTreeMap::new();
        map.insert(vec![1_u8], 1);
        let err = Request::post("http://a/")
            .json(&map)
            .expect_err("non-string keys");
        assert!(matches!(err, Error::Encode(_)), "{err}");
    }

    #[test]
    fn response_decodes_from_the_abi_document() {
        let response = Response::decode(
            br#"{"status":200,"headers":[["Content-Type","application/json"]],"body":"eyJhY3RpdmUiOnRydWV9"}"#,
        )
        .expect("valid");
        assert_eq!(response.status, 200);
        assert!(response.is_success());
        assert_eq!(response.header("content-type"), Some("application/json"));
        let body: Value = response.json().expect("json body");
        assert_eq!(body, json!({"active": true}));
    }

    #[test]
    fn response_without_body_or_headers_is_empty() {
        let response = Response::decode(br#"{"status":204}"#).expect("valid");
        assert_eq!(response, Response::new(204, Vec::new()));
        assert!(response.headers.is_empty());
    }

    #[test]
    fn malformed_responses_are_errors() {
        for document in [
            &b"not json"[..],
            br#"{"headers":[]}"#,
            br#"{"status":200,"body":"@@"}"#,
        ] {
            let err = Response::decode(document).expect_err("malformed");
            assert!(matches!(err, Error::MalformedResponse(_)), "{err}");
        }
    }

    #[test]
    fn body_decoding_errors_name_the_problem() {
        let response = Response::new(200, vec![0xff, 0xfe]);
        assert!(matches!(response.text(), Err(Error::Decode(_))));
        assert!(matches!(response.json::<Value>(), Err(Error::Decode(_))));
    }

    #[test]
    fn host_codes_map_both_ways() {
        let known = [
            (-1, Error::EgressDenied),
            (-2, Error::Timeout),
            (-3, Error::Connection),
            (-4, Error::ResponseTooLarge),
            (-5, Error::InvalidRequest),
            (-6, Error::BudgetExhausted),
            (-42, Error::Unknown(-42)),
        ];
        for (code, error) in known {
            assert_eq!(Error::from_code(code), error);
            assert_eq!(error.code(), Some(code));
        }
        assert_eq!(Error::Decode(String::new()).code(), None);
    }

    #[test]
    fn without_a_mock_the_host_build_denies_egress() {
        let err = Request::get("http://a/").send().expect_err("no bridge");
        assert_eq!(err, Error::EgressDenied);
    }

    #[test]
    fn mock_sees_the_request_and_answers_through_the_wire_format() {
        let _bridge = mock(|request| {
            assert_eq!(request.method, "POST");
            assert_eq!(request.body.as_deref(), Some(&b"\x00\x01binary"[..]));
            assert_eq!(request.headers, [("x-a".to_owned(), "1".to_owned())]);
            let mut response = Response::new(201, b"\xffok".to_vec());
            response.headers.push(("X-B".into(), "2".into()));
            Ok(response)
        });
        let response = Request::post("http://a/")
            .header("x-a", "1")
            .body(b"\x00\x01binary".to_vec())
            .send()
            .expect("mocked");
        assert_eq!(response.status, 201);
        assert_eq!(response.header("x-b"), Some("2"));
        assert_eq!(response.body, b"\xffok");
    }

    #[test]
    fn mock_errors_and_guard_restore() {
        let outer = mock(|_| Err(Error::Timeout));
        {
            let _inner = mock(|_| Err(Error::BudgetExhausted));
            assert_eq!(
                Request::get("http://a/").send(),
                Err(Error::BudgetExhausted)
            );
        }
        assert_eq!(Request::get("http://a/").send(), Err(Error::Timeout));
        drop(outer);
        assert_eq!(Request::get("http://a/").send(), Err(Error::EgressDenied));
    }
}
