//! Cedar policies run by the built-in Cedar guest (`engine = "cedar"`),
//! checked against cedar-policy run natively in this process. This module
//! holds what the tests share: the module cache, the native authorizer
//! ([`Native`]), the seeded request generator and the comparison of a
//! guest's decision with the native answer. The tests, by concern:
//! - `photos`: the photo-sharing example (groups, `when`/`unless`, a
//!   `forbid`, an error-prone condition) answers hundreds of generated
//!   requests, JSON and HTTP, exactly as the native authorizer does
//!   (decision, determining policies, errors); `check` and `eval` show it;
//!   it decides behind nginx forward-auth and ext_authz;
//! - `documentation`: so do examples of Cedar's own documentation;
//! - `load`: a schema violation refuses the load with the validator's
//!   message, a syntax error names file and line, the guest draws its hash
//!   keys at init while a user module's `random_get` at init stays refused.

mod documentation;
mod load;
mod photos;

use std::path::PathBuf;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityUid, PolicyId, PolicySet, Request, Schema,
};
use serde_json::{Value, json};

use crate::support::*;

/// The obligations the guest answers with (docs/policies.md).
const POLICIES: &str = "sandgate.cedar.policies";
const ERRORS: &str = "sandgate.cedar.errors";

/// Requests generated per policy.
const CASES: usize = 400;

fn example() -> PathBuf {
    repo_root().join("examples/cedar-photos")
}

/// The guest module is large: the tests share one module cache, filled once
/// by `sandgate check` on the example, whose output is kept for the test of
/// `check` itself.
static CACHE: SharedCache = SharedCache::new(
    "target/cedar-test-cache",
    "examples/cedar-photos/policy.toml",
);

/// Every string inside `value`, for finding a message in a JSON answer.
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        Value::Object(fields) => fields.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

fn says(value: &Value, text: &str) -> bool {
    strings(value).iter().any(|s| s.contains(text))
}

/// cedar-policy prepared once, as an embedder would, over the same files:
/// policies (an `@id` annotation names its policy), entities, schema.
struct Native {
    policies: PolicySet,
    entities: Entities,
    schema: Option<Schema>,
}

impl Native {
    fn new(policies: &str, entities: &str, schema: Option<Schema>) -> Native {
        let parsed = PolicySet::from_str(policies).expect("native parse");
        let renamed = parsed.policies().map(|p| match p.annotation("id") {
            Some(id) => p.new_id(PolicyId::new(id)),
            None => p.clone(),
        });
        let policies = PolicySet::from_policies(renamed).expect("unique ids");
        let entities = Entities::from_json_str(entities, schema.as_ref()).expect("native entities");
        Native {
            policies,
            entities,
            schema,
        }
    }

    fn photos() -> Native {
        let read = |name: &str| {
            std::fs::read_to_string(example().join("policy").join(name)).expect("example file")
        };
        Native::new(&read("photos.cedar"), &read("entities.json"), None)
    }

    /// The native answer: `None` when the input is not a request.
    fn decide(&self, input: &Value) -> Option<(bool, Vec<String>, Vec<String>)> {
        let uid = |v: &Value| match v {
            Value::String(s) => EntityUid::from_str(s).ok(),
            Value::Object(_) => EntityUid::from_json(v.clone()).ok(),
            _ => None,
        };
        let principal = uid(input.get("principal")?)?;
        let action = uid(input.get("action")?)?;
        let resource = uid(input.get("resource")?)?;
        let context = match input.get("context") {
            None | Some(Value::Null) => json!({}),
            Some(c @ Value::Object(_)) => c.clone(),
            Some(_) => return None,
        };
        let context =
            Context::from_json_value(context, self.schema.as_ref().map(|s| (s, &action))).ok()?;
        let request =
            Request::new(principal, action, resource, context, self.schema.as_ref()).ok()?;
        let response = Authorizer::new().is_authorized(&request, &self.policies, &self.entities);
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        policies.sort();
        let mut errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        errors.sort();
        Some((response.decision() == Decision::Allow, policies, errors))
    }
}

/// An entity UID in one of the two accepted forms.
fn entity(g: &mut Seeded, kind: &str, id: &str) -> Value {
    if g.chance(50) {
        json!(format!("{kind}::{}", json!(id)))
    } else {
        json!({"type": kind, "id": id})
    }
}

async fn evaluate(client: &reqwest::Client, daemon: &Daemon, policy: &str, input: &Value) -> Value {
    json_body(
        client
            .post(daemon.url(&format!("/v1/policies/{policy}/evaluate")))
            .body(input.to_string())
            .send()
            .await
            .expect("evaluate request"),
    )
    .await
}

/// The guest's decision against the native answer for one input.
fn assert_same(
    decision: &Value,
    expected: Option<(bool, Vec<String>, Vec<String>)>,
    what: &str,
) -> bool {
    assert!(decision.get("error").is_none(), "{what}: {decision}");
    let Some((allow, policies, errors)) = expected else {
        assert_eq!(decision["allow"], false, "{what}: {decision}");
        let reason = decision["reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with("invalid input:"), "{what}: {decision}");
        return false;
    };
    assert_eq!(decision["allow"], allow, "{what}: {decision}");
    let obligations = &decision["obligations"];
    assert_eq!(obligations[POLICIES], json!(policies), "{what}: {decision}");
    let said = obligations[ERRORS].as_array().cloned().unwrap_or_default();
    assert_eq!(said.len(), errors.len(), "{what}: {decision} vs {errors:?}");
    for error in &errors {
        assert!(
            said.iter()
                .any(|s| s.as_str().is_some_and(|s| s.starts_with(error.as_str()))),
            "{what}: native error `{error}` missing from {decision}"
        );
    }
    allow
}

fn photos_policy(name: &str) -> String {
    format!(
        "[[policy]]\nname = \"{name}\"\nengine = \"cedar\"\nfiles = [\"{dir}/photos.cedar\", \"{dir}/entities.json\"]\nprincipal_header = \"x-user\"\n{LIMITS}\n",
        dir = example().join("policy").display()
    )
}

/// Generous limits: the comparison is about answers, on a machine that may
/// be busy with other builds.
const LIMITS: &str = "timeout_ms = 5000\nmemory_limit_mb = 64";
