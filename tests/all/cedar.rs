//! Cedar policies run by the built-in Cedar guest (`engine = "cedar"`),
//! checked against cedar-policy run natively in this process: the
//! photo-sharing example (groups, `when`/`unless`, a `forbid`, an error-prone
//! condition) answers hundreds of generated requests, JSON and HTTP, exactly
//! as the native authorizer does (decision, determining policies, errors);
//! so do examples of Cedar's own documentation. Also: a schema violation
//! refuses the load with the validator's message, a syntax error names file
//! and line, the guest draws its hash keys at init while a user module's
//! `random_get` at init stays refused, `check` and `eval` show the policy,
//! and the example decides behind nginx forward-auth and ext_authz.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityUid, PolicyId, PolicySet, Request, Schema,
    ValidationMode, Validator,
};
use reqwest::Method;
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
fn shared_cache() -> (PathBuf, String) {
    static CACHE: OnceLock<(PathBuf, String)> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let cache = repo_root().join("target/cedar-test-cache");
            let config = example().join("policy.toml");
            let out = sandgate(
                &["check", "--config", &config.display().to_string()],
                &cache,
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (cache, String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .clone()
}

/// Starts the daemon on the shared cache and waits until `/readyz` says
/// every policy settled (loaded or failed).
async fn start(config: &Path, client: &reqwest::Client) -> (Daemon, u16, Value) {
    let (cache, _) = tokio::task::block_in_place(shared_cache);
    let daemon = Daemon::start(config, &cache);
    let (status, body) = eventually(
        Duration::from_secs(600),
        daemon.waiting_for("every policy settled (loaded or failed)"),
        async || {
            let response = client
                .get(daemon.url("/readyz"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = json_body(response).await;
            let settled = body["policies"]
                .as_object()
                .is_some_and(|p| p.values().all(|p| p["state"] != "loading"));
            match settled {
                true => Ok((status, body)),
                false => Err(body.to_string()),
            }
        },
    )
    .await;
    (daemon, status, body)
}

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

/// The Cedar request the documented forward-auth mapping (docs/config.md)
/// makes of an HTTP request, for a policy with `principal_header = "x-user"`.
fn http_as_request(http: &Value) -> Value {
    let principal = match http["headers"]["x-user"].as_str() {
        Some(user) if !user.is_empty() => json!({"type": "User", "id": user}),
        _ => json!("Anonymous::\"anonymous\""),
    };
    json!({
        "principal": principal,
        "action": {"type": "Action", "id": http["method"]},
        "resource": {"type": "Path", "id": http["path"]},
        "context": http,
    })
}

/// A tiny deterministic generator (xorshift64*), so a failure names the
/// seed and the case that reproduce it.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
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

fn photo_request(g: &mut Seeded) -> Value {
    let user = g.pick(&["alice", "bob", "carol", "dave", "mallory", "zed"]);
    let principal = if g.chance(8) {
        entity(g, "Anonymous", "anonymous")
    } else {
        entity(g, "User", user)
    };
    let action = g.pick(&["view", "comment", "edit", "delete", "GET", "share"]);
    let action = entity(g, "Action", action);
    let resource = match g.next() % 7 {
        0 => ("Photo", "beach.jpg"),
        1 => ("Photo", "diary.jpg"),
        2 => ("Photo", "cat.jpg"),
        3 => ("Photo", "ghost.jpg"),
        4 => ("Album", "vacation"),
        5 => ("Path", "/photos/vacation/beach.jpg"),
        _ => ("Path", "/photos/cat.jpg"),
    };
    let resource = entity(g, resource.0, resource.1);
    let mut request = json!({"principal": principal, "action": action, "resource": resource});
    match g.next() % 5 {
        0 => {}
        1 => request["context"] = json!({}),
        2 => request["context"] = json!({"trust": "high"}),
        _ => request["context"] = json!({"trust": g.next() % 6}),
    }
    if g.chance(3) {
        request["principal"] = json!("alice");
    }
    if g.chance(2) {
        request["context"] = json!([1]);
    }
    if g.chance(2) {
        request = json!({"action": "Action::\"view\""});
    }
    request
}

fn http_request(g: &mut Seeded) -> Value {
    let mut headers = serde_json::Map::new();
    if !g.chance(20) {
        let user = g.pick(&["alice", "bob", "carol", "mallory", "zed", ""]);
        headers.insert("x-user".into(), json!(user));
    }
    headers.insert("accept".into(), json!("image/jpeg"));
    json!({"request": {
        "method": g.pick(&["GET", "GET", "DELETE", "POST"]),
        "path": g.pick(&["/photos/vacation/beach.jpg", "/photos/vacation/diary.jpg", "/photos/cat.jpg", "/photos/none.jpg"]),
        "query": "",
        "host": "photos.example",
        "headers": headers,
        "source": {"address": "10.0.0.1"},
    }})
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_photo_policy_answers_as_native_cedar_for_generated_requests() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &photos_policy("photos"));
    let client = client();
    let (daemon, status, body) = start(&config, &client).await;
    assert_eq!(status, 200, "{body}");
    let native = Native::photos();

    let mut generator = Seeded(0x5eed_ceda);
    let (mut allowed, mut invalid, mut with_errors) = (0, 0, 0);
    for i in 0..CASES {
        let input = photo_request(&mut generator);
        let expected = native.decide(&input);
        invalid += usize::from(expected.is_none());
        with_errors += usize::from(expected.as_ref().is_some_and(|e| !e.2.is_empty()));
        let decision = evaluate(&client, &daemon, "photos", &input).await;
        allowed += usize::from(assert_same(
            &decision,
            expected,
            &format!("case {i}: {input}"),
        ));
    }
    // The generated requests exercise every answer.
    assert!(
        allowed > CASES / 10 && allowed < CASES * 9 / 10,
        "{allowed} of {CASES} allowed"
    );
    assert!(
        invalid > 0 && with_errors > 0,
        "{invalid} invalid, {with_errors} with errors"
    );

    // HTTP requests (forward-auth's and ext_authz's input) map as documented.
    let mut allowed = 0;
    for i in 0..CASES / 2 {
        let input = http_request(&mut generator);
        let expected = native.decide(&http_as_request(&input["request"]));
        let decision = evaluate(&client, &daemon, "photos", &input).await;
        allowed += usize::from(assert_same(
            &decision,
            expected,
            &format!("http case {i}: {input}"),
        ));
    }
    assert!(
        allowed > 0 && allowed < CASES / 2,
        "{allowed} HTTP requests allowed"
    );
}

/// Examples from Cedar's documentation (the policy language guide and the
/// tutorial's photo application), with the entities they describe.
const DOC_POLICIES: &str = r#"
permit(
  principal == User::"alice",
  action == Action::"view",
  resource == Photo::"VacationPhoto94.jpg"
);

permit(
  principal in Group::"jane_friends",
  action == Action::"view",
  resource in Album::"jane_vacation"
);

permit (principal, action == Action::"view", resource)
when { resource.accessLevel == "public" && principal.location == "USA" };

forbid (principal, action, resource)
when { resource has private }
unless { principal == resource.owner };

permit(principal, action in [Action::"listPhotos", Action::"view"], resource in Account::"jane")
when { context.authenticated == true && context.ip.isInRange(ip("222.222.222.0/24")) };

permit(principal, action == Action::"download", resource)
when { decimal(context.score).greaterThan(decimal("0.75")) };
"#;

const DOC_ENTITIES: &str = r#"[
  {"uid": {"type": "User", "id": "alice"}, "attrs": {"location": "USA"}, "parents": [{"type": "Group", "id": "jane_friends"}]},
  {"uid": {"type": "User", "id": "bob"}, "attrs": {"location": "Canada"}, "parents": []},
  {"uid": {"type": "User", "id": "jane"}, "attrs": {"location": "USA"}, "parents": []},
  {"uid": {"type": "Group", "id": "jane_friends"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Account", "id": "jane"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Album", "id": "jane_vacation"}, "attrs": {}, "parents": [{"type": "Account", "id": "jane"}]},
  {"uid": {"type": "Photo", "id": "VacationPhoto94.jpg"}, "attrs": {"accessLevel": "private"}, "parents": [{"type": "Album", "id": "jane_vacation"}]},
  {"uid": {"type": "Photo", "id": "sunset.jpg"}, "attrs": {"accessLevel": "public"}, "parents": [{"type": "Album", "id": "jane_vacation"}]},
  {"uid": {"type": "Photo", "id": "diary.jpg"}, "attrs": {"accessLevel": "public", "private": true, "owner": {"__entity": {"type": "User", "id": "jane"}}}, "parents": [{"type": "Album", "id": "jane_vacation"}]}
]"#;

fn doc_request(g: &mut Seeded) -> Value {
    let user = g.pick(&["alice", "bob", "jane", "nobody"]);
    let principal = entity(g, "User", user);
    let action = g.pick(&["view", "listPhotos", "download", "edit"]);
    let action = entity(g, "Action", action);
    let resource = match g.next() % 4 {
        0 => entity(g, "Photo", "VacationPhoto94.jpg"),
        1 => entity(g, "Photo", "sunset.jpg"),
        2 => entity(g, "Photo", "diary.jpg"),
        _ => entity(g, "Album", "jane_vacation"),
    };
    let mut context = json!({});
    if g.chance(70) {
        context["authenticated"] = json!(g.chance(60));
    }
    if g.chance(70) {
        let ip = g.pick(&["222.222.222.7", "10.0.0.1", "222.222.223.1"]);
        context["ip"] = json!({"__extn": {"fn": "ip", "arg": ip}});
    }
    if g.chance(70) {
        context["score"] = json!(g.pick(&["0.5", "0.9", "1.0", "x"]));
    }
    json!({"principal": principal, "action": action, "resource": resource, "context": context})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_of_cedars_documentation_answer_as_native_cedar() {
    let dir = tempdir();
    write(dir.path(), "docs.cedar", DOC_POLICIES);
    write(dir.path(), "entities.json", DOC_ENTITIES);
    let config = daemon_config(
        dir.path(),
        "",
        &format!(
            "[[policy]]\nname = \"docs\"\nengine = \"cedar\"\nfiles = [\"docs.cedar\", \"entities.json\"]\n{LIMITS}\n"
        ),
    );
    let client = client();
    let (daemon, status, body) = start(&config, &client).await;
    assert_eq!(status, 200, "{body}");
    let native = Native::new(DOC_POLICIES, DOC_ENTITIES, None);
    let mut generator = Seeded(0xd0c5);
    let mut allowed = 0;
    for i in 0..CASES / 2 {
        let input = doc_request(&mut generator);
        let expected = native.decide(&input);
        let decision = evaluate(&client, &daemon, "docs", &input).await;
        allowed += usize::from(assert_same(
            &decision,
            expected,
            &format!("case {i}: {input}"),
        ));
    }
    assert!(allowed > 0 && allowed < CASES / 2, "{allowed} allowed");
}

const SCHEMA: &str = r#"
entity Group;
entity User in [Group];
entity Photo { owner: User };
action view appliesTo { principal: User, resource: Photo, context: { trust: Long } };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_validates_requests_and_a_violation_refuses_the_load_with_the_validators_message()
{
    let dir = tempdir();
    let good = "permit(principal, action == Action::\"view\", resource)\nwhen { resource.owner == principal && context.trust > 1 };\n";
    let bad =
        "permit(principal, action == Action::\"view\", resource)\nwhen { resource.private };\n";
    let entities = r#"[{"uid": {"type": "User", "id": "alice"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Photo", "id": "p"}, "attrs": {"owner": {"type": "User", "id": "alice"}}, "parents": []}]"#;
    let bad_entities =
        r#"[{"uid": {"type": "Photo", "id": "p"}, "attrs": {"owner": "alice"}, "parents": []}]"#;
    for (sub, policy, entities) in [
        ("good", good, entities),
        ("badpolicy", bad, entities),
        ("badentities", good, bad_entities),
    ] {
        let sub_dir = dir.path().join(sub);
        std::fs::create_dir_all(&sub_dir).expect("dir");
        write(&sub_dir, "p.cedar", policy);
        write(&sub_dir, "entities.json", entities);
        write(&sub_dir, "p.cedarschema", SCHEMA);
    }
    let policies: String = ["good", "badpolicy", "badentities"]
        .iter()
        .map(|name| {
            format!("[[policy]]\nname = \"{name}\"\nengine = \"cedar\"\nfiles = [\"{name}\"]\n{LIMITS}\n")
        })
        .collect();
    let config = daemon_config(dir.path(), "", &policies);
    let client = client();
    let (daemon, status, body) = start(&config, &client).await;
    assert_eq!(status, 503, "{body}");

    // The validator's own message, as cedar-policy gives it natively.
    let (schema, _) = Schema::from_cedarschema_str(SCHEMA).expect("schema");
    let validation = Validator::new(schema.clone()).validate(
        &PolicySet::from_str(bad).expect("parse"),
        ValidationMode::Strict,
    );
    let message = validation
        .validation_errors()
        .next()
        .expect("the bad policy does not validate")
        .to_string();
    let bad_policy = &body["policies"]["badpolicy"];
    assert!(says(bad_policy, "module_invalid"), "{bad_policy}");
    assert!(
        says(bad_policy, &message),
        "`{message}` not in {bad_policy}"
    );
    assert!(says(bad_policy, "badpolicy/p.cedar:2:"), "{bad_policy}");
    let entities_error = Entities::from_json_str(bad_entities, Some(&schema))
        .expect_err("the entities do not match the schema")
        .to_string();
    let bad_entities = &body["policies"]["badentities"];
    assert!(
        says(bad_entities, &entities_error),
        "`{entities_error}` not in {bad_entities}"
    );
    assert!(
        says(bad_entities, "badentities/entities.json"),
        "{bad_entities}"
    );

    // The valid policy answers, and requests are checked against the schema.
    let native = Native::new(good, entities, Some(schema));
    for input in [
        json!({"principal": "User::\"alice\"", "action": "Action::\"view\"", "resource": "Photo::\"p\"", "context": {"trust": 2}}),
        json!({"principal": "User::\"alice\"", "action": "Action::\"view\"", "resource": "Photo::\"p\"", "context": {"trust": 1}}),
        json!({"principal": "User::\"alice\"", "action": "Action::\"view\"", "resource": "Photo::\"p\"", "context": {"trust": "high"}}),
        json!({"principal": "Photo::\"p\"", "action": "Action::\"view\"", "resource": "Photo::\"p\"", "context": {"trust": 2}}),
        json!({"principal": "User::\"alice\"", "action": "Action::\"edit\"", "resource": "Photo::\"p\"", "context": {}}),
    ] {
        let decision = evaluate(&client, &daemon, "good", &input).await;
        assert_same(&decision, native.decide(&input), &input.to_string());
    }
    let first = evaluate(
        &client,
        &daemon,
        "good",
        &json!({"principal": "User::\"alice\"", "action": "Action::\"view\"", "resource": "Photo::\"p\"", "context": {"trust": 2}}),
    )
    .await;
    assert_eq!(first["allow"], true, "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syntax_error_refuses_the_load_and_readyz_names_file_and_line() {
    let dir = tempdir();
    write(
        dir.path(),
        "ok.cedar",
        "permit(principal, action, resource);\n",
    );
    write(
        dir.path(),
        "bad.cedar",
        "// a comment\npermit(principal, action, resource)\nwhen { principal == };\n",
    );
    let config = daemon_config(
        dir.path(),
        "",
        "[[policy]]\nname = \"bad\"\nengine = \"cedar\"\nfiles = [\"ok.cedar\", \"bad.cedar\"]\n",
    );
    let client = client();
    let (daemon, status, body) = start(&config, &client).await;
    assert_eq!(status, 503, "{body}");
    assert!(says(&body, "module_invalid"), "{body}");
    assert!(says(&body, "bad.cedar:3:"), "{body}");

    let decision = evaluate(&client, &daemon, "bad", &json!({})).await;
    assert_eq!(decision["allow"], false, "{decision}");
    assert_eq!(decision["error"]["code"], "module_invalid", "{decision}");
}

/// DESIGN §2 refuses `random_get` at init. The Cedar guest's std hash tables
/// draw their keys there, so the host answers it for that built-in guest
/// only: the policy loads without the `random` grant and without a refusal,
/// while a user module asking at init is still refused and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_built_in_guest_draws_its_hash_keys_at_init() {
    let dir = tempdir();
    let (cache, _) = tokio::task::block_in_place(shared_cache);
    let user = write(
        dir.path(),
        "user.wat",
        &abi_guest(
            r#"(import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))"#,
            &allow_if("(i32.const 1)"),
        )
        .replace(
            "(global $next",
            r#"(func (export "sandgate_init") (result i32)
    (drop (call $random (i32.const 4096) (i32.const 8)))
    (i32.const 0))
  (global $next"#,
        ),
    );
    let toml = format!(
        "{}\n[[policy]]\nname = \"user\"\nmodule = \"{}\"\n[policy.wasi]\nallow = [\"random\"]\n",
        photos_policy("photos"),
        user.display()
    );
    let (_, config) = config(dir.path(), &toml);
    let engine = engine(&cache);
    let audit_path = dir.path().join("audit.jsonl");
    let audit =
        sandgate::audit::AuditLog::open(&sandgate::config::AuditTarget::File(audit_path.clone()))
            .expect("audit log");
    let photos = &config.policies[0];
    assert!(
        !photos.grants.functions.contains("random_get"),
        "the Cedar policy is not granted randomness"
    );
    let cedar = sandgate::Policy::load_audited(&engine, photos.clone(), &audit)
        .await
        .unwrap_or_else(|e| panic!("the Cedar guest loads: {e}"));
    let user = sandgate::Policy::load_audited(&engine, config.policies[1].clone(), &audit)
        .await
        .unwrap_or_else(|e| panic!("the user module loads: {e}"));
    let request = json!({"principal": "User::\"bob\"", "action": "Action::\"view\"", "resource": "Photo::\"beach.jpg\""});
    let evaluation = cedar
        .evaluate(
            request.to_string().as_bytes(),
            &sandgate::EvalOptions::default(),
            &audit,
        )
        .await;
    assert!(evaluation.decision.allow, "{:?}", evaluation.decision);
    assert!(evaluation.denials.is_empty(), "{:?}", evaluation.denials);
    let evaluation = user
        .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
        .await;
    assert!(evaluation.decision.allow, "{:?}", evaluation.decision);
    audit.flush();
    let refused: Vec<(String, String, String)> = audit_lines(&audit_path)
        .iter()
        .filter(|l| l["kind"] == "wasi_denied")
        .map(|l| {
            let text = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
            (text("policy"), text("call"), text("decision_id"))
        })
        .collect();
    assert_eq!(
        refused,
        [(
            "user".to_owned(),
            "random_get".to_owned(),
            "init".to_owned()
        )]
    );
}

#[test]
fn check_prints_engine_files_and_policy_ids_and_eval_decides() {
    let (cache, stdout) = shared_cache();
    assert!(
        stdout.contains("engine        cedar (cedar-policy 4.14.1)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("policy ids    owner, friends-vacation, public, editors, locked, blocked"),
        "{stdout}"
    );
    assert!(stdout.contains("photos.cedar"), "{stdout}");
    assert!(stdout.contains("entities.json"), "{stdout}");
    let config = example().join("policy.toml");
    let out = sandgate(
        &[
            "eval",
            "--config",
            &config.display().to_string(),
            "--policy",
            "photos",
            "--input",
            &example().join("input.json").display().to_string(),
        ],
        &cache,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision = stdout_json(&out);
    assert_eq!(decision["allow"], true, "{decision}");
    assert_eq!(
        decision["obligations"][POLICIES],
        json!(["friends-vacation"]),
        "{decision}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cedar_example_decides_behind_nginx_forward_auth_and_ext_authz() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "grpc_listen = \"127.0.0.1:0\"",
        &photos_policy("photos"),
    );
    let client = client();
    let (mut daemon, status, body) = start(&config, &client).await;
    assert_eq!(status, 200, "{body}");
    let backend = Backend::start();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = start_nginx(&nginx_dir, daemon.http, "photos", backend.addr);
    let through = |method: Method, path: &str, headers: &[(&str, &str)]| {
        let mut request = client.request(method, format!("http://{}{path}", nginx.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move { request.send().await.expect("through nginx") }
    };

    let beach = "/photos/vacation/beach.jpg";
    let owner = through(Method::GET, beach, &[("x-user", "alice")]).await;
    assert_eq!(owner.status(), 200, "{}", nginx.error_log());
    let friend = through(Method::GET, beach, &[("x-user", "bob")]).await;
    assert_eq!(friend.status(), 200);
    let blocked = through(Method::GET, beach, &[("x-user", "mallory")]).await;
    assert_eq!(blocked.status(), 403);
    let anonymous = through(Method::GET, beach, &[]).await;
    assert_eq!(anonymous.status(), 403);
    let public = through(Method::GET, "/photos/cat.jpg", &[]).await;
    assert_eq!(public.status(), 200);
    let private = through(
        Method::GET,
        "/photos/vacation/diary.jpg",
        &[("x-user", "bob")],
    )
    .await;
    assert_eq!(private.status(), 403);

    let seen = backend.received();
    let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        [beach, beach, "/photos/cat.jpg"],
        "only allowed requests reach the application"
    );

    let grpc = daemon.grpc.expect("grpc listening");
    let mut ext_authz = ExtAuthzClient::connect(grpc).await;
    for (user, allowed) in [("bob", true), ("mallory", false)] {
        let answer = ext_authz
            .check(check_request(
                Some("photos"),
                "GET",
                beach,
                &[("x-user", user)],
            ))
            .await;
        let code = answer.status.as_ref().map_or(0, |s| s.code);
        assert_eq!(code == 0, allowed, "{user}: {answer:?}");
    }
    drop(nginx);
    tokio::task::block_in_place(|| daemon.stop());
}
