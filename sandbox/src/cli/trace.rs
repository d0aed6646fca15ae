//! `sandgate trace`: a small OTLP receiver (gRPC and HTTP/protobuf, the
//! official OpenTelemetry protobuf definitions) that prints the span tree of
//! recent traces. It lets a user without Jaeger see what the daemon exports:
//! point `[telemetry] otlp_endpoint` at it.
//!
//! A busy daemon exports tens of thousands of traces a second, more than a
//! terminal can print or anyone read. At most `--max-per-second` traces are
//! printed each second; the others are counted from the export request's
//! envelope, their spans left undecoded, and one line each second says how
//! many were not shown. `--all` prints every trace.
//!
//! Over 600 lines with its tests: both OTLP transports, the rate limit and
//! the printing of `sandgate trace`; it is to move to a CLI module.

mod render;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::transport::server::TcpIncoming;

use render::{count, render};

/// HTTP/2 receive window per stream of the gRPC receiver.
const RECEIVE_WINDOW: u32 = 4 << 20;
/// Largest HTTP/2 frame the gRPC receiver accepts (HTTP/2's default is 16 KiB).
const MAX_FRAME: u32 = 1 << 20;
/// Largest export request taken, over either protocol (tonic's and axum's
/// defaults are 4 and 2 MiB; sandgate sends about 2 MiB at most, other
/// senders may send more).
const MAX_REQUEST: usize = 16 << 20;
/// The gRPC method OTLP exporters call.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

// The arguments of `sandgate trace` (its help text is the variant's in `main.rs`).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// OTLP/gRPC listen address (point `telemetry.otlp_endpoint` here).
    #[arg(long, default_value = "127.0.0.1:4317")]
    pub listen: SocketAddr,
    /// Also receive OTLP/HTTP (`POST /v1/traces`) on this address.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Print at most this many traces a second; the others are counted,
    /// in one line a second.
    #[arg(long, default_value_t = 100, value_name = "TRACES")]
    pub max_per_second: u32,
    /// Print every trace received (for a file or a pipe).
    #[arg(long, conflicts_with = "max_per_second")]
    pub all: bool,
}

/// Runs `sandgate trace` until the process is stopped.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let limit = (!args.all).then_some(args.max_per_second);
    serve(args.listen, args.http_listen, limit).await
}

/// Serves OTLP/gRPC on `grpc` and, when given, OTLP/HTTP on `http`
/// (`POST /v1/traces`), printing received traces to stdout: at most
/// `max_per_second` a second, every one when `None`. Runs until the process
/// is stopped.
pub async fn serve(
    grpc: SocketAddr,
    http: Option<SocketAddr>,
    max_per_second: Option<u32>,
) -> anyhow::Result<()> {
    let view = Arc::new(View::new(max_per_second));
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
            GrpcExport(Arc::clone(&view)),
            TcpIncoming::from(grpc_listener),
            std::future::pending::<()>(),
        );
    let http_server = async {
        let Some(addr) = http else {
            return std::future::pending().await;
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (OTLP/HTTP): {e}"))?;
        eprintln!(
            "sandgate trace: OTLP/HTTP on http://{}/v1/traces",
            listener.local_addr()?
        );
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST))
            .with_state(Arc::clone(&view));
        axum::serve(listener, app)
            .await
            .map_err(anyhow::Error::from)
    };
    tokio::try_join!(
        async { grpc_server.await.map_err(anyhow::Error::from) },
        http_server,
        report_each_second(&view),
    )?;
    Ok(())
}

/// Prints, once a second, how many traces that second did not show.
async fn report_each_second(view: &View) -> anyhow::Result<()> {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    loop {
        every.tick().await;
        if let Some(line) = view.next_second() {
            print(&line);
        }
    }
}

/// An `ExportTraceServiceRequest` with its spans left encoded: the field
/// numbers of the official `trace_service.proto` and `trace.proto`, as far
/// down as a span. Spans are slices of the request's buffer, decoded as the
/// official `Span` only when printed.
#[derive(Clone, PartialEq, prost::Message)]
struct Export {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeSpans {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    spans: Vec<Bytes>,
}

/// A span's first field, its trace id; the others are skipped (and their
/// wire format checked) without decoding them.
#[derive(Clone, PartialEq, prost::Message)]
struct TraceId {
    #[prost(bytes = "bytes", tag = "1")]
    trace_id: Bytes,
}

/// OTLP/gRPC's `TraceService`, decoding requests as [`Export`]s (tonic's
/// generated server would decode every span).
#[derive(Clone)]
struct GrpcExport(Arc<View>);

impl tonic::server::NamedService for GrpcExport {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl<B> Service<http::Request<B>> for GrpcExport
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let view = Arc::clone(&self.0);
        Box::pin(async move {
            if request.uri().path() != EXPORT_PATH {
                return Ok(tonic::Status::unimplemented(format!(
                    "{} is not an OTLP trace export (this receiver serves {EXPORT_PATH})",
                    request.uri().path()
                ))
                .into_http());
            }
            let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, Export>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(MAX_REQUEST), None);
            Ok(grpc.unary(ExportMethod(view), request).await)
        })
    }
}

