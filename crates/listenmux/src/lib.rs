//! `listenmux`: one listening port, several protocols, chosen by the first bytes.
//!
//! A [`ListenMux`] wraps an accept source (TCP, Unix socket, optionally TLS on
//! top of either) and sniffs the first [`MAGIC_LEN`] bytes of every accepted
//! connection in a task of its own. When they equal the magic of a registered
//! [`Handshaker`], the connection is handed to it; anything else goes to the
//! plain gRPC server with the sniffed bytes replayed first, so plain clients
//! share the port untouched.
//!
//! The accept loop never waits on a client: sniffing is bounded by
//! [`MuxConfig::sniff_timeout`] and the number of connections being sniffed (and
//! handshaked) at once by [`MuxConfig::max_pending`]. Those slots are shared
//! fairly between sources ([`SourceLimits`]): each source may hold only its
//! share, and when all are taken a newcomer from a smaller source evicts the
//! oldest pending connection of the biggest one. Refusals and evictions are
//! closed at once and counted.
//!
//! The stream of connections it yields plugs straight into
//! [`tonic::transport::Server::serve_with_incoming`]; handlers find the
//! connection's [`ConnInfo`] in their request extensions. A server built with
//! [`server_builder`] (or carrying a [`ConnectInfoLayer`]) also answers
//! tonic's `Request::remote_addr()`, `local_addr()` and `peer_certs()`.
//!
//! ```no_run
//! # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
//! use listenmux::ListenMux;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! let incoming = ListenMux::builder()
//!     .sniff_timeout(std::time::Duration::from_secs(5))
//!     .build()
//!     .incoming(listener);
//! listenmux::server_builder()
//!     .add_routes(routes)
//!     .serve_with_incoming(incoming)
//!     .await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

mod conn;
mod layer;
mod listener;
mod pending;
mod stats;

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use tokio::{io::AsyncReadExt, sync::mpsc};
use tracing::{debug, info_span, warn, Instrument};

pub use conn::{BoxIo, ConnInfo, Connection, Io, Rewind, Transport};
pub use layer::{server_builder, ConnectInfoLayer, ConnectInfoService};
pub use listener::Listener;
pub use pending::SourceLimits;
pub use stats::{Stats, StatsSnapshot};

/// Length of a handshake magic, in bytes (Gitaly's `backchannel` is 11).
pub const MAGIC_LEN: usize = 11;

/// A handshake magic: the exact first bytes a client sends.
pub type Magic = [u8; MAGIC_LEN];

/// A boxed, sendable future, as returned by [`Handshaker::handshake`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a [`Handshaker`] made of a connection.
#[derive(Debug)]
pub enum Handshaked {
    /// A connection for the gRPC server behind the mux (for example the first
    /// stream of a multiplexed session).
    Connection(Connection),
    /// The handshaker took the connection over entirely; the gRPC server never
    /// sees it.
    Dispatched,
}

/// Why a handshake failed. Logged and counted by the mux; the connection is
/// closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Reading or writing the connection failed.
    #[error("handshake i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer did not complete a step of the handshake in time.
    #[error("handshake timed out after {after:?} waiting for {step}")]
    Timeout {
        /// What the handshake was waiting for (for example "the first
        /// stream").
        step: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// The peer spoke the protocol wrongly.
    #[error("handshake protocol error: {0}")]
    Protocol(Box<dyn std::error::Error + Send + Sync>),
}

/// A protocol that is recognised by its [`Magic`] and takes over the
/// connection after it.
///
/// ```
/// use listenmux::{BoxFuture, BoxIo, ConnInfo, Connection, Handshaked, HandshakeError, Handshaker, Magic};
///
/// /// Answers "pong" to connections that start with `ping-ping-p` and closes them.
/// struct Pong;
/// impl Handshaker for Pong {
///     fn magic(&self) -> Magic { *b"ping-ping-p" }
///     fn handshake(&self, mut io: BoxIo, _info: ConnInfo) -> BoxFuture<Result<Handshaked, HandshakeError>> {
///         Box::pin(async move {
///             use tokio::io::AsyncWriteExt;
///             io.write_all(b"pong").await?;
///             Ok(Handshaked::Dispatched)
///         })
///     }
/// }
/// let mux = listenmux::ListenMux::builder().handshaker(Pong).build();
/// # drop(mux);
/// ```
pub trait Handshaker: Send + Sync + 'static {
    /// The magic that selects this handshaker.
    fn magic(&self) -> Magic;

    /// Takes over `io`, whose magic has already been read. `info` describes
    /// the connection; a handshaker may add its own data (a peer identity,
    /// say) to [`ConnInfo::extensions_mut`] of the connection it returns.
    fn handshake(&self, io: BoxIo, info: ConnInfo)
        -> BoxFuture<Result<Handshaked, HandshakeError>>;
}

