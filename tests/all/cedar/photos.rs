//! The photo-sharing example (examples/cedar-photos) against native Cedar,
//! through the CLI, and behind nginx forward-auth and ext_authz.

use reqwest::Method;
use serde_json::{Value, json};

use super::*;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_photo_policy_answers_as_native_cedar_for_generated_requests() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &photos_policy("photos"));
    let client = client();
    let (daemon, status, body) = CACHE.start(&config, &client).await;
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

#[test]
fn check_prints_engine_files_and_policy_ids_and_eval_decides() {
    let (cache, stdout) = CACHE.filled();
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
    let (mut daemon, status, body) = CACHE.start(&config, &client).await;
    assert_eq!(status, 200, "{body}");
    let backend = Backend::start();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = start_nginx(&nginx_dir, daemon.http, "photos", backend.addr);

    let beach = "/photos/vacation/beach.jpg";
    let owner = nginx
        .through(&client, Method::GET, beach, &[("x-user", "alice")])
        .await;
    assert_eq!(owner.status(), 200, "{}", nginx.error_log());
    let friend = nginx
        .through(&client, Method::GET, beach, &[("x-user", "bob")])
        .await;
    assert_eq!(friend.status(), 200);
    let blocked = nginx
        .through(&client, Method::GET, beach, &[("x-user", "mallory")])
        .await;
    assert_eq!(blocked.status(), 403);
    let anonymous = nginx.through(&client, Method::GET, beach, &[]).await;
    assert_eq!(anonymous.status(), 403);
    let public = nginx
        .through(&client, Method::GET, "/photos/cat.jpg", &[])
        .await;
    assert_eq!(public.status(), 200);
    let private = nginx
        .through(
            &client,
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
