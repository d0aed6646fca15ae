//! OTLP trace receivers the daemon exports to (gRPC with the
//! `opentelemetry-proto` tonic stubs, HTTP/protobuf decoded with prost), and
//! the received spans read back by trace and name. Used by the tracing and
//! probes tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::Value;

use super::{Daemon, eventually, json_body};

/// Every export request a receiver got.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

/// One received span with the resource it came from.
#[derive(Clone, Debug)]
pub struct Got {
    pub resource: HashMap<String, String>,
    pub span: Span,
}

impl Got {
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

pub fn attr(list: &[KeyValue], key: &str) -> Option<String> {
    list.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
        .map(|v| match v {
            any_value::Value::StringValue(s) => s.clone(),
            any_value::Value::BoolValue(b) => b.to_string(),
            any_value::Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Received {
    pub fn spans(&self) -> Vec<Got> {
        let requests = self.0.lock().expect("received");
        let mut out = Vec::new();
        for request in requests.iter() {
            for resource in &request.resource_spans {
                let attributes: HashMap<String, String> = resource
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .filter_map(|kv| {
                        Some((kv.key.clone(), attr(std::slice::from_ref(kv), &kv.key)?))
                    })
                    .collect();
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        out.push(Got {
                            resource: attributes.clone(),
                            span: span.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Waits until the spans of `trace_id` include a finished `sandgate.evaluate`
    /// and `want` spans in all, then returns them.
    pub async fn trace(&self, trace_id: &str, want: usize) -> Vec<Got> {
        eventually(
            Duration::from_secs(15),
            format!("trace {trace_id} arrived complete"),
            async || {
                let spans: Vec<Got> = self
                    .spans()
                    .into_iter()
                    .filter(|g| g.trace_id() == trace_id)
                    .collect();
                if spans.len() >= want && spans.iter().any(|g| g.span.name == "sandgate.evaluate") {
                    return Ok(spans);
                }
                Err(format!(
                    "{spans:#?}\nall: {:#?}",
                    self.spans()
                        .iter()
                        .map(|g| (g.trace_id(), g.span.name.clone()))
                        .collect::<Vec<_>>()
                ))
            },
        )
        .await
    }
}

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .0
            .lock()
            .expect("received")
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on loopback.
pub async fn grpc_receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Received::default();
    let service = TraceServiceServer::new(Collector(received.clone()));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                service,
                tonic::transport::server::TcpIncoming::from(listener),
                std::future::pending::<()>(),
            )
            .await;
    });
    (addr, received)
}

/// An OTLP/HTTP receiver on loopback (`POST /v1/traces`, binary protobuf).
pub async fn http_receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Received::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |headers: HeaderMap, body: Bytes| {
            let store = store.clone();
            async move {
                assert_eq!(
                    headers.get("content-type").and_then(|v| v.to_str().ok()),
                    Some("application/x-protobuf")
                );
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                store.0.lock().expect("received").push(request);
                ExportTraceServiceResponse::default().encode_to_vec()
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, received)
}

/// POSTs `input` to the evaluate endpoint at `path`, with a client
/// `traceparent` when given, and returns the JSON answer.
pub async fn evaluate(
    client: &reqwest::Client,
    daemon: &Daemon,
    path: &str,
    input: &str,
    traceparent: Option<&str>,
) -> Value {
    let mut request = client.post(daemon.url(path)).body(input.to_owned());
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    json_body(request.send().await.expect("evaluate")).await
}

pub fn telemetry(endpoint: &str, extra: &str) -> String {
    format!("\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n{extra}\n")
}

pub fn named<'a>(spans: &'a [Got], name: &str) -> &'a Got {
    spans
        .iter()
        .find(|g| g.span.name == name)
        .unwrap_or_else(|| panic!("no `{name}` span in {spans:#?}"))
}
