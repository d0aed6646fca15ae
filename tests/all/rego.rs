//! Rego policies run by the built-in Rego guest (`engine = "rego"`), checked
//! against regorus run natively in this process: for each policy, hundreds of
//! generated inputs must get the same value from `POST /v1/data/{path}` as
//! from the native engine (OPA's Data API shape, `{}` when undefined), and
//! the decision the entrypoint's value maps to (DESIGN §2b). Also: a listed
//! directory loads as OPA's loader places it, a syntax error or a stray
//! listed file refuses the load naming the file, `print()` reaches the log,
//! and the example runs behind nginx forward-auth.

use std::path::Path;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

/// The module cache the tests share, filled once from the example, so each
/// daemon compiles only its policies' snapshots.
static CACHE: SharedCache = SharedCache::new(
    "target/rego-test-cache",
    "examples/rego-httpapi/policy.toml",
);

/// Inputs generated per policy.
const CASES: usize = 300;

/// RBAC in the shape of OPA's documentation: users have roles, roles grant
/// actions on types; admins may do anything.
const RBAC: &str = r#"package rbac

import rego.v1

default allow := false

allow if user_is_admin

allow if {
	some grant in user_is_granted
	input.action == grant.action
	input.type == grant.type
}

user_is_admin if "admin" in data.user_roles[input.user]

user_is_granted contains grant if {
	some role in data.user_roles[input.user]
	some grant in data.role_grants[role]
}
"#;

const RBAC_DATA: &str = r#"{
  "user_roles": {"alice": ["admin"], "bob": ["employee", "billing"], "eve": ["customer"]},
  "role_grants": {
    "customer": [{"action": "read", "type": "dog"}, {"action": "read", "type": "cat"},
                 {"action": "adopt", "type": "dog"}, {"action": "adopt", "type": "cat"}],
    "employee": [{"action": "read", "type": "dog"}, {"action": "read", "type": "cat"},
                 {"action": "update", "type": "dog"}, {"action": "update", "type": "cat"}],
    "billing": [{"action": "read", "type": "finance"}, {"action": "update", "type": "finance"}]
  }
}"#;

/// ABAC with ownership: owners do anything to their documents; colleagues of
/// the same department read what their clearance allows; a decision object
/// with the reasons.
const ABAC: &str = r#"package abac

import rego.v1

levels := {"public": 0, "internal": 1, "secret": 2}

owner if input.subject.id == input.resource.owner

same_department if input.subject.department == input.resource.department

cleared if levels[input.resource.classification] <= input.subject.clearance

reasons contains "not the owner" if not owner
reasons contains "another department" if not same_department
reasons contains "not cleared" if not cleared

default allow := false

allow if owner

allow if {
	input.action == "read"
	same_department
	cleared
}

decision := {"allow": allow, "reasons": reasons}
"#;

fn rbac_input(g: &mut Seeded) -> Value {
    let mut input = json!({
        "user": g.pick(&["alice", "bob", "eve", "mallory", ""]),
        "action": g.pick(&["read", "update", "adopt", "delete"]),
        "type": g.pick(&["dog", "cat", "finance", "bird"]),
    });
    if g.chance(5) {
        input["user"] = json!(7);
    }
    if g.chance(5) {
        input = json!({"action": "read"});
    }
    input
}

fn abac_input(g: &mut Seeded) -> Value {
    let mut input = json!({
        "subject": {
            "id": g.pick(&["alice", "bob", "carol"]),
            "department": g.pick(&["sales", "legal"]),
            "clearance": g.next() % 3,
        },
        "resource": {
            "owner": g.pick(&["alice", "bob", "dave"]),
            "department": g.pick(&["sales", "legal", "hr"]),
            "classification": g.pick(&["public", "internal", "secret", "unknown"]),
        },
        "action": g.pick(&["read", "write"]),
    });
    if g.chance(5) {
        input["subject"] = json!(null);
    }
    input
}

