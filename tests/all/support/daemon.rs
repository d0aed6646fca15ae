//! A real `sandgate serve` process for the tests: started on loopback ports it
//! picks itself (addresses read from its stderr), polled until ready, stopped
//! by signal or killed on drop; plus the HTTP client and the config snippets
//! (daemon config, rbac and WAT policies) every daemon test writes.

use std::fmt::Display;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{eventually, guest, poll_blocking, repo_root, sandgate_bin, write};

/// How long a daemon may take to print its addresses or to become ready.
const STARTUP: Duration = Duration::from_secs(60);

/// A running `sandgate serve`, killed when dropped.
pub struct Daemon {
    child: Child,
    pub http: SocketAddr,
    pub grpc: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `sandgate serve --config config` with its module cache in `cache`
    /// and waits until it printed the addresses it listens on.
    pub fn start(config: &Path, cache: &Path) -> Daemon {
        Daemon::start_under(&[], config, cache)
    }

    /// Starts the daemon under `wrapper` (a command and its arguments that
    /// run the daemon, e.g. `setpriv` dropping capabilities).
    pub fn start_under(wrapper: &[&str], config: &Path, cache: &Path) -> Daemon {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(sandgate_bin());
                command
            }
            None => Command::new(sandgate_bin()),
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(config)
            .env("SANDGATE_CACHE_DIR", cache)
            .env("SANDGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sandgate serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            // Keep draining stderr so the daemon never blocks on a full pipe.
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    for (what, prefix) in [
                        ("http", "sandgate: http listening on "),
                        ("grpc", "sandgate: grpc listening on "),
                    ] {
                        if let Some(addr) = line
                            .strip_prefix(prefix)
                            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                        {
                            let _ = tx.send((what, addr));
                        }
                    }
                    lines.lock().expect("stderr lines").push(line);
                }
            });
        }
        let grpc_configured =
            std::fs::read_to_string(config).is_ok_and(|t| t.contains("grpc_listen"));
        let deadline = Instant::now() + STARTUP;
        let (mut http, mut grpc) = (None, None);
        while http.is_none() || (grpc_configured && grpc.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("http", addr)) => http = Some(addr),
                Ok((_, addr)) => grpc = Some(addr),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "sandgate serve printed no addresses:\n{}",
                        lines.lock().expect("lines").join("\n")
                    );
                }
            }
        }
        Daemon {
            child,
            http: http.expect("http address"),
            grpc,
            stderr: lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `what` for `eventually`, naming the daemon's logs when the wait fails.
    pub fn waiting_for<D: Display>(&self, what: D) -> WaitingFor<'_, D> {
        WaitingFor { daemon: self, what }
    }

    /// What the daemon logged so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    /// Waits until the daemon has logged a line containing `text` (its log
    /// reaches the test through a pipe and a reader thread, after the answer
    /// that caused it); returns that line.
    pub async fn logged(&self, text: &str) -> String {
        self.logged_within(text, Duration::from_secs(10)).await
    }

    /// [`Daemon::logged`] for a line that may take longer than a request's
    /// aftermath (a report the daemon makes at most so often): waits at
    /// most `within`.
    pub async fn logged_within(&self, text: &str, within: Duration) -> String {
        eventually(within, format!("the daemon logs {text:?}"), async || {
            let lines = self.stderr.lock().expect("lines");
            lines
                .iter()
                .find(|line| line.contains(text))
                .cloned()
                .ok_or_else(|| lines.join("\n"))
        })
        .await
    }

    /// POSTs `input` to `/v1/policies/{policy}/evaluate`; returns the status
    /// and the JSON answer (`null` when it is not JSON).
    pub async fn evaluate(
        &self,
        client: &reqwest::Client,
        policy: &str,
        input: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let response = client
            .post(self.url(&format!("/v1/policies/{policy}/evaluate")))
            .body(input)
            .send()
            .await
            .unwrap_or_else(|e| panic!("evaluate {policy}: {e}"));
        let status = response.status().as_u16();
        (status, json_body(response).await)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self, client: &reqwest::Client) -> String {
        client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits until `/metrics` has the sample line `sample` (name, labels and
    /// value, e.g. `sandgate_evaluations_in_flight{policy="p"} 2`).
    pub async fn until_metrics_show(&self, client: &reqwest::Client, sample: &str) {
        eventually(
            Duration::from_secs(30),
            self.waiting_for(format!("/metrics showing {sample}")),
            async || {
                let metrics = self.metrics(client).await;
                match metrics.lines().any(|l| l.trim() == sample) {
                    true => Ok(()),
                    false => Err(metrics),
                }
            },
        )
        .await
    }

    /// Polls `/readyz` until it answers 200; panics with the last answer after the deadline.
    pub async fn ready(&self, client: &reqwest::Client) -> Value {
        self.poll_readyz(client, |status, _| status == 200).await
    }

    /// Polls `/readyz` until no policy is still loading (some may have failed).
    pub async fn settled(&self, client: &reqwest::Client) -> (u16, Value) {
        self.until_settled(client, STARTUP).await
    }

    /// Polls `/readyz` until every policy settled (loaded or failed), for at
    /// most `within`; returns that answer's status and body.
    pub async fn until_settled(&self, client: &reqwest::Client, within: Duration) -> (u16, Value) {
        eventually(
            within,
            self.waiting_for("every policy settled (loaded or failed)"),
            async || {
                let (status, body) = self.readyz_answer(client).await?;
                let settled = body["policies"]
                    .as_object()
                    .is_some_and(|p| p.values().all(|p| p["state"] != "loading"));
                match settled {
                    true => Ok((status, body)),
                    false => Err(format!("/readyz {status} {body}")),
                }
            },
        )
        .await
    }

    async fn poll_readyz(
        &self,
        client: &reqwest::Client,
        done: impl Fn(u16, &Value) -> bool,
    ) -> Value {
        self.until_readyz(client, "daemon ready", done).await
    }

    /// Polls `/readyz` until `done(status, body)` holds and returns that
    /// body; panics naming `what` and the last answer after the deadline.
    pub async fn until_readyz(
        &self,
        client: &reqwest::Client,
        what: &str,
        done: impl Fn(u16, &Value) -> bool,
    ) -> Value {
        eventually(STARTUP, self.waiting_for(what), async || {
            let (status, body) = self.readyz_answer(client).await?;
            if done(status, &body) {
                Ok(body)
            } else {
                Err(format!("/readyz {status} {body}"))
            }
        })
        .await
    }

    /// One answer of `/readyz`: its status and body.
    pub async fn readyz(&self, client: &reqwest::Client) -> (u16, Value) {
        self.readyz_answer(client)
            .await
            .unwrap_or_else(|e| panic!("GET /readyz: {e}"))
    }

    /// One answer of `/readyz`, or why the request failed.
    async fn readyz_answer(&self, client: &reqwest::Client) -> Result<(u16, Value), String> {
        let response = client
            .get(self.url("/readyz"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        Ok((response.status().as_u16(), json_body(response).await))
    }

    /// Sends a signal (`TERM`, `HUP`, …) to the daemon.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Stops the daemon as an operator would (SIGTERM), so everything it
    /// answered is in the audit log, and asserts it exited cleanly.
    pub fn stop(&mut self) {
        self.signal("TERM");
        let exit = self.wait_exit(Duration::from_secs(30));
        assert_eq!(exit.and_then(|s| s.code()), Some(0), "{}", self.logs());
    }

    /// Waits for the daemon to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_blocking(timeout, || match self.child.try_wait() {
            Ok(Some(status)) => Ok(status),
            other => Err(format!("{other:?}")),
        })
        .ok()
    }
}

