//! Rego and Cedar run natively in this process against the same policies run
//! by sandgate's built-in guests, in one criterion run with the no-op guest
//! (issue 27), so `sandboxed ≤ 2 × native + noop` is read from one run; the
//! run ends by printing that comparison for each language.
//!
//! - `rego/native`: regorus with the files of `examples/rego-httpapi`
//!   (`httpapi.rego`, `data.json`) added to one `Engine` once, as an embedder
//!   would. Per decision: the input parsed from its JSON bytes, `set_input`,
//!   the entrypoint evaluated with `eval_query` (the call the Rego guest
//!   makes), and its value read as allow, status, reason and headers. The
//!   engine is reused, not cloned: `eval_query` resets regorus's evaluation
//!   state each time, so nothing of one decision reaches the next (the
//!   differential test in `tests/all/rego.rs` relies on the same over
//!   hundreds of inputs). Its first evaluation, before timing, prepares the
//!   engine (rules gathered, imports resolved, loops hoisted) once.
//! - `rego/native_unprepared`: the engine as parsed, cloned for each
//!   decision, so that each pays that preparation again: what the preparation
//!   at init saves (the Rego guest prepares its engine in `sandgate_init`, so
//!   its snapshot holds the prepared engine).
//! - `rego/sandboxed`: the same files through `engine = "rego"`
//!   (`examples/rego-httpapi/policy.toml`), loaded as the daemon loads them
//!   and evaluated end to end like `rbac/evaluate` in `evaluate.rs`.
//! - `cedar/native`: cedar-policy with `examples/cedar-photos` (policies with
//!   their `@id` ids, entities) parsed once; per decision the input parsed
//!   from its JSON bytes, the `Request` built from its principal, action,
//!   resource and context, `Authorizer::is_authorized`, and the determining
//!   policy ids collected: the steps the Cedar guest takes.
//!   `cedar/sandboxed`: the same files through `engine = "cedar"`.
//! - `*_deny`: the same for an input the policy denies.
//! - `noop/evaluate`: the host's fixed cost, as in `evaluate.rs`.
//!
//! Before anything is timed, each input must be decided the expected way,
//! natively and in the sandbox alike (allow, status, reason and headers for
//! Rego; allow and the determining policies for Cedar), so a broken
//! benchmark reports no number. Results and the command are in
//! `docs/benchmarks.md`.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityUid, PolicyId, PolicySet, Request,
};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;

use common::{bench_evaluation, decide, repo_root};

/// Alice reads her own order: allowed, `x-user` and `x-roles` passed on.
const REGO_ALLOW: &str = "examples/rego-httpapi/input.json";
/// Alice reads Bob's order: 403 with the policy's reason.
const REGO_DENY: &[u8] = br#"{"request": {"method": "GET", "path": "/api/orders/8", "query": "", "host": "shop.example",
             "headers": {"x-user": "alice", "x-roles": "customer"}, "source": {"address": "10.0.0.7"}}}"#;
/// Bob, a friend, views a photo of the vacation album: permitted by `friends-vacation`.
const CEDAR_ALLOW: &str = "examples/cedar-photos/input.json";
/// Mallory, a friend but blocked, views the same photo: forbidden by `blocked`.
const CEDAR_DENY: &[u8] = br#"{"principal": "User::\"mallory\"", "action": "Action::\"view\"", "resource": {"type": "Photo", "id": "beach.jpg"}, "context": {}}"#;

