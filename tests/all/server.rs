//! The daemon end to end: `sandgate serve` as a real process on loopback
//! ports it picks itself (`listen = "127.0.0.1:0"`, addresses parsed from its
//! stderr), driven over HTTP (reqwest) and Envoy ext_authz gRPC (tonic with
//! Envoy's own messages), through the harness in `support`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::google::protobuf::value::Kind;
use prost::Message as _;
use serde_json::{Value, json};

use crate::support::*;

/// A guest that allows after `ms` milliseconds of the monotonic clock (needs `clock`).
fn sleeping_guest(ms: u64) -> String {
    abi_guest(
        r#"(import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))"#,
        &format!(
            "(local $start i64)
    (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
    (local.set $start (i64.load (i32.const 0)))
    (block $done (loop $wait
      (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
      (br_if $done (i64.ge_u (i64.sub (i64.load (i32.const 0)) (local.get $start)) (i64.const {})))
      (br $wait)))
    {ALLOW_RESULT}",
            ms * 1_000_000
        ),
    )
}

const ALICE_DELETES: &str = r#"{"subject":{"id":"alice","roles":["viewer"]},"action":"delete","resource":{"type":"orders","id":"7"}}"#;

async fn post(
    client: &reqwest::Client,
    url: String,
    body: impl Into<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = client.post(url).body(body).send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {text}"));
    (status, headers, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_api_answers_allow_deny_unknown_policy_invalid_input_and_oversized_bodies() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "max_body_bytes = 4096", &rbac_policy("rbac"));
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let evaluate = |name: &str| daemon.url(&format!("/v1/policies/{name}/evaluate"));

    let (status, headers, allow) = post(&client, evaluate("rbac"), ALICE_READS).await;
    assert_eq!(status, 200, "{allow}");
    assert_eq!(allow["allow"], true);
    assert_eq!(allow["headers"]["x-user"], "alice");
    assert_eq!(allow["policy"], "rbac");
    assert_eq!(allow["version"], "v1");
    let decision_id = allow["decision_id"]
        .as_str()
        .expect("decision_id")
        .to_owned();
    assert_eq!(headers["x-sandgate-decision-id"], decision_id.as_str());
    assert!(allow.get("error").is_none());

    let (status, _, deny) = post(&client, evaluate("rbac"), ALICE_DELETES).await;
    assert_eq!(status, 200, "a completed deny is a decision: {deny}");
    assert_eq!(deny["allow"], false);
    assert_eq!(deny["status"], 403);
    assert!(
        deny["reason"]
            .as_str()
            .is_some_and(|r| r.contains("may not delete")),
        "{deny}"
    );

    let (status, headers, missing) = post(&client, evaluate("nope"), ALICE_READS).await;
    assert_eq!(status, 404);
    assert_eq!(missing["allow"], false);
    assert_eq!(missing["error"]["code"], "policy_not_found");
    assert_eq!(headers["x-sandgate-error"], "policy_not_found");

    let (status, headers, invalid) = post(&client, evaluate("rbac"), r#"{"subject": "#).await;
    assert_eq!(status, 400);
    assert_eq!(invalid["allow"], false);
    assert_eq!(invalid["error"]["code"], "invalid_input");
    assert_eq!(invalid["policy"], "rbac");
    assert_eq!(headers["x-sandgate-error"], "invalid_input");

    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(8192));
    let (status, _, too_large) = post(&client, evaluate("rbac"), big).await;
    assert_eq!(status, 413);
    assert_eq!(too_large["error"]["code"], "invalid_input");

    // Streamed without a Content-Length, the limit still holds.
    let mut chunked = b"POST /v1/policies/rbac/evaluate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..8 {
        chunked.extend_from_slice(format!("400\r\n{}\r\n", "x".repeat(1024)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_http(daemon.http, &chunked);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("invalid_input"), "{answer}");

    // Every evaluation is in the audit log with its decision id.
    tokio::task::block_in_place(|| daemon.stop());
    let audit = audit_lines(&dir.path().join("audit.jsonl"));
    let line = audit
        .iter()
        .find(|l| l["decision_id"] == decision_id.as_str())
        .unwrap_or_else(|| panic!("no audit line for {decision_id}: {audit:?}"));
    assert_eq!(line["kind"], "decision");
    assert_eq!(line["allow"], true);
    assert_eq!(line["policy"], "rbac");
    assert!(audit.iter().any(|l| l["error"]["code"] == "invalid_input"));
}

/// Sends `request` as is on a new connection and returns everything the
/// daemon answered until it closed the connection (send `connection: close`).
fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn opa_data_endpoint_wraps_the_decision_in_result() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &rbac_policy("rbac"));
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let body = format!(r#"{{"input":{ALICE_READS}}}"#);
    let (status, _, answer) = post(&client, daemon.url("/v1/data/rbac"), body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["allow"], true);
    assert_eq!(answer["result"]["headers"]["x-roles"], "viewer");
    assert!(
        answer["decision_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );

    let body = format!(r#"{{"input":{ALICE_DELETES}}}"#);
    let (status, _, answer) = post(&client, daemon.url("/v1/data/rbac"), body).await;
    assert_eq!(status, 200);
    assert_eq!(answer["result"]["allow"], false);

    let (status, _, answer) = post(&client, daemon.url("/v1/data/rbac"), "[1,2]").await;
    assert_eq!(status, 400);
    assert_eq!(answer["code"], "invalid_input");
    assert_eq!(answer["result"]["error"]["code"], "invalid_input");

    let (status, _, answer) = post(&client, daemon.url("/v1/data/missing"), "{}").await;
    assert_eq!(status, 404);
    assert_eq!(answer["code"], "policy_not_found");
}

#[tokio::test]
async fn policies_endpoint_lists_versions_digests_and_grants() {
    let dir = tempdir();
    let policies = format!(
        "{}\n{}",
        rbac_policy("rbac"),
        wat_policy(
            dir.path(),
            "plain",
            &abi_guest("", ALLOW_RESULT),
            "version = \"v7\"\nmax_in_flight = 3"
        )
    );
    let config = daemon_config(dir.path(), "", &policies);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let list = json_body(
        client
            .get(daemon.url("/v1/policies"))
            .send()
            .await
            .expect("list"),
    )
    .await;
    let by_name: HashMap<&str, &Value> = list["policies"]
        .as_array()
        .expect("policies array")
        .iter()
        .map(|p| (p["name"].as_str().expect("name"), p))
        .collect();
    let rbac = by_name["rbac"];
    assert_eq!(rbac["state"], "ready");
    assert_eq!(rbac["version"], "v1");
    assert!(
        rbac["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{rbac}"
    );
    assert_eq!(rbac["versions"][0]["version"], "v1");
    assert_eq!(rbac["versions"][0]["digest"], rbac["digest"]);
    assert_eq!(rbac["wasi"]["allow"], json!(["fs_read"]));
    assert!(
        rbac["wasi"]["functions"]
            .as_array()
            .is_some_and(|f| f.contains(&json!("path_open")))
    );
    assert_eq!(rbac["wasi"]["preopens"][0]["guest"], "/data");
    assert_eq!(rbac["wasi"]["preopens"][0]["mode"], "ro");
    let plain = by_name["plain"];
    assert_eq!(plain["version"], "v7");
    assert_eq!(plain["max_in_flight"], 3);
    assert_eq!(plain["wasi"]["functions"], json!([]));

    // The same report as `sandgate check --json`.
    let check = sandgate(
        &[
            "check",
            "--config",
            config.to_str().expect("utf-8 path"),
            "--json",
        ],
        &dir.path().join("cache"),
    );
    let check = stdout_json(&check);
    let checked = check["policies"]
        .as_array()
        .expect("check policies")
        .iter()
        .find(|p| p["name"] == "rbac")
        .expect("rbac");
    assert_eq!(checked["digest"], rbac["digest"]);
    assert_eq!(checked["wasi"], rbac["wasi"]);
}

#[tokio::test]
async fn metrics_count_decisions_latencies_denials_and_refusals_after_traffic() {
    let dir = tempdir();
    let snoop = abi_guest(
        r#"(import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))"#,
        &format!("(drop (call $random_get (i32.const 2048) (i32.const 16))) {ALLOW_RESULT}"),
    );
    let policies = format!(
        "{}\n{}",
        rbac_policy("rbac"),
        wat_policy(dir.path(), "snoopy", &snoop, "")
    );
    let config = daemon_config(dir.path(), "", &policies);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    for _ in 0..3 {
        post(
            &client,
            daemon.url("/v1/policies/rbac/evaluate"),
            ALICE_READS,
        )
        .await;
    }
    post(
        &client,
        daemon.url("/v1/policies/rbac/evaluate"),
        ALICE_DELETES,
    )
    .await;
    post(
        &client,
        daemon.url("/v1/policies/rbac/evaluate"),
        "not json",
    )
    .await;
    post(&client, daemon.url("/v1/policies/ghost/evaluate"), "{}").await;
    post(&client, daemon.url("/v1/policies/snoopy/evaluate"), "{}").await;

    let response = client
        .get(daemon.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.expect("text");
    for needle in [
        r#"sandgate_decisions_total{policy="rbac",version="v1",allow="true",error="none"} 3"#,
        r#"sandgate_decisions_total{policy="rbac",version="v1",allow="false",error="none"} 1"#,
        r#"sandgate_decisions_total{policy="rbac",version="v1",allow="false",error="invalid_input"} 1"#,
        r#"sandgate_evaluation_duration_seconds_count{policy="rbac",version="v1"} 5"#,
        r#"sandgate_instantiation_duration_seconds_count{policy="rbac",version="v1"} 4"#,
        r#"sandgate_wasi_denials_total{policy="snoopy",call="random_get"} 1"#,
        r#"sandgate_request_errors_total{error="policy_not_found"} 1"#,
        r#"sandgate_evaluations_in_flight{policy="rbac"} 0"#,
        r#"sandgate_max_in_flight_refusals_total{policy="rbac"} 0"#,
        r#"sandgate_egress_denials"#,
        r#"sandgate_policy_ready{policy="rbac"} 1"#,
        "sandgate_audit_lines_dropped_total 0",
        "# EOF",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }
}

#[tokio::test]
async fn readyz_names_the_policy_that_failed_to_load_while_the_others_serve() {
    let dir = tempdir();
    let broken = write(dir.path(), "broken.wasm", "this is not wasm");
    let policies = format!(
        "{}\n[[policy]]\nname = \"broken\"\nmodule = \"{}\"\n",
        rbac_policy("rbac"),
        broken.display()
    );
    let config = daemon_config(dir.path(), "", &policies);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();

    let (status, ready) = daemon.settled(&client).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["policies"]["rbac"]["state"], "ready");
    assert_eq!(ready["policies"]["broken"]["state"], "failed");
    assert_eq!(
        ready["policies"]["broken"]["error"]["code"],
        "module_invalid"
    );
    assert!(
        ready["reason"]
            .as_str()
            .is_some_and(|r| r.contains("broken")),
        "{ready}"
    );

    let (status, _, answer) = post(
        &client,
        daemon.url("/v1/policies/rbac/evaluate"),
        ALICE_READS,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["allow"], true);

    let (status, headers, answer) =
        post(&client, daemon.url("/v1/policies/broken/evaluate"), "{}").await;
    assert_eq!(status, 503);
    assert_eq!(answer["allow"], false);
    assert_eq!(answer["error"]["code"], "module_invalid");
    assert_eq!(headers["x-sandgate-error"], "module_invalid");

    let health = client
        .get(daemon.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn forward_auth_takes_the_original_request_from_proxy_headers_or_its_own_path() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &rbac_policy("rbac"));
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    // nginx style: the subrequest's own path is fixed, the original comes in headers.
    let allowed = client
        .get(daemon.url("/v1/authz/rbac"))
        .header("x-original-method", "GET")
        .header("x-original-uri", "/api/orders/7?expand=1")
        .header("x-user", "alice")
        .header("x-roles", "viewer")
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(allowed.status(), 200);
    assert_eq!(allowed.headers()["x-user"], "alice");
    assert_eq!(allowed.headers()["x-roles"], "viewer");
    assert!(allowed.headers().contains_key("x-sandgate-decision-id"));

    let denied = client
        .get(daemon.url("/v1/authz/rbac"))
        .header("x-forwarded-method", "DELETE")
        .header("x-forwarded-uri", "/api/orders/7")
        .header("x-user", "alice")
        .header("x-roles", "viewer")
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(denied.status(), 403);
    assert!(
        denied
            .text()
            .await
            .expect("body")
            .contains("alice may not delete orders")
    );

    // Traefik/Envoy HTTP style: the original path is under the prefix, any method.
    let created = client
        .post(daemon.url("/v1/authz/rbac/api/orders"))
        .header("x-user", "bob")
        .header("x-roles", "editor")
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(created.status(), 200);
    let forbidden = client
        .delete(daemon.url("/v1/authz/rbac/api/orders/9"))
        .header("x-user", "bob")
        .header("x-roles", "editor")
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(forbidden.status(), 403);

    // Header values that are not UTF-8 are decoded lossily, never fatal.
    let odd = client
        .get(daemon.url("/v1/authz/rbac/api/orders/1"))
        .header("x-user", "alice")
        .header("x-roles", "viewer")
        .header(
            "x-odd",
            reqwest::header::HeaderValue::from_bytes(b"caf\xe9").expect("opaque header value"),
        )
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(odd.status(), 200);

    let unknown = client
        .get(daemon.url("/v1/authz/nope/api/orders"))
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.headers()["x-sandgate-error"], "policy_not_found");
}

fn metadata_text(response: &CheckResponse, key: &str) -> Option<String> {
    match response
        .dynamic_metadata
        .as_ref()?
        .fields
        .get(key)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn ext_authz_check_allows_with_headers_and_denies_with_status_and_body() {
    let dir = tempdir();
    let policies = format!(
        "{}\n{}",
        rbac_policy("rbac"),
        wat_policy(dir.path(), "closed", &abi_guest("", DENY_RESULT), "")
    );
    let config = daemon_config(dir.path(), "grpc_listen = \"127.0.0.1:0\"", &policies);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    daemon.ready(&client()).await;
    let grpc = daemon.grpc.expect("grpc address");
    let mut ext_authz = ExtAuthzClient::connect(grpc).await;

    let allow = ext_authz
        .check(check_request(
            Some("rbac"),
            "GET",
            "/api/orders/7?x=1",
            &[("x-user", "alice"), ("x-roles", "viewer")],
        ))
        .await;
    assert_eq!(allow.status.as_ref().map(|s| s.code), Some(0), "{allow:?}");
    assert!(
        matches!(allow.http_response, Some(HttpResponse::OkResponse(_))),
        "{allow:?}"
    );
    let headers = response_headers(&allow);
    assert_eq!(headers["x-user"], "alice");
    assert_eq!(headers["x-roles"], "viewer");
    assert_eq!(metadata_text(&allow, "policy").as_deref(), Some("rbac"));
    assert!(metadata_text(&allow, "decision_id").is_some());

    let deny = ext_authz
        .check(check_request(
            Some("rbac"),
            "DELETE",
            "/api/orders/7",
            &[("x-user", "alice"), ("x-roles", "viewer")],
        ))
        .await;
    assert_eq!(
        deny.status.as_ref().map(|s| s.code),
        Some(7),
        "PERMISSION_DENIED: {deny:?}"
    );
    let Some(HttpResponse::DeniedResponse(denied)) = &deny.http_response else {
        panic!("expected a denied response: {deny:?}");
    };
    assert_eq!(denied.status.as_ref().map(|s| s.code), Some(403));
    assert!(
        denied.body.contains("alice may not delete orders"),
        "{}",
        denied.body
    );

    // The policy comes from context_extensions; a guest's own deny has no error code.
    let closed = ext_authz
        .check(check_request(Some("closed"), "GET", "/", &[]))
        .await;
    assert!(matches!(
        closed.http_response,
        Some(HttpResponse::DeniedResponse(_))
    ));
    assert_eq!(metadata_text(&closed, "policy").as_deref(), Some("closed"));
    assert_eq!(metadata_text(&closed, "error_code"), None);

    let unknown = ext_authz
        .check(check_request(Some("ghost"), "GET", "/", &[]))
        .await;
    assert_eq!(
        unknown.status.as_ref().map(|s| s.code),
        Some(5),
        "NOT_FOUND: {unknown:?}"
    );
    assert!(matches!(
        unknown.http_response,
        Some(HttpResponse::DeniedResponse(_))
    ));
    assert_eq!(
        response_headers(&unknown)["x-sandgate-error"],
        "policy_not_found"
    );
    assert_eq!(
        metadata_text(&unknown, "error_code").as_deref(),
        Some("policy_not_found")
    );

    // Two policies are configured, so a request naming none matches none.
    let unnamed = ext_authz.check(check_request(None, "GET", "/", &[])).await;
    assert_eq!(
        metadata_text(&unnamed, "error_code").as_deref(),
        Some("policy_not_found")
    );
}

#[tokio::test]
async fn ext_authz_uses_the_only_policy_when_the_request_names_none() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "grpc_listen = \"127.0.0.1:0\"",
        &rbac_policy("rbac"),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    daemon.ready(&client()).await;
    let mut ext_authz = ExtAuthzClient::connect(daemon.grpc.expect("grpc")).await;
    let allow = ext_authz
        .check(check_request(
            None,
            "POST",
            "/api/orders",
            &[("x-user", "bob"), ("x-roles", "editor")],
        ))
        .await;
    assert!(
        matches!(allow.http_response, Some(HttpResponse::OkResponse(_))),
        "{allow:?}"
    );
    assert_eq!(metadata_text(&allow, "policy").as_deref(), Some("rbac"));
}

/// Frames `message` as one gRPC message (uncompressed), declaring `declared` bytes.
fn grpc_frame(message: &[u8], declared: u32) -> Vec<u8> {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&declared.to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

#[tokio::test]
async fn ext_authz_answers_undecodable_and_truncated_messages_with_invalid_input() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "grpc_listen = \"127.0.0.1:0\"",
        &rbac_policy("rbac"),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    daemon.ready(&client()).await;
    let grpc = daemon.grpc.expect("grpc");
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2 client");
    let call = |body: Vec<u8>, path: &'static str| {
        let h2 = h2.clone();
        async move {
            let response = h2
                .post(format!("http://{grpc}{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(body)
                .send()
                .await
                .expect("gRPC over h2");
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            (header("grpc-status"), header("x-sandgate-error"))
        }
    };
    const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
    let full =
        check_request(Some("rbac"), "GET", "/api/orders/1", &[("x-user", "alice")]).encode_to_vec();

    // A message cut short inside a field: the frame is whole, the protobuf is not.
    let cut = &full[..full.len() - 3];
    let (status, code) = call(grpc_frame(cut, cut.len() as u32), CHECK).await;
    assert_eq!(status.as_deref(), Some("3"), "INVALID_ARGUMENT");
    assert_eq!(code.as_deref(), Some("invalid_input"));

    // A frame that declares more bytes than the stream carries.
    let (status, code) = call(grpc_frame(&full[..10], full.len() as u32), CHECK).await;
    assert!(status.as_deref().is_some_and(|s| s != "0"), "{status:?}");
    assert_eq!(code.as_deref(), Some("invalid_input"));

    // Unknown methods are refused the same way.
    let (status, code) = call(
        grpc_frame(&full, full.len() as u32),
        "/envoy.service.auth.v3.Authorization/Nope",
    )
    .await;
    assert_eq!(status.as_deref(), Some("12"), "UNIMPLEMENTED");
    assert_eq!(code.as_deref(), Some("invalid_input"));

    // The daemon still answers real requests.
    let mut ext_authz = ExtAuthzClient::connect(grpc).await;
    let ok = ext_authz
        .check(check_request(
            Some("rbac"),
            "GET",
            "/api/orders/1",
            &[("x-user", "alice"), ("x-roles", "viewer")],
        ))
        .await;
    assert!(matches!(
        ok.http_response,
        Some(HttpResponse::OkResponse(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policy_times_out_while_a_healthy_one_keeps_answering_fast() {
    let dir = tempdir();
    let policies = format!(
        "{}\n{}",
        rbac_policy("healthy"),
        wat_policy(
            dir.path(),
            "hostile",
            &spinning_guest(),
            "timeout_ms = 200\nmax_in_flight = 2"
        )
    );
    let config = daemon_config(dir.path(), "", &policies);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    // Warm up the healthy path, then measure it alone.
    let healthy = daemon.url("/v1/policies/healthy/evaluate");
    let probe = |client: reqwest::Client, url: String, n: usize| async move {
        let mut latencies = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let (status, _, answer) = post(&client, url.clone(), ALICE_READS).await;
            latencies.push(started.elapsed());
            assert_eq!(
                (status, &answer["allow"]),
                (200, &json!(true)),
                "healthy answer: {answer}"
            );
        }
        latencies.sort();
        latencies
    };
    let alone = probe(client.clone(), healthy.clone(), 20).await;

    // Hammer the hostile policy from 6 clients while probing the healthy one.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attackers = Vec::new();
    for _ in 0..6 {
        let (client, url, stop) = (
            client.clone(),
            daemon.url("/v1/policies/hostile/evaluate"),
            Arc::clone(&stop),
        );
        attackers.push(tokio::spawn(async move {
            let mut codes: HashMap<String, usize> = HashMap::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, _, answer) = post(&client, url.clone(), "{}").await;
                assert_eq!(answer["allow"], false, "{answer}");
                let code = answer["error"]["code"]
                    .as_str()
                    .unwrap_or("none")
                    .to_owned();
                match code.as_str() {
                    "eval_timeout" => assert_eq!(status, 200),
                    "internal" => assert_eq!(
                        (status, answer["refused"].as_str()),
                        (503, Some("max_in_flight"))
                    ),
                    other => panic!("unexpected hostile answer {status} {other}: {answer}"),
                }
                *codes.entry(code).or_default() += 1;
            }
            codes
        }));
    }
    // Probe only once the hostile guests burn their deadlines.
    daemon
        .until_metrics_show(
            &client,
            r#"sandgate_evaluations_in_flight{policy="hostile"} 2"#,
        )
        .await;
    let loaded = probe(client.clone(), healthy.clone(), 40).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes: HashMap<String, usize> = HashMap::new();
    for attacker in attackers {
        for (code, n) in attacker.await.expect("attacker") {
            *codes.entry(code).or_default() += n;
        }
    }
    assert!(
        codes.get("eval_timeout").copied().unwrap_or(0) > 0,
        "{codes:?}"
    );

    let median = |l: &[Duration]| l[l.len() / 2];
    let p95 = |l: &[Duration]| l[l.len() * 95 / 100];
    eprintln!(
        "healthy alone: median {:?} p95 {:?}; beside the hostile policy: median {:?} p95 {:?} max {:?}; hostile answers {codes:?}",
        median(&alone),
        p95(&alone),
        median(&loaded),
        p95(&loaded),
        loaded[loaded.len() - 1]
    );
    // The hostile guest burns 200 ms per call; were the healthy policy queued
    // behind it, it would wait that long. The bounds leave room for a machine
    // busy with other tests.
    assert!(
        median(&loaded) < Duration::from_millis(50),
        "healthy median {:?}",
        median(&loaded)
    );
    assert!(
        p95(&loaded) < Duration::from_millis(120),
        "healthy p95 {:?}",
        p95(&loaded)
    );

    let metrics = daemon.metrics(&client).await;
    assert!(
        metrics.contains(r#"sandgate_decisions_total{policy="hostile",version="default",allow="false",error="eval_timeout"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_excess_is_refused_at_once_and_counted() {
    let dir = tempdir();
    let policies = wat_policy(
        dir.path(),
        "slow",
        &sleeping_guest(500),
        "timeout_ms = 5000\nmax_in_flight = 1\n[policy.wasi]\nallow = [\"clock\"]",
    );
    let config = daemon_config(dir.path(), "", &policies);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let url = daemon.url("/v1/policies/slow/evaluate");
    let first = tokio::spawn(post_owned(client.clone(), url.clone()));
    // Wait until the first evaluation is running.
    daemon
        .until_metrics_show(
            &client,
            r#"sandgate_evaluations_in_flight{policy="slow"} 1"#,
        )
        .await;
    let started = Instant::now();
    let (status, headers, refused) = post(&client, url.clone(), "{}").await;
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "refusal took {:?}",
        started.elapsed()
    );
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["allow"], false);
    assert_eq!(refused["error"]["code"], "internal");
    assert_eq!(refused["refused"], "max_in_flight");
    assert_eq!(headers["retry-after"], "1");
    let (status, answer) = first.await.expect("first request");
    assert_eq!((status, &answer["allow"]), (200, &json!(true)), "{answer}");

    let metrics = daemon.metrics(&client).await;
    assert!(
        metrics.contains(r#"sandgate_max_in_flight_refusals_total{policy="slow"} 1"#),
        "{metrics}"
    );
}

async fn post_owned(client: reqwest::Client, url: String) -> (u16, Value) {
    let (status, _, body) = post(&client, url, "{}").await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_before_exiting() {
    let dir = tempdir();
    let policies = wat_policy(
        dir.path(),
        "slow",
        &sleeping_guest(600),
        "timeout_ms = 5000\n[policy.wasi]\nallow = [\"clock\"]",
    );
    let config = daemon_config(dir.path(), "", &policies);
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let url = daemon.url("/v1/policies/slow/evaluate");
    let in_flight: Vec<_> = (0..3)
        .map(|_| tokio::spawn(post_owned(client.clone(), url.clone())))
        .collect();
    daemon
        .until_metrics_show(
            &client,
            r#"sandgate_evaluations_in_flight{policy="slow"} 3"#,
        )
        .await;
    daemon.signal("TERM");
    for request in in_flight {
        let (status, answer) = request.await.expect("in-flight request");
        assert_eq!((status, &answer["allow"]), (200, &json!(true)), "{answer}");
    }
    let exit = tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(20)));
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "logs:\n{}",
        daemon.logs()
    );
    // Every answered decision reached the audit log before exit.
    let audit = audit_lines(&dir.path().join("audit.jsonl"));
    assert_eq!(
        audit.iter().filter(|l| l["kind"] == "decision").count(),
        3,
        "{audit:?}"
    );
    assert!(
        client.get(daemon.url("/healthz")).send().await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn sighup_reopens_the_audit_log_after_rotation() {
    let dir = tempdir();
    let config = daemon_config(dir.path(), "", &rbac_policy("rbac"));
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;
    let audit = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");

    let (_, _, before) = post(
        &client,
        daemon.url("/v1/policies/rbac/evaluate"),
        ALICE_READS,
    )
    .await;
    wait_for_line(&audit, &before["decision_id"]).await;
    std::fs::rename(&audit, &rotated).expect("rotate");
    daemon.signal("HUP");
    // The reopen is asynchronous: poll until a new decision lands in a new file.
    let mut asked = Vec::new();
    let after = eventually(
        Duration::from_secs(10),
        daemon.waiting_for(format!("a line reached a reopened {}", audit.display())),
        async || {
            let (_, _, after) = post(
                &client,
                daemon.url("/v1/policies/rbac/evaluate"),
                ALICE_READS,
            )
            .await;
            asked.push(after);
            let lines = audit_lines(&audit);
            asked
                .iter()
                .find(|a| lines.iter().any(|l| l["decision_id"] == a["decision_id"]))
                .cloned()
                .ok_or_else(|| format!("{} lines", lines.len()))
        },
    )
    .await;
    let old = audit_lines(&rotated);
    assert!(
        old.iter()
            .any(|l| l["decision_id"] == before["decision_id"])
    );
    assert!(!old.iter().any(|l| l["decision_id"] == after["decision_id"]));
}

async fn wait_for_line(path: &Path, decision_id: &Value) {
    audit_line_where(path, &format!("decision {decision_id}"), |l| {
        &l["decision_id"] == decision_id
    })
    .await;
}

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_never_take_the_daemon_down() {
    use std::io::Write;
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "grpc_listen = \"127.0.0.1:0\"",
        &rbac_policy("rbac"),
    );
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    let raw = |request: &[u8]| raw_http(daemon.http, request);
    // Not HTTP at all, a truncated body, an invalid header, garbage to the gRPC port.
    raw(b"\x00\x01\x02 garbage\r\n\r\n");
    {
        // A body cut short: the client goes away mid-request.
        let mut cut = std::net::TcpStream::connect(daemon.http).expect("connect");
        let _ = cut.write_all(b"POST /v1/policies/rbac/evaluate HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"subject\"");
    }
    let answer = raw(b"GET /v1/authz/rbac/api/orders HTTP/1.1\r\nhost: x\r\nx-user: al\xffice\r\nconnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let answer = raw(b"POST /v1/policies/%ff%fe/evaluate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let mut grpc = std::net::TcpStream::connect(daemon.grpc.expect("grpc")).expect("connect grpc");
    let _ = grpc.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x05\x07garbage");
    drop(grpc);

    let (status, headers, answer) = post(&client, daemon.url("/v1/nothing"), "{}").await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["code"], "invalid_input");
    assert_eq!(headers["x-sandgate-error"], "invalid_input");
    let wrong_method = client
        .get(daemon.url("/v1/policies/rbac/evaluate"))
        .send()
        .await
        .expect("get");
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["x-sandgate-error"], "invalid_input");

    // Still serving.
    let (status, _, answer) = post(
        &client,
        daemon.url("/v1/policies/rbac/evaluate"),
        ALICE_READS,
    )
    .await;
    assert_eq!((status, &answer["allow"]), (200, &json!(true)));
    assert_eq!(
        client
            .get(daemon.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
}