fn httpapi_input(g: &mut Seeded) -> Value {
    let path = match g.next() % 6 {
        0 => "/api/public/catalog".to_owned(),
        1 => "/api/orders".to_owned(),
        2 => format!("/api/orders/{}", 6 + g.next() % 4),
        3 => format!("/api/orders/{}/lines", 7 + g.next() % 2),
        4 => "/admin".to_owned(),
        _ => "/".to_owned(),
    };
    let mut headers = serde_json::Map::new();
    if !g.chance(10) {
        headers.insert("x-user".into(), json!(g.pick(&["alice", "bob", "carol"])));
    }
    if g.chance(70) {
        let roles = g.pick(&[
            "",
            "customer",
            "support",
            "clerk",
            "admin",
            "customer, clerk",
            " support ,",
        ]);
        headers.insert("x-roles".into(), json!(roles));
    }
    json!({"request": {
        "method": g.pick(&["GET", "HEAD", "POST", "DELETE", "PUT"]),
        "path": path,
        "query": "",
        "host": "shop.example",
        "headers": headers,
        "source": {"address": "10.0.0.1"},
    }})
}

/// The Rego policies under test: name, files (written into the config's
/// directory, or the example's directory), entrypoint, input generator.
struct Case {
    name: &'static str,
    entrypoint: &'static str,
    generate: fn(&mut Seeded) -> Value,
}

const CASES_UNDER_TEST: [Case; 3] = [
    Case {
        name: "rbac",
        entrypoint: "data.rbac.allow",
        generate: rbac_input,
    },
    Case {
        name: "abac",
        entrypoint: "data.abac.decision",
        generate: abac_input,
    },
    Case {
        name: "httpapi",
        entrypoint: "data.httpapi.authz",
        generate: httpapi_input,
    },
];

fn example_dir() -> std::path::PathBuf {
    repo_root().join("examples/rego-httpapi/policy")
}

/// Writes the RBAC and ABAC policies into `dir` and returns the config's
/// policy tables for all three policies.
fn policies(dir: &Path) -> String {
    let rbac = dir.join("rbac");
    std::fs::create_dir_all(&rbac).expect("rbac dir");
    write(&rbac, "rbac.rego", RBAC);
    write(&rbac, "data.json", RBAC_DATA);
    write(dir, "abac.rego", ABAC);
    format!(
        "[[policy]]\nname = \"rbac\"\nengine = \"rego\"\nfiles = [\"rbac\"]\nentrypoint = \"data.rbac.allow\"\n{LIMITS}\n\
         [[policy]]\nname = \"abac\"\nengine = \"rego\"\nfiles = [\"abac.rego\"]\nentrypoint = \"data.abac.decision\"\n{LIMITS}\n\
         [[policy]]\nname = \"httpapi\"\nengine = \"rego\"\nfiles = [\"{}\"]\nentrypoint = \"data.httpapi.authz\"\n{LIMITS}\n",
        example_dir().display()
    )
}

/// Generous limits: the comparison is about answers, on a machine that may
/// be busy with other builds.
const LIMITS: &str = "timeout_ms = 5000\nmemory_limit_mb = 64";

/// regorus prepared once, as an embedder would, over the same files.
fn native(dir: &Path, name: &str) -> regorus::Engine {
    let mut engine = regorus::Engine::new();
    let add = |engine: &mut regorus::Engine, path: &Path| {
        let text = std::fs::read_to_string(path).expect("policy file");
        if path.extension().is_some_and(|e| e == "rego") {
            engine
                .add_policy(path.display().to_string(), text)
                .expect("native parse");
        } else {
            engine
                .add_data(regorus::Value::from_json_str(&text).expect("data"))
                .expect("native data");
        }
    };
    match name {
        "rbac" => {
            add(&mut engine, &dir.join("rbac/rbac.rego"));
            add(&mut engine, &dir.join("rbac/data.json"));
        }
        "abac" => add(&mut engine, &dir.join("abac.rego")),
        _ => {
            add(&mut engine, &example_dir().join("httpapi.rego"));
            add(&mut engine, &example_dir().join("data.json"));
        }
    }
    engine
}