fn bench(c: &mut Criterion) {
    let started = SystemTime::now();
    let runtime = common::runtime();
    let rego_config = common::config("examples/rego-httpapi/policy.toml");
    let cedar_config = common::config("examples/cedar-photos/policy.toml");
    let engine = sandgate::Engine::new(&rego_config.engine).unwrap_or_else(|e| panic!("{e}"));
    let audit = sandgate::audit::AuditLog::disabled();
    let options = sandgate::EvalOptions::default();
    let read = |path: &str| {
        std::fs::read(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    };

    // Rego.
    let mut rego = NativeRego::load();
    let sandboxed = common::load(&runtime, &engine, rego_config.policies[0].clone());
    let rego_allow = read(REGO_ALLOW);
    for (input, allow) in [(&rego_allow[..], true), (REGO_DENY, false)] {
        let native = rego.decide(input);
        let guest = Verdict::of(&decide(&runtime, &sandboxed, input, &options, &audit));
        assert_eq!(native.allow, allow, "regorus: {native:?}");
        assert_eq!(guest, native, "the Rego guest and regorus disagree");
        assert_eq!(
            rego.decide_unprepared(input),
            native,
            "a fresh clone decides alike"
        );
    }
    let mut group = c.benchmark_group("rego");
    group.bench_function("native", |b| b.iter(|| rego.decide(&rego_allow).allow));
    group.bench_function("native_unprepared", |b| {
        b.iter(|| rego.decide_unprepared(&rego_allow).allow)
    });
    bench_evaluation(
        &mut group,
        &runtime,
        "sandboxed",
        &sandboxed,
        &rego_allow,
        &options,
        &audit,
    );
    group.bench_function("native_deny", |b| b.iter(|| rego.decide(REGO_DENY).allow));
    bench_evaluation(
        &mut group,
        &runtime,
        "sandboxed_deny",
        &sandboxed,
        REGO_DENY,
        &options,
        &audit,
    );
    group.finish();

    // Cedar.
    let cedar = NativeCedar::load();
    let sandboxed = common::load(&runtime, &engine, cedar_config.policies[0].clone());
    let cedar_allow = read(CEDAR_ALLOW);
    for (input, allow, by) in [
        (&cedar_allow[..], true, "friends-vacation"),
        (CEDAR_DENY, false, "blocked"),
    ] {
        let native = cedar.decide(input);
        let guest = decide(&runtime, &sandboxed, input, &options, &audit);
        assert_eq!(native, (allow, vec![by.to_owned()]), "cedar-policy");
        let obligations = guest.extra.get("obligations").cloned().unwrap_or_default();
        let policies = &obligations["sandgate.cedar.policies"];
        let errors = &obligations["sandgate.cedar.errors"];
        assert_eq!(
            (guest.allow, policies, errors),
            (allow, &serde_json::json!([by]), &serde_json::json!([])),
            "the Cedar guest and cedar-policy disagree: {guest:?}"
        );
    }
    let mut group = c.benchmark_group("cedar");
    group.bench_function("native", |b| b.iter(|| cedar.decide(&cedar_allow).0));
    bench_evaluation(
        &mut group,
        &runtime,
        "sandboxed",
        &sandboxed,
        &cedar_allow,
        &options,
        &audit,
    );
    group.bench_function("native_deny", |b| b.iter(|| cedar.decide(CEDAR_DENY).0));
    bench_evaluation(
        &mut group,
        &runtime,
        "sandboxed_deny",
        &sandboxed,
        CEDAR_DENY,
        &options,
        &audit,
    );
    group.finish();

    common::bench_noop(c, &runtime, &engine, &options, &audit);

    // The goal, from this run's medians.
    let noop = common::median_ns("noop", "evaluate", started);
    for (group, name) in [
        ("rego", ""),
        ("rego", "_deny"),
        ("cedar", ""),
        ("cedar", "_deny"),
    ] {
        let native = common::median_ns(group, &format!("native{name}"), started);
        let sandboxed = common::median_ns(group, &format!("sandboxed{name}"), started);
        match (native, sandboxed, &noop) {
            (Ok(native), Ok(sandboxed), Ok(noop)) => {
                let bound = 2.0 * native + noop;
                println!(
                    "goal (medians): {group}/sandboxed{name} {:.1} µs ≤ 2 × {group}/native{name} {:.1} µs + noop/evaluate {:.1} µs = {:.1} µs: {} ({:.2}× native)",
                    sandboxed / 1e3,
                    native / 1e3,
                    noop / 1e3,
                    bound / 1e3,
                    if sandboxed <= bound { "met" } else { "not met" },
                    sandboxed / native
                );
            }
            (Err(why), _, _) | (_, Err(why), _) => println!("goal not computed: {why}"),
            (_, _, Err(why)) => println!("goal not computed: {why}"),
        }
    }
}

/// regorus prepared once over the files of `examples/rego-httpapi`.
struct NativeRego {
    /// Prepared by its first evaluation, then reused.
    engine: regorus::Engine,
    /// As parsed, never evaluated: what every decision would start from
    /// if the guest did not prepare its engine at init.
    parsed: regorus::Engine,
    entrypoint: String,
}

/// A Rego decision as DESIGN §2b reads the entrypoint's object.
#[derive(Debug, PartialEq)]
struct Verdict {
    allow: bool,
    status: Option<u16>,
    reason: Option<String>,
    headers: BTreeMap<String, String>,
}

impl Verdict {
    fn of(decision: &sandgate::Decision) -> Verdict {
        Verdict {
            allow: decision.allow,
            status: decision.status,
            reason: decision.reason.clone(),
            headers: decision.headers.clone(),
        }
    }
}

impl NativeRego {
    fn load() -> NativeRego {
        let dir = repo_root().join("examples/rego-httpapi/policy");
        let mut engine = regorus::Engine::new();
        let path = dir.join("httpapi.rego");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        engine
            .add_policy(path.display().to_string(), text)
            .unwrap_or_else(|e| panic!("{e}"));
        let data = std::fs::read_to_string(dir.join("data.json")).unwrap_or_else(|e| panic!("{e}"));
        engine
            .add_data(regorus::Value::from_json_str(&data).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        NativeRego {
            parsed: engine.clone(),
            engine,
            entrypoint: "data.httpapi.authz".to_owned(),
        }
    }

    fn decide(&mut self, input: &[u8]) -> Verdict {
        Self::evaluate(&mut self.engine, &self.entrypoint, input)
    }

    fn decide_unprepared(&self, input: &[u8]) -> Verdict {
        Self::evaluate(&mut self.parsed.clone(), &self.entrypoint, input)
    }

    fn evaluate(engine: &mut regorus::Engine, entrypoint: &str, input: &[u8]) -> Verdict {
        let input = std::str::from_utf8(input).unwrap_or_else(|e| panic!("{e}"));
        engine.set_input(regorus::Value::from_json_str(input).unwrap_or_else(|e| panic!("{e}")));
        let results = engine
            .eval_query(entrypoint.to_owned(), false)
            .unwrap_or_else(|e| panic!("{e}"));
        let value = results
            .result
            .first()
            .and_then(|r| r.expressions.first())
            .map(|e| &e.value)
            .unwrap_or_else(|| panic!("{entrypoint} is undefined"));
        let text = |v: &regorus::Value| v.as_string().ok().map(|s| s.to_string());
        let headers = match value["headers"].as_object() {
            Ok(fields) => fields
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        Verdict {
            allow: value["allowed"] == regorus::Value::Bool(true),
            status: value["http_status"].as_u64().ok().map(|s| s as u16),
            reason: text(&value["body"]),
            headers,
        }
    }
}

/// cedar-policy prepared once over the files of `examples/cedar-photos`.
struct NativeCedar {
    policies: PolicySet,
    entities: Entities,
}

impl NativeCedar {
    fn load() -> NativeCedar {
        let dir = repo_root().join("examples/cedar-photos/policy");
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let parsed = PolicySet::from_str(&read("photos.cedar")).unwrap_or_else(|e| panic!("{e}"));
        let renamed = parsed.policies().map(|p| match p.annotation("id") {
            Some(id) => p.new_id(PolicyId::new(id)),
            None => p.clone(),
        });
        NativeCedar {
            policies: PolicySet::from_policies(renamed).unwrap_or_else(|e| panic!("{e}")),
            entities: Entities::from_json_str(&read("entities.json"), None)
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// Whether `input` is allowed, and the determining policies' ids.
    fn decide(&self, input: &[u8]) -> (bool, Vec<String>) {
        let input: Value = serde_json::from_slice(input).unwrap_or_else(|e| panic!("{e}"));
        let uid = |part: &str| match &input[part] {
            Value::String(s) => EntityUid::from_str(s).unwrap_or_else(|e| panic!("{e}")),
            other => EntityUid::from_json(other.clone()).unwrap_or_else(|e| panic!("{e}")),
        };
        let context = match &input["context"] {
            Value::Null => Value::Object(serde_json::Map::new()),
            other => other.clone(),
        };
        let context = Context::from_json_value(context, None).unwrap_or_else(|e| panic!("{e}"));
        let request = Request::new(
            uid("principal"),
            uid("action"),
            uid("resource"),
            context,
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let response = Authorizer::new().is_authorized(&request, &self.policies, &self.entities);
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        policies.sort();
        assert_eq!(response.diagnostics().errors().count(), 0);
        (response.decision() == Decision::Allow, policies)
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