struct ExportMethod(Arc<View>);

impl tonic::server::UnaryService<Export> for ExportMethod {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Export>) -> Self::Future {
        std::future::ready(match self.0.print(request.into_inner()) {
            Ok(()) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
        })
    }
}

async fn http_export(State(view): State<Arc<View>>, body: Bytes) -> (StatusCode, Vec<u8>) {
    match Export::decode(body)
        .map_err(NotAnExport)
        .and_then(|export| view.print(export))
    {
        Ok(()) => (
            StatusCode::OK,
            ExportTraceServiceResponse::default().encode_to_vec(),
        ),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
    }
}

fn print(text: &str) {
    if text.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Why an export request was refused, over either protocol.
#[derive(Debug, thiserror::Error)]
#[error("not an ExportTraceServiceRequest: {0}")]
struct NotAnExport(prost::DecodeError);

/// What has been printed this second, and what not.
struct View {
    /// At most this many traces are printed a second; `None`: every one.
    max_per_second: Option<u32>,
    second: Mutex<Second>,
}

#[derive(Default)]
struct Second {
    shown: u32,
    hidden_traces: u64,
    hidden_spans: u64,
}

impl View {
    fn new(max_per_second: Option<u32>) -> View {
        View {
            max_per_second,
            second: Mutex::new(Second::default()),
        }
    }

    /// The span trees of the traces in `export` this second still has room
    /// for, one block per trace in the order they first appear; the others
    /// are counted. A trace whose spans come in several requests (the
    /// `kernel` span follows its decision's) is a block in each.
    fn receive(&self, export: Export) -> Result<String, prost::DecodeError> {
        let traces = Received::group(&export)?;
        let show = {
            let mut second = self.second.lock().unwrap_or_else(PoisonError::into_inner);
            let room = self.max_per_second.map_or(traces.len(), |max| {
                max.saturating_sub(second.shown) as usize
            });
            let show = room.min(traces.len());
            second.shown += show as u32;
            for trace in &traces[show..] {
                second.hidden_traces += 1;
                second.hidden_spans += trace.spans.len() as u64;
            }
            show
        };
        render(&traces[..show])
    }

    /// Prints what [`View::receive`] makes of `export`.
    fn print(&self, export: Export) -> Result<(), NotAnExport> {
        print(&self.receive(export).map_err(NotAnExport)?);
        Ok(())
    }

    /// The line saying what this second did not print, if anything; the next
    /// second starts.
    fn next_second(&self) -> Option<String> {
        let second =
            std::mem::take(&mut *self.second.lock().unwrap_or_else(PoisonError::into_inner));
        let max = self.max_per_second?;
        (second.hidden_traces > 0).then(|| {
            format!(
                "… {} more trace{} ({}) in the last second not shown: at most {max} a second (--all prints every trace)\n\n",
                second.hidden_traces,
                if second.hidden_traces == 1 { "" } else { "s" },
                count(second.hidden_spans, "span"),
            )
        })
    }
}

/// One trace's spans in one export request, still encoded, and the service
/// that sent them.
struct Received<'a> {
    id: Bytes,
    service: &'a str,
    spans: Vec<&'a Bytes>,
}

