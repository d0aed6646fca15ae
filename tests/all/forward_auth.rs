//! Forward-auth behind real proxies: nginx (`deploy/nginx/sandgate.conf`) and
//! Caddy (`deploy/caddy/Caddyfile`). Each proxy sets one pair of headers about
//! the original request and passes the client's other headers through, so a
//! client must not be able to override the method with the other pair.

use std::net::SocketAddr;
use std::path::Path;

use reqwest::Method;

use crate::support::*;

/// A viewer (may read orders, nothing else) asks through the proxy at `proxy`.
async fn as_viewer(
    client: &reqwest::Client,
    proxy: SocketAddr,
    method: Method,
    forged: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client
        .request(method, format!("http://{proxy}/api/orders/7"))
        .header("x-user", "alice")
        .header("x-roles", "viewer");
    for (name, value) in forged {
        request = request.header(*name, *value);
    }
    request.send().await.expect("through the proxy")
}

/// The audit lines of every decision, in order.
fn decisions(dir: &Path) -> Vec<serde_json::Value> {
    audit_lines(&dir.join("audit.jsonl"))
        .into_iter()
        .filter(|l| l["kind"] == "decision")
        .collect()
}

const FORGED_ORIGINAL: &[(&str, &str)] = &[
    ("x-original-method", "GET"),
    ("x-original-uri", "/api/orders/7"),
    ("x-real-ip", "10.9.9.9"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_caddy_a_forged_x_original_method_cannot_turn_a_delete_into_a_get() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "forward_auth_headers = \"x-forwarded\"",
        &rbac_policy("rbac"),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let backend = Backend::start();
    let caddy_dir = dir.path().join("caddy");
    std::fs::create_dir_all(&caddy_dir).expect("caddy dir");
    let caddy = start_caddy(&caddy_dir, daemon.http, "rbac", backend.addr);

    let honest = as_viewer(&client, caddy.addr, Method::GET, &[]).await;
    assert_eq!(honest.status(), 200, "{}", caddy.log());
    assert_eq!(honest.text().await.expect("body"), "backend");

    let forged = as_viewer(&client, caddy.addr, Method::DELETE, FORGED_ORIGINAL).await;
    assert_eq!(forged.status(), 403, "{}", caddy.log());
    // The guest judged the true method: deleting is what it refused.
    let reason = forged.text().await.expect("reason");
    assert!(reason.contains("may not delete orders"), "{reason}");
    let seen = backend.received();
    assert_eq!(
        seen.len(),
        1,
        "the DELETE reached the application: {seen:?}"
    );
    assert_eq!(seen[0].method, "GET");

    drop(caddy);
    tokio::task::block_in_place(|| daemon.stop());
    let allows: Vec<bool> = decisions(dir.path())
        .iter()
        .map(|l| l["allow"] == true)
        .collect();
    assert_eq!(allows, [true, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_disagreeing_method_headers_are_refused_as_invalid_input_and_audited() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &rbac_policy("rbac"));
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let backend = Backend::start();
    let caddy_dir = dir.path().join("caddy");
    std::fs::create_dir_all(&caddy_dir).expect("caddy dir");
    let caddy = start_caddy(&caddy_dir, daemon.http, "rbac", backend.addr);

    let honest = as_viewer(&client, caddy.addr, Method::GET, &[]).await;
    assert_eq!(honest.status(), 200, "{}", caddy.log());

    // Caddy says DELETE in X-Forwarded-Method; the client says GET in
    // X-Original-Method. Neither wins: the request is refused.
    let forged = as_viewer(&client, caddy.addr, Method::DELETE, &FORGED_ORIGINAL[..1]).await;
    assert_eq!(forged.status(), 400, "{}", caddy.log());
    assert_eq!(
        forged
            .headers()
            .get("x-sandgate-error")
            .and_then(|v| v.to_str().ok()),
        Some("invalid_input")
    );
    // So is a forged client address.
    let address = as_viewer(&client, caddy.addr, Method::GET, &FORGED_ORIGINAL[2..]).await;
    assert_eq!(address.status(), 400, "{}", caddy.log());
    assert_eq!(backend.received().len(), 1);

    drop(caddy);
    tokio::task::block_in_place(|| daemon.stop());
    let lines = decisions(dir.path());
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["allow"], true);
    for (line, names) in lines[1..].iter().zip([
        ["X-Original-Method `GET`", "X-Forwarded-Method `DELETE`"],
        ["X-Real-IP `10.9.9.9`", "X-Forwarded-For hop `127.0.0.1`"],
    ]) {
        assert_eq!(line["allow"], false, "{line}");
        assert_eq!(line["error"]["code"], "invalid_input", "{line}");
        let message = line["error"]["message"].as_str().unwrap_or_default();
        for name in names {
            assert!(message.contains(name), "{message}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_a_forged_x_forwarded_method_cannot_turn_a_delete_into_a_get() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "forward_auth_headers = \"x-original\"",
        &rbac_policy("rbac"),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let backend = Backend::start();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = start_nginx(&nginx_dir, daemon.http, "rbac", backend.addr);

    let honest = as_viewer(&client, nginx.addr, Method::GET, &[]).await;
    assert_eq!(honest.status(), 200, "{}", nginx.error_log());
    let forged = as_viewer(
        &client,
        nginx.addr,
        Method::DELETE,
        &[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/api/orders/7"),
            ("x-forwarded-for", "10.9.9.9"),
        ],
    )
    .await;
    assert_eq!(forged.status(), 403, "{}", nginx.error_log());
    let seen = backend.received();
    assert_eq!(
        seen.len(),
        1,
        "the DELETE reached the application: {seen:?}"
    );
    assert_eq!(seen[0].method, "GET");

    drop(nginx);
    tokio::task::block_in_place(|| daemon.stop());
    let allows: Vec<bool> = decisions(dir.path())
        .iter()
        .map(|l| l["allow"] == true)
        .collect();
    assert_eq!(allows, [true, false]);
}
