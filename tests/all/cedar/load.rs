//! What refuses a Cedar policy's load, and how it says so (schema
//! violations, syntax errors), and what its init may do that a user
//! module's may not (draw hash keys).

use std::str::FromStr;

use cedar_policy::{Entities, PolicySet, Schema, ValidationMode, Validator};
use serde_json::json;

use super::*;

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
    let (daemon, status, body) = CACHE.start(&config, &client).await;
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
    let (daemon, status, body) = CACHE.start(&config, &client).await;
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
    // Both inits run, however often the tests ran before.
    let engine = engine(&CACHE.compiled_only(dir.path()));
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