impl<'a> Received<'a> {
    /// The request's spans by trace, in the order traces first appear: linear
    /// in the spans (an export carries hundreds of them).
    fn group(export: &'a Export) -> Result<Vec<Received<'a>>, prost::DecodeError> {
        let mut traces: Vec<Received<'a>> = Vec::new();
        let mut index: HashMap<Bytes, usize> = HashMap::new();
        for resource in &export.resource_spans {
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
            for span in resource.scope_spans.iter().flat_map(|s| &s.spans) {
                let id = TraceId::decode(span.clone())?.trace_id;
                let at = *index.entry(id.clone()).or_insert_with(|| {
                    traces.push(Received {
                        id,
                        service,
                        spans: Vec::new(),
                    });
                    traces.len() - 1
                });
                traces[at].spans.push(span);
            }
        }
        Ok(traces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
    use opentelemetry_proto::tonic::trace::v1 as official;
    use opentelemetry_proto::tonic::trace::v1::span::Event;
    use opentelemetry_proto::tonic::trace::v1::{Span, status};

    fn string(key: &str, v: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn span(trace: u8, id: u8, parent: Option<u8>, name: &str, start: u64) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: name.into(),
            start_time_unix_nano: start,
            end_time_unix_nano: start + 2_000,
            ..Default::default()
        }
    }

    /// `spans` as sandgate's exporter sends them, encoded with the official
    /// definitions and decoded as the receiver does.
    fn export(spans: Vec<Span>) -> Export {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![official::ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![string("service.name", "sandgate")],
                    ..Default::default()
                }),
                scope_spans: vec![official::ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        Export::decode(Bytes::from(request.encode_to_vec())).expect("an export")
    }

    #[test]
    fn spans_print_as_a_tree_with_events_and_errors() {
        let mut root = span(0xab, 1, None, "sandgate.evaluate", 0);
        root.attributes.push(string("policy", "snoop"));
        root.status = Some(official::Status {
            message: "wasi_denied: path_open".into(),
            code: status::StatusCode::Error as i32,
        });
        let mut guest = span(0xab, 3, Some(1), "evaluate", 1_000);
        guest.events.push(Event {
            name: "wasi_denied".into(),
            attributes: vec![string("wasi.call", "path_open")],
            ..Default::default()
        });
        let spans = vec![guest, span(0xab, 2, Some(1), "instantiate", 500), root];
        let text = View::new(None).receive(export(spans)).expect("printed");
        assert_eq!(
            text,
            format!(
                "trace {} (sandgate, 3 spans)\n  sandgate.evaluate 2µs policy=snoop\n    ✗ wasi_denied: path_open\n    instantiate 2µs\n    evaluate 2µs\n      • wasi_denied wasi.call=path_open\n\n",
                "ab".repeat(16)
            )
        );
    }

    #[test]
    fn a_kernel_spans_syscalls_print_a_line_each() {
        let int = |key: &str, i: i64| KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(i)),
            }),
            ..Default::default()
        };
        let root = span(0xcd, 1, None, "sandgate.evaluate", 0);
        let mut kernel = span(0xcd, 2, Some(1), "kernel", 0);
        kernel.attributes = vec![
            int("kernel.syscalls.count", 4),
            int("syscall.openat.instantiate.count", 1),
            int("syscall.openat.instantiate.time_ns", 2000),
            int("syscall.statx.guest.count", 3),
            int("syscall.statx.guest.time_ns", 900),
        ];
        let text = View::new(None)
            .receive(export(vec![root, kernel]))
            .expect("printed");
        assert_eq!(
            text,
            format!(
                "trace {} (sandgate, 2 spans)\n  sandgate.evaluate 2µs\n    kernel 2µs kernel.syscalls.count=4\n      · syscall.openat.instantiate count=1 time_ns=2000\n      · syscall.statx.guest count=3 time_ns=900\n\n",
                "cd".repeat(16)
            )
        );
    }

    #[test]
    fn traces_past_the_limit_are_counted_and_reported_once_a_second() {
        let view = View::new(Some(2));
        // Three traces of two spans, interleaved: grouped by trace first.
        let spans = (1..=3u8)
            .flat_map(|t| {
                [
                    span(t, 1, None, "sandgate.evaluate", 0),
                    span(t, 2, Some(1), "evaluate", 1),
                ]
            })
            .rev()
            .collect();
        let text = view.receive(export(spans)).expect("printed");
        assert_eq!(text.matches("trace ").count(), 2, "{text}");
        assert!(text.starts_with(&format!("trace {} (sandgate, 2 spans)", "03".repeat(16))));
        assert!(text.contains(&format!("trace {} ", "02".repeat(16))));
        // The second is full: the next request is only counted.
        let text = view
            .receive(export(vec![span(4, 1, None, "sandgate.evaluate", 0)]))
            .expect("printed");
        assert_eq!(text, "");
        assert_eq!(
            view.next_second().expect("a line for the hidden traces"),
            "… 2 more traces (3 spans) in the last second not shown: at most 2 a second (--all prints every trace)\n\n"
        );
        // A new second prints again, and says nothing of a second that hid nothing.
        let text = view
            .receive(export(vec![span(5, 1, None, "sandgate.evaluate", 0)]))
            .expect("printed");
        assert!(
            text.starts_with(&format!("trace {} ", "05".repeat(16))),
            "{text}"
        );
        assert_eq!(view.next_second(), None);
    }

    #[test]
    fn a_span_that_is_not_protobuf_is_refused_though_not_shown() {
        let view = View::new(Some(0));
        let mut request = export(vec![span(1, 1, None, "sandgate.evaluate", 0)]);
        request.resource_spans[0].scope_spans[0]
            .spans
            .push(Bytes::from_static(&[0x0a, 0xff]));
        assert!(view.receive(request).is_err());
    }
}
