//! Loaded policies and their evaluation. `Policy::load` turns a `PolicySpec`
//! into a validated, linked `InstancePre`; `Policy::evaluate` runs one
//! decision in a fresh instance under the policy's deadline and memory cap and
//! maps every failure to a contract error code (fail-closed). [`Versions`]
//! holds every version of one policy and picks the one that answers a
//! request; [`DecisionCache`] is the optional cache in front of it.
//! `Registry` holds loaded policies by name for embedders.
//!
//! Loading is in `load`, the store of one evaluation in `store`, the
//! classification of failures in `failure`, the embedders' `Registry` in
//! `registry`. Over 600 lines: `Policy`'s evaluation path (permits, the input
//! document, the guest call, the decision's spans) reads best in one place.

mod decision_cache;
mod failure;
mod init_cache;
pub mod input;
mod load;
mod registry;
mod report;
mod route;
pub mod snapshot;
mod store;

pub use decision_cache::DecisionCache;
pub use registry::{Registry, needed_groups};
pub use report::{
    CredentialReport, DecisionCacheReport, EgressReport, PolicyReport, PreopenReport,
    ProxyWasmReport, RoutingReport, VersionReport, VersionSummary, WasiReport,
};
pub use route::{RequestHeaders, RoutedBy, UnknownVersion, Versions};

use failure::{classify, hand_off_output, timed_out};
use load::{imports_of, initialise, link, obtain, validate};
use store::new_store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use wasmtime::{InstancePre, Store};

use crate::abi::{self, AbiViolation};
use crate::audit::{AuditLog, AuditRecord, Subject};
use crate::bridge::{Bridge, CacheStats, HttpCall};
use crate::config::{Abi, Digest, PolicySpec};
use crate::decision::{Decision, ErrorCode};
use crate::engine::Engine;
use crate::host::{self, Invocation};
use crate::probes::{self, Confinement, Expected, Probe, Watch};
use crate::proxywasm;
use crate::telemetry::log::Escaped;
use crate::telemetry::traces::{Parent, Scope, Tracing};
use crate::wasi::{self, Denial};

/// Extra time the async deadline allows past `timeout_ms`, so the epoch
/// deadline (which names the cause precisely) normally fires first.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("policy `{policy}`: cannot read module {path}: {source}")]
    Read {
        policy: String,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "policy `{policy}`: module {source_name} has digest {actual}, but the config pins {expected}"
    )]
    DigestMismatch {
        policy: String,
        source_name: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("policy `{policy}`: module {source_name} is invalid: {message}")]
    Invalid {
        policy: String,
        source_name: String,
        message: String,
    },
    #[error("policy `{policy}`: {source}")]
    Fetch {
        policy: String,
        source: crate::fetch::FetchError,
    },
    #[error("policy `{policy}`: {message}")]
    Internal { policy: String, message: String },
}

impl LoadError {
    pub fn code(&self) -> ErrorCode {
        match self {
            LoadError::Read { .. }
            | LoadError::DigestMismatch { .. }
            | LoadError::Invalid { .. }
            | LoadError::Fetch { .. } => ErrorCode::ModuleInvalid,
            LoadError::Internal { .. } => ErrorCode::Internal,
        }
    }
}

/// What the host knows about a loaded module, for `check`, `inspect` and `/v1/policies`.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleFacts {
    pub digest: String,
    pub compiled_from: String,
    /// Where the module's bytes came from (`file`, `download cache`,
    /// `network`); `None` when a compiled module was cached and the bytes
    /// were not needed.
    pub fetched_from: Option<String>,
    pub wasi_imports: Vec<String>,
    pub sandgate_imports: Vec<String>,
    /// The proxy-wasm host functions (`env` imports) of a filter.
    pub proxy_wasm_imports: Vec<String>,
    /// The proxy-wasm ABI version a filter declares (`0.2.1`).
    pub proxy_wasm_abi: Option<String>,
    pub has_initialize: bool,
    /// The initialised snapshot evaluations start from, when the module has
    /// state to keep (`_initialize` or `sandgate_init`).
    pub snapshot: Option<SnapshotFacts>,
}

/// The snapshot of a loaded policy, for `check` and `/v1/policies`.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotFacts {
    /// Digest of the initialised module (its compiled form is cached by it).
    pub digest: String,
    /// Whether `sandgate_init` ran (else only `_initialize`).
    pub sandgate_init: bool,
    /// Milliseconds init and the snapshot took at load (or looking it up).
    pub init_ms: u64,
    /// Whether the snapshot came from the cache of init results (the module,
    /// its grants and every file init read unchanged) instead of running init.
    pub cached: bool,
}

