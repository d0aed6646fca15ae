//! Real nginx (`/usr/sbin/nginx`) with `auth_request` in front of a recording
//! backend on loopback, asking a real `sandgate serve` through the forward-auth
//! endpoint. The nginx config is `deploy/nginx/sandgate.conf`, rendered and
//! checked with `nginx -t` here.

use crate::support::nginx::{main_config, nginx_command, render_template};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_lets_allowed_requests_through_with_decision_headers_and_blocks_denied_ones()
 {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &rbac_policy("rbac"));
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let backend = Backend::start();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = start_nginx(&nginx_dir, daemon.http, "rbac", backend.addr);
    let url = |path: &str| format!("http://{}{path}", nginx.addr);

    // Allowed: the request reaches the application with the decision's headers.
    let allowed = client
        .get(url("/api/orders/7?expand=lines"))
        .header("x-user", "alice")
        .header("x-roles", "viewer")
        .send()
        .await
        .expect("through nginx");
    assert_eq!(allowed.status(), 200, "{}", nginx.error_log());
    assert_eq!(allowed.text().await.expect("body"), "backend");
    let seen = backend.received();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/api/orders/7?expand=lines");
    assert_eq!(seen[0].header("x-user"), Some("alice"));
    assert_eq!(seen[0].header("x-roles"), Some("viewer"));
    let decision_id = seen[0]
        .header("x-sandgate-decision-id")
        .expect("decision id header")
        .to_owned();

    // Allowed with a body: the body goes to the application, not to sandgate.
    let created = client
        .post(url("/api/orders"))
        .header("x-user", "bob")
        .header("x-roles", "editor")
        .body(r#"{"item":"tea"}"#)
        .send()
        .await
        .expect("through nginx");
    assert_eq!(created.status(), 200);
    let seen = backend.received();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[1].body, br#"{"item":"tea"}"#);
    assert_eq!(seen[1].header("x-user"), Some("bob"));

    // Denied: 403 from sandgate, and the application never sees the request.
    for (method, path, user, roles) in [
        (
            reqwest::Method::DELETE,
            "/api/orders/7",
            Some("alice"),
            Some("viewer"),
        ),
        (
            reqwest::Method::POST,
            "/api/orders",
            Some("alice"),
            Some("viewer"),
        ),
        (reqwest::Method::GET, "/api/orders/7", None, None),
        (
            reqwest::Method::GET,
            "/static/app.js",
            Some("alice"),
            Some("admin"),
        ),
    ] {
        let mut request = client.request(method.clone(), url(path));
        if let Some(user) = user {
            request = request.header("x-user", user);
        }
        if let Some(roles) = roles {
            request = request.header("x-roles", roles);
        }
        let denied = request.send().await.expect("through nginx");
        assert_eq!(denied.status(), 403, "{method} {path} as {user:?}");
    }
    assert_eq!(
        backend.received().len(),
        2,
        "a denied request reached the backend"
    );

    // The decision the application was told about is the one sandgate audited.
    drop(nginx);
    tokio::task::block_in_place(|| daemon.stop());
    let audit = audit_lines(&dir.path().join("audit.jsonl"));
    let line = audit
        .iter()
        .find(|l| l["decision_id"] == decision_id.as_str())
        .unwrap_or_else(|| panic!("decision {decision_id} not audited: {audit:?}"));
    assert_eq!(line["allow"], true);
    assert_eq!(
        audit
            .iter()
            .filter(|l| l["kind"] == "decision" && l["allow"] == false)
            .count(),
        4
    );
}

#[test]
fn nginx_template_renders_to_a_config_nginx_accepts() {
    let dir = tempdir();
    let rendered = render_template(free_port(), free_port(), "rbac", free_port());
    assert!(rendered.contains("proxy_pass http://sandgate/v1/authz/rbac;"));
    write(dir.path(), "sandgate.conf", &rendered);
    write(dir.path(), "nginx.conf", &main_config(dir.path()));
    let check = nginx_command(dir.path())
        .arg("-t")
        .output()
        .expect("run nginx -t");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
