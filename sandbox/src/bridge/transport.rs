//! The bridge's HTTP/1.1 client: one policy's connections, kept alive between
//! calls and driven only from inside the call that uses them.
//!
//! `Bridge::send` is the only caller. No connection runs in a task of its
//! own: the future of the call that has checked a connection out polls it
//! while it sends the request and reads the body, so every socket syscall of
//! a bridged call happens inside a poll of its evaluation. Between calls a
//! connection sits idle in the pool, polled by no one.

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls_platform_verifier::BuilderVerifierExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::{Host, Position, Url};

use crate::probes::Confinement;

/// Idle connections kept per origin (scheme, host and port); one returned
/// beyond that is closed. Only origins under `egress.allow` are ever
/// reached, so the allowlist bounds the pool.
pub const MAX_IDLE_PER_ORIGIN: usize = 16;
/// How long a connection may sit idle before it is closed instead of reused,
/// as reqwest's pool did. Expired connections are closed at the next
/// checkout or return for their origin, or when the policy is unloaded.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keepalive probes on open connections, as reqwest set them.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Unacknowledged data older than this fails the connection, as with reqwest.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

type Body = Full<Bytes>;

/// A TCP or TLS stream, whichever the scheme asks for.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

type Io = TokioIo<Box<dyn Stream>>;

/// Why a request got no response, or not all of its body.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{url} cannot be sent as an HTTP/1.1 request: {reason}")]
    Request { url: String, reason: String },
    #[error("cannot resolve {origin}: {source}")]
    Resolve {
        origin: Origin,
        source: std::io::Error,
    },
    #[error("cannot connect to {origin}: {source}")]
    Connect {
        origin: Origin,
        source: std::io::Error,
    },
    #[error("TLS handshake with {origin} failed: {source}")]
    Tls {
        origin: Origin,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {origin} failed: {source}")]
    Http {
        origin: Origin,
        source: hyper::Error,
    },
}

/// Where a connection goes: connections are pooled and reused per origin.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    tls: bool,
    host: Host<String>,
    port: u16,
}

