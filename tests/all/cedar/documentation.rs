//! Examples of Cedar's documentation answer as native Cedar does.

use serde_json::{Value, json};

use super::*;

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
    let (daemon, status, body) = CACHE.start(&config, &client).await;
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
