//! Real nginx (`/usr/sbin/nginx`) with `auth_request` in front of a recording
//! backend on loopback, asking a real `sandgate serve` through the forward-auth
//! endpoint. The nginx config is `deploy/nginx/sandgate.conf`, rendered and
//! checked with `nginx -t` here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::server::{Daemon, client, daemon_config, rbac_policy};
use crate::support::*;

const NGINX: &str = "/usr/sbin/nginx";

/// One request the backend received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A tiny HTTP/1.1 application that records every request and answers 200.
pub struct Backend {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Backend {
    pub fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let log = Arc::clone(&log);
                std::thread::spawn(move || serve_connection(stream, &log));
            }
        });
        Backend { addr, received }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("backend log").clone()
    }
}

fn serve_connection(stream: TcpStream, log: &Mutex<Vec<Received>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return;
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        log.lock().expect("backend log").push(Received {
            method,
            target,
            headers,
            body,
        });
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 7\r\n\r\nbackend";
        if writer.write_all(answer).is_err() {
            return;
        }
    }
}

/// nginx running in the foreground with its own prefix; killed when dropped.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// `deploy/nginx/sandgate.conf` with its placeholders filled in.
fn render_template(
    listen: SocketAddr,
    sandgate: SocketAddr,
    policy: &str,
    backend: SocketAddr,
) -> String {
    let template = std::fs::read_to_string(repo_root().join("deploy/nginx/sandgate.conf"))
        .expect("deploy/nginx/sandgate.conf");
    let rendered = template
        .replace("@LISTEN@", &listen.to_string())
        .replace("@SANDGATE@", &sandgate.to_string())
        .replace("@POLICY@", policy)
        .replace("@BACKEND@", &backend.to_string());
    assert!(
        !rendered.contains('@'),
        "a placeholder was left unrendered:\n{rendered}"
    );
    rendered
}

/// The main nginx.conf around the rendered snippet: everything nginx writes
/// stays in `dir`; one process, so killing it leaves nothing behind.
fn main_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/sandgate.conf;
}}
"
    )
}

fn nginx_command(dir: &Path) -> Command {
    let mut command = Command::new(NGINX);
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"]);
    command
}

/// Renders the config into `dir`, checks it with `nginx -t`, starts nginx and
/// waits until it accepts connections.
pub fn start_nginx(dir: &Path, sandgate: SocketAddr, policy: &str, backend: SocketAddr) -> Nginx {
    let addr = free_port();
    write(
        dir,
        "sandgate.conf",
        &render_template(addr, sandgate, policy, backend),
    );
    write(dir, "nginx.conf", &main_config(dir));
    let check = nginx_command(dir).arg("-t").output().expect("run nginx -t");
    let said = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(
        check.status.success(),
        "nginx -t refused the rendered config:\n{said}"
    );
    assert!(
        said.contains("syntax is ok") && said.contains("test is successful"),
        "{said}"
    );

    let child = nginx_command(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let mut nginx = Nginx {
        child,
        addr,
        dir: dir.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = nginx.child.try_wait() {
            panic!("nginx exited with {status}:\n{}", nginx.error_log());
        }
        assert!(
            Instant::now() < deadline,
            "nginx did not listen on {addr}:\n{}",
            nginx.error_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nginx
}

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
