//! The examples that call out through the HTTP bridge, against real peers the
//! test starts on loopback: `examples/introspect` against an RFC 7662 token
//! introspection endpoint that authenticates its client, and
//! `examples/remote-decision` against a decision service answering like a
//! Casbin server or OPA. Each example runs as an operator runs it:
//! `sandgate eval` with its own `policy.toml`, only the endpoint's address
//! and the module path changed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::*;

/// The introspection endpoint's client credentials: in the daemon's
/// environment, added by the bridge, never seen by the guest.
const CLIENT_AUTH: &str = "Basic czZCaGRSa3F0MzpnWDFmQmF0M2JW";
/// The secret part of [`CLIENT_AUTH`], which must not surface either.
const CLIENT_SECRET: &str = "czZCaGRSa3F0MzpnWDFmQmF0M2JW";
/// The bearer token of `examples/introspect/input.json`.
const SAMPLE_TOKEN: &str = "2YotnFZFEjr1zCsicMWpAA";
/// How long a slow peer takes: far beyond the examples' egress timeouts.
const SLOW: Duration = Duration::from_secs(3);

// ---- peers ------------------------------------------------------------------

/// One request as a peer received it.
#[derive(Clone, Debug)]
struct Received {
    method: String,
    path: String,
    headers: HeaderMap,
    body: String,
}

impl Received {
    /// Every value of header `name`, in order.
    fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    fn header(&self, name: &str) -> String {
        self.header_values(name).join(", ")
    }

    /// A field of an `application/x-www-form-urlencoded` body.
    fn form(&self, key: &str) -> Option<String> {
        url::form_urlencoded::parse(self.body.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the peer received no JSON ({e}): {:?}", self.body))
    }
}

/// What a peer answers to one request.
struct Answer {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
}

impl Answer {
    fn json(value: Value) -> Answer {
        Answer::new(200, &value.to_string()).header("content-type", "application/json")
    }

    fn new(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).expect("a valid status"),
            headers: Vec::new(),
            body: body.to_owned(),
            delay: Duration::ZERO,
        }
    }

    fn header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Answers only after `delay`.
    fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
                HeaderValue::from_str(value).expect("a valid header value"),
            );
        }
        (self.status, headers, self.body).into_response()
    }
}

/// An HTTP server on a loopback port of its own runtime that records every
/// request and answers it with `answer`; stopped when dropped.
struct Peer {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Peer {
    fn start(answer: impl Fn(&Received) -> Answer + Send + Sync + 'static) -> Peer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("peer runtime");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        let answer = Arc::new(answer);
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let (answer, log) = (Arc::clone(&answer), Arc::clone(&log));
                async move {
                    let request = Received {
                        method: method.to_string(),
                        path: uri.path().to_owned(),
                        headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    let reply = answer(&request);
                    // Recorded before any delay: a slow answer was still a request.
                    log.lock().expect("peer log").push(request);
                    tokio::time::sleep(reply.delay).await;
                    reply
                }
            },
        );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("peer address");
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Peer {
            addr,
            received,
            _runtime: runtime,
        }
    }

    /// `http://127.0.0.1:<port>`.
    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("peer log").clone()
    }

    fn received_at(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

/// Seconds since the Unix epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock reads after 1970")
        .as_secs()
}

