//! What a hostile client or guest tries against the real daemon: reading a
//! host credential back through a compressed or re-encoded echo, input a
//! guest and the host would read two ways (invalid UTF-8, lone surrogates,
//! duplicate keys) and the decision cache keyed on it, and guest decisions
//! carrying the host's own fields or headers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use serde_json::Value;

use crate::support::*;

/// The credential the host injects; `/`, `+` and spaces make its encodings differ.
const SECRET: &str = "Bearer h0st-only/t0ken+with spaces";

/// A peer that echoes the request's headers, compressing its answer when the
/// request accepts gzip (as any web server does); `/gzip-anyway` compresses
/// whatever was asked; `/forms` hands the authorization header back in the
/// spellings an echo service might use.
struct Peer {
    addr: SocketAddr,
    accept_encoding: Arc<Mutex<Vec<String>>>,
}

async fn peer() -> Peer {
    let accept_encoding = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&accept_encoding);
    let app = axum::Router::new()
        .route(
            "/echo",
            get(move |headers: HeaderMap| {
                let seen = Arc::clone(&seen);
                async move {
                    let accepts = text(&headers, header::ACCEPT_ENCODING.as_str());
                    seen.lock().expect("lock").push(accepts.clone());
                    echo(&headers, accepts.contains("gzip"))
                }
            }),
        )
        .route(
            "/gzip-anyway",
            get(|headers: HeaderMap| async move { echo(&headers, true) }),
        )
        .route(
            "/forms",
            get(|headers: HeaderMap| async move { forms(&headers) }),
        );
    let addr = serve(app).await;
    Peer {
        addr,
        accept_encoding,
    }
}

