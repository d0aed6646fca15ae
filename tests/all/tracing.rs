//! OpenTelemetry traces of the real daemon, received by OTLP receivers the
//! tests start, built on the official protobuf definitions (gRPC with the
//! `opentelemetry-proto` tonic stubs, HTTP/protobuf decoded with prost): the
//! span tree of a forward-auth request through real nginx in the client's
//! trace, a bridged call that carries the decision's trace to the service it
//! calls, a hostile guest's refused calls as events, resource attributes and
//! sampling, a burst of decisions exported whole, collectors that are down
//! or stop answering, and `sandgate trace`, the terminal view.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span, status};
use prost::Message as _;
use serde_json::{Value, json};

use crate::support::otlp::{Got, attr, evaluate, grpc_receiver, http_receiver, named, telemetry};
use crate::support::*;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_auth_request_through_nginx_joins_the_clients_trace() {
    let (collector, received) = grpc_receiver().await;
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        &telemetry(&format!("http://{collector}"), ""),
        &rbac_policy("rbac"),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let backend = Backend::start();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = start_nginx(&nginx_dir, daemon.http, "rbac", backend.addr);

    let allowed = client
        .get(format!("http://{}/api/orders/7", nginx.addr))
        .header("x-user", "alice")
        .header("x-roles", "viewer")
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .expect("through nginx");
    assert_eq!(allowed.status(), 200, "{}", nginx.error_log());

    let spans = received.trace(CLIENT_TRACE, 3).await;
    let root = named(&spans, "sandgate.evaluate");
    assert_eq!(
        root.parent_id(),
        CLIENT_SPAN,
        "the client's span is the parent"
    );
    assert_eq!(root.span.kind, span::SpanKind::Server as i32);
    assert_eq!(root.attr("policy").as_deref(), Some("rbac"));
    assert_eq!(root.attr("version").as_deref(), Some("v1"));
    assert!(
        root.attr("digest")
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    assert_eq!(root.attr("decision.allow").as_deref(), Some("true"));
    assert!(
        root.attr("duration_us")
            .is_some_and(|d| d.parse::<u64>().is_ok())
    );
    assert!(root.attr("wasm.fuel_or_epochs").is_some());
    for child in ["instantiate", "evaluate"] {
        let child = named(&spans, child);
        assert_eq!(child.parent_id(), root.span_id());
        assert!(child.span.start_time_unix_nano >= root.span.start_time_unix_nano);
        assert!(child.span.end_time_unix_nano <= root.span.end_time_unix_nano);
    }
    // The decision the backend was told about is the traced one, and its
    // audit line names the same trace.
    let decision_id = backend.received()[0]
        .header("x-sandgate-decision-id")
        .expect("decision id")
        .to_owned();
    assert_eq!(root.attr("decision_id"), Some(decision_id.clone()));
    drop(nginx);
    tokio::task::block_in_place(|| daemon.stop());
    let audit = audit_lines(&dir.path().join("audit.jsonl"));
    let line = audit
        .iter()
        .find(|l| l["decision_id"] == decision_id.as_str())
        .expect("audited");
    assert_eq!(line["trace_id"], CLIENT_TRACE);
}

#[tokio::test]
async fn a_bridged_call_carries_the_decisions_trace_to_the_service_it_calls() {
    let (collector, received) = grpc_receiver().await;
    // The introspection endpoint records the traceparent it is sent.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/introspect",
        post(move |headers: HeaderMap| {
            let record = Arc::clone(&record);
            async move {
                let traceparent = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                record.lock().expect("seen").push(traceparent);
                ([("content-type", "application/json")], r#"{"active":true}"#)
            }
        }),
    );
    let auth = serve(app).await;

    let dir = tempdir();
    let url = format!("http://{auth}/introspect");
    // The guest tries to forge its own traceparent; the bridge replaces it.
    let request = json!({
        "method": "POST",
        "url": url,
        "headers": [["traceparent", format!("00-{}-{}-01", "1".repeat(32), "2".repeat(16))]],
        "body": "dG9rZW49Z29vZA=="
    })
    .to_string();
    let policy = wat_policy(
        dir.path(),
        "bridged",
        &response_guest(&request),
        &format!("timeout_ms = 2000\n[policy.egress]\nallow = [\"{url}\"]"),
    );
    let config = daemon_config(
        dir.path(),
        &telemetry(&format!("http://{collector}"), ""),
        &policy,
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let answer = evaluate(
        &client,
        &daemon,
        "/v1/policies/bridged/evaluate",
        "{}",
        None,
    )
    .await;
    let trace_id = answer["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the decision names its trace: {answer}"))
        .to_owned();

    let spans = received.trace(&trace_id, 4).await;
    let root = named(&spans, "sandgate.evaluate");
    assert!(
        root.span.parent_span_id.is_empty(),
        "a new trace starts here"
    );
    let guest = named(&spans, "evaluate");
    let call = named(&spans, "POST");
    assert_eq!(
        call.parent_id(),
        guest.span_id(),
        "the call happens inside the guest"
    );
    assert_eq!(call.span.kind, span::SpanKind::Client as i32);
    assert_eq!(call.attr("http.request.method").as_deref(), Some("POST"));
    assert_eq!(call.attr("url.full"), Some(url.clone()));
    assert_eq!(
        call.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(call.attr("server.port"), Some(auth.port().to_string()));

    let sent = seen.lock().expect("seen").clone();
    assert_eq!(
        sent,
        vec![format!("00-{trace_id}-{}-01", call.span_id())],
        "the service is called as a child of the bridged call's span"
    );
}

#[tokio::test]
async fn a_hostile_guests_refused_calls_are_span_events_and_failures_set_error_status() {
    let (collector, received) = grpc_receiver().await;
    let dir = tempdir();
    let snoop = |name: &str, on_denied: &str| {
        format!(
            "[[policy]]\nname = \"{name}\"\nmodule = \"{}\"\ntimeout_ms = 500\n[policy.wasi]\nallow = [\"fs_read\"]\non_denied = \"{on_denied}\"\npreopens = [{{ host = \"{}\", guest = \"/data\", mode = \"ro\" }}]\n",
            guest("snoop").display(),
            repo_root().join("examples/snoop/data").display()
        )
    };
    let config = daemon_config(
        dir.path(),
        &telemetry(
            &format!("http://{collector}"),
            "guest_log_level = \"debug\"",
        ),
        &format!("{}{}", snoop("snoop", "errno"), snoop("snoop-trap", "trap")),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let mut trace_ids = Vec::new();
    for policy in ["snoop", "snoop-trap"] {
        let answer = evaluate(
            &client,
            &daemon,
            &format!("/v1/policies/{policy}/evaluate"),
            "{}",
            None,
        )
        .await;
        assert_eq!(answer["allow"], false, "{answer}");
        trace_ids.push(answer["trace_id"].as_str().expect("trace id").to_owned());
    }

    // errno mode: every refused call is an event on the guest's span.
    let spans = received.trace(&trace_ids[0], 3).await;
    let guest = named(&spans, "evaluate");
    let denied: Vec<(Option<String>, Option<String>)> = guest
        .span
        .events
        .iter()
        .filter(|e| e.name == "wasi_denied")
        .map(|e| {
            (
                attr(&e.attributes, "wasi.call"),
                attr(&e.attributes, "wasi.detail"),
            )
        })
        .collect();
    assert!(
        denied.contains(&(Some("path_open".into()), Some("/etc/passwd".into()))),
        "{denied:?}"
    );
    for call in ["environ_sizes_get", "random_get", "path_unlink_file"] {
        assert!(
            denied.iter().any(|(c, _)| c.as_deref() == Some(call)),
            "{call} missing from {denied:?}"
        );
    }
    let root = named(&spans, "sandgate.evaluate");
    assert_eq!(root.attr("decision.allow").as_deref(), Some("false"));

    // trap mode: the first refusal ends the evaluation; the span says why.
    let spans = received.trace(&trace_ids[1], 3).await;
    let root = named(&spans, "sandgate.evaluate");
    let status = root.span.status.clone().expect("status");
    assert_eq!(status.code, status::StatusCode::Error as i32);
    assert!(
        status.message.starts_with("wasi_denied:"),
        "{}",
        status.message
    );
    assert_eq!(root.attr("error.code").as_deref(), Some("wasi_denied"));
    assert_eq!(named(&spans, "evaluate").span.events.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_names_the_service_and_sampling_follows_the_caller() {
    let (collector, received) = http_receiver().await;
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        &telemetry(
            &format!("http://{collector}"),
            "otlp_protocol = \"http/protobuf\"\nsampling_ratio = 0.0\nservice_name = \"orders-authz\"",
        ),
        &rbac_policy("rbac"),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let input = ALICE_READS;
    // Sampled by the caller: recorded although the ratio is 0.
    let sampled = evaluate(
        &client,
        &daemon,
        "/v1/policies/rbac/evaluate",
        input,
        Some(&format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")),
    )
    .await;
    assert_eq!(sampled["trace_id"], CLIENT_TRACE);
    // No caller context: a new trace, not sampled at ratio 0, but still named.
    let unsampled = evaluate(&client, &daemon, "/v1/policies/rbac/evaluate", input, None).await;
    let other = unsampled["trace_id"].as_str().expect("trace id").to_owned();
    assert_ne!(other, CLIENT_TRACE);

    // Shutdown exports what is buffered.
    daemon.signal("TERM");
    let exit = tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(20)));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "{}", daemon.logs());
    let spans = received.spans();
    let root = named(&spans, "sandgate.evaluate");
    assert_eq!(root.trace_id(), CLIENT_TRACE);
    assert!(spans.iter().all(|g| g.trace_id() != other), "{spans:#?}");
    assert_eq!(
        root.resource.get("service.name").map(String::as_str),
        Some("orders-authz")
    );
    assert_eq!(
        root.resource.get("service.version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(
        root.resource
            .get("service.instance.id")
            .is_some_and(|i| i.len() == 36)
    );
    assert!(
        root.resource
            .get("host.name")
            .is_some_and(|h| !h.is_empty())
    );
}

#[tokio::test]
async fn a_guest_that_logs_without_end_grows_its_span_only_to_the_event_limit() {
    let (collector, received) = grpc_receiver().await;
    let dir = tempdir();
    // Logs 300 times at info before allowing; the ABI passes on 256 of them.
    let wat = logging_guest(2, 300, 5);
    let config = daemon_config(
        dir.path(),
        &telemetry(&format!("http://{collector}"), ""),
        &wat_policy(dir.path(), "chatty", &wat, ""),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let answer = evaluate(&client, &daemon, "/v1/policies/chatty/evaluate", "{}", None).await;
    assert_eq!(answer["allow"], true, "{answer}");
    let trace_id = answer["trace_id"].as_str().expect("trace id");
    let spans = received.trace(trace_id, 3).await;
    let guest = &named(&spans, "evaluate").span;
    assert_eq!(guest.events.len(), 128, "events kept");
    assert!(guest.events.iter().all(|e| e.name == "guest.log"));
    assert_eq!(
        guest.dropped_events_count, 128,
        "the events past the limit are counted as dropped"
    );
}

/// A guest that logs `times` messages of `bytes` at `level`, then allows.
fn logging_guest(level: i32, times: u32, bytes: u32) -> String {
    abi_guest(
        r#"(import "sandgate" "log" (func $log (param i32 i32 i32)))"#,
        &format!(
            "(local $i i32)
    (loop $again
      (call $log (i32.const {level}) (i32.const 4096) (i32.const {bytes}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const {times}))))
    {ALLOW_RESULT}"
        ),
    )
}

/// A daemon serving `loud` and the `rbac` example, exporting to `endpoint`
/// with debug guest logs as span events.
async fn loud_daemon_exporting_to(
    endpoint: &str,
) -> (tempfile::TempDir, Arc<Daemon>, reqwest::Client) {
    daemon_exporting_to(endpoint, "guest_log_level = \"debug\"", |dir| {
        format!(
            "{}{}",
            // 128 messages of 16 KiB (at debug, so the daemon's own log leaves
            // them out): what the ABI and the event limit let into one span, 2 MiB.
            wat_policy(dir, "loud", &logging_guest(1, 128, 16 * 1024), ""),
            rbac_policy("rbac")
        )
    })
    .await
}

/// A ready daemon serving `policies` (written into its directory) and
/// exporting traces to `endpoint` with the `extra` telemetry keys, with a
/// client for it (and the directory it lives in).
async fn daemon_exporting_to(
    endpoint: &str,
    extra: &str,
    policies: impl FnOnce(&std::path::Path) -> String,
) -> (tempfile::TempDir, Arc<Daemon>, reqwest::Client) {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        &telemetry(endpoint, extra),
        &policies(dir.path()),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    (dir, Arc::new(daemon), client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_that_log_the_most_they_may_cost_no_other_decision_its_trace() {
    // Four 2 MiB spans and an `rbac` decision end within one export's wait:
    // more than the 4 MiB a gRPC receiver (tonic's default, as the
    // OpenTelemetry Collector's and Jaeger's) takes in one request.
    let (collector, received) = grpc_receiver().await;
    let (_dir, daemon, client) = loud_daemon_exporting_to(&format!("http://{collector}")).await;
    let mut traces = Vec::new();
    for policy in ["loud", "loud", "rbac", "loud", "loud"] {
        let path = format!("/v1/policies/{policy}/evaluate");
        let answer = evaluate(&client, &daemon, &path, ALICE_READS, None).await;
        assert_eq!(answer["allow"], true, "{path}: {answer}");
        traces.push(answer["trace_id"].as_str().expect("trace id").to_owned());
    }
    for trace_id in &traces {
        let spans = received.trace(trace_id, 3).await;
        if named(&spans, "sandgate.evaluate").attr("policy").as_deref() == Some("loud") {
            let guest = &named(&spans, "evaluate").span;
            assert_eq!(guest.events.len(), 128, "every log line is kept");
            assert!(
                guest
                    .events
                    .iter()
                    .all(|e| attr(&e.attributes, "log.message").is_some_and(|m| m.len() == 16384)),
                "each message whole"
            );
        }
    }
    let metrics = daemon.metrics(&client).await;
    assert_eq!(
        counter(&metrics, "sandgate_otlp_export_failures_total"),
        Some(0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_collector_holds_a_loud_guests_spans_only_up_to_the_queues_bytes() {
    // Accepts connections and never answers. The queue's 32768 spans would
    // be 22 GiB of this guest's; it holds 64 MiB, so spans are dropped
    // after some 40 decisions (with 4 exports of 2 MiB under way), a
    // hundred spans and far from the span limit.
    let (silent, held) = silent_collector();
    let (_dir, daemon, client) = loud_daemon_exporting_to(&format!("http://{silent}")).await;
    let mut decisions = 0;
    until_counted(
        &daemon,
        &client,
        "sandgate_otlp_spans_dropped_total",
        Duration::from_secs(60),
        async || {
            let path = "/v1/policies/loud/evaluate";
            let answer = evaluate(&client, &daemon, path, "{}", None).await;
            assert_eq!(answer["allow"], true, "{answer}");
            decisions += 1;
            assert!(
                decisions <= 100,
                "no span dropped after {decisions} decisions"
            );
        },
    )
    .await;
    let answer = evaluate(
        &client,
        &daemon,
        "/v1/policies/rbac/evaluate",
        ALICE_READS,
        None,
    )
    .await;
    assert_eq!(
        answer["allow"], true,
        "other policies keep serving: {answer}"
    );
    until_drops_are_logged(&daemon).await;
    drop(held);
}

/// A daemon serving the `rbac` example and exporting traces to `endpoint`,
/// ready, with a client for it (and the directory it lives in).
async fn rbac_daemon_exporting_to(
    endpoint: &str,
) -> (tempfile::TempDir, Arc<Daemon>, reqwest::Client) {
    daemon_exporting_to(endpoint, "", |_| rbac_policy("rbac")).await
}

#[tokio::test]
async fn an_unreachable_collector_never_fails_decisions_and_is_reported() {
    let dead = free_port();
    let (_dir, daemon, client) = rbac_daemon_exporting_to(&format!("http://{dead}")).await;
    let input = ALICE_READS;
    for _ in 0..50 {
        let started = Instant::now();
        let answer: Value =
            evaluate(&client, &daemon, "/v1/policies/rbac/evaluate", input, None).await;
        assert_eq!(answer["allow"], true, "{answer}");
        // Far beyond a decision's cost on a loaded machine, far below the
        // exporter's retries: a decision never waits on the export.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a decision waited on the exporter: {:?}",
            started.elapsed()
        );
    }
    until_counted(
        &daemon,
        &client,
        "sandgate_otlp_export_failures_total",
        Duration::from_secs(15),
        async || {},
    )
    .await;
    let failed = daemon.logged("OTLP trace export failed").await;
    assert!(
        failed.contains(&dead.to_string()),
        "the log names the endpoint: {failed}"
    );
}

/// The value of an unlabelled counter in a `/metrics` page.
fn counter(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Reads `/metrics` until the unlabelled counter `name` is above 0, running
/// `between` before each new look; fails once `within` has passed.
async fn until_counted(
    daemon: &Daemon,
    client: &reqwest::Client,
    name: &str,
    within: Duration,
    mut between: impl AsyncFnMut(),
) {
    eventually(within, format!("{name} above 0"), async || {
        let metrics = daemon.metrics(client).await;
        if counter(&metrics, name).is_some_and(|n| n > 0) {
            return Ok(());
        }
        between().await;
        Err(metrics)
    })
    .await;
}

/// A collector that accepts connections and never answers, and the thread
/// holding them open.
fn silent_collector() -> (
    SocketAddr,
    std::thread::JoinHandle<Vec<std::io::Result<std::net::TcpStream>>>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = listener.local_addr().expect("addr");
    let held = std::thread::spawn(move || listener.incoming().take(16).collect::<Vec<_>>());
    (silent, held)
}

/// Waits for the daemon to log that its span queue was full (reported at
/// most so often, hence the longer wait than `Daemon::logged`'s).
async fn until_drops_are_logged(daemon: &Daemon) {
    daemon
        .logged_within("OTLP span queue full", Duration::from_secs(15))
        .await;
}

/// `count` decisions from `concurrency` clients at once, each an allow.
async fn burst(client: &reqwest::Client, daemon: &Arc<Daemon>, count: usize, concurrency: usize) {
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (client, daemon) = (client.clone(), Arc::clone(daemon));
        let share = count / concurrency + usize::from(worker < count % concurrency);
        workers.spawn(async move {
            for _ in 0..share {
                let started = Instant::now();
                let path = "/v1/policies/rbac/evaluate";
                let answer = evaluate(&client, &daemon, path, ALICE_READS, None).await;
                assert_eq!(answer["allow"], true, "{answer}");
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "a decision waited on the exporter: {:?}",
                    started.elapsed()
                );
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("a client task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_decisions_is_exported_whole() {
    // More spans than the export queue holds, made faster than one export
    // at a time would send them.
    const DECISIONS: usize = 11_000;
    let (collector, received) = grpc_receiver().await;
    let (_dir, daemon, client) = rbac_daemon_exporting_to(&format!("http://{collector}")).await;
    burst(&client, &daemon, DECISIONS, 32).await;
    eventually(
        Duration::from_secs(30),
        format!("{DECISIONS} decisions' spans arrived"),
        async || {
            let evaluations = received
                .spans()
                .iter()
                .filter(|g| g.span.name == "sandgate.evaluate")
                .count();
            if evaluations >= DECISIONS {
                return Ok(());
            }
            Err(format!(
                "{evaluations} of {DECISIONS}\n{}",
                daemon.metrics(&client).await
            ))
        },
    )
    .await;
    let spans = received.spans().len() as u64;
    let metrics = daemon.metrics(&client).await;
    assert_eq!(
        counter(&metrics, "sandgate_otlp_spans_dropped_total"),
        Some(0),
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "sandgate_otlp_spans_exported_total"),
        Some(spans),
        "{metrics}"
    );
    let traces: std::collections::HashSet<String> =
        received.spans().iter().map(Got::trace_id).collect();
    assert_eq!(traces.len(), DECISIONS, "one trace per decision");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_stops_answering_costs_spans_not_decisions() {
    // Accepts connections and never answers: every export waits for its
    // deadline while decisions keep coming.
    let (silent, held) = silent_collector();
    let (_dir, daemon, client) = rbac_daemon_exporting_to(&format!("http://{silent}")).await;
    // The queue holds 32768 spans and the exports under way 4096 more; each
    // hung export frees its batch after its 5 s deadline, so bursts
    // outrun them however slowly this machine makes decisions.
    until_counted(
        &daemon,
        &client,
        "sandgate_otlp_spans_dropped_total",
        Duration::from_secs(90),
        async || burst(&client, &daemon, 2_000, 16).await,
    )
    .await;
    until_drops_are_logged(&daemon).await;
    assert!(
        daemon.logs().contains(&silent.to_string()),
        "the log names the endpoint"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exported_over_otlp_beside_prometheus_when_asked() {
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = listener.local_addr().expect("addr");
    let received: Arc<Mutex<Vec<ExportMetricsServiceRequest>>> = Arc::default();
    let store = Arc::clone(&received);
    let app = axum::Router::new()
        .route(
            "/v1/metrics",
            post(move |body: Bytes| {
                let store = Arc::clone(&store);
                async move {
                    let request =
                        ExportMetricsServiceRequest::decode(body).expect("an OTLP metrics request");
                    store.lock().expect("received").push(request);
                    ExportMetricsServiceResponse::default().encode_to_vec()
                }
            }),
        )
        .route(
            "/v1/traces",
            post(|| async { ExportTraceServiceResponse::default().encode_to_vec() }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        &telemetry(
            &format!("http://{collector}"),
            "otlp_protocol = \"http/protobuf\"\notlp_metrics = true\notlp_metrics_interval_ms = 200",
        ),
        &rbac_policy("rbac"),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let input = ALICE_READS;
    for _ in 0..3 {
        let answer = evaluate(&client, &daemon, "/v1/policies/rbac/evaluate", input, None).await;
        assert_eq!(answer["allow"], true, "{answer}");
    }

    // The cumulative decision counter reaches 3 for allowed rbac decisions,
    // and the latency histogram has counted them.
    eventually(
        Duration::from_secs(15),
        "OTLP metrics showing the 3 decisions",
        async || {
            let (mut decisions, mut latencies) = (0, 0);
            for request in received.lock().expect("received").iter() {
                for metric in request
                    .resource_metrics
                    .iter()
                    .flat_map(|r| r.scope_metrics.iter())
                    .flat_map(|s| s.metrics.iter())
                {
                    match (metric.name.as_str(), &metric.data) {
                        ("sandgate.decisions", Some(Data::Sum(sum))) => {
                            for point in &sum.data_points {
                                let ours = attr(&point.attributes, "policy").as_deref()
                                    == Some("rbac")
                                    && attr(&point.attributes, "allow").as_deref() == Some("true")
                                    && attr(&point.attributes, "error").as_deref() == Some("none");
                                if ours && let Some(AsInt(n)) = point.value {
                                    decisions = decisions.max(n);
                                }
                            }
                        }
                        ("sandgate.evaluation.duration", Some(Data::Histogram(h))) => {
                            for point in &h.data_points {
                                latencies = latencies.max(point.count);
                            }
                        }
                        _ => {}
                    }
                }
            }
            if decisions == 3 && latencies == 3 {
                Ok(())
            } else {
                Err(format!("decisions {decisions}, latencies {latencies}"))
            }
        },
    )
    .await;
    // Prometheus keeps counting the same decisions.
    let metrics = daemon.metrics(&client).await;
    assert!(
        metrics.contains(
            r#"sandgate_decisions_total{policy="rbac",version="v1",allow="true",error="none"} 3"#
        ),
        "{metrics}"
    );
}

/// `sandgate trace` run as a user runs it, its stdout in a file.
struct TraceView {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl TraceView {
    fn start(
        dir: &std::path::Path,
        grpc: SocketAddr,
        http: SocketAddr,
        args: &[&str],
    ) -> TraceView {
        let out = dir.join("traces.txt");
        let child = std::process::Command::new(sandgate_bin())
            .args(["trace", "--listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .args(args)
            .stdout(std::fs::File::create(&out).expect("traces.txt"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("sandgate trace");
        TraceView { child, out }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).expect("traces.txt")
    }

    /// Waits until what it printed satisfies `done`, and returns it.
    async fn until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        eventually(
            Duration::from_secs(20),
            format!("sandgate trace printed {what}"),
            async || {
                let text = self.text();
                if done(&text) { Ok(text) } else { Err(text) }
            },
        )
        .await
    }
}

impl Drop for TraceView {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Printed trace blocks, and the traces the once-a-second lines say were not shown.
fn shown_and_hidden(text: &str) -> (usize, u64) {
    let shown = text.lines().filter(|l| l.starts_with("trace ")).count();
    let hidden = text
        .lines()
        .filter_map(|l| l.strip_prefix("… "))
        .map(|l| {
            l.split(' ')
                .next()
                .expect("a word")
                .parse::<u64>()
                .expect("a count")
        })
        .sum();
    (shown, hidden)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandgate_trace_prints_decisions_trees_and_counts_the_traces_past_its_limit() {
    let dir = tempdir();
    let (grpc, http) = (free_port(), free_port());
    let view = TraceView::start(dir.path(), grpc, http, &["--max-per-second", "5"]);
    // Without the probes' `kernel` spans, which may arrive in a
    // later export than their decision's and so make a trace two blocks.
    let (_daemon_dir, daemon, client) = daemon_exporting_to(
        &format!("http://{grpc}"),
        "\n[ebpf]\nmode = \"off\"",
        |_| rbac_policy("rbac"),
    )
    .await;

    // One decision over OTLP/gRPC: its whole tree, under the id it answered with.
    let answer = evaluate(
        &client,
        &daemon,
        "/v1/policies/rbac/evaluate",
        ALICE_READS,
        None,
    )
    .await;
    let trace_id = answer["trace_id"].as_str().expect("a trace id").to_owned();
    let header = format!("trace {trace_id} (sandgate, 3 spans)\n");
    let text = view
        .until("the decision's trace", |t| t.contains(&header))
        .await;
    let tree: Vec<&str> = text[text.find(&header).expect("the trace") + header.len()..]
        .lines()
        .take(3)
        .collect();
    assert!(tree[0].starts_with("  sandgate.evaluate "), "{text}");
    assert!(
        tree[0].contains(" policy=rbac ") && tree[0].contains(" decision.allow=true"),
        "{text}"
    );
    assert!(tree[1].starts_with("    instantiate "), "{text}");
    assert!(tree[2].starts_with("    evaluate "), "{text}");

    // Far more decisions than 5 a second: every trace is either printed or
    // counted in a once-a-second line, and most are counted.
    const BURST: u64 = 300;
    burst(&client, &daemon, BURST as usize, 16).await;
    let text = view
        .until("a count for every trace", |t| {
            let (shown, hidden) = shown_and_hidden(t);
            shown as u64 + hidden == BURST + 1
        })
        .await;
    let (shown, hidden) = shown_and_hidden(&text);
    assert!(
        hidden > 0 && (shown as u64) < BURST / 2,
        "{shown} shown, {hidden} hidden:\n{text}"
    );
    assert!(
        text.contains(" more ")
            && text.contains("not shown: at most 5 a second (--all prints every trace)"),
        "{text}"
    );

    // OTLP/HTTP from another sender, in a second with room again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let request = ExportTraceServiceRequest {
        resource_spans: vec![opentelemetry_proto::tonic::trace::v1::ResourceSpans {
            resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                        value: Some(any_value::Value::StringValue("introspect".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![opentelemetry_proto::tonic::trace::v1::ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![0x5a; 16],
                    span_id: vec![7; 8],
                    name: "POST /introspect".into(),
                    end_time_unix_nano: 42_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let url = format!("http://{http}/v1/traces");
    let response = client
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .expect("OTLP/HTTP export");
    assert_eq!(response.status(), 200);
    ExportTraceServiceResponse::decode(response.bytes().await.expect("a body"))
        .expect("a response");
    let header = format!(
        "trace {} (introspect, 1 span)\n  POST /introspect 42µs\n",
        "5a".repeat(16)
    );
    view.until("the OTLP/HTTP trace", |t| t.contains(&header))
        .await;
    let refused = client
        .post(&url)
        .body(vec![0x0a, 0xff])
        .send()
        .await
        .expect("a bad export");
    assert_eq!(refused.status(), 400);
    assert!(
        refused
            .text()
            .await
            .expect("a reason")
            .contains("not an ExportTraceServiceRequest")
    );
}
