//! The HTTP bridge against real HTTP servers on loopback: allowlist
//! refusals (each audited), redirects, limits, budget, credentials that the
//! guest never sees, the response cache, connections kept alive across
//! evaluations, and waiting without threads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;
use sandgate::ErrorCode;

/// What the peer saw.
#[derive(Default)]
struct Seen {
    authorization: std::sync::Mutex<Vec<Vec<String>>>,
    cached_hits: AtomicU32,
    nostore_hits: AtomicU32,
    /// TCP connections accepted.
    connections: AtomicU32,
}

struct Peer {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

impl Peer {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn peer() -> Peer {
    let seen = Arc::new(Seen::default());
    let s = Arc::clone(&seen);
    let echo_seen = Arc::clone(&seen);
    let cached = Arc::clone(&seen);
    let nostore = Arc::clone(&seen);
    // Answers no request until GATHERED of them wait at once.
    let gathered = Arc::new(tokio::sync::Barrier::new(GATHERED));
    let app = axum::Router::new()
        .route(
            "/introspect",
            post(move |headers: HeaderMap, body: Bytes| {
                let s = Arc::clone(&s);
                async move {
                    let auth: Vec<String> = headers
                        .get_all(header::AUTHORIZATION)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect();
                    s.authorization.lock().expect("lock").push(auth);
                    let active = String::from_utf8_lossy(&body).contains("token=good");
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        format!(r#"{{"active":{active},"sub":"alice"}}"#),
                    )
                }
            }),
        )
        .route(
            "/echo",
            get(move |headers: HeaderMap| {
                let s = Arc::clone(&echo_seen);
                async move {
                    let auth = headers
                        .get(header::AUTHORIZATION)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    s.authorization
                        .lock()
                        .expect("lock")
                        .push(vec![auth.clone()]);
                    (
                        [("x-echo-authorization", auth.clone())],
                        format!("you sent: {auth}"),
                    )
                }
            }),
        )
        .route("/allowed/target", get(|| async { "target" }))
        .route(
            "/allowed/redirect-in",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/allowed/target")]) }),
        )
        .route(
            "/allowed/redirect-out",
            get(|| async {
                (
                    StatusCode::FOUND,
                    [(header::LOCATION, "http://127.0.0.1:9/elsewhere")],
                )
            }),
        )
        .route(
            "/allowed/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                "slow"
            }),
        )
        .route(
            "/allowed/gather",
            get(move || {
                let gathered = Arc::clone(&gathered);
                async move {
                    gathered.wait().await;
                    "gathered"
                }
            }),
        )
        .route(
            "/allowed/slower",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                "slower"
            }),
        )
        .route("/allowed/big", get(|| async { "x".repeat(256 * 1024) }))
        .route(
            "/allowed/big-stream",
            get(|| async { axum::body::Body::new(Unannounced { frames: 16 }) }),
        )
        .route(
            "/allowed/cached",
            get(move || {
                let s = Arc::clone(&cached);
                async move {
                    s.cached_hits.fetch_add(1, Ordering::SeqCst);
                    ([(header::CACHE_CONTROL, "max-age=60")], "cached").into_response()
                }
            }),
        )
        .route(
            "/allowed/nostore",
            get(move || {
                let s = Arc::clone(&nostore);
                async move {
                    s.nostore_hits.fetch_add(1, Ordering::SeqCst);
                    ([(header::CACHE_CONTROL, "no-store")], "fresh").into_response()
                }
            }),
        );
    // Evaluations started together connect in one burst; the default backlog
    // (128) would drop SYNs past it and time the kernel's 1 s retransmit.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let listener = socket.listen(1024).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::clone(&seen);
    let listener = listener.tap_io(move |_| {
        accepted.connections.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Peer { addr, seen }
}

/// A 256 KiB body in 16 KiB frames whose length is not announced, so the
/// bridge can only cut it while streaming.
struct Unannounced {
    frames: u32,
}

impl http_body::Body for Unannounced {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.frames == 0 {
            return std::task::Poll::Ready(None);
        }
        self.frames -= 1;
        let frame = http_body::Frame::data(Bytes::from(vec![b'x'; 16 * 1024]));
        std::task::Poll::Ready(Some(Ok(frame)))
    }
}