impl Origin {
    fn of(url: &Url) -> Result<Origin, Error> {
        let invalid = |reason: &str| Error::Request {
            url: url.to_string(),
            reason: reason.to_owned(),
        };
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => return Err(invalid("the scheme is neither http nor https")),
        };
        let (Some(host), Some(port)) = (url.host(), url.port_or_known_default()) else {
            return Err(invalid("it has no host"));
        };
        Ok(Origin {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// One HTTP/1.1 connection: the half that sends requests and the future
/// that does the connection's I/O, `None` once that future has finished
/// (the peer closed or the connection failed).
struct Connection {
    sender: http1::SendRequest<Body>,
    driver: Option<http1::Connection<Io, Body>>,
}

impl Connection {
    /// Whether the connection can still carry a request.
    fn is_open(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }
}

/// Runs `work` to completion while polling `driver`, the connection's I/O,
/// in the same task. A driver that finishes is dropped, which fails
/// whatever `work` still waits for on that connection.
async fn drive<T>(
    driver: &mut Option<http1::Connection<Io, Body>>,
    work: impl Future<Output = T>,
) -> T {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if let Some(connection) = driver
            && Pin::new(connection).poll(cx).is_ready()
        {
            *driver = None;
        }
        work.as_mut().poll(cx)
    })
    .await
}

/// Polls `driver` once, so that a connection whose exchange just ended
/// settles: idle and ready for the next request, or finished when the peer
/// asked to close it.
async fn settle(driver: &mut Option<http1::Connection<Io, Body>>) {
    poll_fn(|cx| {
        if let Some(connection) = driver
            && Pin::new(connection).poll(cx).is_ready()
        {
            *driver = None;
        }
        Poll::Ready(())
    })
    .await;
}

struct Idle {
    connection: Connection,
    since: Instant,
}

/// One policy's HTTP/1.1 client and its pool of idle connections.
///
/// Guarantees: a connection is only ever polled by the call that has it
/// checked out, so connect, TLS handshake, writes, reads and the close of a
/// dropped connection all happen inside that call's polls. Name resolution
/// is the exception: `tokio::net::lookup_host` runs on tokio's blocking pool,
/// so its syscalls are not the calling evaluation's (IP literals skip it).
///
/// Limits: at most [`MAX_IDLE_PER_ORIGIN`] idle connections per origin, none
/// older than [`IDLE_TIMEOUT`]. A connection is returned only after its
/// response body was read to the end; one dropped earlier (a body over the
/// size limit, a timeout) is closed. A connection the peer closes while idle
/// stays open on this side until it is checked out or expires.
///
/// Not supported: HTTP/2 (hyper's HTTP/2 client runs each connection in a
/// task it spawns, so TLS offers only `http/1.1`), proxies, and Happy
/// Eyeballs: a name's addresses are tried one at a time, in the resolver's
/// order.
pub struct Transport {
    tls: TlsConnector,
    idle: Mutex<HashMap<Origin, Vec<Idle>>>,
    /// The policy's grants for BPF LSM enforcement: the addresses a
    /// connection goes to are permitted there before it connects.
    pub(super) confinement: Option<Arc<Confinement>>,
}

impl Transport {
    /// A client trusting the platform's roots (rustls-platform-verifier,
    /// as reqwest did), with the process's rustls provider.
    pub fn new() -> Result<Transport, rustls::Error> {
        crate::install_tls_provider();
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)?
            .with_platform_verifier()?
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Transport {
            tls: TlsConnector::from(Arc::new(config)),
            idle: Mutex::new(HashMap::new()),
            confinement: None,
        })
    }

    /// Sends one request to `url` on an idle connection to its origin, or a
    /// new one, and waits for the response head. Adds `Host`; the caller
    /// sets every other header. Not bounded in time: the caller's deadline
    /// drops the future, and the connection with it.
    pub async fn send(
        &self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<'_>, Error> {
        let origin = Origin::of(url)?;
        let mut request = request(method, url, headers, body)?;
        // An idle connection the peer has closed in the meantime fails at
        // checkout, or refuses the request before writing any of it; either
        // way the request goes on to another connection.
        while let Some(mut connection) = self.checkout(&origin) {
            let ready = drive(&mut connection.driver, connection.sender.ready()).await;
            if ready.is_err() || connection.driver.is_none() {
                continue;
            }
            let pending = connection.sender.try_send_request(request);
            match drive(&mut connection.driver, pending).await {
                Ok(response) => return Ok(Response::new(self, origin, connection, response)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => {
                        return Err(Error::Http {
                            origin,
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
        let mut connection = self.connect(&origin).await?;
        let pending = connection.sender.send_request(request);
        match drive(&mut connection.driver, pending).await {
            Ok(response) => Ok(Response::new(self, origin, connection, response)),
            Err(source) => Err(Error::Http { origin, source }),
        }
    }

    /// The most recently returned idle connection to `origin` that has not
    /// expired.
    fn checkout(&self, origin: &Origin) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(origin)?;
        let newest = list.pop()?;
        if newest.since.elapsed() < IDLE_TIMEOUT {
            return Some(newest.connection);
        }
        // Returned in order, so all the others are older still.
        let expired = std::mem::take(list);
        drop(idle);
        drop(expired);
        None
    }

    /// Puts a connection whose exchange is complete back in the pool.
    fn checkin(&self, origin: Origin, connection: Connection) {
        if !connection.is_open() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(origin).or_default();
        let expired: Vec<Idle> = list
            .extract_if(.., |i| i.since.elapsed() >= IDLE_TIMEOUT)
            .collect();
        let surplus = if list.len() < MAX_IDLE_PER_ORIGIN {
            list.push(Idle {
                connection,
                since: Instant::now(),
            });
            None
        } else {
            Some(connection)
        };
        drop(idle);
        drop((expired, surplus));
    }

    /// Opens a connection to `origin`: TCP, then TLS for https.
    async fn connect(&self, origin: &Origin) -> Result<Connection, Error> {
        let connect_error = |source| Error::Connect {
            origin: origin.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = match &origin.host {
            Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), origin.port)],
            Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(*ip), origin.port)],
            Host::Domain(name) => tokio::net::lookup_host((name.as_str(), origin.port))
                .await
                .map_err(|source| Error::Resolve {
                    origin: origin.clone(),
                    source,
                })?
                .collect(),
        };
        // What the policy's egress resolved to is what its invocation may
        // connect to (BPF LSM enforcement).
        if let Some(confinement) = &self.confinement {
            confinement.permit_connect(&addrs);
        }
        let tcp = connect_to(addrs).await.map_err(connect_error)?;
        configure(&tcp).map_err(connect_error)?;
        let stream: Box<dyn Stream> = if origin.tls {
            let tls_error = |source| Error::Tls {
                origin: origin.clone(),
                source,
            };
            let name = match &origin.host {
                Host::Ipv4(ip) => ServerName::IpAddress(IpAddr::V4(*ip).into()),
                Host::Ipv6(ip) => ServerName::IpAddress(IpAddr::V6(*ip).into()),
                Host::Domain(name) => ServerName::try_from(name.clone()).map_err(|e| {
                    tls_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                })?,
            };
            Box::new(self.tls.connect(name, tcp).await.map_err(tls_error)?)
        } else {
            Box::new(tcp)
        };
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Http {
                origin: origin.clone(),
                source,
            })?;
        Ok(Connection {
            sender,
            driver: Some(driver),
        })
    }
}

