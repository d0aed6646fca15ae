//! The daemon behind `sandgate serve` (DESIGN §6): [`Server`] binds the HTTP
//! API (`http`) and the Envoy ext_authz gRPC service (`grpc`), loads every
//! policy on its own, serves until a signal and drains. The rest has a module
//! each: `registry` (the generation of config and policies serving now),
//! `gate` (the one path of every evaluation: routing, cache, `max_in_flight`,
//! metrics, audit), `status` (`/readyz`, `/v1/policies`), `reload` (a new
//! generation on a file change, SIGHUP or `POST /v1/reload`; SIGHUP also
//! reopens the audit log) and `connections` (connection limits).

mod authz;
mod connections;
mod gate;
mod grpc;
mod http;
mod registry;
mod reload;
mod status;

pub(crate) use gate::{Answer, Outcome};
pub(crate) use registry::State;

pub use authz::forward_auth_input;
pub use grpc::check_request_input;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::config::{AuditTarget, Config, Digest};
use crate::engine::{Engine, EngineError};
use crate::probes::Probes;
use crate::telemetry::traces::Tracing;

/// How long in-flight requests may take to finish after SIGTERM/SIGINT.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the audit log {target}: {source}")]
    Audit {
        target: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Probes(#[from] crate::probes::ProbesRequired),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("cannot listen on {addr} ({what}): {source}; is another process using it?")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("cannot set up trace export to {endpoint}: {message}")]
    Telemetry { endpoint: String, message: String },
    #[error("the {what} server failed: {message}")]
    Serve { what: &'static str, message: String },
}

/// A daemon whose listeners are bound; [`Server::run`] serves until shutdown.
pub struct Server {
    state: Arc<State>,
    http: TcpListener,
    grpc: Option<TcpListener>,
    limits: Arc<connections::Limits>,
}

impl Server {
    /// Opens the audit log, starts the engine and binds the listeners of
    /// `config`. Policies are loaded by [`Server::run`], so the addresses are
    /// known (and `/readyz` answers) before the modules are compiled.
    ///
    /// Last, it installs the seccomp allowlist of `server.syscall_filter` on
    /// every thread of the process (unless `off`): an embedder's process is
    /// confined from then on as the daemon is.
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let audit = AuditLog::open(&config.audit.target).map_err(|source| ServeError::Audit {
            target: match &config.audit.target {
                AuditTarget::Stdout => "(stdout)".to_owned(),
                AuditTarget::File(path) => path.display().to_string(),
            },
            source,
        })?;
        let engine = Engine::new(&config.engine)?;
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { what, addr, source })
        };
        let http = bind("http", config.server.listen).await?;
        let grpc = match config.server.grpc_listen {
            Some(addr) => Some(bind("grpc", addr).await?),
            None => None,
        };
        let tracing = Tracing::start(&config.telemetry).map_err(|e| ServeError::Telemetry {
            endpoint: config.telemetry.otlp_endpoint.clone().unwrap_or_default(),
            message: format!("{e:#}"),
        })?;
        // The text the first generation came from, so a file event that
        // changes nothing does not reload.
        let config_digest = tokio::fs::read(&config.source)
            .await
            .ok()
            .map(|text| Digest::of(&text));
        let probes = Probes::start(config.ebpf, config.ebpf_enforce, &audit)?;
        // After everything above that needs more (binding, loading the
        // probes, starting the runtime's and exporters' threads); threads
        // started later inherit the filter.
        let seccomp = crate::seccomp::Filter::install(config.server.syscall_filter)?;
        let server_settings = config.server.clone();
        let state = Arc::new(State::new(
            config,
            config_digest,
            audit,
            tracing,
            engine,
            probes,
            seccomp,
        ));
        let connection_metrics = state.metrics.connections();
        connection_metrics.listening("http");
        if grpc.is_some() {
            connection_metrics.listening("grpc");
        }
        let limits = Arc::new(connections::Limits::new(
            &server_settings,
            connection_metrics.clone(),
        ));
        Ok(Server {
            state,
            http,
            grpc,
            limits,
        })
    }

    /// The address the HTTP API listens on (the real port when the config said `:0`).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    /// Whether the seccomp allowlist is installed, in which mode, or why not.
    pub fn syscall_filter(&self) -> crate::seccomp::Status {
        self.state.seccomp.status()
    }

    /// The address the ext_authz gRPC service listens on, when configured.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until SIGTERM or SIGINT, then drains; SIGHUP reopens the audit
    /// log and reloads the config and modules.
    pub async fn run_until_signalled(self) -> Result<(), ServeError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| ServeError::Signal {
                signal: name,
                source,
            })
        };
        let mut term = install(SignalKind::terminate(), "SIGTERM")?;
        let mut int = install(SignalKind::interrupt(), "SIGINT")?;
        let mut hup = install(SignalKind::hangup(), "SIGHUP")?;
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reopening the audit log and reloading");
                state.audit.reopen();
                state.reload(reload::Trigger::Signal).await;
            }
        });
        let shutdown = async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "shutting down: finishing in-flight requests");
        };
        self.run(shutdown).await
    }

    /// Loads the policies and serves until `shutdown` completes; then stops
    /// accepting, lets in-flight requests finish (at most [`DRAIN_TIMEOUT`])
    /// and flushes the audit log.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let Server {
            state,
            http,
            grpc,
            limits,
        } = self;
        let first = state.current();
        for name in first.slots.keys() {
            let (state, generation, name) = (Arc::clone(&state), Arc::clone(&first), name.clone());
            tokio::spawn(async move { state.load_initial(&generation, &name).await });
        }
        drop(first);
        reload::watch(&state);

        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let mut http_task = {
            let serving = http::serve(
                http,
                Arc::clone(&state),
                Arc::clone(&limits),
                stopped(stop_rx.clone()),
            );
            tokio::spawn(async move { serving.await.map_err(|e| e.to_string()) })
        };
        let mut grpc_task = grpc.map(|listener| {
            let serving = grpc::serve(
                listener,
                Arc::clone(&state),
                Arc::clone(&limits),
                stopped(stop_rx.clone()),
            );
            tokio::spawn(async move { serving.await.map_err(|e| e.to_string()) })
        });

        let failed = tokio::select! {
            () = shutdown => None,
            r = &mut http_task => Some(("http", r)),
            r = async { match grpc_task.as_mut() { Some(t) => t.await, None => std::future::pending().await } } => Some(("grpc", r)),
        };
        let _ = stop_tx.send(true);
        if let Some((what, result)) = failed {
            state.flush_audit().await;
            let message = match result {
                Ok(Ok(())) => "stopped unexpectedly".to_owned(),
                Ok(Err(e)) => e,
                Err(e) => format!("task failed: {e}"),
            };
            return Err(ServeError::Serve { what, message });
        }

        let started = Instant::now();
        let drain = async {
            let http = http_task.await;
            let grpc = match grpc_task {
                Some(t) => Some(t.await),
                None => None,
            };
            (http, grpc)
        };
        match tokio::time::timeout(DRAIN_TIMEOUT, drain).await {
            Ok((http, grpc)) => {
                for (what, result) in [("http", Some(http)), ("grpc", grpc)] {
                    match result {
                        Some(Ok(Err(e))) => {
                            tracing::error!(server = what, error = %e, "server stopped with an error")
                        }
                        Some(Err(e)) => {
                            tracing::error!(server = what, error = %e, "server task failed")
                        }
                        _ => {}
                    }
                }
                tracing::info!(
                    drained_ms = started.elapsed().as_millis() as u64,
                    "in-flight requests finished"
                );
            }
            Err(_) => tracing::warn!(
                timeout_s = DRAIN_TIMEOUT.as_secs(),
                "in-flight requests did not finish in time; exiting anyway"
            ),
        }
        state.flush_audit().await;
        Ok(())
    }
}

/// At most `max` characters of `text`, for echoing peer-chosen strings.
pub(crate) fn truncated(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}
