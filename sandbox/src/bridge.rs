//! The audited HTTP bridge: `sandgate.http_send` / `http_read` (DESIGN §2).
//!
//! A guest reaches the network only through here. Each request is checked
//! against the policy's egress allowlist (parsed, normalised URLs compared by
//! scheme, host, port and whole path segments), the per-evaluation call budget
//! and the response size limit; refusals return the contract's negative codes
//! and are audited as `egress_denied`. Credentials configured on the host are
//! added here and scrubbed from what comes back, so a guest never sees them.
//! Waiting on the network holds no thread: the host functions are async,
//! and the call's own future does the socket I/O (`transport`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::audit::{AuditLog, AuditRecord, Subject};
use crate::config::EgressSettings;
use crate::telemetry::log::Escaped;
use crate::telemetry::traces::Scope;

mod cache;
mod host;
mod redact;
mod transport;

pub use host::{EgressState, EgressView, add_to_linker, send};

use cache::{CacheControl, CachedResponse, cache_key, cache_max_age};
use redact::Secret;
use transport::Transport;

/// `http_send` results (DESIGN §2).
pub const EGRESS_DENIED: i64 = -1;
pub const TIMEOUT: i64 = -2;
pub const CONNECTION_ERROR: i64 = -3;
pub const RESPONSE_TOO_LARGE: i64 = -4;
pub const INVALID_REQUEST: i64 = -5;
pub const BUDGET_EXHAUSTED: i64 = -6;

/// The name of a negative bridge code, as spans report it in `error.type`.
pub fn code_name(code: i64) -> &'static str {
    match code {
        EGRESS_DENIED => "egress_denied",
        TIMEOUT => "timeout",
        CONNECTION_ERROR => "connection_error",
        RESPONSE_TOO_LARGE => "response_too_large",
        INVALID_REQUEST => "invalid_request",
        BUDGET_EXHAUSTED => "budget_exhausted",
        _ => "unknown",
    }
}

/// Largest request document a guest may hand the bridge.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Redirect hops followed at most when `allow_redirects` is on.
pub const MAX_REDIRECTS: usize = 5;
/// Entries kept per policy in the response cache.
const CACHE_CAPACITY: u64 = 10_000;

/// The HttpRequest document of DESIGN §2.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRequest {
    #[serde(default = "default_method")]
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: Option<String>,
}

/// Parses the HttpRequest document a guest passed to `http_send`; the error
/// is the code the guest gets (public for the fuzz targets).
pub fn decode_request(raw: &[u8]) -> Result<GuestRequest, i64> {
    serde_json::from_slice(raw).map_err(|_| INVALID_REQUEST)
}

fn default_method() -> String {
    "GET".to_owned()
}

/// The HttpResponse document of DESIGN §2.
#[derive(Serialize)]
struct GuestResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// What one bridged call did, for telemetry.
#[derive(Clone, Debug)]
pub struct HttpCall {
    pub method: String,
    pub url: String,
    /// Status of the response, or the negative code the guest got.
    pub outcome: Result<u16, i64>,
    pub cached: bool,
    pub duration: Duration,
}

/// Response-cache counters of one policy.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

/// The egress path of one policy. Shared by all its evaluations, which
/// reuse its idle connections.
pub struct Bridge {
    settings: EgressSettings,
    transport: Option<Transport>,
    cache: Option<moka::future::Cache<[u8; 32], CachedResponse>>,
    stats: CacheStats,
    /// Every credential of the policy, with the spellings to scrub.
    secrets: Vec<Secret>,
}

/// Why the bridge could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the HTTP client: {0}")]
pub struct BridgeError(String);

impl Bridge {
    /// A bridge for `settings`; policies without egress get no HTTP client.
    /// The client follows no redirects (they are followed by hand, each hop
    /// checked) and uses no proxy.
    pub fn new(settings: &EgressSettings) -> Result<Bridge, BridgeError> {
        let transport = if settings.allow.is_empty() {
            None
        } else {
            Some(Transport::new().map_err(|e| BridgeError(e.to_string()))?)
        };
        let cache = settings.cache_ttl.map(|ttl| {
            moka::future::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(ttl)
                .build()
        });
        Ok(Bridge {
            settings: settings.clone(),
            transport,
            cache,
            stats: CacheStats::default(),
            secrets: settings
                .credentials
                .iter()
                .map(|c| Secret::new(&c.value))
                .collect(),
        })
    }

