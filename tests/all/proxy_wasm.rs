//! proxy-wasm filters as policies (DESIGN §2b): real filters built from
//! crates.io's `proxy-wasm` SDK (`examples/proxy-wasm-*`, and the hostile
//! ones of `tests/proxy-wasm-hostile`) served by a real `sandgate serve`
//! through the JSON API, nginx forward-auth and Envoy ext_authz gRPC.

use std::net::SocketAddr;

use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// The API-key filter's `[[policy]]`: key `k-alice` belongs to alice.
fn apikey_policy(name: &str) -> String {
    format!(
        "[[policy]]\nname = \"{name}\"\nmodule = \"{}\"\nabi = \"proxy-wasm\"\ntimeout_ms = 500\nplugin_config = '{{\"header\": \"x-api-key\", \"keys\": {{\"k-alice\": \"alice\"}}}}'\n",
        guest("proxy_wasm_apikey").display()
    )
}

fn hostile_policy(name: &str, mode: &str) -> String {
    format!(
        "[[policy]]\nname = \"{name}\"\nmodule = \"{}\"\nabi = \"proxy-wasm\"\ntimeout_ms = 2000\nmemory_limit_mb = 200\nplugin_config = \"{mode}\"\n",
        guest("proxy_wasm_hostile").display()
    )
}

async fn evaluate(client: &reqwest::Client, daemon: &Daemon, policy: &str, input: Value) -> Value {
    let response = client
        .post(daemon.url(&format!("/v1/policies/{policy}/evaluate")))
        .body(input.to_string())
        .send()
        .await
        .expect("evaluate");
    assert_eq!(response.status(), 200);
    json_body(response).await
}

fn request(headers: Value) -> Value {
    json!({"request": {"method": "GET", "path": "/api/orders", "host": "shop.example", "headers": headers}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_filter_allows_with_x_user_and_denies_401_with_www_authenticate_over_the_json_api()
{
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &apikey_policy("apikey"));
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let allowed = evaluate(
        &client,
        &daemon,
        "apikey",
        request(json!({"x-api-key": "k-alice"})),
    )
    .await;
    assert_eq!(allowed["allow"], true, "{allowed}");
    assert_eq!(allowed["headers"], json!({"x-user": "alice"}), "{allowed}");

    for headers in [json!({"x-api-key": "k-mallory"}), json!({})] {
        let denied = evaluate(&client, &daemon, "apikey", request(headers)).await;
        assert_eq!(denied["allow"], false, "{denied}");
        assert_eq!(denied["status"], 401, "{denied}");
        assert_eq!(denied["reason"], "missing or unknown API key", "{denied}");
        assert_eq!(
            denied["headers"]["www-authenticate"], "ApiKey realm=\"sandgate\"",
            "{denied}"
        );
        assert!(denied.get("error").is_none(), "{denied}");
    }

    // An input without a request cannot be fed to a filter.
    let response = client
        .post(daemon.url("/v1/policies/apikey/evaluate"))
        .body(json!({"user": "alice"}).to_string())
        .send()
        .await
        .expect("evaluate");
    assert_eq!(response.status(), 400);
    let body = json_body(response).await;
    assert_eq!(body["error"]["code"], "invalid_input", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_filter_behind_nginx_forward_auth_passes_x_user_and_answers_401() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &apikey_policy("apikey"));
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let backend = Backend::start();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = start_nginx(&nginx_dir, daemon.http, "apikey", backend.addr);

    let allowed = client
        .get(format!("http://{}/api/orders/7", nginx.addr))
        .header("x-api-key", "k-alice")
        .send()
        .await
        .expect("through nginx");
    assert_eq!(allowed.status(), 200, "{}", nginx.error_log());
    let seen = backend.received();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, "/api/orders/7");
    assert_eq!(seen[0].header("x-user"), Some("alice"));

    let denied = client
        .get(format!("http://{}/api/orders/7", nginx.addr))
        .header("x-api-key", "k-mallory")
        .send()
        .await
        .expect("through nginx");
    assert_eq!(denied.status(), 401, "{}", nginx.error_log());
    assert_eq!(
        denied
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("ApiKey realm=\"sandgate\"")
    );
    assert_eq!(
        backend.received().len(),
        1,
        "the denied request reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_filter_answers_envoy_ext_authz_over_grpc() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "grpc_listen = \"127.0.0.1:0\"",
        &apikey_policy("apikey"),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    daemon.ready(&client()).await;
    let mut ext_authz = ExtAuthzClient::connect(daemon.grpc.expect("grpc address")).await;

    let allow = ext_authz
        .check(check_request(
            Some("apikey"),
            "GET",
            "/api/orders/7",
            &[("x-api-key", "k-alice")],
        ))
        .await;
    assert_eq!(allow.status.as_ref().map(|s| s.code), Some(0), "{allow:?}");
    assert!(
        matches!(allow.http_response, Some(HttpResponse::OkResponse(_))),
        "{allow:?}"
    );
    assert_eq!(response_headers(&allow)["x-user"], "alice");

    let deny = ext_authz
        .check(check_request(Some("apikey"), "GET", "/api/orders/7", &[]))
        .await;
    assert_eq!(deny.status.as_ref().map(|s| s.code), Some(7), "{deny:?}");
    let Some(HttpResponse::DeniedResponse(denied)) = &deny.http_response else {
        panic!("not denied: {deny:?}");
    };
    assert_eq!(
        denied.status.as_ref().map(|s| s.code),
        Some(401),
        "{deny:?}"
    );
    assert_eq!(denied.body, "missing or unknown API key");
    assert_eq!(
        response_headers(&deny)["www-authenticate"],
        "ApiKey realm=\"sandgate\""
    );
}

/// An auth service on loopback: `authorization: Bearer good` is 200 with
/// `x-user: carol`, anything else 401. Counts the requests it answered.
async fn auth_service() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..len]).to_ascii_lowercase();
                log.lock().expect("log").push(head.clone());
                let answer = if head.contains("authorization: bearer good") {
                    "HTTP/1.1 200 OK\r\nx-user: carol\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                } else {
                    "HTTP/1.1 401 Unauthorized\r\ncontent-length: 9\r\nconnection: close\r\n\r\nbad token"
                };
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