/// A server that streams an endless chunked body (no Content-Length),
/// counting the chunks it wrote and the connections it stopped writing to
/// (because the client closed them, or after the last chunk).
struct ChunkedPeer {
    addr: SocketAddr,
    chunks_written: Arc<AtomicU32>,
    streams_ended: Arc<AtomicU32>,
}

async fn chunked_peer() -> ChunkedPeer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let chunks_written = Arc::new(AtomicU32::new(0));
    let streams_ended = Arc::new(AtomicU32::new(0));
    let (counter, ended) = (Arc::clone(&chunks_written), Arc::clone(&streams_ended));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (counter, ended) = (Arc::clone(&counter), Arc::clone(&ended));
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                if socket
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let chunk = format!("4000\r\n{}\r\n", "y".repeat(0x4000));
                    for _ in 0..1024 {
                        if socket.write_all(chunk.as_bytes()).await.is_err() {
                            break;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    ChunkedPeer {
        addr,
        chunks_written,
        streams_ended,
    }
}

/// A server that answers the first request on each connection, keeps the
/// connection open until told to close one, and then closes it without
/// having announced it (no `Connection: close`): to the client, a kept-alive
/// connection that died while idle in its pool.
struct ClosingPeer {
    addr: SocketAddr,
    close_one: Arc<tokio::sync::Notify>,
    closed: Arc<AtomicU32>,
}

async fn closing_peer() -> ClosingPeer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let close_one = Arc::new(tokio::sync::Notify::new());
    let closed = Arc::new(AtomicU32::new(0));
    let (close, counter) = (Arc::clone(&close_one), Arc::clone(&closed));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (close, counter) = (Arc::clone(&close), Arc::clone(&counter));
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                close.notified().await;
                drop(socket);
                counter.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    ClosingPeer {
        addr,
        close_one,
        closed,
    }
}

fn egress_toml(module: &std::path::Path, allow: &[String], extra: &str) -> String {
    let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    policy_toml(
        module,
        &format!(
            "timeout_ms = 1000\n[policy.egress]\nallow = [{}]\n{extra}",
            allow.join(", ")
        ),
    )
}

async fn run(
    guest: &str,
    toml_for: impl FnOnce(&std::path::Path) -> String,
) -> (
    sandgate::Evaluation,
    Vec<serde_json::Value>,
    tempfile::TempDir,
) {
    let dir = tempdir();
    let module = write(dir.path(), "m.wat", guest);
    let toml = toml_for(&module);
    let (e, audit) = evaluate_once(dir.path(), &toml, "{}").await;
    (e, audit, dir)
}

/// Loads one policy for tests that evaluate it more than once; the
/// directory holds its module and must outlive it.
async fn load(
    dir: &std::path::Path,
    guest: &str,
    toml_for: impl FnOnce(&std::path::Path) -> String,
) -> sandgate::Policy {
    let module = write(dir, "m.wat", guest);
    let (_, config) = config(dir, &toml_for(&module));
    let engine = engine(&dir.join("cache"));
    sandgate::Policy::load(&engine, config.policies[0].clone())
        .await
        .expect("load")
}

fn response(e: &sandgate::Evaluation) -> &serde_json::Value {
    assert!(
        e.decision.allow,
        "the bridged call failed: {:?}",
        e.decision
    );
    &e.decision.extra["obligations"]
}