/// An RFC 7662 introspection endpoint at `/introspect`. It authenticates its
/// client (`authorization` must be exactly [`CLIENT_AUTH`], else 401
/// `invalid_client`), then answers for the token in the form body:
///
/// | token | answer |
/// | --- | --- |
/// | [`SAMPLE_TOKEN`], `good` | active, scope `orders:read profile`, sub `alice`, expires in 10 min |
/// | `expired` | active, but `exp` a minute ago |
/// | `profile-only` | active, scope `profile` |
/// | `slow` | like `good`, after [`SLOW`] |
/// | `huge` | like `good`, padded past 100 KiB |
/// | `moved` | 307 to `/leak` (a POST to it would carry the token and credentials) |
/// | `echo` | active, with the `authorization` it received as sub, client_id, a body field and the `x-echo-authorization` header |
/// | anything else | `{"active": false}` |
fn introspection_endpoint() -> Peer {
    Peer::start(|r| {
        if r.path != "/introspect" {
            return Answer::new(404, "not found");
        }
        if r.method != "POST" {
            return Answer::new(405, "introspection takes POST");
        }
        if r.header_values("authorization") != [CLIENT_AUTH] {
            return Answer::new(401, r#"{"error":"invalid_client"}"#)
                .header("content-type", "application/json")
                .header("www-authenticate", r#"Basic realm="introspection""#);
        }
        let now = now();
        let active = |scope: &str| {
            json!({
                "active": true, "scope": scope, "sub": "alice", "client_id": "shop-web",
                "token_type": "Bearer", "iat": now - 60, "exp": now + 600
            })
        };
        match r.form("token").unwrap_or_default().as_str() {
            SAMPLE_TOKEN | "good" => Answer::json(active("orders:read profile")),
            "expired" => {
                let mut answer = active("orders:read");
                answer["iat"] = json!(now - 3600);
                answer["exp"] = json!(now - 60);
                Answer::json(answer)
            }
            "profile-only" => Answer::json(active("profile")),
            "slow" => Answer::json(active("orders:read")).after(SLOW),
            "huge" => {
                let mut answer = active("orders:read");
                answer["padding"] = json!("x".repeat(100 * 1024));
                Answer::json(answer)
            }
            "moved" => Answer::new(307, "")
                .header("location", &format!("http://{}/leak", r.header("host"))),
            "echo" => {
                let auth = r.header("authorization");
                Answer::json(json!({
                    "active": true, "scope": "orders:read", "sub": auth, "client_id": auth,
                    "echo": format!("you authenticated as {auth}")
                }))
                .header("x-echo-authorization", &auth)
            }
            _ => Answer::json(json!({"active": false})),
        }
    })
}

/// A decision service at `/v1/decide`. A plain question
/// `{"subject","object","action"}` gets a Casbin-server style answer
/// (`{"allow": bool, "reason": …}`); a question wrapped as OPA's
/// `{"input": …}` gets OPA's (`{"result": {"allow": bool}}`). Alice may read
/// (`read`, `get`), nobody else may do anything. Subjects named `svc-…` get a
/// broken answer:
///
/// | subject | answer |
/// | --- | --- |
/// | `svc-500` | HTTP 500 |
/// | `svc-html` | 200, an HTML page |
/// | `svc-empty` | 200, `{}` (OPA's answer for an undefined rule) |
/// | `svc-string` | 200, `{"allow": "true"}` |
/// | `svc-both` | 200, `{"allow": true, "result": true}` |
/// | `svc-slow` | 200, `{"allow": true}` after [`SLOW`] |
fn decision_service() -> Peer {
    Peer::start(|r| {
        if r.path != "/v1/decide" || r.method != "POST" {
            return Answer::new(404, "not found");
        }
        let Ok(body) = serde_json::from_str::<Value>(&r.body) else {
            return Answer::new(400, "the question is not JSON");
        };
        let (opa, ask) = match body.get("input") {
            Some(input) => (true, input.clone()),
            None => (false, body),
        };
        let subject = ask["subject"].as_str().unwrap_or_default();
        let action = ask["action"].as_str().unwrap_or_default();
        let allow = subject == "alice" && matches!(action, "read" | "get");
        match subject {
            "svc-500" => Answer::new(500, "internal error"),
            "svc-html" => Answer::new(200, "<html><body>maintenance</body></html>")
                .header("content-type", "text/html"),
            "svc-empty" => Answer::json(json!({})),
            "svc-string" => Answer::json(json!({"allow": "true"})),
            "svc-both" => Answer::json(json!({"allow": true, "result": true})),
            "svc-slow" => Answer::json(json!({"allow": true})).after(SLOW),
            _ if opa => Answer::json(json!({
                "decision_id": "4ca636c1-55e4-417a-b1d8-4aceb67960d1",
                "result": {"allow": allow}
            })),
            _ if allow => Answer::json(json!({"allow": true})),
            _ => Answer::json(json!({
                "allow": false,
                "reason": format!("{subject} may not {action} orders")
            })),
        }
    })
}

// ---- running the examples ---------------------------------------------------

/// `examples/<example>/policy.toml`, copied into a temp dir with its module
/// pointing at the built guest, its endpoint `shipped_base` replaced by
/// `base`, and each `(from, to)` edit applied (each must match).
fn example_config(
    example: &str,
    module: &str,
    shipped_base: &str,
    base: &str,
    edits: &[(&str, &str)],
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    let shipped = std::fs::read_to_string(
        repo_root()
            .join("examples")
            .join(example)
            .join("policy.toml"),
    )
    .expect("the example's policy.toml");
    assert!(
        shipped.contains(shipped_base),
        "{example}/policy.toml no longer names {shipped_base}"
    );
    let built = guest(module);
    let mut toml: String = shipped
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("module =") {
                format!("module = \"{}\"", built.display())
            } else {
                l.replace(shipped_base, base)
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    for (from, to) in edits {
        assert!(
            toml.contains(from),
            "{example}/policy.toml has no {from:?} to edit"
        );
        toml = toml.replace(from, to);
    }
    let config = write(dir.path(), "policy.toml", &toml);
    (dir, config)
}

/// What one `sandgate eval` did.
struct Run {
    out: Output,
    decision: Value,
    audit: Vec<Value>,
}

impl Run {
    /// Everything the run wrote: the decision, the audit lines and the log.
    fn everything(&self) -> String {
        format!(
            "{}\n{}\n{}",
            String::from_utf8_lossy(&self.out.stdout),
            self.audit
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            String::from_utf8_lossy(&self.out.stderr)
        )
    }

    fn egress_denied(&self) -> Vec<&Value> {
        self.audit
            .iter()
            .filter(|l| l["kind"] == "egress_denied")
            .collect()
    }

    /// Asserts the guest decided (exit 0, no `error`: the evaluation itself
    /// did not fail) and the single decision audit line agrees.
    fn assert_decided(&self) {
        assert_eq!(
            self.out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&self.out.stderr)
        );
        assert!(self.decision.get("error").is_none(), "{}", self.decision);
        let decisions: Vec<&Value> = self
            .audit
            .iter()
            .filter(|l| l["kind"] == "decision")
            .collect();
        assert_eq!(decisions.len(), 1, "{:?}", self.audit);
        assert_eq!(decisions[0]["allow"], self.decision["allow"]);
    }

    /// The decision's `duration_us` audit field.
    fn duration(&self) -> Duration {
        let us = self
            .audit
            .iter()
            .find(|l| l["kind"] == "decision")
            .and_then(|l| l["duration_us"].as_u64())
            .expect("a decision audit line with duration_us");
        Duration::from_micros(us)
    }
}

/// A module cache shared by every evaluation here: each example is compiled
/// once per test run, not once per test.
fn module_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("bridge-examples-cache")
}

/// `sandgate eval --config config --policy policy` of `input` with `env`,
/// optionally with the config's module replaced by `module`.
fn eval(
    config: &Path,
    policy: &str,
    input: &str,
    env: &[(&str, &str)],
    module: Option<&Path>,
) -> Run {
    let mut eval = Eval::policy(config, policy).env(env);
    if let Some(module) = module {
        eval = eval.arg("--module", module.to_str().expect("UTF-8 path"));
    }
    let dir = config.parent().expect("config dir");
    let (out, audit) = eval.run_audited(dir, input, &module_cache());
    let decision = stdout_json(&out);
    Run {
        out,
        decision,
        audit,
    }
}

// ---- introspect -------------------------------------------------------------

/// `examples/introspect` pointed at `endpoint`, with `edits` to its config.
fn introspect_config(endpoint: &Peer, edits: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    example_config(
        "introspect",
        "introspect",
        "http://127.0.0.1:8080",
        &endpoint.base(),
        edits,
    )
}

/// The environment `examples/introspect/README.md` asks for.
fn introspect_env(endpoint: &Peer) -> Vec<(&'static str, String)> {
    vec![
        ("INTROSPECT_URL", format!("{}/introspect", endpoint.base())),
        ("REQUIRED_SCOPE", "orders:read".to_owned()),
        ("INTROSPECT_CLIENT_AUTH", CLIENT_AUTH.to_owned()),
    ]
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A forward-auth request carrying `Authorization: Bearer <token>`.
fn bearer_request(token: &str) -> String {
    json!({"request": {
        "method": "GET", "path": "/api/orders/7", "query": "", "host": "shop.example",
        "headers": {"authorization": format!("Bearer {token}"), "accept": "application/json"},
        "source": {"address": "10.0.0.7"}
    }})
    .to_string()
}

/// Runs the introspect example against `endpoint` for a request with `token`.
fn introspect(config: &Path, endpoint: &Peer, token: &str) -> Run {
    let env = introspect_env(endpoint);
    eval(
        config,
        "introspect",
        &bearer_request(token),
        &env_refs(&env),
        None,
    )
}

#[test]
fn introspect_allows_an_active_token_with_the_scope_and_names_its_user() {
    let endpoint = introspection_endpoint();
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let sample = std::fs::read_to_string(repo_root().join("examples/introspect/input.json"))
        .expect("the shipped sample input");
    let env = introspect_env(&endpoint);
    let run = eval(&config, "introspect", &sample, &env_refs(&env), None);
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({"allow": true, "headers": {
            "x-user": "alice", "x-scopes": "orders:read profile", "x-client-id": "shop-web"
        }})
    );

    let received = endpoint.received();
    assert_eq!(received.len(), 1, "one introspection call: {received:?}");
    let call = &received[0];
    assert_eq!(
        (call.method.as_str(), call.path.as_str()),
        ("POST", "/introspect")
    );
    assert_eq!(
        call.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    assert_eq!(call.header("accept"), "application/json");
    assert_eq!(
        call.body,
        format!("token={SAMPLE_TOKEN}&token_type_hint=access_token")
    );
    assert_eq!(
        call.header_values("authorization"),
        [CLIENT_AUTH],
        "the host added the client credentials"
    );
    assert!(run.egress_denied().is_empty(), "{:?}", run.audit);
    assert!(
        !run.everything().contains(SAMPLE_TOKEN),
        "the bearer token is never logged or audited: {}",
        run.everything()
    );
}

#[test]
fn introspect_denies_an_inactive_token() {
    let endpoint = introspection_endpoint();
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let run = introspect(&config, &endpoint, "revoked");
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({
            "allow": false, "status": 401, "reason": "token is not active",
            "obligations": {"www-authenticate": "Bearer error=\"invalid_token\""}
        })
    );
    assert_eq!(endpoint.received_at("/introspect").len(), 1);
}

#[test]
fn introspect_denies_an_expired_token_the_endpoint_still_calls_active() {
    let endpoint = introspection_endpoint();
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let run = introspect(&config, &endpoint, "expired");
    run.assert_decided();
    assert_eq!(run.decision["allow"], false, "{}", run.decision);
    assert_eq!(run.decision["status"], 401);
    let reason = run.decision["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("token expired: exp "), "{reason}");
    assert_eq!(
        run.decision["obligations"]["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert!(run.decision.get("headers").is_none(), "{}", run.decision);
}

#[test]
fn introspect_denies_a_token_lacking_the_required_scope() {
    let endpoint = introspection_endpoint();
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let run = introspect(&config, &endpoint, "profile-only");
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({
            "allow": false, "status": 403,
            "reason": "token lacks scope orders:read (token scopes: profile)",
            "obligations": {
                "www-authenticate": "Bearer error=\"insufficient_scope\", scope=\"orders:read\""
            }
        })
    );
}

#[test]
fn introspect_denies_a_request_without_a_token_without_calling_the_endpoint() {
    let endpoint = introspection_endpoint();
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let env = introspect_env(&endpoint);
    let anonymous = r#"{"request":{"method":"GET","path":"/api/orders/7","headers":{}}}"#;
    let run = eval(&config, "introspect", anonymous, &env_refs(&env), None);
    run.assert_decided();
    assert_eq!(run.decision["status"], 401, "{}", run.decision);
    assert_eq!(run.decision["obligations"]["www-authenticate"], "Bearer");
    assert!(endpoint.received().is_empty(), "{:?}", endpoint.received());
}

#[test]
fn introspect_fails_closed_when_the_endpoint_answers_after_the_egress_timeout() {
    let endpoint = introspection_endpoint();
    // The example's own limits: egress timeout_ms = 200 inside an evaluation
    // timeout_ms = 500, so the call times out (-2) before the evaluation does.
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let run = introspect(&config, &endpoint, "slow");
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({
            "allow": false, "status": 503,
            "reason": "token introspection failed: http call timed out"
        })
    );
    assert_eq!(
        endpoint.received_at("/introspect").len(),
        1,
        "the request reached the endpoint"
    );
    assert!(
        run.duration() < SLOW / 2,
        "the evaluation waited {:?} for a {SLOW:?} answer",
        run.duration()
    );
}

#[test]
fn introspect_fails_closed_on_an_answer_over_max_response_bytes() {
    let endpoint = introspection_endpoint();
    // max_response_bytes = 65536 in the example; the answer is over 100 KiB.
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let run = introspect(&config, &endpoint, "huge");
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({
            "allow": false, "status": 503,
            "reason": "token introspection failed: http response exceeds the policy's max_response_bytes"
        })
    );
    assert_eq!(endpoint.received_at("/introspect").len(), 1);
}

#[test]
fn introspect_never_follows_a_redirect_off_the_allowlist_and_audits_the_refusal() {
    let endpoint = introspection_endpoint();
    let leak = format!("{}/leak", endpoint.base());

    // Redirects off (the example's default): the guest sees the 307 itself.
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let run = introspect(&config, &endpoint, "moved");
    run.assert_decided();
    assert_eq!(run.decision["allow"], false);
    assert_eq!(run.decision["status"], 502);
    assert_eq!(
        run.decision["reason"],
        "introspection endpoint answered HTTP 307"
    );
    assert!(run.egress_denied().is_empty());

    // Redirects on: the hop leaves egress.allow, so the bridge refuses it (-1).
    let (_dir, config) = introspect_config(
        &endpoint,
        &[(
            "[policy.egress]\n",
            "[policy.egress]\nallow_redirects = true\n",
        )],
    );
    let run = introspect(&config, &endpoint, "moved");
    run.assert_decided();
    assert_eq!(run.decision["allow"], false);
    assert_eq!(run.decision["status"], 503);
    let reason = run.decision["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("token introspection failed: egress denied"),
        "{reason}"
    );
    let denied = run.egress_denied();
    assert_eq!(denied.len(), 1, "{:?}", run.audit);
    assert_eq!(denied[0]["url"], leak.as_str());
    assert_eq!(denied[0]["policy"], "introspect");
    let why = denied[0]["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("redirect from") && why.contains("not within egress.allow"),
        "{why}"
    );
    assert!(
        endpoint.received_at("/leak").is_empty(),
        "the token and credentials never went to the redirect target"
    );
    assert_eq!(endpoint.received_at("/introspect").len(), 2);
}

/// A guest that posts `request` (an HttpRequest document) and answers
/// `{"allow":true,"obligations":<the HttpResponse it read>}`, or denies when
/// the call failed: everything the bridge lets a guest see of a response.
fn mirror_guest(request: &str) -> String {
    let escaped = request.replace('\\', "\\\\").replace('"', "\\\"");
    abi_guest(
        &format!(
            r#"(import "sandgate" "http_send" (func $send (param i32 i32) (result i64)))
  (import "sandgate" "http_read" (func $read (param i32 i32) (result i32)))
  (data (i32.const 3000) "{escaped}")
  (data (i32.const 8192) "{{\"allow\":true,\"obligations\":")"#
        ),
        // The 28-byte prefix at 8192, the response at 8220, a closing brace.
        &format!(
            "(local $n i64) (local $m i32)
    (local.set $n (call $send (i32.const 3000) (i32.const {len})))
    (if (i64.lt_s (local.get $n) (i64.const 0)) (then {DENY_RESULT} return))
    (local.set $m (call $read (i32.const 8220) (i32.wrap_i64 (local.get $n))))
    (i32.store8 (i32.add (i32.const 8220) (local.get $m)) (i32.const 125))
    (i64.or (i64.shl (i64.const 8192) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $m) (i32.const 29))))",
            len = request.len()
        ),
    )
}