/// The auth-call filter's `[[policy]]`: it asks the auth service at `auth`
/// (cluster `authsvc`) and may reach nothing else.
fn authcall_policy(auth: SocketAddr) -> String {
    format!(
        "[[policy]]\nname = \"authcall\"\nmodule = \"{}\"\nabi = \"proxy-wasm\"\ntimeout_ms = 2000\nplugin_config = '{{\"cluster\": \"authsvc\", \"path\": \"/check\"}}'\n[policy.egress]\nallow = [\"http://{auth}/check\"]\n[policy.proxy_wasm.clusters]\nauthsvc = \"http://{auth}\"\n",
        guest("proxy_wasm_authcall").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_call_filter_asks_the_auth_service_through_the_audited_bridge() {
    let (auth, seen) = auth_service().await;
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &authcall_policy(auth));
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let allowed = client
        .get(daemon.url("/v1/authz/authcall"))
        .header("x-original-uri", "/api/orders/7")
        .header("authorization", "Bearer good")
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(allowed.status(), 200, "{}", daemon.logs());
    assert_eq!(
        allowed
            .headers()
            .get("x-user")
            .and_then(|v| v.to_str().ok()),
        Some("carol")
    );

    let denied = client
        .get(daemon.url("/v1/authz/authcall"))
        .header("x-original-uri", "/api/orders/7")
        .header("authorization", "Bearer bad")
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(denied.status(), 403);
    assert_eq!(
        denied
            .headers()
            .get("x-auth-status")
            .and_then(|v| v.to_str().ok()),
        Some("401")
    );
    assert_eq!(denied.text().await.expect("body"), "bad token");

    let heads = seen.lock().expect("log").clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].starts_with("get /check "), "{heads:?}");
    assert!(
        heads[0].contains("x-original-uri: /api/orders/7"),
        "{heads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_call_filter_serves_nginx_forward_auth_and_envoy_ext_authz_over_grpc() {
    let (auth, seen) = auth_service().await;
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "grpc_listen = \"127.0.0.1:0\"",
        &authcall_policy(auth),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    // Behind nginx auth_request: the filter's call decides, x-user reaches
    // the backend, a refused token never does.
    let backend = Backend::start();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = start_nginx(&nginx_dir, daemon.http, "authcall", backend.addr);
    let through_nginx = async |token: &str| {
        client
            .get(format!("http://{}/api/orders/7", nginx.addr))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .expect("through nginx")
            .status()
    };
    assert_eq!(through_nginx("good").await, 200, "{}", nginx.error_log());
    assert_eq!(through_nginx("bad").await, 403, "{}", nginx.error_log());
    let received = backend.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].header("x-user"), Some("carol"));

    // The same filter as Envoy's ext_authz service.
    let mut ext_authz = ExtAuthzClient::connect(daemon.grpc.expect("grpc address")).await;
    let request = |token: &str| {
        let authorization = format!("Bearer {token}");
        check_request(
            Some("authcall"),
            "GET",
            "/api/orders/7",
            &[("authorization", &authorization)],
        )
    };
    let allow = ext_authz.check(request("good")).await;
    assert_eq!(allow.status.as_ref().map(|s| s.code), Some(0), "{allow:?}");
    assert_eq!(response_headers(&allow)["x-user"], "carol");
    let deny = ext_authz.check(request("bad")).await;
    let Some(HttpResponse::DeniedResponse(denied)) = &deny.http_response else {
        panic!("not denied: {deny:?}");
    };
    assert_eq!(
        denied.status.as_ref().map(|s| s.code),
        Some(403),
        "{deny:?}"
    );
    assert_eq!(denied.body, "bad token");
    assert_eq!(response_headers(&deny)["x-auth-status"], "401");

    // Every decision asked the auth service once, through the bridge.
    assert_eq!(seen.lock().expect("log").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_reads_the_request_body_and_properties_of_a_json_request() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &hostile_policy("body", "body"));
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let input = |body: &str| json!({"request": {"method": "POST", "path": "/api/orders", "query": "a=1", "headers": {}, "body": body, "source": {"address": "10.1.2.3"}}});

    let allowed = evaluate(&client, &daemon, "body", input("{\"item\":\"tea\"}")).await;
    assert_eq!(allowed["allow"], true, "{allowed}");
    assert_eq!(
        allowed["headers"],
        json!({"x-body-bytes": "14", "x-path": "/api/orders?a=1", "x-method": "POST", "x-plugin": "body", "x-source": "10.1.2.3"}),
        "{allowed}"
    );
    let denied = evaluate(&client, &daemon, "body", input("forbidden")).await;
    assert_eq!(denied["allow"], false, "{denied}");
    assert_eq!(denied["status"], 403, "{denied}");
    assert_eq!(denied["reason"], "forbidden body", "{denied}");
    assert_eq!(denied["headers"], json!({"x-reason": "body"}), "{denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_filters_fail_closed_with_their_error_code_while_the_daemon_keeps_serving() {
    let dir = tempdir();
    let policies = [
        hostile_policy("bad-pointer", "bad-pointer"),
        hostile_policy("pause-forever", "pause-forever"),
        hostile_policy("huge-response", "huge-response"),
        hostile_policy("refused-call", "refused-call"),
        apikey_policy("apikey"),
    ]
    .join("\n");
    let config = daemon_config(dir.path(), "", &policies);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    for (policy, code, says) in [
        ("bad-pointer", "abi_violation", "outside guest memory"),
        (
            "pause-forever",
            "abi_violation",
            "no dispatched call pending",
        ),
        ("huge-response", "abi_violation", "exceeds max_output_bytes"),
        ("refused-call", "wasi_denied", "proxy_register_shared_queue"),
    ] {
        let decision = evaluate(&client, &daemon, policy, request(json!({}))).await;
        assert_eq!(decision["allow"], false, "{policy}: {decision}");
        assert_eq!(decision["error"]["code"], code, "{policy}: {decision}");
        let message = decision["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{policy}: {decision}");
    }
    let allowed = evaluate(
        &client,
        &daemon,
        "apikey",
        request(json!({"x-api-key": "k-alice"})),
    )
    .await;
    assert_eq!(allowed["allow"], true, "{allowed}");

    let metrics = daemon.metrics(&client).await;
    assert!(
        metrics.contains(
            r#"sandgate_wasi_denials_total{policy="refused-call",call="proxy_register_shared_queue"} 1"#
        ),
        "{metrics}"
    );

    audit_line_where(
        &dir.path().join("audit.jsonl"),
        "the refused proxy_register_shared_queue",
        |l| {
            l["kind"] == "wasi_denied"
                && l["policy"] == "refused-call"
                && l["call"] == "proxy_register_shared_queue"
        },
    )
    .await;
}

