//! `sandgate trace`: a small OTLP receiver (gRPC and HTTP/protobuf, the
//! official OpenTelemetry protobuf definitions) that prints the span tree of
//! every trace it receives. It lets a user without Jaeger see what the daemon
//! exports: point `[telemetry] otlp_endpoint` at it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, status};
use prost::Message as _;
use tonic::transport::server::TcpIncoming;

/// HTTP/2 receive window per stream of the gRPC receiver.
const RECEIVE_WINDOW: u32 = 4 << 20;
/// Largest HTTP/2 frame the gRPC receiver accepts (HTTP/2's default is 16 KiB).
const MAX_FRAME: u32 = 1 << 20;
/// Largest export request taken, over either protocol (tonic's and axum's
/// defaults are 4 and 2 MiB; sandgate sends about 2 MiB at most, other
/// senders may send more).
const MAX_REQUEST: usize = 16 << 20;

/// Serves OTLP/gRPC on `grpc` and, when given, OTLP/HTTP on `http`
/// (`POST /v1/traces`), printing each received trace to stdout. Runs until
/// the process is stopped.
pub async fn serve(grpc: SocketAddr, http: Option<SocketAddr>) -> anyhow::Result<()> {
    let grpc_listener = tokio::net::TcpListener::bind(grpc)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {grpc} (OTLP/gRPC): {e}"))?;
    eprintln!(
        "sandgate trace: OTLP/gRPC on {}",
        grpc_listener.local_addr()?
    );
    // An export request carries hundreds of spans (100 KiB and more): windows
    // larger than HTTP/2's default 64 KiB let it arrive without the sender
    // stopping for window updates part way.
    let grpc_server = tonic::transport::Server::builder()
        .initial_stream_window_size(RECEIVE_WINDOW)
        .initial_connection_window_size(4 * RECEIVE_WINDOW)
        .max_frame_size(MAX_FRAME)
        .serve_with_incoming_shutdown(
            TraceServiceServer::new(Printer).max_decoding_message_size(MAX_REQUEST),
            TcpIncoming::from(grpc_listener),
            std::future::pending::<()>(),
        );
    match http {
        None => grpc_server.await?,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (OTLP/HTTP): {e}"))?;
            eprintln!(
                "sandgate trace: OTLP/HTTP on http://{}/v1/traces",
                listener.local_addr()?
            );
            let app = axum::Router::new()
                .route("/v1/traces", axum::routing::post(http_export))
                .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST));
            tokio::try_join!(
                async { grpc_server.await.map_err(anyhow::Error::from) },
                async {
                    axum::serve(listener, app)
                        .await
                        .map_err(anyhow::Error::from)
                },
            )?;
        }
    }
    Ok(())
}

struct Printer;

#[tonic::async_trait]
impl TraceService for Printer {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        print(&request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_export(body: Bytes) -> (StatusCode, Vec<u8>) {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            print(&request);
            (
                StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("not an ExportTraceServiceRequest: {e}").into_bytes(),
        ),
    }
}

fn print(request: &ExportTraceServiceRequest) {
    let text = render(request);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The span trees of `request`, one block per trace: each span with its
/// duration and attributes, its events (`•`) and, on error, its status (`✗`).
pub fn render(request: &ExportTraceServiceRequest) -> String {
    let mut spans: Vec<(&str, &Span)> = Vec::new();
    for resource in &request.resource_spans {
        let service = resource
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .and_then(|a| a.value.as_ref())
            .and_then(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
                _ => None,
            })
            .unwrap_or("?");
        for scope in &resource.scope_spans {
            spans.extend(scope.spans.iter().map(|s| (service, s)));
        }
    }
    // Group by trace in the order traces first appear: linear in the spans
    // (an export carries hundreds of them).
    let mut traces: Vec<Trace<'_>> = Vec::new();
    let mut index: HashMap<&[u8], usize> = HashMap::new();
    for &(service, span) in &spans {
        let at = *index.entry(span.trace_id.as_slice()).or_insert_with(|| {
            traces.push((span.trace_id.as_slice(), Vec::new()));
            traces.len() - 1
        });
        traces[at].1.push((service, span));
    }
    let mut out = String::with_capacity(spans.len() * 160);
    let mut tree = Tree::default();
    for (trace, members) in traces {
        let service = members.first().map(|(s, _)| *s).unwrap_or("?");
        out.push_str("trace ");
        hex(&mut out, trace);
        let _ = writeln!(out, " ({service}, {} spans)", members.len());
        tree.build(members.iter().map(|(_, span)| *span));
        for &root in &tree.roots {
            let mut note = String::new();
            if !root.parent_span_id.is_empty() {
                note.push_str(" (child of remote span ");
                hex(&mut note, &root.parent_span_id);
                note.push(')');
            }
            write_span(&mut out, root, &tree, 1, &note);
        }
        out.push('\n');
    }
    out
}

/// One trace's id and its spans, each with the service that sent it.
type Trace<'a> = (&'a [u8], Vec<(&'a str, &'a Span)>);