    /// Makes the bridge permit, for BPF LSM enforcement, the addresses its
    /// connections go to in `confinement` before connecting.
    pub fn confined(mut self, confinement: Arc<crate::probes::Confinement>) -> Bridge {
        if let Some(transport) = &mut self.transport {
            transport.confinement = Some(confinement);
        }
        self
    }

    pub fn cache_stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Why `url` may not be reached, if it may not.
    fn refusal(&self, url: &Url) -> Option<String> {
        if self.settings.allow.is_empty() {
            return Some("no egress is granted to this policy (egress.allow is empty)".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Some("the URL carries user information".into());
        }
        if !self.settings.allow.iter().any(|rule| rule.matches(url)) {
            return Some(format!("{url} is not within egress.allow"));
        }
        None
    }

    /// Sends one guest request; the `Ok` document is what `http_read` copies.
    async fn send(
        &self,
        raw: &[u8],
        audit: &AuditLog,
        subject: &Subject,
        calls: &mut Vec<HttpCall>,
        trace: &Scope,
    ) -> Result<Vec<u8>, i64> {
        let started = Instant::now();
        let request = decode_request(raw)?;
        let method = request.method.to_ascii_uppercase();
        let span = trace.child(method.clone(), SpanKind::Client, || {
            vec![
                KeyValue::new("http.request.method", method),
                KeyValue::new("url.full", request.url.clone()),
            ]
        });
        let mut record = HttpCall {
            method: request.method.clone(),
            url: request.url.clone(),
            outcome: Err(INVALID_REQUEST),
            cached: false,
            duration: Duration::ZERO,
        };
        let result = self
            .send_checked(request, audit, subject, &mut record, &span)
            .await;
        record.duration = started.elapsed();
        match &result {
            Ok((status, _)) => span.set_attributes(|| {
                vec![
                    KeyValue::new("http.response.status_code", i64::from(*status)),
                    KeyValue::new("sandgate.cached", record.cached),
                ]
            }),
            Err(code) => {
                span.set_attributes(|| vec![KeyValue::new("error.type", code_name(*code))]);
                span.fail(
                    code_name(*code),
                    &format!("bridge returned {code} to the guest"),
                );
            }
        }
        span.end();
        record.outcome = match &result {
            Ok((status, _)) => Ok(*status),
            Err(code) => Err(*code),
        };
        calls.push(record);
        result.map(|(_, document)| document)
    }

    async fn send_checked(
        &self,
        request: GuestRequest,
        audit: &AuditLog,
        subject: &Subject,
        record: &mut HttpCall,
        span: &Scope,
    ) -> Result<(u16, Vec<u8>), i64> {
        let mut url = Url::parse(&request.url).map_err(|_| INVALID_REQUEST)?;
        url.set_fragment(None);
        span.set_attributes(|| {
            let mut server = Vec::with_capacity(2);
            if let Some(host) = url.host_str() {
                server.push(KeyValue::new("server.address", host.to_owned()));
            }
            if let Some(port) = url.port_or_known_default() {
                server.push(KeyValue::new("server.port", i64::from(port)));
            }
            server
        });
        let deny = |url: &str, reason: String| {
            tracing::warn!(policy = %subject.policy, decision_id = %subject.decision_id, url = %Escaped(url), reason = %Escaped(&reason), "egress refused");
            span.event("egress_denied", || {
                vec![
                    KeyValue::new("url.full", url.to_owned()),
                    KeyValue::new("reason", reason.clone()),
                ]
            });
            audit.record(
                subject,
                &AuditRecord::EgressDenied {
                    url: url.to_owned(),
                    reason,
                },
            );
            EGRESS_DENIED
        };
        if let Some(reason) = self.refusal(&url) {
            return Err(deny(&request.url, reason));
        }
        let Some(transport) = &self.transport else {
            return Err(deny(&request.url, "no HTTP client".into()));
        };
        let mut method = Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| INVALID_REQUEST)?;
        let mut guest_headers = Vec::with_capacity(request.headers.len());
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| INVALID_REQUEST)?;
            let value = HeaderValue::from_str(value).map_err(|_| INVALID_REQUEST)?;
            // The bridge sets Host from the URL; hop-by-hop headers are its own.
            if matches!(
                name.as_str(),
                "host" | "connection" | "transfer-encoding" | "content-length"
            ) {
                continue;
            }
            // A compressed, transfer-coded or partial answer could carry a
            // credential in a form redaction cannot see: the bridge asks for
            // whole, unencoded bodies whatever the guest asked for.
            if UNINSPECTABLE_REQUEST_HEADERS.contains(&name.as_str()) {
                tracing::info!(
                    policy = %subject.policy,
                    decision_id = %subject.decision_id,
                    header = name.as_str(),
                    "guest request header dropped: the bridge must be able to inspect the answer for credentials"
                );
                continue;
            }
            guest_headers.push((name, value));
        }
        let mut body = match &request.body {
            Some(b) => Some(Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|_| INVALID_REQUEST)?,
            )),
            None => None,
        };

        let cache_key = self
            .cache
            .as_ref()
            .map(|_| cache_key(&method, &url, &guest_headers, body.as_deref()));
        if let (Some(cache), Some(key)) = (&self.cache, &cache_key) {
            match cache.get(key).await {
                Some(hit) if hit.expires > Instant::now() => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    record.cached = true;
                    let document = hit.document.as_ref().clone();
                    return Ok((status_of(&document), document));
                }
                _ => {
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                }
            }
        }

        let mut hops = 0;
        let (mut response, deadline) = loop {
            let mut headers = HeaderMap::new();
            for (name, value) in &guest_headers {
                headers.append(name.clone(), value.clone());
            }
            // Credentials replace any header of the same name the guest set.
            for credential in self
                .settings
                .credentials
                .iter()
                .filter(|c| c.prefix.matches(&url))
            {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(credential.header.as_bytes()),
                    HeaderValue::from_str(&credential.value),
                ) {
                    headers.insert(name, value);
                }
            }
            // The usual client default, as reqwest sent it, unless the guest set one.
            headers
                .entry(header::ACCEPT)
                .or_insert(HeaderValue::from_static("*/*"));
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            // The called service joins the decision's trace.
            span.inject(&mut headers);
            // One timeout per hop, from connecting to the body's last byte.
            let deadline = tokio::time::Instant::now() + self.settings.timeout;
            let sent = transport.send(
                method.clone(),
                &url,
                headers,
                body.clone().unwrap_or_default(),
            );
            let response = within(deadline, sent, subject).await?;
            let status = response.status();
            if !(self.settings.allow_redirects && status.is_redirection()) {
                break (response, deadline);
            }
            let Some(location) = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
            else {
                break (response, deadline);
            };
            hops += 1;
            let location_text = redact::redact_str(location.as_str(), &self.secrets);
            if hops > MAX_REDIRECTS {
                return Err(deny(
                    &location_text,
                    format!("more than {MAX_REDIRECTS} redirects"),
                ));
            }
            if let Some(reason) = self.refusal(&location) {
                return Err(deny(
                    &location_text,
                    format!(
                        "redirect from {}: {reason}",
                        redact::redact_str(url.as_str(), &self.secrets)
                    ),
                ));
            }
            // 303, and 301/302 after a POST, continue as GET without a body.
            if status == StatusCode::SEE_OTHER
                || ((status == StatusCode::MOVED_PERMANENTLY || status == StatusCode::FOUND)
                    && method == Method::POST)
            {
                method = Method::GET;
                body = None;
            }
            url = location;
            record.url = location_text;
        };

        let status = response.status().as_u16();
        let max = self.settings.max_response_bytes;
        if response.content_length().is_some_and(|n| n > max) {
            return Err(RESPONSE_TOO_LARGE);
        }
        let mut headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let max_age = cache_max_age(response.headers());
        let mut bytes = Vec::new();
        while let Some(chunk) = within(deadline, response.chunk(), subject).await? {
            if (bytes.len() + chunk.len()) as u64 > max {
                // Dropping the response closes the connection, the rest unread;
                // only a body read to its end returns it to the pool.
                return Err(RESPONSE_TOO_LARGE);
            }
            bytes.extend_from_slice(&chunk);
        }
        if let Some(coding) = uninspectable_coding(response.headers())
            && !bytes.is_empty()
        {
            return Err(deny(
                &record.url,
                format!(
                    "the answer's body is encoded ({coding}) although the bridge asked for identity; it cannot be checked for credentials, so it is not handed to the guest"
                ),
            ));
        }
        if !self.secrets.is_empty() {
            for (name, value) in headers.iter_mut() {
                *name = redact::redact_str(name, &self.secrets);
                *value = redact::redact_str(value, &self.secrets);
            }
            bytes = redact::redact(bytes, &self.secrets);
        }
        let document = serde_json::to_vec(&GuestResponse {
            status,
            headers: std::mem::take(&mut headers),
            body: base64::engine::general_purpose::STANDARD.encode(&bytes),
        })
        .map_err(|_| INVALID_REQUEST)?;

        if let (Some(cache), Some(key), Some(ttl)) =
            (&self.cache, cache_key, self.settings.cache_ttl)
            && status < 500
            && let Some(ttl) = match max_age {
                CacheControl::NoStore => None,
                CacheControl::MaxAge(age) => Some(ttl.min(age)),
                CacheControl::Default => Some(ttl),
            }
            && !ttl.is_zero()
        {
            cache
                .insert(
                    key,
                    CachedResponse {
                        expires: Instant::now() + ttl,
                        document: Arc::new(document.clone()),
                    },
                )
                .await;
        }
        Ok((status, document))
    }
}

