//! The generation registry: [`State`] (what the listeners share and what
//! outlives a reload) and the [`Generation`] of config and policies serving
//! now, with each policy's [`Slot`] (load status, `max_in_flight` permits,
//! metrics). `Server::bind` creates it, `reload` replaces the generation, and
//! every request reads it once through [`State::current`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::Semaphore;

use super::reload;
use crate::audit::AuditLog;
use crate::config::{Config, Digest, ForwardAuthHeaders, PolicySpec};
use crate::decision::DecisionError;
use crate::engine::Engine;
use crate::policy::{DecisionCache, Policy, VersionSummary, Versions};
use crate::probes::Probes;
use crate::telemetry::traces::Tracing;
use crate::telemetry::{Metrics, PolicyMetrics};

/// What the daemon shares between its listeners: the generation of config
/// and policies serving now (replaced whole by a reload, see `reload`), and
/// what outlives generations: audit log, metrics, tracer, engine.
pub(crate) struct State {
    pub(super) generation: RwLock<Arc<Generation>>,
    pub(super) audit: AuditLog,
    pub(super) metrics: Metrics,
    /// The OTLP trace exporter, when `[telemetry] otlp_endpoint` is set.
    pub(super) tracing: Option<Tracing>,
    pub(super) engine: Engine,
    pub(super) reloads: reload::Reloads,
    /// The eBPF probes, attached or off with the reason why.
    pub(super) probes: Probes,
    /// The daemon-wide seccomp allowlist, installed or why not.
    pub(super) seccomp: crate::seccomp::Filter,
}

/// One config and the policies loaded from it. A request takes the
/// generation current when it arrives and keeps it (and the versions it
/// picked) until it is answered, whatever reloads happen meanwhile.
pub(crate) struct Generation {
    pub(super) number: u64,
    pub(super) config: Config,
    /// sha256 of the config text, to tell a file event that changed nothing.
    pub(super) config_digest: Option<Digest>,
    pub(super) slots: HashMap<String, Arc<Slot>>,
    /// The policy the gRPC service uses without `context_extensions["policy"]`.
    only_policy: Option<String>,
    max_body_bytes: usize,
}

impl Generation {
    pub(super) fn new(
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

    /// The policy the gRPC service uses when the request names none.
    pub(crate) fn only_policy(&self) -> Option<&str> {
        self.only_policy.as_deref()
    }

    /// The largest request body accepted (`server.max_body_bytes`).
    pub(crate) fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Which proxy headers forward-auth trusts (`server.forward_auth_headers`).
    pub(crate) fn forward_auth_headers(&self) -> ForwardAuthHeaders {
        self.config.server.forward_auth_headers
    }

    pub(crate) fn is_configured(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }
}

/// One configured policy: its load status, its evaluation gate and metrics.
pub(super) struct Slot {
    pub(super) spec: PolicySpec,
    pub(super) permits: Arc<Semaphore>,
    /// The handles of the first version; per-policy gauges and refusals.
    pub(super) metrics: PolicyMetrics,
    pub(super) status: RwLock<Status>,
}

impl Slot {
    pub(super) fn status(&self) -> Status {
        match self.status.read() {
            Ok(status) => status.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[derive(Clone)]
pub(super) enum Status {
    Loading,
    Ready(Arc<Serving>),
    Failed(DecisionError),
}

impl Status {
    /// The state `/readyz` and `/v1/policies` show.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Status::Loading => "loading",
            Status::Ready(_) => "ready",
            Status::Failed(_) => "failed",
        }
    }
}

/// A loaded policy: its versions, the metric handles of each (same order)
/// and its decision cache.
pub(super) struct Serving {
    pub(super) versions: Versions,
    pub(super) metrics: Vec<PolicyMetrics>,
    pub(super) cache: Option<DecisionCache>,
}

impl Serving {
    pub(super) fn new(versions: Versions, spec: &PolicySpec, metrics: &Metrics) -> Serving {
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
    pub(super) fn version(&self, index: usize) -> Option<(&Policy, &PolicyMetrics)> {
        Some((self.versions.get(index)?, self.metrics.get(index)?))
    }

    pub(super) fn primary(&self) -> (&Policy, &PolicyMetrics) {
        (self.versions.primary(), &self.metrics[0])
    }

    /// Every version with its weight and digest, for `/readyz`, `/v1/reload`.
    pub(super) fn summary(&self) -> Vec<VersionSummary> {
        VersionSummary::all(&self.versions)
    }
}

impl State {
    pub(super) fn new(
        config: Config,
        config_digest: Option<Digest>,
        audit: AuditLog,
        tracing: Option<Tracing>,
        engine: Engine,
        probes: Probes,
        seccomp: crate::seccomp::Filter,
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
            seccomp,
        }
    }

    /// The generation serving now. A request reads it once and keeps it
    /// until it is answered, so a reload never lands halfway through.
    pub(crate) fn current(&self) -> Arc<Generation> {
        match self.generation.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Loads one policy of the first generation. Each policy loads on its own
    /// at start: one that fails answers `module_invalid` while the others serve.
    pub(super) async fn load_initial(&self, generation: &Generation, name: &str) {
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

    pub(crate) fn probes(&self) -> &Probes {
        &self.probes
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Flushes the audit log and exports the spans still buffered.
    pub(super) async fn flush_audit(&self) {
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
        if let Some(tracing) = self.tracing.clone() {
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        }
    }
}