#[test]
fn introspect_client_credentials_reach_the_endpoint_and_nothing_the_guest_can_read() {
    let endpoint = introspection_endpoint();
    let (dir, config) = introspect_config(&endpoint, &[]);

    // The example guest, answered with the credentials echoed as the user.
    let run = introspect(&config, &endpoint, "echo");
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({"allow": true, "headers": {
            "x-user": "[redacted]", "x-scopes": "orders:read", "x-client-id": "[redacted]"
        }}),
        "the echoed credentials reach the decision only redacted"
    );
    let everything = run.everything();
    assert!(
        !everything.contains(CLIENT_SECRET),
        "the client secret leaked: {everything}"
    );

    // A guest returning the whole response it read, sending an authorization
    // header of its own: the host's replaces it, and is scrubbed on the way back.
    let request = json!({
        "method": "POST",
        "url": format!("{}/introspect", endpoint.base()),
        "headers": [
            ["content-type", "application/x-www-form-urlencoded"],
            ["authorization", "Bearer chosen-by-the-guest"]
        ],
        "body": base64::engine::general_purpose::STANDARD
            .encode("token=echo&token_type_hint=access_token")
    })
    .to_string();
    let mirror = write(dir.path(), "mirror.wat", &mirror_guest(&request));
    let env = introspect_env(&endpoint);
    let run = eval(&config, "introspect", "{}", &env_refs(&env), Some(&mirror));
    run.assert_decided();
    assert_eq!(run.decision["allow"], true, "{}", run.decision);
    let response = &run.decision["obligations"];
    assert_eq!(response["status"], 200, "{response}");
    let echoed = response["headers"]
        .as_array()
        .and_then(|h| h.iter().find(|kv| kv[0] == "x-echo-authorization"))
        .unwrap_or_else(|| panic!("no x-echo-authorization in {response}"));
    assert_eq!(echoed[1], "[redacted]");
    let body = base64::engine::general_purpose::STANDARD
        .decode(response["body"].as_str().unwrap_or_default())
        .expect("a base64 body");
    let body: Value = serde_json::from_slice(&body).expect("a JSON body");
    assert_eq!(body["sub"], "[redacted]");
    assert_eq!(body["echo"], "you authenticated as [redacted]");
    let everything = run.everything();
    assert!(
        !everything.contains(CLIENT_SECRET),
        "the client secret leaked: {everything}"
    );

    let received = endpoint.received_at("/introspect");
    assert_eq!(received.len(), 2);
    for call in &received {
        assert_eq!(
            call.header_values("authorization"),
            [CLIENT_AUTH],
            "exactly the host's credentials reached the endpoint"
        );
    }
}

