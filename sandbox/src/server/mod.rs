//! The daemon behind `sandgate serve` (DESIGN §6). It binds the HTTP API
//! (`http`) and the Envoy ext_authz gRPC service (`grpc`), loads every policy
//! on its own (one that fails to load answers `module_invalid` while the others
//! serve), and runs every evaluation through one gate, [`State::evaluate`]:
//! version routing, decision cache, per-policy `max_in_flight` limit, metrics,
//! audit. `reload` swaps in a new generation of config and policies on a file
//! change, SIGHUP or `POST /v1/reload` (SIGHUP also reopens the audit log);
//! SIGTERM/SIGINT drain in-flight requests.

mod authz;
mod connections;
mod grpc;
mod http;
mod reload;

pub use authz::forward_auth_input;
pub use grpc::check_request_input;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::audit::{AuditLog, AuditRecord, Subject};
use crate::config::{AuditTarget, Config, Digest, PolicySpec};
use crate::decision::{Decision, DecisionError, ErrorCode, FailMode};
use crate::engine::{CacheReport, Engine, EngineError};
use crate::policy::{DecisionCache, EvalOptions, Evaluation, Policy, RequestHeaders, Versions};
use crate::probes::{ProbeReport, Probes};
use crate::telemetry::traces::{Parent, Tracing};
use crate::telemetry::{Metrics, PolicyMetrics};

