//! Forward-auth behind real proxies: nginx (`deploy/nginx/sandgate.conf`) and
//! Caddy (`deploy/caddy/Caddyfile`). Each proxy sets one pair of headers about
//! the original request and passes the client's other headers through, so a
//! client must not be able to override the method with the other pair.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::Method;

use crate::support::*;

const CADDY: &str = "/usr/bin/caddy";

/// Caddy running in the foreground with its own config and state; killed when dropped.
struct Caddy {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Caddy {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Renders `deploy/caddy/Caddyfile` into `dir`, validates it, starts Caddy
/// and waits until it accepts connections.
fn start_caddy(dir: &Path, sandgate: SocketAddr, policy: &str, backend: SocketAddr) -> Caddy {
    let addr = free_port();
    let template = std::fs::read_to_string(repo_root().join("deploy/caddy/Caddyfile"))
        .expect("deploy/caddy/Caddyfile");
    let rendered = template
        .replace("@LISTEN_PORT@", &addr.port().to_string())
        .replace("@SANDGATE@", &sandgate.to_string())
        .replace("@POLICY@", policy)
        .replace("@BACKEND@", &backend.to_string());
    assert!(
        !rendered.contains('@'),
        "a placeholder was left unrendered:\n{rendered}"
    );
    let caddyfile = write(dir, "Caddyfile", &rendered);
    let caddy = |args: &[&str]| {
        let mut command = Command::new(CADDY);
        command
            .args(args)
            .arg("--config")
            .arg(&caddyfile)
            .args(["--adapter", "caddyfile"])
            .env("HOME", dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config"));
        command
    };
    let check = caddy(&["validate"]).output().expect("run caddy validate");
    assert!(
        check.status.success(),
        "caddy refused the rendered Caddyfile:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let log = dir.join("caddy.log");
    let child = caddy(&["run"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("caddy log"))
        .spawn()
        .expect("start caddy");
    let mut caddy = Caddy { child, addr, log };
    eventually_blocking(
        Duration::from_secs(20),
        format!("caddy listening on {addr}"),
        || {
            if let Ok(Some(status)) = caddy.child.try_wait() {
                panic!("caddy exited with {status}:\n{}", caddy.log());
            }
            std::net::TcpStream::connect(addr).map_err(|e| format!("{e}\n{}", caddy.log()))
        },
    );
    caddy
}

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
