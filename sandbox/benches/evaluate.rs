//! One evaluation of the `rbac` example end to end (fresh instance from
//! `InstancePre`, started copy-on-write from the snapshot holding the role
//! table its `sandgate_init` parsed at load; input written, decision read
//! back and validated), the same without the snapshot (`_initialize` and the
//! table read from the preopen and parsed in every evaluation), instantiation
//! alone, the evaluation traced (spans exported over OTLP/gRPC to a receiver
//! in the same process), and a no-op guest (the host's fixed cost); ends by
//! printing `rbac/evaluate` over `noop/evaluate` (issue 26's goal). Results
//! and the command are in `docs/benchmarks.md`.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use common::{assert_allowed, bench_evaluation, repo_root};

fn build_rbac() {
    let status = Command::new(repo_root().join("scripts/build-guests"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/build-guests: {e}"));
    assert!(status.success(), "building the example guests failed");
}

fn bench(c: &mut Criterion) {
    let started = SystemTime::now();
    build_rbac();
    let runtime = common::runtime();
    let config = common::config("examples/rbac/policy.toml");
    let engine = sandgate::Engine::new(&config.engine).unwrap_or_else(|e| panic!("{e}"));
    let policy = common::load(&runtime, &engine, config.policies[0].clone());
    let input = std::fs::read(repo_root().join("examples/rbac/input.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let audit = sandgate::audit::AuditLog::disabled();
    let options = sandgate::EvalOptions::default();

    assert_allowed(&runtime, &policy, &input, &options, &audit);
    // The forward-auth shape: the request document a proxy's headers become.
    let forward = std::fs::read(repo_root().join("examples/rbac/forward-auth-input.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_allowed(&runtime, &policy, &forward, &options, &audit);

    let mut group = c.benchmark_group("rbac");
    bench_evaluation(
        &mut group, &runtime, "evaluate", &policy, &input, &options, &audit,
    );
    bench_evaluation(
        &mut group,
        &runtime,
        "evaluate_forward_auth",
        &policy,
        &forward,
        &options,
        &audit,
    );
    // The cost the snapshot removes: the same module evaluated as it is.
    let unsnapshotted = runtime
        .block_on(sandgate::Policy::load_without_snapshot(
            &engine,
            config.policies[0].clone(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_allowed(&runtime, &unsnapshotted, &input, &options, &audit);
    bench_evaluation(
        &mut group,
        &runtime,
        "evaluate_without_snapshot",
        &unsnapshotted,
        &input,
        &options,
        &audit,
    );
    group.bench_function("instantiate", |b| {
        b.to_async(&runtime).iter(|| async {
            policy
                .instantiate_only()
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        })
    });
    // The same evaluation traced: the `sandgate.evaluate` span and its two
    // children made, ended and exported over OTLP/gRPC to a receiver in this
    // process that decodes each request and counts its spans.
    let received = Arc::new(AtomicU64::new(0));
    let tracing = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(
            tonic::transport::Server::builder().serve_with_incoming_shutdown(
                TraceServiceServer::new(Counter(Arc::clone(&received))),
                tonic::transport::server::TcpIncoming::from(listener),
                std::future::pending::<()>(),
            ),
        );
        let settings = sandgate::config::TelemetrySettings {
            otlp_endpoint: Some(format!("http://{addr}")),
            ..Default::default()
        };
        sandgate::telemetry::traces::Tracing::start(&settings)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no tracer for an endpoint"))
    });
    let traced = sandgate::EvalOptions {
        tracing: Some(tracing.clone()),
        ..Default::default()
    };
    // One traced decision whatever the benchmark filter, so the check after
    // the group always has spans to count.
    let check = runtime.block_on(policy.evaluate(&input, &traced, &audit));
    assert!(
        check.trace_id.is_some(),
        "a traced decision names its trace"
    );
    bench_evaluation(
        &mut group,
        &runtime,
        "evaluate_traced",
        &policy,
        &input,
        &traced,
        &audit,
    );
    group.finish();
    // Shutting down exports what is queued (and waits for it).
    tracing.shutdown();
    assert!(
        received.load(Ordering::Relaxed) >= 3,
        "the receiver got no spans"
    );

    common::bench_noop(c, &runtime, &engine, &options, &audit);

    // Issue 26's goal, from this run's medians.
    let rbac = common::median_ns("rbac", "evaluate", started);
    let noop = common::median_ns("noop", "evaluate", started);
    match (rbac, noop) {
        (Ok(rbac), Ok(noop)) => println!(
            "goal (medians): rbac/evaluate {:.1} µs / noop/evaluate {:.1} µs = {:.2}× (goal ≤ 1.5×)",
            rbac / 1e3,
            noop / 1e3,
            rbac / noop
        ),
        (Err(why), _) | (_, Err(why)) => println!("goal not computed: {why}"),
    }
}

/// An OTLP trace receiver that decodes each export and counts its spans.
struct Counter(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