#[test]
fn introspect_reports_client_credentials_the_endpoint_rejects() {
    let endpoint = introspection_endpoint();
    let (_dir, config) = introspect_config(&endpoint, &[]);
    let mut env = introspect_env(&endpoint);
    env.retain(|(k, _)| *k != "INTROSPECT_CLIENT_AUTH");
    env.push((
        "INTROSPECT_CLIENT_AUTH",
        "Basic d3Jvbmc6d3Jvbmc=".to_owned(),
    ));
    let run = eval(
        &config,
        "introspect",
        &bearer_request("good"),
        &env_refs(&env),
        None,
    );
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({
            "allow": false, "status": 502,
            "reason": "introspection endpoint answered HTTP 401 (check the client credentials the host adds for this endpoint)"
        })
    );
    assert_eq!(
        endpoint.received_at("/introspect")[0].header_values("authorization"),
        ["Basic d3Jvbmc6d3Jvbmc="]
    );
}

// ---- remote-decision --------------------------------------------------------

/// `examples/remote-decision` pointed at `service`, with `edits` to its config.
fn remote_config(service_base: &str, edits: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    example_config(
        "remote-decision",
        "remote_decision",
        "http://127.0.0.1:8282",
        service_base,
        edits,
    )
}

/// Runs the remote-decision example for `input`, `DECISION_URL` = `url`.
fn ask(config: &Path, url: &str, input: &str, extra_env: &[(&str, &str)]) -> Run {
    let mut env = vec![("DECISION_URL", url)];
    env.extend_from_slice(extra_env);
    eval(config, "remote-decision", input, &env, None)
}

