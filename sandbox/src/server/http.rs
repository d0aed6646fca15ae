//! The HTTP API of DESIGN §6 on axum: the JSON evaluate endpoint, the
//! OPA-compatible data endpoint, forward-auth, the policy list, health,
//! readiness and metrics. Handlers only translate HTTP to [`State`] calls and
//! answers back; every error answer carries its DESIGN §3 code (in the JSON
//! body and in `x-sandgate-error`).
//!
//! Over 600 lines: every route of DESIGN §6 is here, so the HTTP contract
//! reads in one file; the logic behind them lives in `gate` and `status`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State as Shared};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use super::authz::{self, DECISION_ID_HEADER, ERROR_HEADER, ForwardRequest};
use super::connections::{Admitted, Limits, Listener};
use super::registry::Generation;
use super::{Answer, Outcome, State};
use crate::decision::{Decision, ErrorCode, FailMode};
use crate::language::{self, Language};
use crate::policy::input;
use crate::telemetry;
use crate::telemetry::traces::Parent;

/// Where forward-auth lives; the policy name is the next path segment.
const AUTHZ_PREFIX: &str = "/v1/authz/";
const JSON: &str = "application/json";

type Shared_ = Shared<Arc<State>>;

/// Serves the API on `listener` until `shutdown` completes, then lets
/// in-flight requests finish. Connections are admitted under `limits` (the
/// shared cap) and closed by its header-read and idle timeouts.
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    limits: Arc<Limits>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(state);
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let Admitted {
            stream,
            peer,
            watch,
        } = tokio::select! {
            admitted = limits.accept(&listener, Listener::Http) => admitted,
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let watchdog = Arc::clone(&watch);
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let handling = watch.request();
            let answered = router.clone().oneshot(request);
            async move {
                let response = answered.await;
                drop(handling);
                response
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                served = connection => if let Err(e) = served {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                },
                // Dropping the connection closes it.
                _ = watchdog.expired() => {}
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/v1/policies/{name}/evaluate", post(evaluate))
        .route("/v1/data/{*path}", post(opa_data))
        .route("/v1/authz/{*rest}", any(forward_auth))
        .route("/v1/authz", any(forward_auth))
        .route("/v1/policies", get(policies))
        .route("/v1/reload", post(reload))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/probes", get(probes))
        .route("/metrics", get(metrics))
        .fallback(unknown_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// `POST /v1/policies/{name}/evaluate`: the body is the input; the answer is
/// the decision plus `policy`, `version` and `decision_id`.
async fn evaluate(
    Shared(state): Shared_,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let name = policy_name(name);
    let generation = state.current();
    let answer = match read_input(&state, &generation, &name, &headers, body).await {
        Ok(input) => {
            let trace = Parent::from_headers(&headers);
            state
                .evaluate(&generation, &name, input, trace, &headers)
                .await
        }
        Err(answer) => answer,
    };
    json_answer(json_status(&answer), &answer, &DecisionBody::new(&answer))
}

/// `POST /v1/data/{name}`, OPA-compatible: body `{"input": …}` (an empty body
/// or no `input` is input `null`), answer `{"result": <decision>, "decision_id": …}`;
/// error answers also carry OPA's `code` and `message` (the DESIGN §3 code).
///
/// For a Rego policy the path is a document, `data.<path with / as .>`, of
/// the policy its first segment names, answered exactly as OPA's Data API
/// does: `{"result": <value>}`, `{}` when undefined (the decision id is in
/// the `x-sandgate-decision-id` header).
async fn opa_data(
    Shared(state): Shared_,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = policy_name(path);
    let (name, rest) = path.split_once('/').unwrap_or((&path, ""));
    let trace = Parent::from_headers(&headers);
    let generation = state.current();
    let rego = generation
        .slots
        .get(name)
        .and_then(|slot| slot.spec.language.as_ref())
        .is_some_and(|l| l.language == Language::Rego);
    let query = match (rego, language::data_query(&path)) {
        (true, Some(query)) => Ok(Some(query)),
        (true, None) => Err(format!(
            "`{path}` is not a path of Rego names (letters, digits and '_', not starting with a digit)"
        )),
        (false, _) if rest.trim_matches('/').is_empty() => Ok(None),
        (false, _) => Err(format!(
            "policy `{name}` is a module policy: /v1/data/{name} answers its decision; only a Rego policy answers a path under its name"
        )),
    };
    let answer = match read_input(&state, &generation, name, &headers, body).await {
        Err(answer) => answer,
        Ok(body) => match (opa_input(&body), query) {
            (Ok(input), Ok(query)) => {
                state
                    .evaluate_query(&generation, name, input, trace, &headers, query)
                    .await
            }
            (Err(message), _) | (_, Err(message)) => {
                state.reject(&generation, name, Outcome::BadRequest, message, trace)
            }
        },
    };
    let status = json_status(&answer);
    if rego {
        return rego_data_answer(status, &answer);
    }
    let error = (status != StatusCode::OK)
        .then_some(answer.decision.error.as_ref())
        .flatten();
    note_dropped_fields(&answer);
    let body = OpaBody {
        result: ResultBody(&answer.decision),
        decision_id: &answer.decision_id,
        trace_id: answer.trace_id.as_deref(),
        code: error.map(|e| e.code),
        message: error.map(|e| e.message.as_str()),
    };
    json_answer(status, &answer, &body)
}

/// A Rego document as OPA's Data API gives it: `{"result": …}`, `{}` when
/// undefined, and for an evaluation error (a conflict, a builtin's error) 500
/// with OPA's `internal_error` code and the engine's message. A failed
/// evaluation (deadline, memory, a trap, not loaded) is OPA's error shape
/// with the DESIGN §3 code, 500 unless the failure has its own status.
fn rego_data_answer(status: StatusCode, answer: &Answer) -> Response {
    if let Some(error) = &answer.decision.error {
        let body = json!({"code": error.code, "message": error.message});
        let status = if status == StatusCode::OK {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            status
        };
        return json_answer(status, answer, &body);
    }
    let obligations = answer.decision.extra.get("obligations");
    let obligation = |name: &str| obligations.and_then(|o| o.get(name));
    if let Some(message) = obligation(language::REGO_ERROR) {
        let body = json!({
            "code": "internal_error",
            "message": message.as_str().unwrap_or_default(),
        });
        return json_answer(StatusCode::INTERNAL_SERVER_ERROR, answer, &body);
    }
    let body = match obligation(language::REGO_RESULT) {
        Some(result) => json!({ "result": result }),
        None => json!({}),
    };
    json_answer(StatusCode::OK, answer, &body)
}

/// The `input` member of an OPA data request, as the caller wrote it (no
/// re-encoding, so numbers and strings reach the guest unchanged). The whole
/// body goes through the one input parser first.
fn opa_input(body: &Bytes) -> Result<Bytes, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Bytes::from_static(b"null"));
    }
    let members = input::members(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let Some(members) = members else {
        return Err("body must be a JSON object like {\"input\": …}".to_owned());
    };
    Ok(members
        .into_iter()
        .find(|(name, _)| name == "input")
        .map_or(Bytes::from_static(b"null"), |(_, range)| body.slice(range)))
}

/// `/v1/authz/{name}[/…]`, any method: forward-auth. Allow → 200 with the
/// decision's headers; deny → the decision's status with the reason as body.
async fn forward_auth(
    Shared(state): Shared_,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, _body) = request.into_parts();
    let path = parts.uri.path();
    let rest = path.strip_prefix(AUTHZ_PREFIX).unwrap_or_default();
    let (name, own_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let trace = Parent::from_headers(&parts.headers);
    let generation = state.current();
    let answer = if name.is_empty() {
        state.unattributed(
            "",
            ErrorCode::PolicyNotFound,
            Outcome::NotFound,
            "forward-auth needs a policy: /v1/authz/{name}[/path]".to_owned(),
        )
    } else {
        match ForwardRequest::from_http(
            parts.method.as_str(),
            own_path,
            parts.uri.query().unwrap_or_default(),
            &parts.headers,
            Some(peer),
            generation.forward_auth_headers(),
        ) {
            Ok(request) => {
                let input = Bytes::from(request.to_input());
                state
                    .evaluate(&generation, name, input, trace, &request.headers)
                    .await
            }
            Err(message) => {
                // Audited and counted by `reject`; a client can cause it at will.
                tracing::debug!(policy = ?super::truncated(name, 128), peer = %peer, reason = ?message, "forward-auth request refused");
                state.reject(&generation, name, Outcome::BadRequest, message, trace)
            }
        }
    };
    let status =
        StatusCode::from_u16(authz::proxy_status(&answer)).unwrap_or(StatusCode::FORBIDDEN);
    let body = if answer.decision.allow {
        Body::empty()
    } else {
        Body::from(
            answer
                .decision
                .reason
                .clone()
                .unwrap_or_else(|| "denied".to_owned()),
        )
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in authz::decision_headers(&answer) {
        headers.append(name, value);
    }
    if !answer.decision.allow {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    tag(headers, &answer);
    response
}

/// `GET /v1/policies`: every policy with its versions, digests and grants.
async fn policies(Shared(state): Shared_) -> Response {
    json_response(StatusCode::OK, &state.policies())
}

/// `POST /v1/reload`: reloads the config file and every module now, like
/// SIGHUP. 200 with the generation serving when it was applied; 422 with the
/// error when it failed (the previous generation keeps serving).
async fn reload(Shared(state): Shared_) -> Response {
    match state.reload(super::reload::Trigger::Api).await {
        Some(record) if record.ok() => json_response(StatusCode::OK, &record),
        Some(record) => json_response(StatusCode::UNPROCESSABLE_ENTITY, &record),
        None => json_response(StatusCode::OK, &serde_json::json!({"result": "unchanged"})),
    }
}

/// `GET /healthz`: the process is up (a constant answer; also the bench baseline).
async fn healthz() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(JSON))],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

/// `GET /readyz`: 200 once every policy is loaded, else 503 saying which is not and why.
async fn readyz(Shared(state): Shared_) -> Response {
    let (ready, readiness) = state.readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &readiness)
}

