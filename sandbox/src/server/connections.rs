//! Admission and lifetime of client connections on both listeners (issue:
//! stalled clients must not exhaust the daemon's file descriptors). One cap,
//! `server.max_connections`, covers the HTTP and gRPC listeners together; a
//! connection over it is closed at once, counted and logged (at most every
//! [`WARN_EVERY`]). [`Watched`] enforces the header-read and idle timeouts on
//! the socket itself, so no request handler has to.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::config::ServerSettings;
use crate::telemetry::{ConnectionMetrics, OpenConnection, TimeoutPhase};

/// The least time between two warnings about refused connections or failed accepts.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long the accept loop waits after a failed accept (out of descriptors,
/// most likely) before trying again, so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The answer a connection over the cap gets before it is closed (written
/// only if the socket takes it at once; the accept loop never waits).
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\nx-sandgate-error: internal\r\ncontent-type: text/plain\r\ncontent-length: 42\r\n\r\nserver.max_connections connections are open";
/// An HTTP/2 connection is established once its client preface (24 bytes)
/// and first frame header (9 bytes) arrived.
const H2_HANDSHAKE_BYTES: u64 = 24 + 9;

/// The cap and timeouts shared by both listeners.
pub(super) struct Limits {
    permits: Arc<Semaphore>,
    max: u64,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    metrics: ConnectionMetrics,
    warned: Mutex<Warned>,
}

#[derive(Default)]
struct Warned {
    refused_at: Option<Instant>,
    accept_failed_at: Option<Instant>,
}

/// A connection let in: it holds a place under the cap until dropped.
pub(super) struct Admitted {
    pub stream: Watched<TcpStream>,
    pub peer: SocketAddr,
    pub watch: Arc<Watch>,
}

impl Limits {
    pub(super) fn new(settings: &ServerSettings, metrics: ConnectionMetrics) -> Limits {
        let max = settings.max_connections.limit;
        metrics.set_max(max);
        match settings.max_connections.derived_from {
            Some(nofile) => tracing::info!(
                max_connections = max,
                rlimit_nofile = nofile,
                "connection cap derived from the open-files limit (set server.max_connections to choose it)"
            ),
            None => tracing::info!(max_connections = max, "connection cap"),
        }
        Limits {
            permits: Arc::new(Semaphore::new(
                usize::try_from(max).unwrap_or(Semaphore::MAX_PERMITS),
            )),
            max,
            header_read_timeout: settings.header_read_timeout,
            idle_timeout: settings.idle_timeout,
            metrics,
            warned: Mutex::new(Warned::default()),
        }
    }

    /// Waits for the next connection on `listener` that fits under the cap;
    /// the ones that do not are answered 503 and closed meanwhile.
    pub(super) async fn accept(&self, listener: &TcpListener, kind: Listener) -> Admitted {
        let name = kind.name();
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    if self.may_warn(|w| &mut w.accept_failed_at) {
                        tracing::warn!(listener = name, error = %e, "cannot accept a connection; retrying");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                self.refuse(stream, peer, kind);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let watch = Arc::new(Watch::new(
                kind,
                self.header_read_timeout,
                self.idle_timeout,
                self.metrics.clone(),
                self.metrics.opened(name),
                permit,
            ));
            return Admitted {
                stream: Watched::new(stream, Arc::clone(&watch)),
                peer,
                watch,
            };
        }
    }

    fn refuse(&self, stream: TcpStream, peer: SocketAddr, kind: Listener) {
        let total = self.metrics.refused(kind.name());
        if kind == Listener::Http {
            // Unread bytes would turn the close into a reset that discards
            // the answer: take what has arrived (without waiting) first.
            let mut arrived = [0u8; 4096];
            let _ = stream.try_read(&mut arrived);
            let _ = stream.try_write(REFUSAL);
        }
        drop(stream);
        if self.may_warn(|w| &mut w.refused_at) {
            tracing::warn!(
                listener = kind.name(),
                peer = %peer,
                max_connections = self.max,
                refused_total = total,
                "connection refused: server.max_connections connections are open"
            );
        }
    }

    /// Whether a warning may be logged now (at most one every [`WARN_EVERY`]).
    fn may_warn(&self, last: impl FnOnce(&mut Warned) -> &mut Option<Instant>) -> bool {
        let mut warned = match self.warned.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let last = last(&mut warned);
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Listener {
    /// HTTP/1.1 (or h2c): requests come and go; header-read and idle timeouts apply.
    Http,
    /// ext_authz over HTTP/2: the handshake must arrive within the
    /// header-read timeout; HTTP/2 keep-alive pings watch the peer after that.
    Grpc,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Http => "http",
            Listener::Grpc => "grpc",
        }
    }
}

const NONE: u64 = u64::MAX;