#[test]
fn inspect_recognises_a_filter_and_check_prints_what_it_is_granted_or_why_it_fails() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let module = guest("proxy_wasm_authcall");
    let out = sandgate(&["inspect", "--module", &module.to_string_lossy()], &cache);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("abi           proxy-wasm 0.2.1"), "{text}");
    assert!(text.contains("proxy_http_call"), "{text}");
    let refused = text
        .lines()
        .find(|l| l.trim_start().starts_with("host refused"))
        .unwrap_or_default();
    assert!(refused.contains("proxy_grpc_call"), "{text}");

    let config = write(
        dir.path(),
        "sandgate.toml",
        &format!(
            "{}[policy.egress]\nallow = [\"http://127.0.0.1:9/check\"]\n[policy.proxy_wasm.clusters]\nauthsvc = \"http://127.0.0.1:9\"\n",
            apikey_policy("apikey")
        ),
    );
    let out = sandgate(&["check", "--config", &config.to_string_lossy()], &cache);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("abi           proxy-wasm 0.2.1 (plugin_config 53 bytes)"),
        "{text}"
    );
    assert!(
        text.contains("clusters      authsvc -> http://127.0.0.1:9"),
        "{text}"
    );

    // A filter configured as an ABI v1 guest is refused with the fix.
    let config = write(
        dir.path(),
        "v1.toml",
        &policy_toml(&guest("proxy_wasm_apikey"), ""),
    );
    let out = sandgate(&["check", "--config", &config.to_string_lossy()], &cache);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("configure it with abi = \"proxy-wasm\""),
        "{said}"
    );

    // A filter that refuses its plugin_config does not load, and says why.
    let config = write(
        dir.path(),
        "bad.toml",
        &apikey_policy("apikey").replace(
            "plugin_config = '{\"header\": \"x-api-key\", \"keys\": {\"k-alice\": \"alice\"}}'",
            "plugin_config = \"not json\"",
        ),
    );
    let out = sandgate(&["check", "--config", &config.to_string_lossy()], &cache);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("on_configure returned false") && said.contains("bad plugin configuration"),
        "{said}"
    );
}
