//! Envoy ext_authz v3 over gRPC (`envoy.service.auth.v3.Authorization/Check`)
//! on `server.grpc_listen`, with Envoy's own messages (`envoy-types`). A
//! CheckRequest becomes the forward-auth input of DESIGN §2; the answer becomes
//! an OkHttpResponse (decision headers) or a DeniedHttpResponse (status, reason).
//! The service is written against tonic's `Grpc` with its own codec so that a
//! request that does not decode is answered `INVALID_ARGUMENT` with the DESIGN
//! §3 code (`x-sandgate-error: invalid_input`), like every other error status.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use envoy_types::ext_authz::v3::pb::{
    Address, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue,
    HeaderValueOption, HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use prost::Message as _;
use tokio::net::TcpListener;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Code, Status};

use super::authz::{self, DECISION_ID_HEADER, ERROR_HEADER, ForwardRequest, Source};
use super::connections::{Limits, Listener};
use super::registry::Generation;
use super::{Answer, Outcome, State};
use crate::decision::ErrorCode;
use crate::telemetry::traces::Parent;

const SERVICE: &str = "envoy.service.auth.v3.Authorization";
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
/// The CheckRequest context extension naming the policy.
const POLICY_EXTENSION: &str = "policy";
/// How often an idle connection's peer is pinged, and how long it has to answer.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves ext_authz on `listener` until `shutdown` completes, then lets
/// in-flight calls finish.
/// Connections count under the shared `server.max_connections` cap; one that
/// has not sent its HTTP/2 handshake within `server.header_read_timeout_ms` is
/// closed, and keep-alive pings close one whose peer stopped answering.
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    limits: Arc<Limits>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (admitted, incoming) = tokio::sync::mpsc::channel::<std::io::Result<_>>(1);
    let accepting = tokio::spawn(async move {
        loop {
            let connection = limits.accept(&listener, Listener::Grpc).await;
            if admitted.send(Ok(connection.stream)).await.is_err() {
                return;
            }
        }
    });
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .serve_with_incoming_shutdown(
            Authorization { state },
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            shutdown,
        )
        .await;
    accepting.abort();
    served
}

/// The `Authorization` service: routes `Check`, refuses every other method.
#[derive(Clone)]
struct Authorization {
    state: Arc<State>,
}

impl NamedService for Authorization {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<B> tower::Service<http::Request<B>> for Authorization
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let state = Arc::clone(&self.state);
        if request.uri().path() != CHECK_PATH {
            let message = format!(
                "no method {}; this server implements {CHECK_PATH}",
                super::truncated(request.uri().path(), 128)
            );
            state.metrics().request_error(ErrorCode::InvalidInput);
            return Box::pin(async move { Ok(invalid(Code::Unimplemented, message).into_http()) });
        }
        Box::pin(async move {
            let generation = state.current();
            let limit = generation.max_body_bytes();
            let mut grpc = Grpc::new(CheckCodec).apply_max_message_size_config(Some(limit), None);
            let mut response = grpc
                .unary(
                    Check {
                        state: Arc::clone(&state),
                        generation,
                    },
                    request,
                )
                .await;
            // A status tonic produced before our handler ran (a truncated frame,
            // a message over the limit, an unsupported encoding) is the
            // caller's fault: tag it like our own refusals.
            let headers = response.headers_mut();
            let failed = headers
                .get("grpc-status")
                .is_some_and(|s| s.as_bytes() != b"0");
            if failed && !headers.contains_key(ERROR_HEADER) {
                state.metrics().request_error(ErrorCode::InvalidInput);
                headers.insert(
                    ERROR_HEADER,
                    http::HeaderValue::from_static(ErrorCode::InvalidInput.as_str()),
                );
            }
            Ok(response)
        })
    }
}

/// A status carrying `x-sandgate-error: invalid_input`.
fn invalid(code: Code, message: String) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(
        ERROR_HEADER,
        MetadataValue::from_static(ErrorCode::InvalidInput.as_str()),
    );
    Status::with_metadata(code, message, metadata)
}

/// One `Check` call, answered from the generation serving when it arrived.
struct Check {
    state: Arc<State>,
    generation: Arc<Generation>,
}

