//! What the criterion benchmarks of this crate share (included with
//! `mod common;` by `evaluate.rs` and `languages.rs`): the repository root, the
//! runtime, loading a configured policy, checking a decision before timing
//! it, one timed evaluation, the no-op guest (the host's fixed cost), and
//! reading back a median criterion measured in this run.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The runtime the evaluations run on: one worker, as in evaluate.rs since
/// its first figures.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
}

/// The configuration at `path` (relative to the repository root), which
/// must hold at least one policy.
pub fn config(path: &str) -> sandgate::Config {
    let config =
        sandgate::config::load(&repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(!config.policies.is_empty(), "{path} configures no policy");
    config
}

/// Loads `spec` as the daemon would (compiled, initialised, snapshot taken).
pub fn load(
    runtime: &tokio::runtime::Runtime,
    engine: &sandgate::Engine,
    spec: sandgate::PolicySpec,
) -> sandgate::Policy {
    runtime
        .block_on(sandgate::Policy::load(engine, spec))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Evaluates `input` once and returns the decision; the benchmark stops
/// when the evaluation failed (a benchmark of a failing evaluation measures
/// nothing).
pub fn decide(
    runtime: &tokio::runtime::Runtime,
    policy: &sandgate::Policy,
    input: &[u8],
    options: &sandgate::EvalOptions,
    audit: &sandgate::audit::AuditLog,
) -> sandgate::Decision {
    let evaluation = runtime.block_on(policy.evaluate(input, options, audit));
    assert!(
        evaluation.decision.error.is_none(),
        "{}: {:?}",
        String::from_utf8_lossy(input),
        evaluation.decision
    );
    evaluation.decision
}

/// Evaluates `input` once; the benchmark stops unless the decision is an
/// allow without error.
pub fn assert_allowed(
    runtime: &tokio::runtime::Runtime,
    policy: &sandgate::Policy,
    input: &[u8],
    options: &sandgate::EvalOptions,
    audit: &sandgate::audit::AuditLog,
) {
    let decision = decide(runtime, policy, input, options, audit);
    assert!(decision.allow, "{decision:?}");
}

/// One evaluation of `input` end to end, as benchmark `name` of `group`.
pub fn bench_evaluation(
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

/// Benchmark `noop/evaluate`: the host's fixed cost, a guest that does
/// nothing but answer allow, evaluated end to end like any policy.
pub fn bench_noop(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    engine: &sandgate::Engine,
    options: &sandgate::EvalOptions,
    audit: &sandgate::audit::AuditLog,
) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let module = dir.path().join("noop.wat");
    std::fs::write(&module, NOOP_GUEST).unwrap_or_else(|e| panic!("{e}"));
    let noop = load(runtime, engine, sandgate::PolicySpec::for_module(&module));
    assert_allowed(runtime, &noop, b"{}", options, audit);
    let mut group = c.benchmark_group("noop");
    bench_evaluation(
        &mut group, runtime, "evaluate", &noop, b"{}", options, audit,
    );
    group.finish();
}

const NOOP_GUEST: &str = r#"(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "{\"allow\":true}")
  (func (export "sandgate_abi_version") (result i32) i32.const 1)
  (func (export "sandgate_alloc") (param i32) (result i32) i32.const 4096)
  (func (export "sandgate_evaluate") (param i32 i32) (result i64) i64.const 4398046511118))"#;

/// The median time in nanoseconds criterion estimated for `group/name` in
/// this process's run (its estimate written after `since`), or why there is
/// none (the filter left it out, or criterion saved it elsewhere).
pub fn median_ns(group: &str, name: &str, since: SystemTime) -> Result<f64, String> {
    // Where criterion keeps its results: $CRITERION_HOME, else
    // $CARGO_TARGET_DIR/criterion, else the workspace's target/criterion.
    let home = std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
        })
        .unwrap_or_else(|| repo_root().join("target/criterion"));
    let file = home.join(group).join(name).join("new/estimates.json");
    let missing = || {
        format!(
            "no estimate of {group}/{name} from this run in {}",
            file.display()
        )
    };
    let modified = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .map_err(|_| missing())?;
    if modified < since {
        return Err(missing());
    }
    let estimates: serde_json::Value = std::fs::read(&file)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| format!("cannot read {}", file.display()))?;
    estimates["median"]["point_estimate"]
        .as_f64()
        .ok_or_else(|| format!("no median in {}", file.display()))
}