/// `GET /v1/probes`: whether the eBPF probes are attached (or why not),
/// which programs, the events seen and lost, and what the kernel enforces
/// (`enforcement.seccomp`).
async fn probes(Shared(state): Shared_) -> Response {
    #[derive(serde::Serialize)]
    struct Probes {
        #[serde(flatten)]
        probes: crate::probes::ProbeReport,
        enforcement: super::status::Enforcement,
    }
    json_response(
        StatusCode::OK,
        &Probes {
            probes: state.probes().report(),
            enforcement: state.enforcement(),
        },
    )
}

/// `GET /metrics`: Prometheus / OpenMetrics text.
async fn metrics(Shared(state): Shared_) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(telemetry::METRICS_CONTENT_TYPE),
        )],
        state.metrics().render(),
    )
        .into_response()
}

async fn unknown_endpoint(
    Shared(state): Shared_,
    method: Method,
    uri: axum::http::Uri,
) -> Response {
    let message = format!(
        "no endpoint {method} {}; see /v1/policies/{{name}}/evaluate, /v1/data/{{name}}, /v1/authz/{{name}}, /v1/policies, /v1/reload, /v1/probes, /healthz, /readyz, /metrics",
        super::truncated(uri.path(), 128)
    );
    error_response(&state, StatusCode::NOT_FOUND, message)
}