impl UnaryService<Decoded> for Check {
    type Response = CheckResponse;
    type Future = BoxFuture<Result<tonic::Response<CheckResponse>, Status>>;

    fn call(&mut self, request: tonic::Request<Decoded>) -> Self::Future {
        let state = Arc::clone(&self.state);
        let generation = Arc::clone(&self.generation);
        Box::pin(async move {
            let metadata = Parent::from_headers(request.metadata().as_ref());
            let check = match request.into_inner() {
                Ok(check) => check,
                Err(e) => {
                    state.metrics().request_error(ErrorCode::InvalidInput);
                    return Err(invalid(
                        Code::InvalidArgument,
                        format!("CheckRequest could not be decoded: {e}"),
                    ));
                }
            };
            let answer = check_answer(&state, &generation, check, metadata).await;
            Ok(tonic::Response::new(check_response(&answer)))
        })
    }
}

/// `metadata` is the trace context of the gRPC call; the original request's
/// own `traceparent` (in its attributes) wins when present.
async fn check_answer(
    state: &State,
    generation: &Generation,
    check: CheckRequest,
    metadata: Parent,
) -> Answer {
    let attributes = check.attributes.unwrap_or_default();
    let named = attributes
        .context_extensions
        .get(POLICY_EXTENSION)
        .filter(|p| !p.is_empty());
    let name = match (named, generation.only_policy()) {
        (Some(name), _) => name.clone(),
        (None, Some(only)) => only.to_owned(),
        (None, None) => {
            return state.unattributed(
                "",
                ErrorCode::PolicyNotFound,
                Outcome::NotFound,
                "CheckRequest names no policy: set context_extensions[\"policy\"] (more than one policy is configured)"
                    .to_owned(),
            );
        }
    };
    let Some(http) = attributes.request.and_then(|r| r.http) else {
        return state.reject(
            generation,
            &name,
            Outcome::BadRequest,
            "CheckRequest has no attributes.request.http".to_owned(),
            metadata,
        );
    };
    let trace = match Parent::from_map(&http.headers) {
        from_request if from_request.trace_id().is_some() => from_request,
        _ => metadata,
    };
    let request = forward_request(http, source_address(attributes.source));
    let input = Bytes::from(request.to_input());
    state
        .evaluate(generation, &name, input, trace, &request.headers)
        .await
}

/// The guest input of a CheckRequest's bytes, as `Check` maps it; `None`
/// when it has no `attributes.request.http` (public for the fuzz targets).
pub fn check_request_input(bytes: &[u8]) -> Result<Option<Vec<u8>>, prost::DecodeError> {
    let attributes = CheckRequest::decode(bytes)?.attributes.unwrap_or_default();
    let Some(http) = attributes.request.and_then(|r| r.http) else {
        return Ok(None);
    };
    let request = forward_request(http, source_address(attributes.source));
    Ok(Some(request.to_input()))
}

/// The downstream address of the original request, when Envoy gives one.
fn source_address(source: Option<Peer>) -> Option<String> {
    source
        .and_then(|peer| peer.address)
        .and_then(|address| match address.address {
            Some(Address::SocketAddress(socket)) if !socket.address.is_empty() => {
                Some(socket.address)
            }
            _ => None,
        })
}

/// The forward-auth input of an Envoy HttpRequest: `path` carries the query
/// (Envoy leaves `query` empty); headers come from `headers`, or from
/// `header_map` when Envoy sends raw header values.
fn forward_request(http: HttpRequest, source: Option<String>) -> ForwardRequest {
    let (path, mut query) = authz::split_target(&http.path);
    if !http.query.is_empty() {
        query = http.query;
    }
    let mut headers =
        authz::collect_headers(http.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
    if let Some(map) = &http.header_map {
        let raw = map.headers.iter().map(|h| {
            let value = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                h.raw_value.as_slice()
            };
            (h.key.as_str(), value)
        });
        for (name, value) in authz::collect_headers(raw) {
            headers.entry(name).or_insert(value);
        }
    }
    let host = if http.host.is_empty() {
        http.headers.get(":authority").cloned().unwrap_or_default()
    } else {
        http.host
    };
    ForwardRequest {
        method: http.method.to_ascii_uppercase(),
        path,
        query,
        host,
        headers,
        source: source.map(|address| Source { address }),
    }
}

