//! The status views: `GET /v1/policies` (every policy's [`PolicyReport`]
//! and load state) and `GET /readyz` (whether every policy is loaded, the last
//! reload, probes and module cache). `http` serves them from the generation
//! serving now; they never change it.

use std::collections::BTreeMap;

use serde::Serialize;

use super::registry::{State, Status};
use super::reload;
use crate::decision::DecisionError;
use crate::engine::CacheReport;
use crate::policy::{PolicyReport, VersionReport, VersionSummary};
use crate::probes::ProbeReport;

impl State {
    /// Every policy with its versions, digests and grants (`GET /v1/policies`).
    pub(crate) fn policies(&self) -> PolicyList {
        let generation = self.current();
        let mut slots: Vec<_> = generation.slots.values().collect();
        slots.sort_unstable_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let policies = slots
            .into_iter()
            .map(|slot| {
                let status = slot.status();
                let spec = &slot.spec;
                let not_loaded = |error| PolicyDetail::NotLoaded {
                    name: spec.name.clone(),
                    version: spec.version.clone(),
                    module: spec.module.to_string(),
                    error,
                    versions: Vec::new(),
                };
                PolicyListing {
                    state: status.name(),
                    detail: match status {
                        Status::Ready(serving) => PolicyDetail::Ready(Box::new(
                            PolicyReport::of(&serving.versions).with_active(),
                        )),
                        Status::Loading => not_loaded(None),
                        Status::Failed(error) => not_loaded(Some(error)),
                    },
                }
            })
            .collect();
        PolicyList {
            generation: generation.number,
            policies,
        }
    }

    /// Whether every policy is loaded, and the state of each (`GET /readyz`).
    /// A failed reload does not make the daemon unready (the previous
    /// generation serves) but is reported in `last_reload`.
    pub(crate) fn readiness(&self) -> (bool, Readiness) {
        let generation = self.current();
        let mut policies = BTreeMap::new();
        let mut not_ready = Vec::new();
        for (name, slot) in &generation.slots {
            let status = slot.status();
            let state_name = status.name();
            let state = match status {
                Status::Ready(serving) => PolicyReadiness {
                    state: state_name,
                    version: slot.spec.version.clone(),
                    digest: Some(serving.versions.primary().digest().to_string()),
                    versions: serving.summary(),
                    error: None,
                },
                Status::Loading => {
                    not_ready.push(format!("policy `{name}` is still loading"));
                    PolicyReadiness {
                        state: state_name,
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
                        state: state_name,
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
                enforcement: self.enforcement(),
                module_cache: self.engine.cache_report(),
                policies,
            },
        )
    }
}

/// The body of `GET /v1/policies`.
#[derive(Serialize)]
pub(crate) struct PolicyList {
    /// The generation of config and modules serving.
    generation: u64,
    /// Sorted by name.
    policies: Vec<PolicyListing>,
}

/// One policy of `GET /v1/policies`: its load state, and its report once
/// loaded.
#[derive(Serialize)]
struct PolicyListing {
    /// `ready`, `loading` or `failed`.
    state: &'static str,
    #[serde(flatten)]
    detail: PolicyDetail,
}

#[derive(Serialize)]
#[serde(untagged)]
enum PolicyDetail {
    Ready(Box<PolicyReport>),
    /// Still loading, or failed to load (with the error): what the config
    /// says, and no versions.
    NotLoaded {
        name: String,
        version: String,
        module: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<DecisionError>,
        versions: Vec<VersionReport>,
    },
}

/// `enforcement` of `/readyz` and `GET /v1/probes` (DESIGN §9): the BPF
/// LSM layer and its start-up drill, which the probes own, and the
/// daemon-wide syscall allowlist.
#[derive(Serialize)]
pub(crate) struct Enforcement {
    /// `attached`, or why not.
    lsm: String,
    /// The daemon-wide syscall allowlist (`server.syscall_filter`).
    seccomp: crate::seccomp::Status,
    /// `passed`, `failed: why`, or why it did not run.
    selftest: String,
}

impl State {
    pub(crate) fn enforcement(&self) -> Enforcement {
        let lsm = self.probes.enforcement();
        Enforcement {
            lsm: lsm.lsm.clone(),
            seccomp: self.seccomp.status(),
            selftest: lsm.selftest.clone(),
        }
    }
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
    /// What the kernel enforces on the daemon (DESIGN §9).
    enforcement: Enforcement,
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