fn status_of(document: &[u8]) -> u16 {
    serde_json::from_slice::<serde_json::Value>(document)
        .ok()
        .and_then(|v| v["status"].as_u64())
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(0)
}

/// Runs one step of a call against the hop's deadline: `TIMEOUT` when it
/// passes, `CONNECTION_ERROR` when the peer or the network failed.
async fn within<T>(
    deadline: tokio::time::Instant,
    step: impl Future<Output = Result<T, transport::Error>>,
    subject: &Subject,
) -> Result<T, i64> {
    match tokio::time::timeout_at(deadline, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            tracing::debug!(policy = %subject.policy, decision_id = %subject.decision_id, error = %Escaped(&e.to_string()), "bridged call failed");
            Err(CONNECTION_ERROR)
        }
        Err(_) => Err(TIMEOUT),
    }
}

/// Request headers a guest may not send: they would let a peer answer in a
/// form the bridge cannot scrub (compressed, transfer-coded, or a slice of a
/// body too short to contain a whole credential).
const UNINSPECTABLE_REQUEST_HEADERS: [&str; 4] = ["accept-encoding", "te", "range", "if-range"];

/// The content or transfer coding of a response that is not plain bytes
/// (`chunked` is undone by the transport), if any.
fn uninspectable_coding(headers: &HeaderMap) -> Option<String> {
    let codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .map(|v| (header::CONTENT_ENCODING, v))
        .chain(
            headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .map(|v| (header::TRANSFER_ENCODING, v)),
        );
    for (name, value) in codings {
        let text = String::from_utf8_lossy(value.as_bytes());
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let plain = coding.eq_ignore_ascii_case("identity")
                || (name == header::TRANSFER_ENCODING && coding.eq_ignore_ascii_case("chunked"));
            if !plain {
                return Some(format!(
                    "{name}: {}",
                    coding.chars().take(32).collect::<String>()
                ));
            }
        }
    }
    None
}