/// What a test waits for, shown with the daemon's logs as they are when the
/// wait gives up (see [`Daemon::waiting_for`]).
pub struct WaitingFor<'a, D> {
    daemon: &'a Daemon,
    what: D,
}

impl<D: Display> Display for WaitingFor<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\nlogs:\n{}", self.what, self.daemon.logs())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON body of a response (`null` when it is not JSON).
pub async fn json_body(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

pub fn client() -> reqwest::Client {
    // reqwest is built without a bundled TLS provider (the daemon installs
    // ring); a test client needs one installed too, whichever test runs first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// The `[[policy]]` table of the example rbac guest, its role table preopened read-only.
pub fn rbac_policy(name: &str) -> String {
    format!(
        "[[policy]]\nname = \"{name}\"\nversion = \"v1\"\nmodule = \"{}\"\ntimeout_ms = 500\n[policy.wasi]\nallow = [\"fs_read\"]\npreopens = [{{ host = \"{}\", guest = \"/data\", mode = \"ro\" }}]\n",
        guest("rbac").display(),
        repo_root().join("examples/rbac/data").display()
    )
}

/// A `[[policy]]` table for a module file, with extra keys.
pub fn wat_policy(dir: &Path, name: &str, wat: &str, extra: &str) -> String {
    let module = write(dir, &format!("{name}.wat"), wat);
    format!(
        "[[policy]]\nname = \"{name}\"\nmodule = \"{}\"\n{extra}\n",
        module.display()
    )
}

/// Writes a daemon config (loopback port 0, audit log in `dir`) followed by `policies`.
pub fn daemon_config(dir: &Path, server: &str, policies: &str) -> PathBuf {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[audit]\npath = \"{}\"\n\n{policies}",
        dir.join("audit.jsonl").display()
    );
    write(dir, "sandgate.toml", &toml)
}

pub const ALICE_READS: &str = r#"{"subject":{"id":"alice","roles":["viewer"]},"action":"read","resource":{"type":"orders","id":"7"}}"#;