fn question(subject: &str, action: &str) -> String {
    json!({"subject": subject, "object": "/orders/7", "action": action}).to_string()
}

#[test]
fn remote_decision_allows_what_the_service_allows_and_sends_subject_object_action() {
    let service = decision_service();
    let (_dir, config) = remote_config(&service.base(), &[]);
    let url = format!("{}/v1/decide", service.base());

    let sample = std::fs::read_to_string(repo_root().join("examples/remote-decision/input.json"))
        .expect("the shipped sample input");
    let run = ask(&config, &url, &sample, &[]);
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({"allow": true, "headers": {"x-user": "alice"}})
    );
    let received = service.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let call = &received[0];
    assert_eq!(
        (call.method.as_str(), call.path.as_str()),
        ("POST", "/v1/decide")
    );
    assert_eq!(call.header("content-type"), "application/json");
    assert_eq!(call.header("accept"), "application/json");
    assert_eq!(
        call.json(),
        json!({"subject": "alice", "object": "/orders/7", "action": "read"})
    );

    // Forward-auth: subject from x-user, object the path, action the method.
    let forward = std::fs::read_to_string(
        repo_root().join("examples/remote-decision/forward-auth-input.json"),
    )
    .expect("the shipped forward-auth input");
    let run = ask(&config, &url, &forward, &[]);
    run.assert_decided();
    assert_eq!(run.decision["allow"], true, "{}", run.decision);
    assert_eq!(
        service.received()[1].json(),
        json!({"subject": "alice", "object": "/orders/7", "action": "get"})
    );
    assert!(run.egress_denied().is_empty());
}