/// Settings of a [`ListenMux`].
///
/// ```
/// use std::time::Duration;
/// let config = listenmux::MuxConfig::default()
///     .with_sniff_timeout(Duration::from_secs(3))
///     .with_max_pending(256);
/// assert_eq!(config.sniff_timeout(), Duration::from_secs(3));
/// assert_eq!(config.max_pending(), 256);
/// ```
#[derive(Clone, Debug)]
pub struct MuxConfig {
    sniff_timeout: Duration,
    max_pending: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            sniff_timeout: Duration::from_secs(10),
            max_pending: 1024,
        }
    }
}

impl MuxConfig {
    /// How long a new connection may take to send its first bytes (and, with
    /// TLS, to finish the TLS handshake before that). Default 10 s.
    pub fn sniff_timeout(&self) -> Duration {
        self.sniff_timeout
    }

    /// Sets [`sniff_timeout`](Self::sniff_timeout).
    pub fn with_sniff_timeout(mut self, timeout: Duration) -> Self {
        self.sniff_timeout = timeout;
        self
    }

    /// How many connections may be sniffed or handshaked at once; further
    /// connections are closed immediately and counted in
    /// [`StatsSnapshot::rejected_overload`]. Default 1024.
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// Sets [`max_pending`](Self::max_pending) (at least 1).
    pub fn with_max_pending(mut self, max: usize) -> Self {
        self.max_pending = max.max(1);
        self
    }
}

struct Inner {
    config: MuxConfig,
    handshakers: Vec<Arc<dyn Handshaker>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<Stats>,
    limits: SourceLimits,
}

/// Routes accepted connections by their first bytes. See the crate docs.
///
/// Built with [`ListenMux::builder`]; cheap to clone, and every clone (and
/// every listener given to [`incoming`](Self::incoming)) shares the
/// handshakers, the TLS acceptor and the [`Stats`].
#[derive(Clone)]
pub struct ListenMux {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ListenMux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let magics: Vec<_> = self
            .inner
            .handshakers
            .iter()
            .map(|h| String::from_utf8_lossy(&h.magic()).into_owned())
            .collect();
        f.debug_struct("ListenMux")
            .field("config", &self.inner.config)
            .field("handshakers", &magics)
            .field("tls", &self.inner.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Configures a [`ListenMux`]: settings, handshakers, TLS.
///
/// ```
/// # use listenmux::*;
/// # struct H; impl Handshaker for H { fn magic(&self) -> Magic { *b"xxxxxxxxxxx" }
/// # fn handshake(&self, _: BoxIo, _: ConnInfo) -> BoxFuture<Result<Handshaked, HandshakeError>> { Box::pin(async { Ok(Handshaked::Dispatched) }) } }
/// let mux = ListenMux::builder()
///     .max_pending(512)
///     .handshaker(H)
///     .build();
/// assert_eq!(mux.stats().snapshot().accepted, 0);
/// ```
pub struct ListenMuxBuilder {
    config: MuxConfig,
    handshakers: Vec<Arc<dyn Handshaker>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: SourceLimits,
}

impl std::fmt::Debug for ListenMuxBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenMuxBuilder")
            .field("config", &self.config)
            .field("handshakers", &self.handshakers.len())
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .finish()
    }
}

