//! The evaluation gate: every request of every surface (HTTP, forward-auth,
//! `/v1/data`, gRPC) is answered here, by [`State::evaluate`] or one of its
//! refusals. It routes to a version, answers from the decision cache, holds
//! the per-policy `max_in_flight` limit, counts and audits. The surfaces pass
//! the [`Generation`] they read once for the request.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use super::registry::{Generation, Serving, Slot, State, Status};
use super::truncated;
use crate::audit::{AuditLog, AuditRecord, Subject};
use crate::decision::{Decision, ErrorCode, FailMode};
use crate::policy::{DecisionCache, EvalOptions, Evaluation, Policy, RequestHeaders};
use crate::telemetry::PolicyMetrics;
use crate::telemetry::traces::Parent;

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
    /// The answer of a completed (or cached) evaluation.
    fn evaluated(evaluation: Evaluation) -> Answer {
        Answer {
            decision: evaluation.decision,
            policy: evaluation.policy,
            version: Some(evaluation.version),
            decision_id: evaluation.decision_id,
            trace_id: evaluation.trace_id,
            outcome: Outcome::Evaluated,
        }
    }

    pub(crate) fn error_code(&self) -> Option<ErrorCode> {
        self.decision.error_code()
    }
}

impl State {
    /// Evaluates `input` (raw JSON) with policy `name`: the one path every
    /// endpoint takes. Picks the version (version header, sticky key or
    /// weight, from `headers` and `input`), answers from the decision cache
    /// when the policy has one, else runs the guest. Never fails; every
    /// refusal is a fail-closed decision with its contract code, counted and
    /// (for loaded policies) audited.
    pub(crate) async fn evaluate(
        &self,
        generation: &Generation,
        name: &str,
        input: Bytes,
        parent: Parent,
        headers: &dyn RequestHeaders,
    ) -> Answer {
        self.evaluate_query(generation, name, input, parent, headers, None)
            .await
    }

    /// [`evaluate`](Self::evaluate) of a Rego policy's Data API `query`
    /// instead of its entrypoint (`None`: the entrypoint). A query's answer
    /// is not kept in the decision cache, whose key is the input alone.
    pub(crate) async fn evaluate_query(
        &self,
        generation: &Generation,
        name: &str,
        input: Bytes,
        parent: Parent,
        headers: &dyn RequestHeaders,
        query: Option<String>,
    ) -> Answer {
        let Some(slot) = generation.slots.get(name) else {
            return self.not_found(generation, name);
        };
        let serving = match slot.status() {
            Status::Ready(serving) => serving,
            Status::Loading => {
                return self.refuse(
                    slot,
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
                    slot,
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
                    slot,
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
        let cache_key = serving
            .cache
            .as_ref()
            .filter(|_| query.is_none())
            .and_then(|_| DecisionCache::key(&policy.spec().version, &policy.digest(), &input));
        let options = EvalOptions {
            parent,
            tracing: self.tracing.clone(),
            query,
        };
        if let (Some(cache), Some(key)) = (&serving.cache, &cache_key) {
            if let Some(decision) = cache.get(key).await {
                metrics.cache_hit();
                let evaluation = policy.answer_cached(decision, &options, &self.audit);
                metrics.decision(evaluation.decision.allow, None);
                return Answer::evaluated(evaluation);
            }
            metrics.cache_miss();
        }
        // Excess load is refused at once, fail-closed whatever the fail_mode:
        // queueing would let one slow policy hold every worker.
        let Ok(permit) = Arc::clone(&slot.permits).try_acquire_owned() else {
            metrics.refused();
            return self.refuse(
                slot,
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
                Answer::evaluated(evaluation)
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
        generation: &Generation,
        name: &str,
        outcome: Outcome,
        message: String,
        parent: Parent,
    ) -> Answer {
        let Some(slot) = generation.slots.get(name) else {
            return self.not_found(generation, name);
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
    pub(crate) fn not_found(&self, generation: &Generation, name: &str) -> Answer {
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