/// How long in-flight requests may take to finish after SIGTERM/SIGINT.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the audit log {target}: {source}")]
    Audit {
        target: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Probes(#[from] crate::probes::ProbesRequired),
    #[error("cannot listen on {addr} ({what}): {source}; is another process using it?")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("cannot set up trace export to {endpoint}: {message}")]
    Telemetry { endpoint: String, message: String },
    #[error("the {what} server failed: {message}")]
    Serve { what: &'static str, message: String },
}

/// A daemon whose listeners are bound; [`Server::run`] serves until shutdown.
pub struct Server {
    state: Arc<State>,
    http: TcpListener,
    grpc: Option<TcpListener>,
    limits: Arc<connections::Limits>,
}

impl Server {
    /// Opens the audit log, starts the engine and binds the listeners of
    /// `config`. Policies are loaded by [`Server::run`], so the addresses are
    /// known (and `/readyz` answers) before the modules are compiled.
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let audit = AuditLog::open(&config.audit.target).map_err(|source| ServeError::Audit {
            target: match &config.audit.target {
                AuditTarget::Stdout => "(stdout)".to_owned(),
                AuditTarget::File(path) => path.display().to_string(),
            },
            source,
        })?;
        let engine = Engine::new(&config.engine)?;
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { what, addr, source })
        };
        let http = bind("http", config.server.listen).await?;
        let grpc = match config.server.grpc_listen {
            Some(addr) => Some(bind("grpc", addr).await?),
            None => None,
        };
        let tracing = Tracing::start(&config.telemetry).map_err(|e| ServeError::Telemetry {
            endpoint: config.telemetry.otlp_endpoint.clone().unwrap_or_default(),
            message: format!("{e:#}"),
        })?;
        // The text the first generation came from, so a file event that
        // changes nothing does not reload.
        let config_digest = tokio::fs::read(&config.source)
            .await
            .ok()
            .map(|text| Digest::of(&text));
        let probes = Probes::start(config.ebpf)?;
        let server_settings = config.server.clone();
        let state = Arc::new(State::new(
            config,
            config_digest,
            audit,
            tracing,
            engine,
            probes,
        ));
        let connection_metrics = state.metrics.connections();
        connection_metrics.listening("http");
        if grpc.is_some() {
            connection_metrics.listening("grpc");
        }
        let limits = Arc::new(connections::Limits::new(
            &server_settings,
            connection_metrics.clone(),
        ));
        Ok(Server {
            state,
            http,
            grpc,
            limits,
        })
    }

    /// The address the HTTP API listens on (the real port when the config said `:0`).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    /// The address the ext_authz gRPC service listens on, when configured.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until SIGTERM or SIGINT, then drains; SIGHUP reopens the audit
    /// log and reloads the config and modules.
    pub async fn run_until_signalled(self) -> Result<(), ServeError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| ServeError::Signal {
                signal: name,
                source,
            })
        };
        let mut term = install(SignalKind::terminate(), "SIGTERM")?;
        let mut int = install(SignalKind::interrupt(), "SIGINT")?;
        let mut hup = install(SignalKind::hangup(), "SIGHUP")?;
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reopening the audit log and reloading");
                state.audit.reopen();
                state.reload(reload::Trigger::Signal).await;
            }
        });
        let shutdown = async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "shutting down: finishing in-flight requests");
        };
        self.run(shutdown).await
    }

    /// Loads the policies and serves until `shutdown` completes; then stops
    /// accepting, lets in-flight requests finish (at most [`DRAIN_TIMEOUT`])
    /// and flushes the audit log.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let Server {
            state,
            http,
            grpc,
            limits,
        } = self;
        let first = state.current();
        for name in first.slots.keys() {
            let (state, generation, name) = (Arc::clone(&state), Arc::clone(&first), name.clone());
            tokio::spawn(async move { state.load_initial(&generation, &name).await });
        }
        drop(first);
        reload::watch(&state);

        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let mut http_task = {
            let serving = http::serve(
                http,
                Arc::clone(&state),
                Arc::clone(&limits),
                stopped(stop_rx.clone()),
            );
            tokio::spawn(async move { serving.await.map_err(|e| e.to_string()) })
        };
        let mut grpc_task = grpc.map(|listener| {
            let serving = grpc::serve(
                listener,
                Arc::clone(&state),
                Arc::clone(&limits),
                stopped(stop_rx.clone()),
            );
            tokio::spawn(async move { serving.await.map_err(|e| e.to_string()) })
        });

        let failed = tokio::select! {
            () = shutdown => None,
            r = &mut http_task => Some(("http", r)),
            r = async { match grpc_task.as_mut() { Some(t) => t.await, None => std::future::pending().await } } => Some(("grpc", r)),
        };
        let _ = stop_tx.send(true);
        if let Some((what, result)) = failed {
            state.flush_audit().await;
            let message = match result {
                Ok(Ok(())) => "stopped unexpectedly".to_owned(),
                Ok(Err(e)) => e,
                Err(e) => format!("task failed: {e}"),
            };
            return Err(ServeError::Serve { what, message });
        }

        let started = Instant::now();
        let drain = async {
            let http = http_task.await;
            let grpc = match grpc_task {
                Some(t) => Some(t.await),
                None => None,
            };
            (http, grpc)
        };
        match tokio::time::timeout(DRAIN_TIMEOUT, drain).await {
            Ok((http, grpc)) => {
                for (what, result) in [("http", Some(http)), ("grpc", grpc)] {
                    match result {
                        Some(Ok(Err(e))) => {
                            tracing::error!(server = what, error = %e, "server stopped with an error")
                        }
                        Some(Err(e)) => {
                            tracing::error!(server = what, error = %e, "server task failed")
                        }
                        _ => {}
                    }
                }
                tracing::info!(
                    drained_ms = started.elapsed().as_millis() as u64,
                    "in-flight requests finished"
                );
            }
            Err(_) => tracing::warn!(
                timeout_s = DRAIN_TIMEOUT.as_secs(),
                "in-flight requests did not finish in time; exiting anyway"
            ),
        }
        state.flush_audit().await;
        Ok(())
    }
}

/// What the daemon shares between its listeners: the generation of config
/// and policies serving now (replaced whole by a reload, see `reload`), and
/// what outlives generations: audit log, metrics, tracer, engine.
pub(crate) struct State {
    generation: RwLock<Arc<Generation>>,
    audit: AuditLog,
    metrics: Metrics,
    /// The OTLP trace exporter, when `[telemetry] otlp_endpoint` is set.
    tracing: Option<Tracing>,
    engine: Engine,
    reloads: reload::Reloads,
    /// The eBPF probes, attached or off with the reason why.
    probes: Probes,
}

/// One config and the policies loaded from it. A request takes the
/// generation current when it arrives and keeps it (and the versions it
/// picked) until it is answered, whatever reloads happen meanwhile.
pub(crate) struct Generation {
    number: u64,
    config: Config,
    /// sha256 of the config text, to tell a file event that changed nothing.
    config_digest: Option<Digest>,
    slots: HashMap<String, Arc<Slot>>,
    /// The policy the gRPC service uses without `context_extensions["policy"]`.
    only_policy: Option<String>,
    max_body_bytes: usize,
}