#[test]
fn remote_decision_denies_what_the_service_denies() {
    let service = decision_service();
    let (_dir, config) = remote_config(&service.base(), &[]);
    let url = format!("{}/v1/decide", service.base());
    let run = ask(&config, &url, &question("bob", "delete"), &[]);
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({
            "allow": false, "status": 403,
            "reason": "decision service denies bob delete /orders/7: bob may not delete orders"
        })
    );
    assert_eq!(
        service.received()[0].json(),
        json!({"subject": "bob", "object": "/orders/7", "action": "delete"})
    );
}

#[test]
fn remote_decision_asks_opa_with_the_question_as_input() {
    let service = decision_service();
    let (_dir, config) = remote_config(
        &service.base(),
        &[(
            r#"env = ["DECISION_URL"]"#,
            r#"env = ["DECISION_URL", "DECISION_FORMAT"]"#,
        )],
    );
    let url = format!("{}/v1/decide", service.base());
    let opa = [("DECISION_FORMAT", "opa")];
    let run = ask(&config, &url, &question("alice", "read"), &opa);
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({"allow": true, "headers": {"x-user": "alice"}})
    );
    assert_eq!(
        service.received()[0].json(),
        json!({"input": {"subject": "alice", "object": "/orders/7", "action": "read"}})
    );
    let run = ask(&config, &url, &question("mallory", "read"), &opa);
    run.assert_decided();
    assert_eq!(run.decision["allow"], false, "{}", run.decision);
    assert_eq!(run.decision["status"], 403);
}