async fn method_not_allowed(
    Shared(state): Shared_,
    method: Method,
    uri: axum::http::Uri,
) -> Response {
    let message = format!(
        "method {method} is not allowed on {}",
        super::truncated(uri.path(), 128)
    );
    error_response(&state, StatusCode::METHOD_NOT_ALLOWED, message)
}

fn error_response(state: &State, status: StatusCode, message: String) -> Response {
    state.metrics().request_error(ErrorCode::InvalidInput);
    let decision = Decision::failed(ErrorCode::InvalidInput, message, FailMode::Closed);
    let mut response = json_response(status, &decision);
    response.headers_mut().insert(
        ERROR_HEADER,
        HeaderValue::from_static(ErrorCode::InvalidInput.as_str()),
    );
    response
}

/// The policy name of the path; one that cannot be decoded names no policy.
fn policy_name(name: Result<Path<String>, axum::extract::rejection::PathRejection>) -> String {
    match name {
        Ok(Path(name)) => name,
        Err(_) => String::new(),
    }
}

/// Reads a request body of at most `server.max_body_bytes`. An unknown policy
/// is answered first (404) without reading; an oversized body is 413.
async fn read_input(
    state: &State,
    generation: &Generation,
    name: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, Answer> {
    let trace = || Parent::from_headers(headers);
    if !generation.is_configured(name) {
        return Err(state.not_found(generation, name));
    }
    let limit = generation.max_body_bytes();
    let too_large = |size: String| {
        state.reject(
            generation,
            name,
            Outcome::TooLarge,
            format!("request body is {size}; server.max_body_bytes allows {limit}"),
            trace(),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared
        && declared > limit as u64
    {
        return Err(too_large(format!("{declared} bytes")));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large("larger than that".to_owned())),
        Err(e) => Err(state.reject(
            generation,
            name,
            Outcome::BadRequest,
            format!("request body could not be read: {e}"),
            trace(),
        )),
    }
}

/// Status of a JSON answer: 200 for a decision (even a failed evaluation),
/// 400 for invalid input, 404 for an unknown policy, 413 for an oversized
/// body, 503 when the policy cannot evaluate now (loading, not loaded, max_in_flight).
fn json_status(answer: &Answer) -> StatusCode {
    match answer.outcome {
        Outcome::Evaluated if answer.error_code() == Some(ErrorCode::InvalidInput) => {
            StatusCode::BAD_REQUEST
        }
        Outcome::Evaluated => StatusCode::OK,
        Outcome::NotFound => StatusCode::NOT_FOUND,
        Outcome::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Outcome::BadRequest => StatusCode::BAD_REQUEST,
        Outcome::Loading | Outcome::NotLoaded | Outcome::Overloaded => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// The decision with `policy`, `version`, `decision_id` (and `refused` when
/// the daemon answered without evaluating). The host's fields are the only
/// ones of their names: a guest's `policy`, `version`, `decision_id`,
/// `trace_id` or `refused` is dropped (logged at debug), never rendered
/// beside or before the host's.
struct DecisionBody<'a> {
    decision: &'a Decision,
    policy: &'a str,
    version: Option<&'a str>,
    decision_id: &'a str,
    trace_id: Option<&'a str>,
    refused: Option<&'static str>,
}

/// Members of a JSON answer that only the host sets (`error` too: a guest
/// that sets it is refused when its decision is read).
const HOST_FIELDS: [&str; 6] = [
    "policy",
    "version",
    "decision_id",
    "trace_id",
    "refused",
    "error",
];

impl<'a> DecisionBody<'a> {
    fn new(answer: &'a Answer) -> Self {
        note_dropped_fields(answer);
        DecisionBody {
            decision: &answer.decision,
            policy: &answer.policy,
            version: answer.version.as_deref(),
            decision_id: &answer.decision_id,
            trace_id: answer.trace_id.as_deref(),
            refused: answer.outcome.refusal(),
        }
    }
}

/// Says (at debug) which guest fields an answer leaves out.
fn note_dropped_fields(answer: &Answer) {
    for name in HOST_FIELDS {
        if answer.decision.extra.contains_key(name) {
            tracing::debug!(
                policy = %answer.policy,
                decision_id = %answer.decision_id,
                field = name,
                "guest decision field dropped: the host sets it"
            );
        }
    }
}

/// Writes the decision's members into `map`: the guest's fields without
/// the host's names, then the host's `error` when it set one.
fn write_decision<M: SerializeMap>(map: &mut M, d: &Decision) -> Result<(), M::Error> {
    map.serialize_entry("allow", &d.allow)?;
    if let Some(reason) = &d.reason {
        map.serialize_entry("reason", reason)?;
    }
    if let Some(status) = d.status {
        map.serialize_entry("status", &status)?;
    }
    if !d.headers.is_empty() {
        map.serialize_entry("headers", &d.headers)?;
    }
    for (name, value) in &d.extra {
        if !HOST_FIELDS.contains(&name.as_str()) {
            map.serialize_entry(name, value)?;
        }
    }
    if let Some(error) = &d.error {
        map.serialize_entry("error", error)?;
    }
    Ok(())
}

/// The decision as `/v1/data` gives it in `result`: the host's names are
/// the host's there too, so a guest cannot plant a `decision_id` a client
/// could take for the answer's own.
struct ResultBody<'a>(&'a Decision);

impl Serialize for ResultBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        write_decision(&mut map, self.0)?;
        map.end()
    }
}

