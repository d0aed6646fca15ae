//! Real nginx (`/usr/sbin/nginx`) in front of a recording HTTP/1.1 backend:
//! `deploy/nginx/sandgate.conf` rendered into a private prefix, checked with
//! `nginx -t`, run in the foreground and killed on drop. Used by the nginx,
//! forward-auth and tracing tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{eventually_blocking, repo_root, write};

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

    /// Sends `method path` with `headers` through nginx; its answer.
    pub async fn through(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = client.request(method, format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("through nginx")
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// `deploy/nginx/sandgate.conf` with its placeholders filled in.
pub fn render_template(
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
pub fn main_config(dir: &Path) -> String {
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

pub fn nginx_command(dir: &Path) -> Command {
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
    eventually_blocking(
        Duration::from_secs(20),
        format!("nginx listening on {addr}"),
        || {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited with {status}:\n{}", nginx.error_log());
            }
            TcpStream::connect(addr).map_err(|e| format!("{e}\n{}", nginx.error_log()))
        },
    );
    nginx
}