/// Connects to the first of `addrs` that accepts, in the resolver's order.
async fn connect_to(addrs: impl IntoIterator<Item = SocketAddr>) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name resolved to no address",
        )
    }))
}

/// The socket options reqwest set: no Nagle delay, keepalive probes, and a
/// bound on unacknowledged data.
fn configure(tcp: &TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let socket = socket2::SockRef::from(tcp);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE)
            .with_interval(TCP_KEEPALIVE)
            .with_retries(TCP_KEEPALIVE_RETRIES),
    )?;
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
    Ok(())
}

/// The request as HTTP/1.1 sends it to an origin server: the path and query
/// as its target, the URL's host and any non-default port as `Host`.
fn request(
    method: Method,
    url: &Url,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<Request<Body>, Error> {
    let invalid = |reason: String| Error::Request {
        url: url.to_string(),
        reason,
    };
    let target: Uri = url[Position::BeforePath..Position::AfterQuery]
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
    let host = HeaderValue::from_str(&url[Position::BeforeHost..Position::AfterPort])
        .map_err(|e| invalid(e.to_string()))?;
    headers.insert(HOST, host);
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = target;
    *request.headers_mut() = headers;
    Ok(request)
}

/// A response whose body is still on its connection. Reading the body to
/// its end returns the connection to the pool; dropping the response before
/// that closes the connection, the rest unread.
pub struct Response<'t> {
    head: http::response::Parts,
    body: Incoming,
    connection: Option<Connection>,
    origin: Origin,
    transport: &'t Transport,
}

impl<'t> Response<'t> {
    fn new(
        transport: &'t Transport,
        origin: Origin,
        connection: Connection,
        response: http::Response<Incoming>,
    ) -> Response<'t> {
        let (head, body) = response.into_parts();
        Response {
            head,
            body,
            connection: Some(connection),
            origin,
            transport,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.head.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.head.headers
    }

    /// The body's length, when the peer announced it.
    pub fn content_length(&self) -> Option<u64> {
        self.body.size_hint().exact()
    }

    /// The next piece of the body, or `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            let mut closed = None;
            let driver = match &mut self.connection {
                Some(connection) => &mut connection.driver,
                None => &mut closed,
            };
            let frame = drive(driver, self.body.frame()).await;
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Some(data));
                    }
                }
                Some(Err(source)) => {
                    self.connection = None;
                    return Err(Error::Http {
                        origin: self.origin.clone(),
                        source,
                    });
                }
                None => {
                    if let Some(mut connection) = self.connection.take() {
                        settle(&mut connection.driver).await;
                        self.transport.checkin(self.origin.clone(), connection);
                    }
                    return Ok(None);
                }
            }
        }
    }
}
