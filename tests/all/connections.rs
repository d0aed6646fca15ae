//! Connection limits of `sandgate serve`: clients that stall mid-headers or
//! sit idle are closed by the daemon, and connections over
//! `server.max_connections` are refused at once, so stalled clients cannot
//! exhaust its file descriptors and `/healthz` keeps answering.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// The status of `GET /healthz` on a fresh connection, or `None` when the
/// connection was closed without an answer.
async fn healthz(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: sandgate\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().map(str::to_owned)
}

/// Reads until the daemon closes `stream` (EOF or reset); the bytes it sent
/// meanwhile, or `None` when it was still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut answer = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut answer)).await {
        Ok(_) => Some(answer),
        Err(_) => None,
    }
}

/// The value of the sample `series` (name and labels) in Prometheus text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

async fn metrics(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: sandgate\r\nconnection: close\r\n\r\n")
        .await
        .expect("ask for /metrics");
    closed_within(&mut stream, Duration::from_secs(5))
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .expect("/metrics answered")
}

async fn wait_for_healthz(addr: SocketAddr, daemon: &Daemon) {
    eventually(
        Duration::from_secs(20),
        daemon.waiting_for("/healthz answering"),
        async || match healthz(addr).await {
            Some(status) if status == "HTTP/1.1 200 OK" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_stalled_mid_headers_are_closed_and_those_over_the_cap_refused_while_healthz_keeps_answering()
 {
    const CAP: usize = 8;
    const STALLED: usize = 40;
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        &format!("max_connections = {CAP}\nheader_read_timeout_ms = 1000\n"),
        &rbac_policy("rbac"),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let addr = daemon.http;
    wait_for_healthz(addr, &daemon).await;

    // Many clients start a request and never finish its headers.
    let opened = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: sandgate\r\nx-slow: ")
            .await
            .expect("start a request");
        stalled.push(stream);
    }
    // Every one of them is closed: those over the cap at once (with a 503
    // when the socket takes it), the others when their headers are overdue.
    let watching: Vec<_> = stalled
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let answer = closed_within(&mut stream, Duration::from_secs(10)).await;
                (answer, opened.elapsed())
            })
        })
        .collect();
    let (mut refused, mut timed_out) = (0, 0);
    for watched in watching {
        let (answer, after) = watched.await.expect("watching task");
        let answer = answer
            .unwrap_or_else(|| panic!("a stalled connection was left open:\n{}", daemon.logs()));
        if after < Duration::from_millis(900) {
            assert!(
                answer.is_empty() || answer.starts_with(b"HTTP/1.1 503"),
                "{:?}",
                String::from_utf8_lossy(&answer)
            );
            refused += 1;
        } else {
            assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
            timed_out += 1;
        }
    }
    assert_eq!(refused + timed_out, STALLED);
    assert!(timed_out <= CAP, "{timed_out} admitted over a cap of {CAP}");
    assert!(refused >= STALLED - CAP, "only {refused} refused");

    // The daemon answers again, and says what happened.
    wait_for_healthz(addr, &daemon).await;
    let metrics = metrics(addr).await;
    assert_eq!(
        sample(&metrics, "sandgate_connections_max"),
        Some(CAP as f64)
    );
    assert_eq!(
        sample(
            &metrics,
            "sandgate_connections_refused_total{listener=\"http\"}"
        ),
        Some(refused as f64),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "sandgate_connection_timeouts_total{listener=\"http\",phase=\"header\"}"
        ),
        Some(timed_out as f64),
        "{metrics}"
    );
    // Nothing stays open: only the connection asking for /metrics is counted.
    eventually(
        Duration::from_secs(10),
        "only the /metrics connection open",
        async || {
            let metrics = self::metrics(addr).await;
            let open = sample(&metrics, "sandgate_connections_open{listener=\"http\"}");
            if open == Some(1.0) {
                Ok(())
            } else {
                Err(metrics)
            }
        },
    )
    .await;
    tokio::task::block_in_place(|| daemon.stop());
    let logs = daemon.logs();
    assert_eq!(
        logs.matches("connection refused: server.max_connections connections are open")
            .count(),
        1,
        "refusals are logged, at most once every 10 s:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let dir = tempdir();
    let config = daemon_config(
        dir.path(),
        "idle_timeout_ms = 1000\nheader_read_timeout_ms = 200\n",
        &rbac_policy("rbac"),
    );
    let mut daemon = Daemon::start(&config, &dir.path().join("cache"));
    let addr = daemon.http;
    wait_for_healthz(addr, &daemon).await;

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: sandgate\r\n\r\n")
        .await
        .expect("ask");
    let mut answer = [0u8; 512];
    let n = stream.read(&mut answer).await.expect("answer");
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
    // Idle longer than the header-read timeout: still open (waiting for a
    // next request is not sending headers slowly), then closed at the idle timeout.
    let answered = Instant::now();
    let rest = closed_within(&mut stream, Duration::from_secs(10))
        .await
        .expect("the idle connection was closed");
    assert!(rest.is_empty());
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(5),
        "closed after {idle:?}"
    );
    let metrics = metrics(addr).await;
    assert_eq!(
        sample(
            &metrics,
            "sandgate_connection_timeouts_total{listener=\"http\",phase=\"idle\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    tokio::task::block_in_place(|| daemon.stop());
}