fn body_text(resp: &serde_json::Value) -> String {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["body"].as_str().unwrap_or_default())
        .expect("base64 body");
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn bridged_call_reaches_a_real_server_and_returns_its_response() {
    let p = peer().await;
    let request = format!(r#"{{"method":"GET","url":"{}"}}"#, p.url("/allowed/target"));
    let (e, audit, _d) = run(&response_guest(&request), |m| {
        egress_toml(m, &[p.url("/allowed")], "")
    })
    .await;
    let resp = response(&e);
    assert_eq!(resp["status"], 200);
    assert_eq!(body_text(resp), "target");
    assert!(audit.iter().all(|l| l["kind"] != "egress_denied"));
    assert_eq!(e.http_calls.len(), 1);
    assert_eq!(e.http_calls[0].outcome, Ok(200));
}

#[tokio::test]
async fn requests_outside_the_allowlist_are_refused_and_audited() {
    let p = peer().await;
    let port = p.addr.port();
    let cases = [
        (
            format!("http://127.0.0.1:{port}/introspect"),
            "not within egress.allow",
        ),
        (
            format!("http://127.0.0.1:{port}/allowedx/target"),
            "not within egress.allow",
        ),
        (
            format!("http://127.0.0.1:{port}/allowed/../introspect"),
            "not within egress.allow",
        ),
        (
            format!("http://127.0.0.1:{port}/allowed/%2e%2e/introspect"),
            "not within egress.allow",
        ),
        (
            format!("http://127.0.0.1:{}/allowed/target", port + 1),
            "not within egress.allow",
        ),
        (
            format!("http://127.0.0.1:{port}@evil.example/allowed/target"),
            "user information",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/allowed/target"),
            "not within egress.allow",
        ),
        (
            format!("http://localhost:{port}/allowed/target"),
            "not within egress.allow",
        ),
    ];
    for (url, reason) in cases {
        let request = format!(r#"{{"method":"GET","url":"{url}"}}"#);
        let (e, audit, _d) = run(&code_guest(&[request], -1), |m| {
            egress_toml(m, &[p.url("/allowed")], "")
        })
        .await;
        assert!(
            e.decision.allow,
            "{url} must be refused with -1: {:?}",
            e.decision
        );
        let denied: Vec<_> = audit
            .iter()
            .filter(|l| l["kind"] == "egress_denied")
            .collect();
        assert_eq!(denied.len(), 1, "{url}: {audit:?}");
        assert_eq!(denied[0]["url"], url.as_str());
        assert!(
            denied[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(reason)),
            "{url}: {:?}",
            denied[0]
        );
        assert_eq!(e.egress_denied, 1);
    }
    assert!(
        p.seen.authorization.lock().expect("lock").is_empty(),
        "nothing reached the server"
    );
}

#[tokio::test]
async fn policies_without_egress_are_refused_every_request() {
    let p = peer().await;
    let request = format!(r#"{{"url":"{}"}}"#, p.url("/allowed/target"));
    let (e, audit, _d) = run(&code_guest(&[request], -1), |m| policy_toml(m, "")).await;
    assert!(e.decision.allow, "{:?}", e.decision);
    let denied: Vec<_> = audit
        .iter()
        .filter(|l| l["kind"] == "egress_denied")
        .collect();
    assert!(
        denied[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("egress.allow is empty"))
    );
}

#[tokio::test]
async fn redirects_are_not_followed_unless_allowed_and_then_only_within_the_allowlist() {
    let p = peer().await;
    let to_in = format!(r#"{{"url":"{}"}}"#, p.url("/allowed/redirect-in"));
    let (e, _, _d) = run(&response_guest(&to_in), |m| {
        egress_toml(m, &[p.url("/allowed")], "")
    })
    .await;
    assert_eq!(response(&e)["status"], 302, "not followed by default");

    let (e, _, _d) = run(&response_guest(&to_in), |m| {
        egress_toml(m, &[p.url("/allowed")], "allow_redirects = true")
    })
    .await;
    let resp = response(&e);
    assert_eq!(resp["status"], 200);
    assert_eq!(body_text(resp), "target");

    let to_out = format!(r#"{{"url":"{}"}}"#, p.url("/allowed/redirect-out"));
    let (e, audit, _d) = run(&code_guest(&[to_out], -1), |m| {
        egress_toml(m, &[p.url("/allowed")], "allow_redirects = true")
    })
    .await;
    assert!(e.decision.allow, "{:?}", e.decision);
    let denied: Vec<_> = audit
        .iter()
        .filter(|l| l["kind"] == "egress_denied")
        .collect();
    assert_eq!(denied[0]["url"], "http://127.0.0.1:9/elsewhere");
    assert!(
        denied[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("redirect"))
    );
}

#[tokio::test]
async fn limits_map_to_their_codes() {
    let p = peer().await;
    let allowed = [p.url("/allowed"), "http://127.0.0.1:9/closed".to_owned()];
    let get = |path: &str| format!(r#"{{"url":"{}"}}"#, p.url(path));

    let (e, _, _d) = run(&code_guest(&[get("/allowed/slow")], -2), |m| {
        egress_toml(m, &allowed, "timeout_ms = 50")
    })
    .await;
    assert!(e.decision.allow, "per-call timeout is -2: {:?}", e.decision);

    let closed = r#"{"url":"http://127.0.0.1:9/closed"}"#.to_owned();
    let (e, _, _d) = run(&code_guest(&[closed], -3), |m| egress_toml(m, &allowed, "")).await;
    assert!(
        e.decision.allow,
        "connection refused is -3: {:?}",
        e.decision
    );

    let (e, _, _d) = run(&code_guest(&[get("/allowed/big")], -4), |m| {
        egress_toml(m, &allowed, "max_response_bytes = 65536")
    })
    .await;
    assert!(
        e.decision.allow,
        "oversized response is -4: {:?}",
        e.decision
    );

    let (e, _, _d) = run(
        &code_guest(&[get("/allowed/target"), get("/allowed/target")], -6),
        |m| egress_toml(m, &allowed, "max_calls = 1"),
    )
    .await;
    assert!(
        e.decision.allow,
        "the second call exceeds the budget: {:?}",
        e.decision
    );

    let (e, _, _d) = run(&code_guest(&["{\"url\": 5}".to_owned()], -5), |m| {
        egress_toml(m, &allowed, "")
    })
    .await;
    assert!(
        e.decision.allow,
        "a malformed request is -5: {:?}",
        e.decision
    );
}

#[tokio::test]
async fn streamed_responses_are_cut_at_the_limit_and_not_read_further() {
    let peer = chunked_peer().await;
    let addr = peer.addr;
    let request = format!(r#"{{"url":"http://{addr}/stream"}}"#);
    let (e, _, _d) = run(&code_guest(&[request], -4), |m| {
        egress_toml(
            m,
            &[format!("http://{addr}/stream")],
            "max_response_bytes = 65536",
        )
    })
    .await;
    assert!(e.decision.allow, "{:?}", e.decision);
    // The peer stops writing once the bridge drops the connection (or, were
    // the bridge to read on, after its last chunk): only then is the count final.
    eventually(
        Duration::from_secs(10),
        "the peer's stream ended",
        async || match peer.streams_ended.load(Ordering::SeqCst) {
            0 => Err(format!(
                "{} chunks written so far",
                peer.chunks_written.load(Ordering::SeqCst)
            )),
            _ => Ok(()),
        },
    )
    .await;
    assert!(
        peer.chunks_written.load(Ordering::SeqCst) < 1024,
        "the bridge kept reading after the limit"
    );
}

#[tokio::test]
async fn a_slow_server_cannot_stretch_an_evaluation_past_its_deadline() {
    let p = peer().await;
    let request = format!(r#"{{"url":"{}"}}"#, p.url("/allowed/slower"));
    let started = Instant::now();
    let (e, _, _d) = run(&code_guest(&[request], 0), |m| {
        policy_toml(
            m,
            &format!(
                "timeout_ms = 100\n[policy.egress]\nallow = [\"{}\"]\ntimeout_ms = 5000",
                p.url("/allowed")
            ),
        )
    })
    .await;
    assert_eq!(
        e.decision.error_code(),
        Some(ErrorCode::EvalTimeout),
        "{:?}",
        e.decision
    );
    assert!(e.duration < Duration::from_millis(300), "{:?}", e.duration);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn credentials_are_injected_replacing_the_guests_and_never_visible_to_it() {
    let p = peer().await;
    let secret = "Basic czZCaGRSa3F0MzpnWDFmQmF0M2JW";
    let request = format!(
        r#"{{"method":"GET","url":"{}","headers":[["Authorization","Bearer from-guest"]]}}"#,
        p.url("/echo")
    );
    let (e, _, _d) = run(&response_guest(&request), |m| {
        let dir = m.parent().expect("dir");
        write(dir, "client-secret", &format!("{secret}\n"));
        egress_toml(
            m,
            &[p.url("/echo")],
            &format!("[[policy.egress.credentials]]\nprefix = \"{}\"\nheader = \"authorization\"\nvalue_file = \"client-secret\"", p.url("/echo")),
        )
    })
    .await;
    let resp = response(&e).clone();
    assert_eq!(
        p.seen.authorization.lock().expect("lock").as_slice(),
        [vec![secret.to_owned()]],
        "exactly the host's credential reached the server"
    );
    let seen_by_guest = resp.to_string();
    assert!(
        !seen_by_guest.contains("czZCaGRSa3F0MzpnWDFmQmF0M2JW"),
        "{seen_by_guest}"
    );
    assert!(body_text(&resp).contains("[redacted]"));
    let echoed = resp["headers"]
        .as_array()
        .and_then(|h| h.iter().find(|kv| kv[0] == "x-echo-authorization"))
        .expect("echo header");
    assert_eq!(echoed[1], "[redacted]");
}

#[tokio::test]
async fn responses_are_cached_within_ttl_honouring_no_store() {
    let p = peer().await;
    let get = |path: &str| format!(r#"{{"url":"{}"}}"#, p.url(path));
    let dir = tempdir();
    let guest = code_guest(
        &[
            get("/allowed/cached"),
            get("/allowed/cached"),
            get("/allowed/nostore"),
            get("/allowed/nostore"),
        ],
        75,
    );
    let policy = load(dir.path(), &guest, |m| {
        egress_toml(m, &[p.url("/allowed")], "cache_ttl_ms = 60000")
    })
    .await;
    let audit = sandgate::audit::AuditLog::disabled();
    let e = policy
        .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
        .await;
    assert_eq!(
        e.http_calls.iter().filter(|c| c.cached).count(),
        1,
        "{:?}",
        e.http_calls
    );
    let _ = policy
        .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
        .await;
    assert_eq!(
        p.seen.cached_hits.load(Ordering::SeqCst),
        1,
        "max-age response served from the cache"
    );
    assert_eq!(
        p.seen.nostore_hits.load(Ordering::SeqCst),
        4,
        "no-store responses are never cached"
    );
    let stats = policy.bridge_cache_stats();
    assert_eq!(stats.hits.load(Ordering::SeqCst), 3);
    assert_eq!(stats.misses.load(Ordering::SeqCst), 5);
}

/// How many requests `/allowed/gather` holds until it answers them all.
const GATHERED: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_evaluations_waiting_on_a_server_hold_no_threads() {
    // The server answers only once all of them wait on it at the same time:
    // on two worker threads that happens only if a waiting evaluation holds
    // no thread. Otherwise they would all run into their deadline.
    let p = peer().await;
    let dir = tempdir();
    let request = format!(r#"{{"url":"{}"}}"#, p.url("/allowed/gather"));
    let policy = load(dir.path(), &response_guest(&request), |m| {
        policy_toml(
            m,
            &format!(
                "timeout_ms = 60000\n[policy.egress]\nallow = [\"{}\"]\ntimeout_ms = 60000",
                p.url("/allowed")
            ),
        )
    })
    .await;
    let audit = sandgate::audit::AuditLog::disabled();
    let tasks: Vec<_> = (0..GATHERED)
        .map(|_| {
            let (policy, audit) = (policy.clone(), audit.clone());
            tokio::spawn(async move {
                policy
                    .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
                    .await
            })
        })
        .collect();
    for t in tasks {
        let e = t.await.expect("join");
        assert_eq!(response(&e)["status"], 200);
        assert_eq!(body_text(response(&e)), "gathered");
    }
}

#[tokio::test]
async fn sequential_evaluations_share_one_kept_alive_connection() {
    let p = peer().await;
    let dir = tempdir();
    let request = format!(
        r#"{{"method":"POST","url":"{}","body":"dG9rZW49Z29vZA=="}}"#,
        p.url("/introspect")
    );
    let policy = load(dir.path(), &response_guest(&request), |m| {
        egress_toml(m, &[p.url("/introspect")], "")
    })
    .await;
    let audit = sandgate::audit::AuditLog::disabled();
    for _ in 0..5 {
        let e = policy
            .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
            .await;
        assert_eq!(body_text(response(&e)), r#"{"active":true,"sub":"alice"}"#);
    }
    assert_eq!(p.seen.authorization.lock().expect("lock").len(), 5);
    assert_eq!(
        p.seen.connections.load(Ordering::SeqCst),
        1,
        "five evaluations, one connection"
    );
}

#[tokio::test]
async fn a_response_over_the_limit_closes_its_connection_and_the_next_call_succeeds() {
    let p = peer().await;
    let get = |path: &str| format!(r#"{{"url":"{}"}}"#, p.url(path));
    let dir = tempdir();
    // Refused by Content-Length, then cut while streaming; each oversized
    // response takes its connection with it, the unread rest never reused.
    let guest = code_guest(
        &[
            get("/allowed/target"),
            get("/allowed/big"),
            get("/allowed/target"),
            get("/allowed/big-stream"),
            get("/allowed/target"),
            get("/allowed/target"),
        ],
        0,
    );
    let policy = load(dir.path(), &guest, |m| {
        egress_toml(m, &[p.url("/allowed")], "max_response_bytes = 65536")
    })
    .await;
    let audit = sandgate::audit::AuditLog::disabled();
    let e = policy
        .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
        .await;
    let outcomes: Vec<_> = e.http_calls.iter().map(|c| c.outcome).collect();
    assert_eq!(
        outcomes,
        [Ok(200), Err(-4), Ok(200), Err(-4), Ok(200), Ok(200)],
        "{:?}",
        e.http_calls
    );
    assert_eq!(
        p.seen.connections.load(Ordering::SeqCst),
        3,
        "a new connection after each oversized response, reused otherwise"
    );
}

#[tokio::test]
async fn a_kept_alive_connection_the_peer_closed_while_idle_is_replaced() {
    let peer = closing_peer().await;
    let url = format!("http://{}/x", peer.addr);
    let dir = tempdir();
    let request = format!(r#"{{"url":"{url}"}}"#);
    let policy = load(dir.path(), &response_guest(&request), |m| {
        egress_toml(m, std::slice::from_ref(&url), "")
    })
    .await;
    let audit = sandgate::audit::AuditLog::disabled();
    for n in 1..=3 {
        let e = policy
            .evaluate(b"{}", &sandgate::EvalOptions::default(), &audit)
            .await;
        assert_eq!(body_text(response(&e)), "ok", "evaluation {n}");
        // The connection now idles in the pool; the peer closes it before
        // the next evaluation checks it out.
        peer.close_one.notify_one();
        eventually(
            Duration::from_secs(5),
            format!("the peer closed connection {n}"),
            async || match peer.closed.load(Ordering::SeqCst) {
                closed if closed >= n => Ok(()),
                closed => Err(format!("{closed} closed")),
            },
        )
        .await;
    }
}