impl Serialize for DecisionBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        write_decision(&mut map, self.decision)?;
        map.serialize_entry("policy", self.policy)?;
        if let Some(version) = self.version {
            map.serialize_entry("version", version)?;
        }
        map.serialize_entry("decision_id", self.decision_id)?;
        if let Some(trace_id) = self.trace_id {
            map.serialize_entry("trace_id", trace_id)?;
        }
        if let Some(refused) = self.refused {
            map.serialize_entry("refused", refused)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct OpaBody<'a> {
    result: ResultBody<'a>,
    decision_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

fn json_answer(status: StatusCode, answer: &Answer, body: &impl Serialize) -> Response {
    let mut response = json_response(status, body);
    tag(response.headers_mut(), answer);
    if answer.outcome == Outcome::Overloaded {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Adds the decision id, the version that answered and, when the decision
/// failed, its error code.
fn tag(headers: &mut HeaderMap, answer: &Answer) {
    if let Ok(id) = HeaderValue::from_str(&answer.decision_id) {
        headers.insert(DECISION_ID_HEADER, id);
    }
    if let Some(version) = &answer.version
        && let Ok(version) = HeaderValue::from_str(version)
    {
        headers.insert(crate::config::defaults::VERSION_HEADER, version);
    }
    if let Some(code) = answer.error_code() {
        headers.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(JSON))],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "answer could not be encoded");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(
                    ERROR_HEADER,
                    HeaderValue::from_static(ErrorCode::Internal.as_str()),
                )],
                "answer could not be encoded",
            )
                .into_response()
        }
    }
}