impl Generation {
    fn new(
        number: u64,
        config: Config,
        config_digest: Option<Digest>,
        slots: HashMap<String, Arc<Slot>>,
    ) -> Generation {
        let only_policy = match config.policies.as_slice() {
            [only] => Some(only.name.clone()),
            _ => None,
        };
        Generation {
            number,
            max_body_bytes: usize::try_from(config.server.max_body_bytes).unwrap_or(usize::MAX),
            config,
            config_digest,
            slots,
            only_policy,
        }
    }
}

/// One configured policy: its load status, its evaluation gate and metrics.
struct Slot {
    spec: PolicySpec,
    permits: Arc<Semaphore>,
    /// The handles of the first version; per-policy gauges and refusals.
    metrics: PolicyMetrics,
    status: RwLock<Status>,
}

impl Slot {
    fn status(&self) -> Status {
        match self.status.read() {
            Ok(status) => status.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[derive(Clone)]
enum Status {
    Loading,
    Ready(Arc<Serving>),
    Failed(DecisionError),
}

/// A loaded policy: its versions, the metric handles of each (same order)
/// and its decision cache.
struct Serving {
    versions: Versions,
    metrics: Vec<PolicyMetrics>,
    cache: Option<DecisionCache>,
}

impl Serving {
    fn new(versions: Versions, spec: &PolicySpec, metrics: &Metrics) -> Serving {
        let handles = versions
            .iter()
            .map(|(policy, _)| metrics.policy(&spec.name, &policy.spec().version))
            .collect();
        Serving {
            versions,
            metrics: handles,
            cache: spec.decision_cache.as_ref().map(DecisionCache::new),
        }
    }

    /// The version at `index` with its metric handles.
    fn version(&self, index: usize) -> Option<(&Policy, &PolicyMetrics)> {
        Some((self.versions.get(index)?, self.metrics.get(index)?))
    }

    fn primary(&self) -> (&Policy, &PolicyMetrics) {
        (self.versions.primary(), &self.metrics[0])
    }

    /// Every version with its weight and digest, for `/readyz`, `/v1/reload`.
    fn summary(&self) -> Vec<VersionSummary> {
        self.versions
            .iter()
            .map(|(policy, weight)| VersionSummary {
                version: policy.spec().version.clone(),
                digest: policy.digest().to_string(),
                weight,
            })
            .collect()
    }
}

/// One version as `/readyz` and `/v1/reload` show it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct VersionSummary {
    version: String,
    digest: String,
    weight: u32,
}

/// Why an answer is not (only) the result of an evaluation. Each surface
/// maps it to its own status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The policy evaluated the input; the decision may still carry an error.
    Evaluated,
    /// No policy of that name is configured (`policy_not_found`).
    NotFound,
    /// The request body is larger than `server.max_body_bytes` (`invalid_input`).
    TooLarge,
    /// The request could not be read or understood, or named a version the
    /// policy does not have (`invalid_input`).
    BadRequest,
    /// The policy is still being loaded (`internal`).
    Loading,
    /// The policy failed to load (its `module_invalid` error).
    NotLoaded,
    /// The policy already runs `max_in_flight` evaluations (`internal`).
    Overloaded,
}

impl Outcome {
    /// A short name for the refusal, given as `refused` in JSON answers.
    pub(crate) fn refusal(self) -> Option<&'static str> {
        match self {
            Outcome::Evaluated | Outcome::BadRequest => None,
            Outcome::NotFound => Some("policy_not_found"),
            Outcome::TooLarge => Some("body_too_large"),
            Outcome::Loading => Some("policy_loading"),
            Outcome::NotLoaded => Some("policy_not_loaded"),
            Outcome::Overloaded => Some("max_in_flight"),
        }
    }
}

/// What every surface renders: the decision and who made it.
pub(crate) struct Answer {
    pub decision: Decision,
    pub policy: String,
    pub version: Option<String>,
    pub decision_id: String,
    /// The trace the decision belongs to, when traced or the caller sent one.
    pub trace_id: Option<String>,
    pub outcome: Outcome,
}

impl Answer {
    pub(crate) fn error_code(&self) -> Option<ErrorCode> {
        self.decision.error_code()
    }
}