/// The parent links of one trace's spans, in buffers reused from trace to
/// trace: no hashing, O(n log n) in the trace's spans.
#[derive(Default)]
struct Tree<'a> {
    /// The trace's span ids, sorted, to tell local parents from remote ones.
    ids: Vec<&'a [u8]>,
    /// Spans with a parent in the trace, by parent id, then start time.
    children: Vec<&'a Span>,
    /// Spans without one, by start time.
    roots: Vec<&'a Span>,
}

impl<'a> Tree<'a> {
    fn build(&mut self, spans: impl Iterator<Item = &'a Span> + Clone) {
        self.ids.clear();
        self.children.clear();
        self.roots.clear();
        self.ids.extend(spans.clone().map(|s| s.span_id.as_slice()));
        self.ids.sort_unstable();
        for span in spans {
            if self
                .ids
                .binary_search(&span.parent_span_id.as_slice())
                .is_ok()
            {
                self.children.push(span);
            } else {
                self.roots.push(span);
            }
        }
        self.children
            .sort_by_key(|s| (s.parent_span_id.as_slice(), s.start_time_unix_nano));
        self.roots.sort_by_key(|s| s.start_time_unix_nano);
    }

    fn children_of(&self, span: &Span) -> &[&'a Span] {
        let id = span.span_id.as_slice();
        let from = self
            .children
            .partition_point(|c| c.parent_span_id.as_slice() < id);
        let to = self
            .children
            .partition_point(|c| c.parent_span_id.as_slice() <= id);
        &self.children[from..to]
    }
}

fn write_span(out: &mut String, span: &Span, tree: &Tree<'_>, depth: usize, note: &str) {
    let indent = |out: &mut String| (0..depth).for_each(|_| out.push_str("  "));
    let micros = span
        .end_time_unix_nano
        .saturating_sub(span.start_time_unix_nano)
        / 1_000;
    indent(out);
    let _ = write!(out, "{} {micros}µs{note}", span.name);
    attributes(out, &span.attributes);
    if let Some(status) = &span.status
        && status.code == status::StatusCode::Error as i32
    {
        indent(out);
        out.push_str("  ✗ ");
        out.push_str(&status.message);
        out.push('\n');
    }
    for event in &span.events {
        indent(out);
        out.push_str("  • ");
        out.push_str(&event.name);
        attributes(out, &event.attributes);
    }
    for child in tree.children_of(span) {
        write_span(out, child, tree, depth + 1, "");
    }
}

/// ` key=value` for each attribute, then the end of the line.
fn attributes(out: &mut String, list: &[KeyValue]) {
    for kv in list {
        out.push(' ');
        out.push_str(&kv.key);
        out.push('=');
        value(out, kv.value.as_ref());
    }
    out.push('\n');
}

fn value(out: &mut String, v: Option<&AnyValue>) {
    let _ = match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => {
            out.push_str(s);
            Ok(())
        }
        Some(any_value::Value::BoolValue(b)) => write!(out, "{b}"),
        Some(any_value::Value::IntValue(i)) => write!(out, "{i}"),
        Some(any_value::Value::DoubleValue(d)) => write!(out, "{d}"),
        Some(other) => write!(out, "{other:?}"),
        None => Ok(()),
    };
}

fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::span::Event;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};

    fn string(key: &str, v: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn span(id: u8, parent: Option<u8>, name: &str, start: u64) -> Span {
        Span {
            trace_id: vec![0xab; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: name.into(),
            start_time_unix_nano: start,
            end_time_unix_nano: start + 2_000,
            ..Default::default()
        }
    }

    #[test]
    fn spans_print_as_a_tree_with_events_and_errors() {
        let mut root = span(1, None, "sandgate.evaluate", 0);
        root.attributes.push(string("policy", "snoop"));
        root.status = Some(Status {
            message: "wasi_denied: path_open".into(),
            code: status::StatusCode::Error as i32,
        });
        let mut guest = span(3, Some(1), "evaluate", 1_000);
        guest.events.push(Event {
            name: "wasi_denied".into(),
            attributes: vec![string("wasi.call", "path_open")],
            ..Default::default()
        });
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                    attributes: vec![string("service.name", "sandgate")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![guest, span(2, Some(1), "instantiate", 500), root],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let text = render(&request);
        assert_eq!(
            text,
            format!(
                "trace {} (sandgate, 3 spans)\n  sandgate.evaluate 2µs policy=snoop\n    ✗ wasi_denied: path_open\n    instantiate 2µs\n    evaluate 2µs\n      • wasi_denied wasi.call=path_open\n\n",
                "ab".repeat(16)
            )
        );
    }
}