/// Options of one evaluation beyond the input.
#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    /// The caller's W3C trace context, if it sent one.
    pub parent: Parent,
    /// The daemon's tracer, when it exports traces.
    pub tracing: Option<Tracing>,
    /// A Rego policy's Data API query (`data.a.b`), passed to the guest as
    /// `context.query`; `None` evaluates the entrypoint.
    pub query: Option<String>,
}

/// The result of one evaluation.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub decision: Decision,
    pub policy: String,
    pub version: String,
    pub digest: Digest,
    pub decision_id: String,
    /// The trace of this decision (its own when tracing, else the caller's).
    pub trace_id: Option<String>,
    pub duration: Duration,
    /// Time spent instantiating the module.
    pub instantiate: Duration,
    pub denials: Vec<Denial>,
    /// Bridged HTTP requests refused by the egress allowlist.
    pub egress_denied: u32,
    /// Every bridged HTTP call, in order.
    pub http_calls: Vec<HttpCall>,
    /// Lines of guest output (stdout, stderr, `log`) cut off by the
    /// per-evaluation bound.
    pub guest_output_dropped: u64,
}

impl From<&Evaluation> for crate::telemetry::EvaluationFigures {
    fn from(evaluation: &Evaluation) -> Self {
        crate::telemetry::EvaluationFigures {
            allow: evaluation.decision.allow,
            error: evaluation.decision.error_code(),
            duration: evaluation.duration,
            instantiate: evaluation.instantiate,
            denied_calls: evaluation.denials.iter().map(|d| d.call).collect(),
            egress_denied: evaluation.egress_denied,
            guest_output_dropped: evaluation.guest_output_dropped,
        }
    }
}

/// A loaded policy version, ready to evaluate. Cheap to clone.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Loaded>,
}

struct Loaded {
    spec: PolicySpec,
    engine: Engine,
    pre: InstancePre<Invocation>,
    /// Whether each evaluation calls `_initialize` (only when no snapshot
    /// holds its effect).
    initialize_per_eval: bool,
    /// Whether each evaluation runs a proxy-wasm filter's root context and
    /// `on_configure` (only when no snapshot holds the configured filter).
    configure_per_eval: bool,
    /// Digest of the initialised module, when evaluations start from one.
    snapshot: Option<Digest>,
    grants: Arc<crate::config::Grants>,
    bridge: Arc<Bridge>,
    digest: Digest,
    facts: ModuleFacts,
    /// The syscalls the eBPF probes expect of this policy's invocations.
    expected: Arc<Expected>,
    /// Its grants as the BPF LSM programs see them (`[ebpf] enforce`).
    confinement: Arc<Confinement>,
    /// `policy`, `version` and `digest` of every `sandgate.evaluate` span,
    /// shared by reference so a traced decision copies none of them.
    span_attributes: Vec<KeyValue>,
}

impl Policy {
    /// Reads, verifies, compiles, validates and links the module of `spec`,
    /// runs its init once into a snapshot when it has one, then instantiates
    /// it to check its ABI version. WASI calls refused during init are only
    /// logged; [`Policy::load_audited`] also audits them.
    pub async fn load(engine: &Engine, spec: PolicySpec) -> Result<Policy, LoadError> {
        Policy::load_audited(engine, spec, &AuditLog::disabled()).await
    }

    /// [`Policy::load`], writing the audit lines of init (refused WASI
    /// calls, decision id `init`) to `audit`.
    pub async fn load_audited(
        engine: &Engine,
        spec: PolicySpec,
        audit: &AuditLog,
    ) -> Result<Policy, LoadError> {
        Policy::load_with(engine, spec, audit, true).await
    }

    /// [`Policy::load`] without a snapshot: every evaluation runs
    /// `_initialize` and starts from the module as it is (`sandgate_init`
    /// never runs; the SDK then builds its state in each evaluation). For
    /// measuring what the snapshot saves, not for serving.
    pub async fn load_without_snapshot(
        engine: &Engine,
        spec: PolicySpec,
    ) -> Result<Policy, LoadError> {
        Policy::load_with(engine, spec, &AuditLog::disabled(), false).await
    }