#[test]
fn remote_decision_fails_closed_when_the_service_errs_or_answers_nonsense() {
    let service = decision_service();
    let (_dir, config) = remote_config(&service.base(), &[]);
    let url = format!("{}/v1/decide", service.base());
    let unrecognised = "unrecognised answer from the decision service: ";
    let cases = [
        (
            "svc-500",
            502,
            "decision service answered HTTP 500".to_owned(),
        ),
        (
            "svc-html",
            502,
            format!("{unrecognised}the body is not JSON"),
        ),
        ("svc-empty", 502, format!("{unrecognised}an empty object")),
        (
            "svc-string",
            502,
            format!("{unrecognised}allow is a string, not a boolean"),
        ),
        (
            "svc-both",
            502,
            format!("{unrecognised}it has more than one of allow, result"),
        ),
        (
            "svc-slow",
            503,
            "decision service call failed: http call timed out".to_owned(),
        ),
    ];
    for (subject, status, reason) in &cases {
        let run = ask(&config, &url, &question(subject, "read"), &[]);
        run.assert_decided();
        assert_eq!(run.decision["allow"], false, "{subject}: {}", run.decision);
        assert_eq!(
            run.decision["status"], *status,
            "{subject}: {}",
            run.decision
        );
        let got = run.decision["reason"].as_str().unwrap_or_default();
        assert!(got.starts_with(reason.as_str()), "{subject}: {got}");
        assert!(run.decision.get("headers").is_none(), "{subject}");
    }
    assert_eq!(
        service.received().len(),
        cases.len(),
        "every case reached the service"
    );
}

