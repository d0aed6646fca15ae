//! Caddy as a forward-auth peer: `deploy/caddy/Caddyfile` rendered for a
//! test, validated by Caddy itself and run in the foreground.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually_blocking, free_port, repo_root, write};

const CADDY: &str = "/usr/bin/caddy";

/// Caddy running in the foreground with its own config and state; killed when dropped.
pub struct Caddy {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Caddy {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Renders `deploy/caddy/Caddyfile` into `dir`, validates it, starts Caddy
/// and waits until it accepts connections.
pub fn start_caddy(dir: &Path, sandgate: SocketAddr, policy: &str, backend: SocketAddr) -> Caddy {
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
