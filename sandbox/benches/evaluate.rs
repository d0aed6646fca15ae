//! One evaluation of the `rbac` example end to end (fresh instance from
//! `InstancePre`, started copy-on-write from the snapshot holding the role
//! table its `sandgate_init` parsed at load; input written, decision read
//! back and validated), the same without the snapshot (`_initialize` and the
//! table read from the preopen and parsed in every evaluation), instantiation
//! alone, the evaluation traced (spans exported over OTLP/gRPC to a receiver
//! in the same process), and a no-op guest (the host's fixed cost). Results and the command are in `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn build_rbac() {
    let status = Command::new(repo_root().join("scripts/build-guests"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/build-guests: {e}"));
    assert!(status.success(), "building the example guests failed");
}

fn bench(c: &mut Criterion) {
    build_rbac();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let config = sandgate::config::load(&repo_root().join("examples/rbac/policy.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let engine = sandgate::Engine::new(&config.engine).unwrap_or_else(|e| panic!("{e}"));
    let policy = runtime
        .block_on(sandgate::Policy::load(&engine, config.policies[0].clone()))
        .unwrap_or_else(|e| panic!("{e}"));
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

    // The host's fixed cost: a guest that does nothing but answer allow.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let noop = dir.path().join("noop.wat");
    std::fs::write(&noop, NOOP_GUEST).unwrap_or_else(|e| panic!("{e}"));
    let noop = runtime
        .block_on(sandgate::Policy::load(
            &engine,
            sandgate::PolicySpec::for_module(&noop),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut group = c.benchmark_group("noop");
    bench_evaluation(
        &mut group, &runtime, "evaluate", &noop, b"{}", &options, &audit,
    );
    group.finish();
}

/// Evaluates `input` once; the benchmark stops unless the decision is an
/// allow without error (a benchmark of a failing evaluation measures nothing).
fn assert_allowed(
    runtime: &tokio::runtime::Runtime,
    policy: &sandgate::Policy,
    input: &[u8],
    options: &sandgate::EvalOptions,
    audit: &sandgate::audit::AuditLog,
) {
    let check = runtime.block_on(policy.evaluate(input, options, audit));
    assert!(
        check.decision.allow && check.decision.error.is_none(),
        "{:?}",
        check.decision
    );
}

/// One evaluation of `input` end to end, as benchmark `name` of `group`.
fn bench_evaluation(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    policy: &sandgate::Policy,
    input: &[u8],
    options: &sandgate::EvalOptions,
    audit: &sandgate::audit::AuditLog,
) {
    group.bench_function(name, |b| {
        b.to_async(runtime).iter(|| async {
            let e = policy.evaluate(input, options, audit).await;
            std::hint::black_box(e.decision.allow)
        })
    });
}

const NOOP_GUEST: &str = r#"(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "{\"allow\":true}")
  (func (export "sandgate_abi_version") (result i32) i32.const 1)
  (func (export "sandgate_alloc") (param i32) (result i32) i32.const 4096)
  (func (export "sandgate_evaluate") (param i32 i32) (result i64) i64.const 4398046511118))"#;

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