impl State {
    fn new(
        config: Config,
        config_digest: Option<Digest>,
        audit: AuditLog,
        tracing: Option<Tracing>,
        engine: Engine,
        probes: Probes,
    ) -> State {
        let metrics = Metrics::new(&audit, tracing.as_ref(), &probes);
        let slots: HashMap<String, Arc<Slot>> = config
            .policies
            .iter()
            .map(|spec| {
                let policy_metrics = metrics.policy(&spec.name, &spec.version);
                policy_metrics.set_ready(false);
                let slot = Slot {
                    permits: Arc::new(Semaphore::new(spec.max_in_flight as usize)),
                    metrics: policy_metrics,
                    spec: spec.clone(),
                    status: RwLock::new(Status::Loading),
                };
                (spec.name.clone(), Arc::new(slot))
            })
            .collect();
        metrics.serving(1, true);
        State {
            generation: RwLock::new(Arc::new(Generation::new(1, config, config_digest, slots))),
            audit,
            metrics,
            tracing,
            engine,
            reloads: reload::Reloads::default(),
            probes,
        }
    }

    /// The generation serving now.
    fn current(&self) -> Arc<Generation> {
        match self.generation.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Loads one policy of the first generation. Each policy loads on its own
    /// at start: one that fails answers `module_invalid` while the others serve.
    async fn load_initial(&self, generation: &Generation, name: &str) {
        let Some(slot) = generation.slots.get(name) else {
            return;
        };
        let started = Instant::now();
        let status = match Versions::load(&self.engine, &slot.spec, &self.audit).await {
            Ok(versions) => {
                for (policy, weight) in versions.iter() {
                    tracing::info!(
                        policy = %name,
                        version = %policy.spec().version,
                        weight,
                        digest = %policy.digest(),
                        compiled_from = policy.compiled_from(),
                        fetched_from = policy.facts().fetched_from.as_deref().unwrap_or("-"),
                        load_ms = started.elapsed().as_millis() as u64,
                        "policy loaded"
                    );
                }
                slot.metrics.set_ready(true);
                Status::Ready(Arc::new(Serving::new(versions, &slot.spec, &self.metrics)))
            }
            Err(e) => {
                tracing::error!(policy = %name, version = %slot.spec.version, code = %e.code(), error = %crate::telemetry::log::Escaped(&e.to_string()), "policy failed to load");
                Status::Failed(DecisionError {
                    code: e.code(),
                    message: e.to_string(),
                })
            }
        };
        if let Ok(mut current) = slot.status.write() {
            *current = status;
        }
        // Its init may have read its preopens: watch them from now on.
        self.watch_serving();
    }

    /// The policy the gRPC service uses when the request names none.
    pub(crate) fn only_policy(&self) -> Option<String> {
        self.current().only_policy.clone()
    }

    pub(crate) fn max_body_bytes(&self) -> usize {
        self.current().max_body_bytes
    }

    /// Which proxy headers forward-auth trusts (`server.forward_auth_headers`).
    pub(crate) fn forward_auth_headers(&self) -> crate::config::ForwardAuthHeaders {
        self.current().config.server.forward_auth_headers
    }

    pub(crate) fn probes(&self) -> &Probes {
        &self.probes
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn is_configured(&self, name: &str) -> bool {
        self.current().slots.contains_key(name)
    }

    /// Evaluates `input` (raw JSON) with policy `name`: the one path every
    /// endpoint takes. Picks the version (version header, sticky key or
    /// weight, from `headers` and `input`), answers from the decision cache
    /// when the policy has one, else runs the guest. Never fails; every
    /// refusal is a fail-closed decision with its contract code, counted and
    /// (for loaded policies) audited.
    pub(crate) async fn evaluate(
        &self,
        name: &str,
        input: Bytes,
        parent: Parent,
        headers: &dyn RequestHeaders,
    ) -> Answer {
        let generation = self.current();
        let Some(slot) = generation.slots.get(name).cloned() else {
            return self.not_found(name);
        };
        drop(generation);
        let serving = match slot.status() {
            Status::Ready(serving) => serving,
            Status::Loading => {
                return self.refuse(
                    &slot,
                    None,
                    Outcome::Loading,
                    ErrorCode::Internal,
                    format!("policy `{name}` is still loading; retry when /readyz is ready"),
                    slot.spec.fail_mode,
                    parent,
                );
            }
            Status::Failed(error) => {
                return self.refuse(
                    &slot,
                    None,
                    Outcome::NotLoaded,
                    error.code,
                    error.message,
                    slot.spec.fail_mode,
                    parent,
                );
            }
        };
        let picked = serving
            .versions
            .pick(headers, &input)
            .map(|(index, routed_by)| (serving.version(index), routed_by));
        let (policy, metrics) = match picked {
            Ok((Some(version), routed_by)) => {
                tracing::trace!(policy = %name, version = %version.0.spec().version, routed_by = routed_by.as_str(), "version picked");
                version
            }
            Ok((None, _)) => serving.primary(),
            Err(unknown) => {
                return self.refuse(
                    &slot,
                    Some(serving.primary()),
                    Outcome::BadRequest,
                    ErrorCode::InvalidInput,
                    unknown.to_string(),
                    FailMode::Closed,
                    parent,
                );
            }
        };
        let (policy, metrics) = (policy.clone(), metrics.clone());
        let options = EvalOptions {
            parent,
            tracing: self.tracing.clone(),
        };
        let cache_key = serving
            .cache
            .as_ref()
            .and_then(|_| DecisionCache::key(&policy.spec().version, &policy.digest(), &input));
        if let (Some(cache), Some(key)) = (&serving.cache, &cache_key) {
            if let Some(decision) = cache.get(key).await {
                metrics.cache_hit();
                let evaluation = policy.answer_cached(decision, &options, &self.audit);
                metrics.decision(evaluation.decision.allow, None);
                return Answer {
                    decision: evaluation.decision,
                    policy: evaluation.policy,
                    version: Some(evaluation.version),
                    decision_id: evaluation.decision_id,
                    trace_id: evaluation.trace_id,
                    outcome: Outcome::Evaluated,
                };
            }
            metrics.cache_miss();
        }
        // Excess load is refused at once, fail-closed whatever the fail_mode:
        // queueing would let one slow policy hold every worker.
        let Ok(permit) = Arc::clone(&slot.permits).try_acquire_owned() else {
            metrics.refused();
            return self.refuse(
                &slot,
                Some((&policy, &metrics)),
                Outcome::Overloaded,
                ErrorCode::Internal,
                format!(
                    "policy `{name}` is already running max_in_flight = {} evaluations; request refused",
                    slot.spec.max_in_flight
                ),
                FailMode::Closed,
                options.parent.clone(),
            );
        };
        let version = policy.spec().version.clone();
        let evaluation = run_isolated(
            metrics.clone(),
            policy,
            input,
            options,
            self.audit.clone(),
            permit,
        );
        match evaluation.await {
            Ok(evaluation) => {
                if let (Some(cache), Some(key)) = (&serving.cache, cache_key) {
                    cache.insert(key, &evaluation.decision).await;
                }
                Answer {
                    decision: evaluation.decision,
                    policy: evaluation.policy,
                    version: Some(evaluation.version),
                    decision_id: evaluation.decision_id,
                    trace_id: evaluation.trace_id,
                    outcome: Outcome::Evaluated,
                }
            }
            Err(e) => {
                // Only a host bug gets here: the guest runs under its deadline.
                tracing::error!(policy = %name, version = %version, error = %e, "evaluation task failed");
                let decision = Decision::failed(
                    ErrorCode::Internal,
                    format!("evaluation task failed: {e}"),
                    slot.spec.fail_mode,
                );
                metrics.decision(decision.allow, Some(ErrorCode::Internal));
                Answer {
                    decision,
                    policy: slot.spec.name.clone(),
                    version: Some(version),
                    decision_id: uuid::Uuid::new_v4().to_string(),
                    trace_id: None,
                    outcome: Outcome::Evaluated,
                }
            }
        }
    }

    /// Refuses a request before evaluation (`TooLarge`, `BadRequest`) for policy `name`.
    pub(crate) fn reject(
        &self,
        name: &str,
        outcome: Outcome,
        message: String,
        parent: Parent,
    ) -> Answer {
        let generation = self.current();
        let Some(slot) = generation.slots.get(name) else {
            return self.not_found(name);
        };
        let serving = match slot.status() {
            Status::Ready(serving) => Some(serving),
            _ => None,
        };
        self.refuse(
            slot,
            serving.as_deref().map(Serving::primary),
            outcome,
            ErrorCode::InvalidInput,
            message,
            FailMode::Closed,
            parent,
        )
    }

    /// The answer for a request that could not be tied to any policy.
    pub(crate) fn unattributed(
        &self,
        policy: &str,
        code: ErrorCode,
        outcome: Outcome,
        message: String,
    ) -> Answer {
        self.metrics.request_error(code);
        Answer {
            decision: Decision::failed(code, message, FailMode::Closed),
            policy: policy.to_owned(),
            version: None,
            decision_id: uuid::Uuid::new_v4().to_string(),
            trace_id: None,
            outcome,
        }
    }

    /// The answer for a policy name that is not configured.
    pub(crate) fn not_found(&self, name: &str) -> Answer {
        let generation = self.current();
        let mut known: Vec<&str> = generation.slots.keys().map(String::as_str).collect();
        known.sort_unstable();
        let known = if known.is_empty() {
            "none is configured".to_owned()
        } else {
            format!("configured: {}", known.join(", "))
        };
        tracing::debug!(policy = %crate::telemetry::log::Escaped(name), "request for an unknown policy");
        self.unattributed(
            name,
            ErrorCode::PolicyNotFound,
            Outcome::NotFound,
            format!("no policy named `{}` ({known})", truncated(name, 128)),
        )
    }

    /// A fail-closed answer without evaluation. `version` is the version the
    /// request was routed to, when it got that far (else the first).
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &self,
        slot: &Slot,
        version: Option<(&Policy, &PolicyMetrics)>,
        outcome: Outcome,
        code: ErrorCode,
        message: String,
        fail_mode: FailMode,
        parent: Parent,
    ) -> Answer {
        let spec = &slot.spec;
        let version_name = version
            .map(|(policy, _)| policy.spec().version.clone())
            .unwrap_or_else(|| spec.version.clone());
        let decision_id = uuid::Uuid::new_v4().to_string();
        let trace_id = parent.trace_id();
        let decision = Decision::failed(code, message, fail_mode);
        version
            .map(|(_, metrics)| metrics)
            .unwrap_or(&slot.metrics)
            .decision(decision.allow, Some(code));
        // Only a loaded policy has the digest every audit line carries; load
        // failures are reported at load time and by /readyz.
        if let Some((policy, _)) = version {
            let mut subject = Subject::new(
                &spec.name,
                &version_name,
                &policy.digest().to_string(),
                decision_id.clone(),
            );
            subject.trace_id = trace_id.clone();
            self.audit.record(
                &subject,
                &AuditRecord::Decision {
                    allow: decision.allow,
                    duration_us: 0,
                    error: decision.error.clone(),
                },
            );
        }
        tracing::debug!(policy = %spec.name, version = %version_name, decision_id = %decision_id, code = %code, ?outcome, "request refused");
        Answer {
            decision,
            policy: spec.name.clone(),
            version: Some(version_name),
            decision_id,
            trace_id,
            outcome,
        }
    }

    /// Every policy with its versions, digests and grants (`GET /v1/policies`).
    pub(crate) fn policies(&self) -> serde_json::Value {
        let generation = self.current();
        let mut names: Vec<&String> = generation.slots.keys().collect();
        names.sort_unstable();
        let policies: Vec<serde_json::Value> = names
            .into_iter()
            .filter_map(|name| generation.slots.get(name))
            .map(|slot| {
                let spec = &slot.spec;
                match slot.status() {
                    Status::Ready(serving) => {
                        let mut report = serving.versions.primary().report();
                        let versions: Vec<serde_json::Value> = serving
                            .versions
                            .iter()
                            .map(|(policy, weight)| {
                                let facts = policy.facts();
                                serde_json::json!({
                                    "version": policy.spec().version,
                                    "module": policy.spec().module.to_string(),
                                    "digest": facts.digest,
                                    "weight": weight,
                                    "active": weight > 0,
                                    "compiled_from": facts.compiled_from,
                                    "fetched_from": facts.fetched_from,
                                })
                            })
                            .collect();
                        if let Some(map) = report.as_object_mut() {
                            map.insert("state".into(), "ready".into());
                            map.insert("versions".into(), versions.into());
                        }
                        report
                    }
                    Status::Loading => serde_json::json!({
                        "name": spec.name,
                        "version": spec.version,
                        "module": spec.module.to_string(),
                        "state": "loading",
                        "versions": [],
                    }),
                    Status::Failed(error) => serde_json::json!({
                        "name": spec.name,
                        "version": spec.version,
                        "module": spec.module.to_string(),
                        "state": "failed",
                        "error": error,
                        "versions": [],
                    }),
                }
            })
            .collect();
        serde_json::json!({ "generation": generation.number, "policies": policies })
    }

    /// Whether every policy is loaded, and the state of each (`GET /readyz`).
    /// A failed reload does not make the daemon unready (the previous
    /// generation serves) but is reported in `last_reload`.
    pub(crate) fn readiness(&self) -> (bool, Readiness) {
        let generation = self.current();
        let mut policies = BTreeMap::new();
        let mut not_ready = Vec::new();
        for (name, slot) in &generation.slots {
            let state = match slot.status() {
                Status::Ready(serving) => PolicyReadiness {
                    state: "ready",
                    version: slot.spec.version.clone(),
                    digest: Some(serving.versions.primary().digest().to_string()),
                    versions: serving.summary(),
                    error: None,
                },
                Status::Loading => {
                    not_ready.push(format!("policy `{name}` is still loading"));
                    PolicyReadiness {
                        state: "loading",
                        version: slot.spec.version.clone(),
                        digest: None,
                        versions: Vec::new(),
                        error: None,
                    }
                }
                Status::Failed(error) => {
                    not_ready.push(format!(
                        "policy `{name}` failed to load ({}): {}",
                        error.code, error.message
                    ));
                    PolicyReadiness {
                        state: "failed",
                        version: slot.spec.version.clone(),
                        digest: None,
                        versions: Vec::new(),
                        error: Some(error),
                    }
                }
            };
            policies.insert(name.clone(), state);
        }
        not_ready.sort();
        let ready = not_ready.is_empty();
        (
            ready,
            Readiness {
                ready,
                reason: (!ready).then(|| not_ready.join("; ")),
                generation: generation.number,
                last_reload: self.reloads.last(),
                probes: self.probes.report(),
                module_cache: self.engine.cache_report(),
                policies,
            },
        )
    }

    /// Flushes the audit log and exports the spans still buffered.
    async fn flush_audit(&self) {
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
        if let Some(tracing) = self.tracing.clone() {
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        }
    }
}

/// Runs one evaluation in its own task, holding the policy's `max_in_flight`
/// permit until it ends. The guest yields to the executor at every epoch tick,
/// so a spinning policy shares the workers instead of holding one; the
/// evaluation also finishes (and is audited and counted) when the caller goes
/// away.
fn run_isolated(
    metrics: PolicyMetrics,
    policy: Policy,
    input: Bytes,
    options: EvalOptions,
    audit: AuditLog,
    permit: OwnedSemaphorePermit,
) -> tokio::task::JoinHandle<Evaluation> {
    tokio::spawn(async move {
        let _permit = permit;
        let _in_flight = metrics.in_flight();
        let evaluation = policy.evaluate(&input, &options, &audit).await;
        metrics.evaluated(&evaluation);
        evaluation
    })
}

/// The body of `GET /readyz`.
#[derive(Serialize)]
pub(crate) struct Readiness {
    ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The generation of config and modules serving.
    generation: u64,
    /// The last reload attempt, when there was one (a failure shows here
    /// while the previous generation keeps serving).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_reload: Option<reload::ReloadRecord>,
    /// Whether the eBPF probes are attached, or why not (never affects
    /// readiness: with `mode = "auto"` the daemon serves without them).
    probes: ProbeReport,
    /// Whether compiled modules are cached on disk, or why the cache
    /// directory was refused (never affects readiness: modules compile).
    module_cache: CacheReport,
    policies: BTreeMap<String, PolicyReadiness>,
}

#[derive(Serialize)]
struct PolicyReadiness {
    state: &'static str,
    version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    versions: Vec<VersionSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<DecisionError>,
}

/// At most `max` characters of `text`, for echoing peer-chosen strings.
pub(crate) fn truncated(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}