fn text(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

fn echo(headers: &HeaderMap, gzipped: bool) -> Response {
    let mut body = String::new();
    for (name, value) in headers {
        body.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    if gzipped {
        ([(header::CONTENT_ENCODING, "gzip")], gzip(body.as_bytes())).into_response()
    } else {
        body.into_response()
    }
}

fn forms(headers: &HeaderMap) -> Response {
    let auth = text(headers, "authorization");
    let percent: String = auth
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let json = auth.replace('/', "\\/").replace(' ', "\\u0020");
    let b64 = base64::engine::general_purpose::STANDARD;
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body = format!(
        r#"{{"json":"{json}","b64":"{}","b64url":"{}","form":"{}"}}"#,
        b64.encode(format!("x{auth}")),
        url_safe.encode(format!("ab{auth}y")),
        auth.replace('+', "%2B")
            .replace(' ', "+")
            .replace('/', "%2f")
    );
    (
        StatusCode::FOUND,
        [
            (
                header::LOCATION.as_str().to_owned(),
                format!("https://elsewhere.example/cb?t={percent}"),
            ),
            (
                "x-basic".to_owned(),
                format!("Basic {}", b64.encode(format!("u:{auth}"))),
            ),
        ],
        body,
    )
        .into_response()
}

/// A gzip member holding `data` in one fixed-Huffman deflate block: a real
/// compressed body (any gzip reader decodes it) in which the plain bytes
/// no longer appear.
fn gzip(data: &[u8]) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, value: u32, count: u32) {
            self.acc |= value << self.n;
            self.n += count;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// Huffman codes go most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            let reversed = (0..len).fold(0, |r, i| r | (((code >> i) & 1) << (len - 1 - i)));
            self.put(reversed, len);
        }
    }
    let mut bits = Bits {
        out: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff],
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // last block
    bits.put(1, 2); // fixed Huffman codes
    for &b in data {
        match b {
            0..=143 => bits.code(0x30 + u32::from(b), 8),
            _ => bits.code(0x190 + u32::from(b) - 144, 9),
        }
    }
    bits.code(0, 7); // end of block
    if bits.n > 0 {
        bits.out.push(bits.acc as u8);
    }
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    let mut out = bits.out;
    out.extend_from_slice(&(!crc).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// A daemon serving one guest `p` that sends `request` and returns the
/// response as its `obligations`, with `SECRET` injected for `peer`.
fn bridge_daemon(dir: &std::path::Path, peer: &Peer, request: &str) -> Daemon {
    write(dir, "client-secret", SECRET);
    let egress = format!(
        "timeout_ms = 2000\n[policy.egress]\nallow = [\"http://{0}/\"]\n[[policy.egress.credentials]]\nprefix = \"http://{0}/\"\nheader = \"authorization\"\nvalue_file = \"client-secret\"",
        peer.addr
    );
    let policy = wat_policy(dir, "p", &response_guest(request), &egress);
    let config = daemon_config(dir, "", &policy);
    Daemon::start(&config, &dir.join("cache"))
}

/// Evaluates `input` with policy `name` over the JSON API.
async fn evaluate(daemon: &Daemon, name: &str, input: impl Into<reqwest::Body>) -> (u16, String) {
    let response = client()
        .post(daemon.url(&format!("/v1/policies/{name}/evaluate")))
        .body(input)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {text}"))
}

/// Everything the guest got from its bridged call, body decoded, as text.
fn seen_by_guest(answer: &Value) -> String {
    let response = &answer["obligations"];
    let body = base64::engine::general_purpose::STANDARD
        .decode(response["body"].as_str().unwrap_or_default())
        .unwrap_or_default();
    format!(
        "{}\n{}",
        response["headers"],
        String::from_utf8_lossy(&body)
    )
}

/// The audit lines of `dir` once one satisfies `found`, polled with a deadline.
fn audit_line(dir: &std::path::Path, found: impl Fn(&Value) -> bool) -> Value {
    let path = dir.join("audit.jsonl");
    eventually_blocking(Duration::from_secs(10), "such an audit line", || {
        let lines = audit_lines(&path);
        lines
            .iter()
            .find(|l| found(l))
            .cloned()
            .ok_or_else(|| format!("{lines:?}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_asking_for_gzip_gets_an_identity_answer_with_the_credential_redacted() {
    let peer = peer().await;
    let dir = tempdir();
    let request = format!(
        r#"{{"url":"http://{}/echo","headers":[["Accept-Encoding","gzip"],["TE","gzip"],["Range","bytes=0-9"]]}}"#,
        peer.addr
    );
    let daemon = bridge_daemon(dir.path(), &peer, &request);
    daemon.ready(&client()).await;

    let (status, answer) = evaluate(&daemon, "p", "{}").await;
    let answer = json(&answer);
    assert_eq!(
        (status, &answer["allow"]),
        (200, &Value::Bool(true)),
        "{answer}"
    );
    assert_eq!(
        peer.accept_encoding.lock().expect("lock").as_slice(),
        ["identity"],
        "the bridge pins the encoding, whatever the guest asked"
    );
    let seen = seen_by_guest(&answer);
    assert!(seen.contains("authorization: [redacted]"), "{seen}");
    assert!(!seen.contains("h0st-only"), "{seen}");
    assert!(
        !seen.contains("range:"),
        "a partial answer could split the credential: {seen}"
    );
    daemon.logged("guest request header dropped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_answer_the_bridge_cannot_inspect_is_refused_and_audited() {
    let peer = peer().await;
    let dir = tempdir();
    let request = format!(r#"{{"url":"http://{}/gzip-anyway"}}"#, peer.addr);
    let daemon = bridge_daemon(dir.path(), &peer, &request);
    daemon.ready(&client()).await;

    let (status, answer) = evaluate(&daemon, "p", "{}").await;
    let answer = json(&answer);
    // The guest got -1 (egress denied), not the compressed echo: it denies.
    assert_eq!(
        (status, &answer["allow"]),
        (200, &Value::Bool(false)),
        "{answer}"
    );
    assert!(answer.get("obligations").is_none(), "{answer}");
    let refusal = audit_line(dir.path(), |l| l["kind"] == "egress_denied");
    let reason = refusal["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("content-encoding: gzip"), "{refusal}");
    assert!(
        refusal["url"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/gzip-anyway")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_credential_is_redacted_in_every_spelling_headers_and_location_included() {
    let peer = peer().await;
    let dir = tempdir();
    let request = format!(r#"{{"url":"http://{}/forms"}}"#, peer.addr);
    let daemon = bridge_daemon(dir.path(), &peer, &request);
    daemon.ready(&client()).await;

    let (status, answer) = evaluate(&daemon, "p", "{}").await;
    let answer = json(&answer);
    assert_eq!(
        (status, &answer["allow"]),
        (200, &Value::Bool(true)),
        "{answer}"
    );
    assert_eq!(answer["obligations"]["status"], 302, "{answer}");
    let seen = seen_by_guest(&answer);
    let b64 = base64::engine::general_purpose::STANDARD;
    let token = "h0st-only/t0ken+with spaces";
    for (form, spelling) in [
        ("plain", token.to_owned()),
        ("percent-encoded", "h0st%2Donly%2Ft0ken".to_owned()),
        ("json-escaped", "t0ken+with\\u0020spaces".to_owned()),
        ("form-encoded", "t0ken%2Bwith+spaces".to_owned()),
        // The middle of each base64 encoding, whatever its alignment.
        ("base64", b64.encode(format!("x{SECRET}"))[4..40].to_owned()),
        (
            "base64 of a Basic pair",
            b64.encode(format!("u:{SECRET}"))[4..40].to_owned(),
        ),
        (
            "url-safe base64",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("ab{SECRET}y"))[4..40]
                .to_owned(),
        ),
    ] {
        assert!(
            !seen.contains(&spelling),
            "{form} spelling {spelling:?} leaked: {seen}"
        );
    }
    let location = answer["obligations"]["headers"]
        .as_array()
        .and_then(|h| h.iter().find(|kv| kv[0] == "location"))
        .map(|kv| kv[1].to_string())
        .unwrap_or_default();
    assert_eq!(location, "\"https://elsewhere.example/cb?t=[redacted]\"");
}

/// A guest that allows when the document it receives contains `alice`
/// anywhere, as a guest reading the first of two duplicated keys would.
fn alice_guest() -> String {
    abi_guest(
        "",
        &format!(
            "(local $i i32) (local $end i32)
    (local.set $i (local.get $ptr))
    (local.set $end (i32.sub (i32.add (local.get $ptr) (local.get $len)) (i32.const 5)))
    (block $none (loop $scan
      (br_if $none (i32.gt_s (local.get $i) (local.get $end)))
      (if (i32.and
            (i32.eq (i32.load (local.get $i)) (i32.const 0x63696c61))
            (i32.eq (i32.load8_u offset=4 (local.get $i)) (i32.const 0x65)))
        (then (return ({ALLOW_RESULT}))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $scan)))
    {DENY_RESULT}"
        ),
    )
}

/// A guest answering the fixed decision `doc`.
fn fixed_guest(doc: &str) -> String {
    let escaped = doc.replace('\\', "\\\\").replace('"', "\\\"");
    let packed = (2048_i64 << 32) | doc.len() as i64;
    abi_guest(
        &format!("(data (i32.const 2048) \"{escaped}\")"),
        &format!("i64.const {packed}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_a_guest_could_read_two_ways_is_invalid_input_on_every_entry_point() {
    let dir = tempdir();
    let policy = wat_policy(
        dir.path(),
        "p",
        &alice_guest(),
        "decision_cache_ttl_ms = 60000",
    );
    let config = daemon_config(dir.path(), "", &policy);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    for (input, fault) in [
        (
            &b"{\"user\":\"\xff\"}"[..],
            "invalid UTF-8 in a string (JSON text must be UTF-8) at byte 9 (at $.user)",
        ),
        (br#"{"user":"\ud800"}"#, "lone surrogate \\ud800"),
        (br#"{"u":[{"r":"\udc00x"}]}"#, "(at $.u[0].r)"),
        (
            br#"{"user":"alice","user":"mallory"}"#,
            "duplicate key \"user\" at byte 16 (at $)",
        ),
    ] {
        let (status, answer) = evaluate(&daemon, "p", input.to_vec()).await;
        let answer = json(&answer);
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_input", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(fault), "{message:?} should name {fault:?}");

        // The OPA data API answers the same, for the same input.
        let mut body = b"{\"input\":".to_vec();
        body.extend_from_slice(input);
        body.push(b'}');
        let response = client
            .post(daemon.url("/v1/data/p"))
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 400);
        let answer = json(&response.text().await.expect("body"));
        assert_eq!(answer["code"], "invalid_input", "{answer}");
    }

    // The crafted input was not evaluated, so it cached nothing under the
    // key of the input it shadows: mallory is still denied.
    let (status, answer) = evaluate(&daemon, "p", r#"{"user":"mallory"}"#).await;
    assert_eq!(
        (status, json(&answer)["allow"].clone()),
        (200, Value::Bool(false)),
        "{answer}"
    );
    let (_, answer) = evaluate(&daemon, "p", r#"{"user":"alice"}"#).await;
    assert_eq!(json(&answer)["allow"], true, "{answer}");
}

#[test]
fn the_cli_refuses_the_same_input_with_the_same_answer() {
    let dir = tempdir();
    let module = write(dir.path(), "alice.wat", &alice_guest());
    for input in [
        &b"{\"user\":\"\xff\"}"[..],
        br#"{"user":"\ud800"}"#,
        br#"{"user":"alice","user":"mallory"}"#,
    ] {
        let out = Eval::module(&module)
            .stdin(input)
            .run(&dir.path().join("cache"));
        let decision = stdout_json(&out);
        assert_eq!(out.status.code(), Some(3), "{decision}");
        assert_eq!(decision["allow"], false);
        assert_eq!(decision["error"]["code"], "invalid_input", "{decision}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_fields_and_headers_appear_once_with_the_hosts_values_in_every_answer() {
    let dir = tempdir();
    let forged = r#"{"allow":true,"policy":"forged","version":"forged","decision_id":"forged","trace_id":"forged","refused":"forged","headers":{"X-User":"first","x-user":"second","x-sandgate-decision-id":"forged","x-sandgate-error":"forged"}}"#;
    let policy = wat_policy(dir.path(), "p", &fixed_guest(forged), "version = \"v1\"");
    let config = daemon_config(dir.path(), "grpc_listen = \"127.0.0.1:0\"", &policy);
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    let client = client();
    daemon.ready(&client).await;

    // JSON API: each member once, the host's.
    let (status, text) = evaluate(&daemon, "p", "{}").await;
    assert_eq!(status, 200, "{text}");
    for key in ["policy", "version", "decision_id", "trace_id", "refused"] {
        let count = text.matches(&format!("\"{key}\":")).count();
        assert!(count <= 1, "{key} appears {count} times: {text}");
    }
    let answer = json(&text);
    assert_eq!(
        (&answer["policy"], &answer["version"]),
        (&Value::from("p"), &Value::from("v1"))
    );
    assert_ne!(answer["decision_id"], "forged");
    assert!(answer["trace_id"] != "forged" && answer.get("refused").is_none());

    // OPA data API: the guest's copies are not in `result` either.
    let text = client
        .post(daemon.url("/v1/data/p"))
        .body(r#"{"input":{}}"#)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    assert_eq!(text.matches("\"decision_id\":").count(), 1, "{text}");
    let answer = json(&text);
    for key in ["policy", "version", "decision_id", "trace_id", "refused"] {
        assert!(answer["result"].get(key).is_none(), "{key}: {text}");
    }
    assert_eq!(answer["result"]["allow"], true, "{text}");

    // Forward-auth: one x-user, and the host's own headers are the host's.
    let response = client
        .get(daemon.url("/v1/authz/p/orders"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let users: Vec<_> = response.headers().get_all("x-user").iter().collect();
    assert_eq!(users.len(), 1, "{users:?}");
    let ids: Vec<_> = response
        .headers()
        .get_all("x-sandgate-decision-id")
        .iter()
        .collect();
    assert_eq!(ids.len(), 1);
    assert_ne!(ids[0], "forged");
    assert!(response.headers().get("x-sandgate-error").is_none());

    // ext_authz: the OkResponse's headers, each name once, none forged.
    let grpc = daemon.grpc.expect("grpc address");
    let mut ext_authz = ExtAuthzClient::connect(grpc).await;
    let check = ext_authz
        .check(envoy_check_request(
            [("policy".to_owned(), "p".to_owned())].into(),
            "GET",
            "/orders",
            &[],
        ))
        .await;
    let Some(HttpResponse::OkResponse(ok)) = &check.http_response else {
        panic!("not allowed: {check:?}");
    };
    let mut names: Vec<String> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| h.key.to_ascii_lowercase())
        .collect();
    let values: Vec<String> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| h.value.clone())
        .collect();
    names.sort();
    let before = names.len();
    names.dedup();
    assert_eq!(
        before,
        names.len(),
        "repeated header names: {:?}",
        ok.headers
    );
    assert!(!values.iter().any(|v| v == "forged"), "{:?}", ok.headers);
}

#[test]
fn the_peers_gzip_is_real_gzip_that_hides_the_plain_text() {
    use std::io::Write as _;
    let plain = format!("authorization: {SECRET}\n").repeat(3);
    let compressed = gzip(plain.as_bytes());
    assert!(!String::from_utf8_lossy(&compressed).contains("h0st-only"));
    let mut gunzip = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip is installed");
    gunzip
        .stdin
        .take()
        .expect("stdin")
        .write_all(&compressed)
        .expect("write");
    let out = gunzip.wait_with_output().expect("gzip -dc");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), plain);
}