/// What the timeouts of one connection depend on: whether a request is being
/// handled, since when it has been idle, and since when the next request's
/// head has been arriving.
pub(super) struct Watch {
    kind: Listener,
    started: Instant,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` at which the last request ended.
    idle_since: AtomicU64,
    /// Milliseconds after `started` of the first byte of the next request, or `NONE`.
    head_since: AtomicU64,
    bytes_read: AtomicU64,
    /// Signalled when the deadline may have moved (a request began or ended,
    /// the next request's first bytes arrived).
    changed: Notify,
    expired: AtomicBool,
    metrics: ConnectionMetrics,
    _open: OpenConnection,
    _permit: OwnedSemaphorePermit,
}

impl Watch {
    fn new(
        kind: Listener,
        header_read_timeout: Duration,
        idle_timeout: Duration,
        metrics: ConnectionMetrics,
        open: OpenConnection,
        permit: OwnedSemaphorePermit,
    ) -> Watch {
        Watch {
            kind,
            started: Instant::now(),
            header_read_timeout,
            idle_timeout,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            bytes_read: AtomicU64::new(0),
            changed: Notify::new(),
            expired: AtomicBool::new(false),
            metrics,
            _open: open,
            _permit: permit,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Marks a request as being handled (its head has arrived) until the guard
    /// is dropped: no timeout runs meanwhile, the policy's own deadline does.
    pub(super) fn request(self: &Arc<Self>) -> Handling {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NONE, Ordering::Release);
        self.changed.notify_one();
        Handling {
            watch: Arc::clone(self),
        }
    }

    fn saw_bytes(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Acquire) == 0
            && self
                .head_since
                .compare_exchange(NONE, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.changed.notify_one();
        }
    }

    /// Completes when the connection has waited longer than its timeout
    /// allows, with the phase it was in; never while a request is handled.
    /// The HTTP listener races each connection against it: hyper does not
    /// read an idle keep-alive socket again until the client sends something,
    /// so a timer on the socket alone would never fire there.
    pub(super) async fn expired(&self) -> TimeoutPhase {
        loop {
            let changed = self.changed.notified();
            match self.deadline() {
                None => changed.await,
                Some((deadline, phase)) => {
                    if Instant::now() >= deadline {
                        self.expire(phase);
                        return phase;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }

    /// Counts and logs the timeout, once per connection.
    fn expire(&self, phase: TimeoutPhase) {
        if !self.expired.swap(true, Ordering::AcqRel) {
            self.metrics.timed_out(self.kind.name(), phase);
            tracing::debug!(
                listener = self.kind.name(),
                phase = phase.as_str(),
                "connection closed: timed out"
            );
        }
    }

    /// When the connection times out if nothing changes, and why.
    fn deadline(&self) -> Option<(Instant, TimeoutPhase)> {
        let at = |ms: u64, timeout: Duration| self.started + Duration::from_millis(ms) + timeout;
        match self.kind {
            Listener::Grpc => (self.bytes_read.load(Ordering::Relaxed) < H2_HANDSHAKE_BYTES)
                .then(|| (at(0, self.header_read_timeout), TimeoutPhase::Header)),
            Listener::Http => {
                if self.in_flight.load(Ordering::Acquire) > 0 {
                    return None;
                }
                match self.head_since.load(Ordering::Acquire) {
                    NONE => Some((
                        at(self.idle_since.load(Ordering::Acquire), self.idle_timeout),
                        TimeoutPhase::Idle,
                    )),
                    since => Some((at(since, self.header_read_timeout), TimeoutPhase::Header)),
                }
            }
        }
    }
}

/// A request being handled; see [`Watch::request`].
pub(super) struct Handling {
    watch: Arc<Watch>,
}

impl Drop for Handling {
    fn drop(&mut self) {
        let watch = &self.watch;
        if watch.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            watch.idle_since.store(watch.now_ms(), Ordering::Release);
            watch.changed.notify_one();
        }
    }
}

/// A client socket that fails with `TimedOut` once its [`Watch`] says the
/// connection has waited too long, which makes hyper close it. Checked on
/// every read and whenever a read or write would wait, so a client trickling
/// bytes is cut off as surely as a silent one.
pub(super) struct Watched<IO> {
    io: IO,
    watch: Arc<Watch>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl<IO> Watched<IO> {
    fn new(io: IO, watch: Arc<Watch>) -> Watched<IO> {
        Watched {
            io,
            watch,
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
        }
    }

    fn expire(&mut self, phase: TimeoutPhase) -> io::Error {
        self.watch.expire(phase);
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connection {} timeout", phase.as_str()),
        )
    }

    /// Fails when the deadline has passed.
    fn check(&mut self) -> io::Result<()> {
        match self.watch.deadline() {
            Some((deadline, phase)) if Instant::now() >= deadline => Err(self.expire(phase)),
            _ => Ok(()),
        }
    }

    /// Before returning `Pending`: wakes the task at the deadline, or fails
    /// when it has passed.
    fn wait(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some((deadline, phase)) = self.watch.deadline() else {
            return Ok(());
        };
        if self.armed != Some(deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Err(self.expire(phase)),
            Poll::Pending => Ok(()),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.watch.saw_bytes(n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                this.wait(cx)?;
                Poll::Pending
            }
            failed => failed,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending => {
                this.wait(cx)?;
                Poll::Pending
            }
            done => done,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => {
                this.wait(cx)?;
                Poll::Pending
            }
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => {
                this.wait(cx)?;
                Poll::Pending
            }
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Watched<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