/// OPA's Data API answer for `query` over `input`, natively.
fn native_answer(engine: &mut regorus::Engine, query: &str, input: &Value) -> Value {
    engine.set_input(regorus::Value::from_json_str(&input.to_string()).expect("input"));
    let results = engine
        .eval_query(query.to_owned(), false)
        .expect("native evaluation");
    match results
        .result
        .first()
        .and_then(|r| r.expressions.first())
        .map(|e| &e.value)
    {
        Some(value) if *value != regorus::Value::Undefined => {
            json!({"result": serde_json::to_value(value).expect("value as JSON")})
        }
        _ => json!({}),
    }
}

/// The decision DESIGN §2b maps the entrypoint's Data API answer to:
/// `(allow, status, reason)`.
fn mapped(answer: &Value) -> (bool, Option<u64>, Option<String>) {
    match &answer.get("result") {
        None => (false, None, Some("undefined".into())),
        Some(Value::Bool(b)) => (*b, None, None),
        Some(Value::Object(o)) => (
            o.get("allowed")
                .or_else(|| o.get("allow"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            o.get("http_status").and_then(Value::as_u64),
            o.get("body").and_then(Value::as_str).map(str::to_owned),
        ),
        Some(other) => panic!("the test policies give booleans or objects, not {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rego_policies_answer_as_native_regorus_for_generated_inputs() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &policies(dir.path()));
    let client = client();
    let (daemon, status, body) = CACHE.start(&config, &client).await;
    assert_eq!(status, 200, "{body}");

    for case in &CASES_UNDER_TEST {
        let mut engine = native(dir.path(), case.name);
        let data_path = case
            .entrypoint
            .trim_start_matches("data.")
            .replace('.', "/");
        let mut generator = Seeded(0x5eed_0000 + case.name.len() as u64);
        let mut allowed = 0;
        for i in 0..CASES {
            let input = (case.generate)(&mut generator);
            let expected = native_answer(&mut engine, case.entrypoint, &input);
            let response = client
                .post(daemon.url(&format!("/v1/data/{data_path}")))
                .body(json!({ "input": input }).to_string())
                .send()
                .await
                .expect("data request");
            assert_eq!(response.status(), 200, "{} case {i}", case.name);
            let answer = json_body(response).await;
            assert_eq!(
                answer, expected,
                "{} case {i}: /v1/data differs from regorus for input {input}",
                case.name
            );

            let decision = json_body(
                client
                    .post(daemon.url(&format!("/v1/policies/{}/evaluate", case.name)))
                    .body(input.to_string())
                    .send()
                    .await
                    .expect("evaluate request"),
            )
            .await;
            let (allow, status, reason) = mapped(&expected);
            assert_eq!(
                decision["allow"], allow,
                "{} case {i}: {decision} for {input}",
                case.name
            );
            assert_eq!(
                decision["status"].as_u64(),
                status,
                "{} case {i}: {decision}",
                case.name
            );
            assert_eq!(
                decision["reason"].as_str().map(str::to_owned),
                reason,
                "{} case {i}: {decision}",
                case.name
            );
            assert!(decision.get("error").is_none(), "{decision}");
            allowed += usize::from(allow);
        }
        // The generated inputs exercise both answers.
        assert!(
            allowed > CASES / 10 && allowed < CASES * 9 / 10,
            "{}: {allowed} of {CASES} allowed",
            case.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_answers_documents_undefined_and_errors_as_opa_does() {
    let dir = tempdir();
    write(
        dir.path(),
        "p.rego",
        "package p\n\nimport rego.v1\n\nx := input.n + 1\n\ny if input.n > 3\n\nconflict := 1 if input.c\nconflict := 2 if input.c\n\nsay if print(\"deciding for\", input.n)\n",
    );
    let config = daemon_config(
        dir.path(),
        "",
        "[[policy]]\nname = \"p\"\nengine = \"rego\"\nfiles = [\"p.rego\"]\nentrypoint = \"data.p.y\"\n",
    );
    let client = client();
    let (daemon, status, body) = CACHE.start(&config, &client).await;
    assert_eq!(status, 200, "{body}");
    let data = |path: &str, body: Value| {
        let request = client.post(daemon.url(path)).body(body.to_string());
        async move {
            let response = request.send().await.expect("data request");
            (response.status().as_u16(), json_body(response).await)
        }
    };

    assert_eq!(
        data("/v1/data/p/x", json!({"input": {"n": 4}})).await,
        (200, json!({"result": 5}))
    );
    assert_eq!(
        data("/v1/data/p/y", json!({"input": {"n": 1}})).await,
        (200, json!({}))
    );
    assert_eq!(
        data("/v1/data/p/nothing", json!({"input": {}})).await,
        (200, json!({}))
    );
    let (status, whole) = data("/v1/data/p", json!({"input": {"n": 9}})).await;
    assert_eq!(status, 200);
    assert_eq!(whole["result"]["x"], 10, "{whole}");
    assert_eq!(whole["result"]["y"], true, "{whole}");
    let (status, error) = data("/v1/data/p/conflict", json!({"input": {"c": true}})).await;
    assert_eq!(status, 500, "{error}");
    assert_eq!(error["code"], "internal_error", "{error}");
    let (status, bad) = data("/v1/data/p/a-b", json!({"input": {}})).await;
    assert_eq!(status, 400, "{bad}");

    // The entrypoint's undefined value denies with reason `undefined`.
    let (_, decision) = daemon
        .evaluate(&client, "p", json!({"n": 1}).to_string())
        .await;
    assert_eq!(decision["allow"], false, "{decision}");
    assert_eq!(decision["reason"], "undefined", "{decision}");

    // print() goes to the policy's log.
    assert_eq!(
        data("/v1/data/p/say", json!({"input": {"n": 42}})).await.0,
        200
    );
    daemon.logged("deciding for 42").await;
}

/// The Rego guest allocates a decision's values from its arena (1 MiB); an
/// input whose values need more still decides, from the system allocator,
/// and the next decision starts from an empty arena again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_larger_than_the_guests_arena_still_decides_and_the_next_starts_afresh() {
    let dir = tempdir();
    write(
        dir.path(),
        "big.rego",
        "package big\n\nimport rego.v1\n\nallow if sum(input.xs) == input.expected\n",
    );
    let config = daemon_config(
        dir.path(),
        "",
        "[[policy]]\nname = \"big\"\nengine = \"rego\"\nfiles = [\"big.rego\"]\nentrypoint = \"data.big.allow\"\nmemory_limit_mb = 64\n",
    );
    let client = client();
    let (daemon, status, body) = CACHE.start(&config, &client).await;
    assert_eq!(status, 200, "{body}");
    let decide = async |input: Value| {
        let (status, decision) = daemon.evaluate(&client, "big", input.to_string()).await;
        assert_eq!(status, 200, "{decision}");
        decision
    };
    // 40 000 numbers: some 250 KB of JSON, several MB of Rego values.
    let xs: Vec<u64> = (0..40_000).collect();
    let expected: u64 = xs.iter().sum();
    for _ in 0..3 {
        let big = decide(json!({"xs": xs, "expected": expected})).await;
        assert_eq!(big["allow"], true, "{big}");
        let wrong = decide(json!({"xs": xs, "expected": expected + 1})).await;
        assert_eq!(wrong["allow"], false, "{wrong}");
        let small = decide(json!({"xs": [1, 2], "expected": 3})).await;
        assert_eq!(small["allow"], true, "{small}");
    }
}

/// A listed directory loads as OPA's loader places it: `.rego` modules,
/// data under its subdirectories' path, other files skipped; a listed file
/// that is neither refuses the load, named as the config wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_loads_as_opas_loader_places_it_and_a_listed_stray_file_is_named() {
    let dir = tempdir();
    let bundle = dir.path().join("bundle");
    write(
        &bundle,
        "p.rego",
        "package p\n\nimport rego.v1\n\nallow if input.user in data.roles.admins\n\nops := data.roles.ops.members\n",
    );
    write(&bundle, "roles/admins.json", r#"{"admins": ["alice"]}"#);
    write(&bundle, "roles/ops/team.yaml", "members:\n  - bob\n");
    write(&bundle, "README.md", "not policy");
    write(dir.path(), "NOTES.txt", "not policy either");
    let config = daemon_config(
        dir.path(),
        "",
        "[[policy]]\nname = \"p\"\nengine = \"rego\"\nfiles = [\"bundle\"]\nentrypoint = \"data.p.allow\"\n\
         [[policy]]\nname = \"stray\"\nengine = \"rego\"\nfiles = [\"bundle/p.rego\", \"NOTES.txt\"]\nentrypoint = \"data.p.allow\"\n",
    );
    let client = client();
    let (daemon, status, body) = CACHE.start(&config, &client).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["policies"]["p"]["state"], "ready", "{body}");
    let stray = body["policies"]["stray"]["error"].to_string();
    assert!(
        stray.contains("NOTES.txt: not a .rego module nor a .json/.yaml data file"),
        "{stray}"
    );

    let (status, alice) = daemon
        .evaluate(&client, "p", json!({"user": "alice"}).to_string())
        .await;
    assert_eq!((status, &alice["allow"]), (200, &json!(true)), "{alice}");
    let (_, bob) = daemon
        .evaluate(&client, "p", json!({"user": "bob"}).to_string())
        .await;
    assert_eq!(bob["allow"], false, "{bob}");
    let ops = client
        .post(daemon.url("/v1/data/p/ops"))
        .body(json!({"input": {}}).to_string())
        .send()
        .await
        .expect("data request");
    assert_eq!(json_body(ops).await, json!({"result": ["bob"]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syntax_error_refuses_the_load_and_readyz_names_file_and_line() {
    let dir = tempdir();
    write(
        dir.path(),
        "bad.rego",
        "package bad\n\nallow if {\n  input.a ==\n}\n",
    );
    let config = daemon_config(
        dir.path(),
        "",
        "[[policy]]\nname = \"bad\"\nengine = \"rego\"\nfiles = [\"bad.rego\"]\nentrypoint = \"data.bad.allow\"\n",
    );
    let client = client();
    let (daemon, status, body) = CACHE.start(&config, &client).await;
    assert_eq!(status, 503, "{body}");
    let said = body.to_string();
    assert!(said.contains("module_invalid"), "{said}");
    assert!(said.contains("bad.rego:5:1"), "{said}");

    let decision = json_body(
        client
            .post(daemon.url("/v1/policies/bad/evaluate"))
            .body("{}")
            .send()
            .await
            .expect("evaluate"),
    )
    .await;
    assert_eq!(decision["allow"], false, "{decision}");
    assert_eq!(decision["error"]["code"], "module_invalid", "{decision}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rego_example_decides_behind_nginx_forward_auth() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "",
        &format!(
            "[[policy]]\nname = \"httpapi\"\nengine = \"rego\"\nfiles = [\"{}\"]\nentrypoint = \"data.httpapi.authz\"\n",
            example_dir().display()
        ),
    );
    let client = client();
    let (mut daemon, status, body) = CACHE.start(&config, &client).await;
    assert_eq!(status, 200, "{body}");
    let backend = Backend::start();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = start_nginx(&nginx_dir, daemon.http, "httpapi", backend.addr);

    let owner = nginx
        .through(
            &client,
            Method::GET,
            "/api/orders/7",
            &[("x-user", "alice")],
        )
        .await;
    assert_eq!(owner.status(), 200, "{}", nginx.error_log());
    let other = nginx
        .through(&client, Method::GET, "/api/orders/7", &[("x-user", "bob")])
        .await;
    assert_eq!(other.status(), 403);
    let anonymous = nginx
        .through(&client, Method::GET, "/api/orders/7", &[])
        .await;
    assert_eq!(anonymous.status(), 401);
    let clerk = nginx
        .through(
            &client,
            Method::POST,
            "/api/orders",
            &[("x-user", "carol"), ("x-roles", "clerk")],
        )
        .await;
    assert_eq!(clerk.status(), 200);

    let seen = backend.received();
    assert_eq!(
        seen.len(),
        2,
        "only allowed requests reach the application: {seen:?}"
    );
    assert_eq!(seen[0].target, "/api/orders/7");
    assert_eq!(seen[1].method, "POST");
    drop(nginx);
    tokio::task::block_in_place(|| daemon.stop());
}