impl ListenMuxBuilder {
    /// Replaces all settings.
    pub fn config(mut self, config: MuxConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets [`MuxConfig::sniff_timeout`].
    pub fn sniff_timeout(mut self, timeout: Duration) -> Self {
        self.config = self.config.with_sniff_timeout(timeout);
        self
    }

    /// Sets [`MuxConfig::max_pending`].
    pub fn max_pending(mut self, max: usize) -> Self {
        self.config = self.config.with_max_pending(max);
        self
    }

    /// Registers a handshaker. A later handshaker with the same magic replaces
    /// the earlier one.
    pub fn handshaker(mut self, handshaker: impl Handshaker) -> Self {
        let magic = handshaker.magic();
        self.handshakers.retain(|h| h.magic() != magic);
        self.handshakers.push(Arc::new(handshaker));
        self
    }

    /// Terminates TLS on every accepted connection before sniffing; the magic
    /// is then read from the decrypted bytes. The peer's certificates (when the
    /// acceptor asks for them) appear in [`ConnInfo::peer_certs`].
    ///
    /// ```no_run
    /// # fn f(config: std::sync::Arc<tokio_rustls::rustls::ServerConfig>) {
    /// let mux = listenmux::ListenMux::builder()
    ///     .tls(tokio_rustls::TlsAcceptor::from(config))
    ///     .build();
    /// # drop(mux); }
    /// ```
    pub fn tls(mut self, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        self.tls = Some(acceptor);
        self
    }

    /// Shares the [`MuxConfig::max_pending`] slots fairly between sources:
    /// a per-source limit, and eviction of the biggest source's oldest
    /// pending connection when all slots are taken (see [`SourceLimits`]).
    /// On by default with [`SourceLimits::default`].
    ///
    /// ```
    /// let mux = listenmux::ListenMux::builder()
    ///     .source_limits(listenmux::SourceLimits::default().with_max_per_source(32))
    ///     .build();
    /// # drop(mux);
    /// ```
    pub fn source_limits(mut self, limits: SourceLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The mux.
    pub fn build(self) -> ListenMux {
        ListenMux {
            inner: Arc::new(Inner {
                config: self.config,
                handshakers: self.handshakers,
                tls: self.tls,
                stats: Arc::new(Stats::default()),
                limits: self.limits,
            }),
        }
    }
}

impl ListenMux {
    /// A builder with [`MuxConfig::default`] settings, no handshakers and no
    /// TLS (every connection goes to the gRPC server as it is).
    ///
    /// ```
    /// let mux = listenmux::ListenMux::builder().build();
    /// assert_eq!(mux.stats().snapshot().accepted, 0);
    /// ```
    pub fn builder() -> ListenMuxBuilder {
        ListenMuxBuilder {
            config: MuxConfig::default(),
            handshakers: Vec::new(),
            tls: None,
            limits: SourceLimits::default(),
        }
    }

    /// Counters of what the mux has seen so far.
    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }

    /// Starts accepting on `listener` in a background task and returns the
    /// stream of connections for the gRPC server. Dropping the stream stops the
    /// accept loop and closes the listener.
    ///
    /// ```no_run
    /// # async fn f() -> std::io::Result<()> {
    /// let listener = tokio::net::UnixListener::bind("/tmp/example.sock")?;
    /// let incoming = listenmux::ListenMux::builder().build().incoming(listener);
    /// # drop(incoming); Ok(()) }
    /// ```
    pub fn incoming<L: Listener>(&self, listener: L) -> Incoming {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(listener, self.inner.clone(), tx));
        Incoming {
            rx,
            _accept_loop: AbortOnDrop(task),
        }
    }
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connections a [`ListenMux`] hands to the gRPC server: plain ones with
/// their sniffed bytes replayed, and those returned by handshakers.
///
/// It never yields an error; accept and handshake failures are logged and
/// counted in [`Stats`].
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Connection>,
    /// Stops the accept loop (and closes the listener) when dropped.
    _accept_loop: AbortOnDrop,
}