    async fn load_with(
        engine: &Engine,
        spec: PolicySpec,
        audit: &AuditLog,
        snapshot: bool,
    ) -> Result<Policy, LoadError> {
        let source_name = spec.module.to_string();
        let invalid = {
            let (policy, source_name) = (spec.name.clone(), source_name.clone());
            move |message: String| LoadError::Invalid {
                policy: policy.clone(),
                source_name: source_name.clone(),
                message,
            }
        };
        let (module, digest, from, fetched, bytes) = obtain(engine, &spec, &invalid).await?;
        validate(&spec.abi, &module).map_err(&invalid)?;
        let (initialised, snapshot_facts) = if snapshot {
            initialise(engine, &spec, &module, &digest, bytes, audit, &invalid).await?
        } else {
            (None, None)
        };
        let evaluated = initialised.as_ref().map_or(&module, |(m, _)| m);
        let pre = link(engine, evaluated, &spec.grants, &spec.abi).map_err(&invalid)?;
        let initialize_per_eval = evaluated.get_export(snapshot::INITIALIZE_EXPORT).is_some();
        // A filter without a snapshot is configured in every evaluation.
        let configure_per_eval = is_filter(&spec.abi) && initialised.is_none();
        let facts = ModuleFacts {
            digest: digest.to_string(),
            compiled_from: from.to_string(),
            fetched_from: fetched.map(|f| f.to_string()),
            wasi_imports: imports_of(&module, wasi::MODULE),
            sandgate_imports: imports_of(&module, abi::MODULE),
            proxy_wasm_imports: if is_filter(&spec.abi) {
                let mut calls = imports_of(&module, proxywasm::MODULE);
                calls.sort_unstable();
                calls
            } else {
                Vec::new()
            },
            proxy_wasm_abi: proxywasm::abi_version(&module).map(str::to_owned),
            has_initialize: module.get_export(snapshot::INITIALIZE_EXPORT).is_some(),
            snapshot: snapshot_facts,
        };
        let confinement = Arc::new(Confinement::for_policy(&spec.grants, &spec.egress));
        let bridge = Arc::new(
            Bridge::new(&spec.egress)
                .map_err(|e| LoadError::Internal {
                    policy: spec.name.clone(),
                    message: e.to_string(),
                })?
                .confined(Arc::clone(&confinement)),
        );
        let span_attributes = vec![
            KeyValue::new("policy", Arc::<str>::from(spec.name.as_str())),
            KeyValue::new("version", Arc::<str>::from(spec.version.as_str())),
            KeyValue::new("digest", Arc::<str>::from(facts.digest.as_str())),
        ];
        let policy = Policy {
            inner: Arc::new(Loaded {
                span_attributes,
                expected: Arc::new(Expected::for_policy(&spec.grants, &spec.egress)),
                confinement,
                grants: Arc::new(spec.grants.clone()),
                bridge,
                spec,
                engine: engine.clone(),
                pre,
                initialize_per_eval,
                configure_per_eval,
                snapshot: initialised.map(|(_, d)| d),
                digest,
                facts,
            }),
        };
        policy.check_abi_version().await.map_err(invalid)?;
        Ok(policy)
    }

    pub fn spec(&self) -> &PolicySpec {
        &self.inner.spec
    }

    pub fn name(&self) -> &str {
        &self.inner.spec.name
    }

    pub fn digest(&self) -> Digest {
        self.inner.digest
    }

    pub fn facts(&self) -> &ModuleFacts {
        &self.inner.facts
    }

    /// Digest of the initialised module evaluations start from, when the
    /// module had state to keep; it changes when init read other data.
    pub fn snapshot_digest(&self) -> Option<Digest> {
        self.inner.snapshot
    }