#[test]
fn remote_decision_fails_closed_when_the_service_is_unreachable_or_not_allowed() {
    // A port that just stopped listening: connection refused (-3).
    let gone = decision_service().base();
    let (_dir, config) = remote_config(&gone, &[]);
    let run = ask(
        &config,
        &format!("{gone}/v1/decide"),
        &question("alice", "read"),
        &[],
    );
    run.assert_decided();
    assert_eq!(
        run.decision,
        json!({
            "allow": false, "status": 503,
            "reason": "decision service call failed: http connection failed"
        })
    );

    // DECISION_URL outside egress.allow: refused (-1) and audited, never sent.
    let service = decision_service();
    let (_dir, config) = remote_config(&service.base(), &[]);
    let admin = format!("{}/v1/admin", service.base());
    let run = ask(&config, &admin, &question("alice", "read"), &[]);
    run.assert_decided();
    assert_eq!(run.decision["allow"], false);
    assert_eq!(run.decision["status"], 503);
    let reason = run.decision["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("decision service call failed: egress denied"),
        "{reason}"
    );
    let denied = run.egress_denied();
    assert_eq!(denied.len(), 1, "{:?}", run.audit);
    assert_eq!(denied[0]["url"], admin.as_str());
    assert!(service.received().is_empty(), "{:?}", service.received());
}