impl Stream for Incoming {
    type Item = Result<Connection, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

async fn accept_loop<L: Listener>(
    mut listener: L,
    inner: Arc<Inner>,
    tx: mpsc::Sender<Connection>,
) {
    let pending = pending::Pending::new(inner.config.max_pending, inner.limits);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = tx.closed() => return,
        };
        match accepted {
            Ok((io, info)) => {
                backoff = Duration::from_millis(5);
                inner.stats.inc(&inner.stats.accepted);
                let admitted = match pending.admit(pending::SourceKey::of(info.remote_addr())) {
                    Ok(a) => a,
                    Err(pending::Refused::SourceLimit) => {
                        inner.stats.inc(&inner.stats.rejected_source_limit);
                        debug!(remote = ?info.remote_addr(), max_per_source = inner.limits.max_per_source,
                            "too many pending connections from this source; closing the new one");
                        continue;
                    }
                    Err(pending::Refused::Overload) => {
                        inner.stats.inc(&inner.stats.rejected_overload);
                        warn!(remote = ?info.remote_addr(), max_pending = inner.config.max_pending,
                            "too many connections being sniffed; closing the new one");
                        continue;
                    }
                };
                if admitted.made_room {
                    inner.stats.inc(&inner.stats.evicted);
                }
                let span = info_span!("listenmux_conn", remote = ?info.remote_addr());
                let work = sniff_and_route(
                    Box::new(io),
                    info,
                    inner.clone(),
                    tx.clone(),
                    admitted.guard,
                );
                let on_evict =
                    || debug!("pending connection evicted for a newcomer from another source");
                tokio::spawn(pending::evictable(admitted.evicted, on_evict, work).instrument(span));
            }
            Err(err) => {
                // Out of file descriptors and similar resource errors: back off
                // instead of spinning. Other errors concern one connection only.
                warn!(error = %err, "accept failed");
                if is_resource_error(&err) {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

fn is_resource_error(err: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM
    matches!(err.raw_os_error(), Some(23 | 24 | 105 | 12))
}

/// What sniffing read: a connection, its first bytes and how many there are.
struct Sniffed {
    io: BoxIo,
    info: ConnInfo,
    buf: [u8; MAGIC_LEN],
    len: usize,
}

async fn sniff_and_route(
    io: BoxIo,
    info: ConnInfo,
    inner: Arc<Inner>,
    tx: mpsc::Sender<Connection>,
    permit: pending::PendingGuard,
) {
    let stats = &inner.stats;
    let timeout = inner.config.sniff_timeout;
    let sniffed = match tokio::time::timeout(timeout, sniff(io, info, &inner)).await {
        Err(_) => {
            stats.inc(&stats.sniff_timeouts);
            debug!(
                ?timeout,
                "closing connection: no magic or preface within the sniff timeout"
            );
            return;
        }
        Ok(Err(SniffError::Tls(err))) => {
            stats.inc(&stats.tls_failures);
            debug!(error = %err, "closing connection: TLS handshake failed");
            return;
        }
        Ok(Err(SniffError::Io(err))) => {
            stats.inc(&stats.sniff_errors);
            debug!(error = %err, "closing connection: failed before its first bytes");
            return;
        }
        Ok(Ok(s)) => s,
    };
    let Sniffed { io, info, buf, len } = sniffed;
    let handshaker = (len == MAGIC_LEN)
        .then(|| inner.handshakers.iter().find(|h| h.magic() == buf))
        .flatten();
    let conn = match handshaker {
        None => {
            stats.inc(&stats.plain);
            let prefix = Bytes::copy_from_slice(&buf[..len]);
            Connection::new(Box::new(Rewind::new(prefix, io)), info)
        }
        Some(h) => {
            stats.inc(&stats.handshakes);
            match h.handshake(io, info).await {
                Ok(Handshaked::Connection(conn)) => conn,
                Ok(Handshaked::Dispatched) => return,
                Err(err) => {
                    stats.inc(&stats.handshake_failures);
                    stats.inc(match err {
                        HandshakeError::Timeout { .. } => &stats.handshake_timeouts,
                        HandshakeError::Io(_) => &stats.handshake_io_errors,
                        HandshakeError::Protocol(_) => &stats.handshake_protocol_errors,
                    });
                    warn!(error = %err, magic = %String::from_utf8_lossy(&buf), "handshake failed");
                    return;
                }
            }
        }
    };
    drop(permit);
    if tx.send(conn).await.is_err() {
        debug!("server stopped accepting; dropping connection");
    }
}

/// Why sniffing a connection failed.
enum SniffError {
    Tls(io::Error),
    Io(io::Error),
}

impl From<io::Error> for SniffError {
    fn from(e: io::Error) -> Self {
        SniffError::Io(e)
    }
}

async fn sniff(io: BoxIo, mut info: ConnInfo, inner: &Inner) -> Result<Sniffed, SniffError> {
    let mut io = match &inner.tls {
        None => io,
        Some(acceptor) => {
            let io = conn::WithTcpInfo {
                io,
                info: info.tcp_connect_info(),
            };
            let tls = acceptor.accept(io).await.map_err(SniffError::Tls)?;
            info.set_tls(tonic::transport::server::Connected::connect_info(&tls));
            Box::new(tls) as BoxIo
        }
    };
    let mut buf = [0u8; MAGIC_LEN];
    let mut len = 0;
    while len < MAGIC_LEN {
        let n = io.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        // Stop as soon as no magic can match: a plain HTTP/2 client (whose
        // preface starts with 'P') is routed after its first read.
        if !inner
            .handshakers
            .iter()
            .any(|h| h.magic()[..len] == buf[..len])
        {
            break;
        }
    }
    if len == 0 {
        return Err(SniffError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before sending anything",
        )));
    }
    Ok(Sniffed { io, info, buf, len })
}

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