    /// The host directories whose content init may have read: the policy's
    /// preopens, when `sandgate_init` ran. A change in them is a reload.
    pub fn init_reads(&self) -> Vec<std::path::PathBuf> {
        match &self.inner.facts.snapshot {
            Some(s) if s.sandgate_init => self
                .inner
                .grants
                .preopens
                .iter()
                .map(|p| p.host.clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn compiled_from(&self) -> &str {
        &self.inner.facts.compiled_from
    }

    fn store(
        &self,
        subject: Subject,
        audit: AuditLog,
        trace: Scope,
        probe: Probe,
    ) -> Store<Invocation> {
        let loaded = &self.inner;
        new_store(
            &loaded.engine,
            &loaded.spec,
            Arc::clone(&loaded.grants),
            Arc::clone(&loaded.bridge),
            subject,
            audit,
            trace,
            probe,
        )
    }

    /// Creates a store and instantiates the module, nothing else: the cost
    /// every evaluation pays before the guest runs (used by the benchmarks).
    pub async fn instantiate_only(&self) -> anyhow::Result<()> {
        let subject = Subject::new(
            self.name(),
            &self.inner.spec.version,
            &self.inner.facts.digest,
            String::new(),
        );
        let _slot = self.instance_slot().await?;
        let mut store = self.store(subject, AuditLog::disabled(), Scope::default(), Probe::NONE);
        self.inner.pre.instantiate_async(&mut store).await?;
        Ok(())
    }

    /// A slot of the engine's instance pool, waiting for one to be free
    /// (loads wait; evaluations use [`Policy::evaluation_slot`]).
    async fn instance_slot(&self) -> anyhow::Result<OwnedSemaphorePermit> {
        Ok(Arc::clone(self.inner.engine.instances())
            .acquire_owned()
            .await?)
    }

    /// A slot of the instance pool for one evaluation, waiting at most the
    /// policy's `timeout_ms`: when every slot stays busy that long (other
    /// policies use `engine.max_instances` up), the evaluation fails with
    /// `eval_timeout`, never with an instantiation error.
    async fn evaluation_slot(&self) -> Result<OwnedSemaphorePermit, (ErrorCode, String)> {
        let spec = &self.inner.spec;
        let instances = Arc::clone(self.inner.engine.instances());
        match tokio::time::timeout(spec.timeout, instances.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err((ErrorCode::Internal, "the instance pool is closed".into())),
            Err(_) => {
                tracing::warn!(
                    policy = %spec.name,
                    version = %spec.version,
                    "no instance slot free within timeout_ms: engine.max_instances is in use by other evaluations"
                );
                Err((
                    ErrorCode::EvalTimeout,
                    format!(
                        "no instance free within timeout_ms = {}: every slot of engine.max_instances is in use",
                        spec.timeout.as_millis()
                    ),
                ))
            }
        }
    }

    async fn check_abi_version(&self) -> Result<(), String> {
        let subject = Subject::new(
            self.name(),
            &self.inner.spec.version,
            &self.inner.facts.digest,
            "load".into(),
        );
        let _slot = self
            .instance_slot()
            .await
            .map_err(|e| format!("cannot prepare an instance: {e:#}"))?;
        let mut store = self.store(subject, AuditLog::disabled(), Scope::default(), Probe::NONE);
        // At load the preopens must open now, so the load says why not.
        store
            .data_mut()
            .wasi
            .open()
            .map_err(|e| format!("cannot prepare an instance: {e:#}"))?;
        let instance = self
            .inner
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| format!("instantiation failed: {e:#}"))?;
        if is_filter(&self.inner.spec.abi) {
            // `proxywasm::validate` checked its ABI version export.
            return Ok(());
        }
        abi::call::check_version(&mut store, instance).await
    }

    /// Evaluates `input` (raw JSON bytes) in a fresh instance. Never fails:
    /// a failed evaluation is a fail-closed decision carrying its error code.
    /// Writes the decision's audit line (and any denial lines) to `audit`.
    pub async fn evaluate(
        &self,
        input: &[u8],
        options: &EvalOptions,
        audit: &AuditLog,
    ) -> Evaluation {
        let started = Instant::now();
        let spec = &self.inner.spec;
        let (decision_id, subject, trace) = self.begin(options, false);
        let mut epochs = 0;

        let mut instantiate = Duration::ZERO;
        let mut denials = Vec::new();
        let mut egress_denied = 0;
        let mut http_calls = Vec::new();
        let mut guest_output_dropped = 0;
        let outcome = match self.prepare(input, &subject, &options.query) {
            Err(message) => Err((ErrorCode::InvalidInput, message)),
            Ok(document) => {
                let probe = probes::watch(|| Watch {
                    subject: subject.clone(),
                    audit: audit.clone(),
                    trace: trace.clone(),
                    expected: Arc::clone(&self.inner.expected),
                    confinement: Arc::clone(&self.inner.confinement),
                    deadline: spec.timeout + DEADLINE_MARGIN,
                });
                // Every poll of this future is a stretch of the invocation
                // for the probes: the instance's whole life is inside it.
                let invocation = probe.guest(async {
                    let _slot = self.evaluation_slot().await?;
                    let mut store =
                        self.store(subject.clone(), audit.clone(), trace.clone(), probe);
                    let run = self.run(&mut store, &document, &mut instantiate, &trace);
                    let result =
                        match tokio::time::timeout(spec.timeout + DEADLINE_MARGIN, run).await {
                            Ok(result) => result.map_err(|e| classify(&e, store.data())),
                            Err(_) => Err(timed_out(spec.timeout, store.data())),
                        };
                    let inv = probe.phase(probes::phase::TEARDOWN, || store.into_data());
                    // Whatever the guest answered, it answered without the
                    // files its grants promise.
                    let result = match inv.wasi.unavailable() {
                        Some(why) => Err((ErrorCode::Internal, why.to_owned())),
                        None => result,
                    };
                    guest_output_dropped =
                        hand_off_output(&inv, started + spec.timeout + DEADLINE_MARGIN);
                    epochs = inv.epochs;
                    denials = inv.wasi.denials;
                    egress_denied = inv.egress.denied;
                    http_calls = inv.egress.http_calls;
                    result
                });
                let result = invocation.await;
                probes::end(probe);
                result
            }
        };
        let decision = match outcome {
            Ok(decision) => decision,
            Err((code, message)) => {
                tracing::warn!(
                    policy = %spec.name,
                    version = %spec.version,
                    decision_id = %decision_id,
                    code = %code,
                    error = %Escaped(&message),
                    "evaluation failed"
                );
                trace.fail(code.as_str(), &message);
                Decision::failed(code, message, spec.fail_mode)
            }
        };
        let duration = started.elapsed();
        trace.set_attributes(|| {
            let mut attributes = vec![
                KeyValue::new("decision.allow", decision.allow),
                KeyValue::new("duration_us", duration.as_micros() as i64),
                KeyValue::new("wasm.fuel_or_epochs", epochs as i64),
            ];
            if guest_output_dropped > 0 {
                attributes.push(KeyValue::new(
                    "sandgate.guest_output.dropped_lines",
                    guest_output_dropped as i64,
                ));
            }
            attributes
        });
        trace.end();
        audit.record(
            &subject,
            &AuditRecord::Decision {
                allow: decision.allow,
                duration_us: duration.as_micros() as u64,
                error: decision.error.clone(),
            },
        );
        Evaluation {
            decision,
            policy: spec.name.clone(),
            version: spec.version.clone(),
            digest: self.inner.digest,
            decision_id,
            trace_id: subject.trace_id.clone(),
            duration,
            instantiate,
            denials,
            egress_denied,
            http_calls,
            guest_output_dropped,
        }
    }

    /// A new decision's id, its audit subject and its `sandgate.evaluate` span.
    fn begin(&self, options: &EvalOptions, cached: bool) -> (String, Subject, Scope) {
        let spec = &self.inner.spec;
        let decision_id = uuid::Uuid::new_v4().to_string();
        let mut subject = Subject::new(
            &spec.name,
            &spec.version,
            &self.inner.facts.digest,
            decision_id.clone(),
        );
        let trace = Scope::evaluation(options.tracing.as_ref(), &options.parent, || {
            // Room for what the decision adds later too (allow, duration,
            // epochs, error code), so the list is not moved as it grows.
            let mut attributes = Vec::with_capacity(self.inner.span_attributes.len() + 6);
            attributes.extend_from_slice(&self.inner.span_attributes);
            attributes.push(KeyValue::new("decision_id", decision_id.clone()));
            if cached {
                attributes.push(KeyValue::new("decision.cached", true));
            }
            attributes
        });
        subject.trace_id = trace.trace_id();
        (decision_id, subject, trace)
    }

    /// Answers with a decision from the decision cache: audited, traced and
    /// returned like an evaluation (the span says `decision.cached`), without
    /// running the guest.
    pub fn answer_cached(
        &self,
        decision: Decision,
        options: &EvalOptions,
        audit: &AuditLog,
    ) -> Evaluation {
        let started = Instant::now();
        let spec = &self.inner.spec;
        let (decision_id, subject, trace) = self.begin(options, true);
        let duration = started.elapsed();
        trace.set_attributes(|| {
            vec![
                KeyValue::new("decision.allow", decision.allow),
                KeyValue::new("duration_us", duration.as_micros() as i64),
            ]
        });
        trace.end();
        audit.record(
            &subject,
            &AuditRecord::Decision {
                allow: decision.allow,
                duration_us: duration.as_micros() as u64,
                error: None,
            },
        );
        Evaluation {
            decision,
            policy: spec.name.clone(),
            version: spec.version.clone(),
            digest: self.inner.digest,
            decision_id,
            trace_id: subject.trace_id.clone(),
            duration,
            instantiate: Duration::ZERO,
            denials: Vec::new(),
            egress_denied: 0,
            http_calls: Vec::new(),
            guest_output_dropped: 0,
        }
    }

    /// Hit and miss counts of the policy's bridge response cache.
    pub fn bridge_cache_stats(&self) -> &CacheStats {
        self.inner.bridge.cache_stats()
    }

    /// What the guest is handed: the input document of ABI v1, or the
    /// request a proxy-wasm filter is fed.
    fn prepare(
        &self,
        input: &[u8],
        subject: &Subject,
        query: &Option<String>,
    ) -> Result<Prepared, String> {
        self.check_input(input)?;
        if !is_filter(&self.inner.spec.abi) {
            return Ok(Prepared::Document(
                self.input_document(input, subject, query)?,
            ));
        }
        proxywasm::FilterRequest::from_input(input).map(Prepared::Request)
    }

    /// The caller's input within `max_input_bytes` and strictly valid JSON.
    fn check_input(&self, input: &[u8]) -> Result<(), String> {
        let max = self.inner.spec.max_input_bytes;
        if input.len() as u64 > max {
            return Err(format!(
                "input is {} bytes; the policy accepts at most {max}",
                input.len()
            ));
        }
        input::validate(input).map_err(|e| format!("input is not valid JSON: {e}"))?;
        Ok(())
    }

    /// The input document of DESIGN §2, built around the caller's (checked)
    /// JSON without re-serialising it.
    fn input_document(
        &self,
        input: &[u8],
        subject: &Subject,
        query: &Option<String>,
    ) -> Result<Vec<u8>, String> {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let context = GuestContext {
            query: query.as_deref(),
            decision_id: &subject.decision_id,
            policy: &subject.policy,
            time: &now,
            trace_id: subject.trace_id.as_deref(),
            version: &subject.version,
        };
        let mut document = Vec::with_capacity(input.len() + 256);
        document.extend_from_slice(b"{\"input\":");
        document.extend_from_slice(input);
        document.extend_from_slice(b",\"context\":");
        serde_json::to_writer(&mut document, &context)
            .map_err(|e| format!("cannot encode context: {e}"))?;
        document.push(b'}');
        Ok(document)
    }

    async fn run(
        &self,
        store: &mut Store<Invocation>,
        document: &Prepared,
        instantiate: &mut Duration,
        trace: &Scope,
    ) -> anyhow::Result<Decision> {
        let span = trace.child("instantiate", SpanKind::Internal, Vec::new);
        let started = Instant::now();
        let probe = store.data().probe;
        let instance = self.inner.pre.instantiate_async(&mut *store).await;
        probe.exit(probes::phase::INSTANTIATE);
        *instantiate = started.elapsed();
        span.end();
        let span = trace.child("evaluate", SpanKind::Internal, Vec::new);
        store.data_mut().trace = span.clone();
        let decision = self.call_guest(store, instance?, document).await;
        span.end();
        decision
    }

    /// Hands the input to a fresh instance and reads its decision back.
    async fn call_guest(
        &self,
        store: &mut Store<Invocation>,
        instance: wasmtime::Instance,
        prepared: &Prepared,
    ) -> anyhow::Result<Decision> {
        if self.inner.initialize_per_eval {
            abi::call::initialize(&mut *store, instance).await?;
        }
        match prepared {
            Prepared::Document(document) => {
                let max_output = self.inner.spec.max_output_bytes;
                abi::call::evaluate(&mut *store, instance, document, max_output).await
            }
            Prepared::Request(request) => {
                if self.inner.configure_per_eval
                    && let Err(why) =
                        proxywasm::call::configure(&mut *store, instance, host::FILTER_STATE)
                            .await?
                {
                    return Err(AbiViolation(why).into());
                }
                store.data_mut().filter.feed(request.clone());
                proxywasm::call::decide(&mut *store, instance, host::FILTER_STATE).await
            }
        }
    }
}

/// What a fresh instance is handed.
enum Prepared {
    /// The input document of ABI v1.
    Document(Vec<u8>),
    /// The request a proxy-wasm filter is fed.
    Request(proxywasm::FilterRequest),
}

fn is_filter(abi: &Abi) -> bool {
    matches!(abi, Abi::ProxyWasm(_))
}

/// The `context` of a guest's input document (DESIGN §2), serialized
/// straight from the decision's subject.
#[derive(Serialize)]
struct GuestContext<'a> {
    decision_id: &'a str,
    policy: &'a str,
    time: &'a str,
    trace_id: Option<&'a str>,
    version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
}