/// The CheckResponse of an answer: OK with the decision headers on allow;
/// on deny a DeniedHttpResponse and the rpc status saying why
/// (PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT or UNAVAILABLE). The error
/// code is in `x-sandgate-error` and in `dynamic_metadata`.
fn check_response(answer: &Answer) -> CheckResponse {
    let decision = &answer.decision;
    let mut headers: Vec<HeaderValueOption> = authz::decision_headers(answer)
        .into_iter()
        .map(|(name, value)| header(name.as_str(), &String::from_utf8_lossy(value.as_bytes())))
        .collect();
    headers.push(header(DECISION_ID_HEADER, &answer.decision_id));
    if let Some(code) = answer.error_code() {
        headers.push(header(ERROR_HEADER, code.as_str()));
    }
    let (code, http_response) = if decision.allow {
        (
            Code::Ok,
            HttpResponse::OkResponse(OkHttpResponse {
                headers,
                ..Default::default()
            }),
        )
    } else {
        let status = authz::proxy_status(answer);
        let status =
            HttpStatusCode::try_from(i32::from(status)).unwrap_or(HttpStatusCode::Forbidden);
        let code = match answer.outcome {
            Outcome::Evaluated if answer.error_code() == Some(ErrorCode::InvalidInput) => {
                Code::InvalidArgument
            }
            Outcome::Evaluated => Code::PermissionDenied,
            Outcome::NotFound => Code::NotFound,
            Outcome::TooLarge | Outcome::BadRequest => Code::InvalidArgument,
            Outcome::Loading | Outcome::NotLoaded | Outcome::Overloaded => Code::Unavailable,
        };
        (
            code,
            HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: status as i32,
                }),
                headers,
                body: decision
                    .reason
                    .clone()
                    .unwrap_or_else(|| "denied".to_owned()),
            }),
        )
    };
    let message = match (&decision.error, &decision.reason) {
        (Some(error), _) => format!("{}: {}", error.code, error.message),
        (None, Some(reason)) => reason.clone(),
        (None, None) => String::new(),
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: code as i32,
            message,
            details: Vec::new(),
        }),
        dynamic_metadata: Some(metadata(answer)),
        http_response: Some(http_response),
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn metadata(answer: &Answer) -> Struct {
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let mut fields = HashMap::from([
        ("policy".to_owned(), text(&answer.policy)),
        ("decision_id".to_owned(), text(&answer.decision_id)),
        (
            "allow".to_owned(),
            Value {
                kind: Some(Kind::BoolValue(answer.decision.allow)),
            },
        ),
    ]);
    if let Some(version) = &answer.version {
        fields.insert("version".to_owned(), text(version));
    }
    if let Some(trace_id) = &answer.trace_id {
        fields.insert("trace_id".to_owned(), text(trace_id));
    }
    if let Some(code) = answer.error_code() {
        fields.insert("error_code".to_owned(), text(code.as_str()));
    }
    Struct { fields }
}

/// A CheckRequest, or why its bytes are not one: decoding never fails the
/// stream, so the handler can answer with the contract code.
type Decoded = Result<CheckRequest, prost::DecodeError>;

#[derive(Clone, Copy)]
struct CheckCodec;

impl Codec for CheckCodec {
    type Encode = CheckResponse;
    type Decode = Decoded;
    type Encoder = CheckCodec;
    type Decoder = CheckCodec;

    fn encoder(&mut self) -> CheckCodec {
        *self
    }

    fn decoder(&mut self) -> CheckCodec {
        *self
    }
}

impl Encoder for CheckCodec {
    type Item = CheckResponse;
    type Error = Status;

    fn encode(&mut self, item: CheckResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("CheckResponse could not be encoded: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for CheckCodec {
    type Item = Decoded;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Decoded>, Status> {
        let decoded = CheckRequest::decode(&mut *src);
        // A message that fails to decode leaves bytes behind; consume them so
        // the stream stays aligned and the handler answers with the code.
        let rest = src.remaining();
        src.advance(rest);
        Ok(Some(decoded))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
