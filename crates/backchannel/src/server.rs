//! The server side: magic → yamux server session → stream 1 is the client's
//! gRPC connection; the registry gets a reverse channel.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::SystemTime,
};

use backchannel_yamux::Mode;
use hyper_util::rt::TokioIo;
use listenmux::{
    BoxFuture, BoxIo, ConnInfo, Connection, HandshakeError, Handshaked, Handshaker, Magic, Rewind,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::Endpoint;
use tracing::{info, info_span, Instrument};

use crate::{
    config::SessionConfig,
    registry::{PeerInfo, Registry},
    session::{self, CloseOnDrop, SessionHandle},
    stream::YamuxStream,
    Error, PeerChannel, MAGIC,
};

/// The [`Handshaker`] to register with a [`listenmux::ListenMux`] on the
/// server: it turns every connection that starts with the magic into a peer
/// in the [`Registry`].
///
/// The connection it hands to the gRPC server (stream 1) carries the
/// underlying connection's [`ConnInfo`] (so `Request::remote_addr()` is the
/// client's TCP address) with the peer's [`PeerId`] added to its extensions;
/// handlers read it with [`RequestExt::peer_id`](crate::RequestExt::peer_id).
///
/// ```no_run
/// # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
/// use backchannel::{Registry, ServerHandshaker, SessionConfig};
/// let registry = Registry::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let incoming = listenmux::ListenMux::builder()
///     .handshaker(ServerHandshaker::new(registry.clone(), SessionConfig::server()))
///     .build()
///     .incoming(listener);
/// // `routes` holds services that call `registry.backchannel_for(&request)`.
/// listenmux::server_builder()
///     .add_routes(routes)
///     .serve_with_incoming(incoming)
///     .await?;
/// # Ok(()) }
/// ```
pub struct ServerHandshaker {
    registry: Registry,
    config: SessionConfig,
    max_peers: usize,
    endpoint: Option<Endpoint>,
    tunnels: crate::Tunnels,
}

impl std::fmt::Debug for ServerHandshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshaker")
            .field("config", &self.config)
            .field("max_peers", &self.max_peers)
            .field("endpoint", &self.endpoint)
            .field("tunnels", &self.tunnels)
            .finish_non_exhaustive()
    }
}

impl ServerHandshaker {
    /// Registers peers in `registry`, running sessions with `config`.
    pub fn new(registry: Registry, config: SessionConfig) -> Self {
        ServerHandshaker {
            registry,
            config,
            max_peers: usize::MAX,
            endpoint: None,
            tunnels: crate::Tunnels::new(),
        }
    }

    /// The tunnel services the server offers its clients (see
    /// [`Tunnels`](crate::Tunnels)). With none (the default) the server
    /// accepts exactly one client-opened stream, as Gitaly does; with some,
    /// later client-opened streams are sniffed: tunnels go to their
    /// handlers, anything else is closed.
    ///
    /// ```
    /// let h = backchannel::ServerHandshaker::new(backchannel::Registry::new(), backchannel::SessionConfig::server())
    ///     .tunnels(backchannel::Tunnels::new().handle("upload", |t| async move {
    ///         let _ = t.refuse(backchannel::RefusalKind::Unavailable, "full").await;
    ///     }));
    /// # drop(h);
    /// ```
    pub fn tunnels(mut self, tunnels: crate::Tunnels) -> Self {
        self.tunnels = tunnels;
        self
    }

    /// Configures every peer's reverse channel with a tonic [`Endpoint`]:
    /// request timeout, HTTP/2 keepalive, user agent, concurrency and rate
    /// limits, windows. Its URI gives the reverse calls' `:authority`; its
    /// TCP and TLS settings are not used (the calls ride the peer's session).
    ///
    /// Without it the channel uses `http://<peer address>` and
    /// [`H2_STREAM_WINDOW`](crate::H2_STREAM_WINDOW) /
    /// [`H2_CONNECTION_WINDOW`](crate::H2_CONNECTION_WINDOW).
    ///
    /// ```
    /// use std::time::Duration;
    /// let endpoint = tonic::transport::Endpoint::from_static("http://backchannel.local")
    ///     .timeout(Duration::from_secs(10))
    ///     .initial_stream_window_size(backchannel::H2_STREAM_WINDOW)
    ///     .initial_connection_window_size(backchannel::H2_CONNECTION_WINDOW);
    /// let h = backchannel::ServerHandshaker::new(backchannel::Registry::new(), backchannel::SessionConfig::server())
    ///     .reverse_endpoint(endpoint);
    /// # drop(h);
    /// ```
    pub fn reverse_endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    /// Refuses new peers while `max` are connected. Unlimited by default.
    /// A refused client's first call (its announce, say) is answered with
    /// `RESOURCE_EXHAUSTED` naming the limit, then its session is closed.
    ///
    /// ```
    /// let h = backchannel::ServerHandshaker::new(backchannel::Registry::new(), backchannel::SessionConfig::server())
    ///     .with_max_peers(10_000);
    /// # drop(h);
    /// ```
    pub fn with_max_peers(mut self, max: usize) -> Self {
        self.max_peers = max;
        self
    }
}

impl Handshaker for ServerHandshaker {
    fn magic(&self) -> Magic {
        MAGIC
    }

    fn handshake(
        &self,
        io: BoxIo,
        info: ConnInfo,
    ) -> BoxFuture<Result<Handshaked, HandshakeError>> {
        let registry = self.registry.clone();
        let config = self.config.clone();
        let endpoint = self.endpoint.clone();
        let max_peers = self.max_peers;
        let tunnels = self.tunnels.clone();
        Box::pin(async move {
            accept_peer(io, info, registry, config, endpoint, max_peers, tunnels).await
        })
    }
}

/// How long a refused client has to send its first call and read the
/// refusal: clients send it right after connecting.
const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

async fn accept_peer(
    io: BoxIo,
    mut info: ConnInfo,
    registry: Registry,
    config: SessionConfig,
    endpoint: Option<Endpoint>,
    max_peers: usize,
    tunnels: crate::Tunnels,
) -> Result<Handshaked, HandshakeError> {
    let id = registry.next_id();
    // Clients that open tunnels open streams in bursts: more than one may
    // wait to be accepted.
    let config = if tunnels.is_empty() {
        config
    } else {
        let backlog = config.accept_backlog().max(64);
        config.with_accept_backlog(backlog)
    };
    let span = info_span!("backchannel_peer", peer_id = id.get(), remote = ?info.remote_addr());
    let (session, mut inbound, _) = session::spawn(io, &config, Mode::Server, span.clone());
    let guard = CloseOnDrop(session.clone());
    // Stream 1, then the HTTP/2 preface and SETTINGS on it, all within the
    // handshake timeout: until then the session is not a peer (not in the
    // registry, not counted against the peer limit).
    let start = async {
        let mut first = match inbound.accept().await {
            Some(stream) => stream,
            None => {
                return Err(HandshakeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "session ended before the client opened its stream",
                )))
            }
        };
        match crate::preface::read_h2_start(&mut first).await {
            Ok(prefix) => Ok((first, prefix)),
            Err(crate::preface::PrefaceError::Io(e)) => Err(HandshakeError::Io(e)),
            Err(e) => Err(HandshakeError::Protocol(Box::new(e))),
        }
    };
    let timeout = config.handshake_timeout();
    let (first, prefix) = match tokio::time::timeout(timeout, start).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(HandshakeError::Timeout {
                step: "the client's first yamux stream and its HTTP/2 preface and SETTINGS",
                after: timeout,
            })
        }
    };
    // Exactly one client-opened stream, as in Gitaly: later ones are reset,
    // unless the server offers tunnels (then only tunnels are accepted).
    if tunnels.is_empty() {
        drop(inbound);
    } else {
        let dispatch = std::sync::Arc::new(crate::inbound::Dispatch {
            tunnels,
            sidechannels: None,
            raw: None,
            sniff_timeout: config.handshake_timeout(),
            side: format!("peer {id}").into(),
        });
        let _entered = span.enter();
        crate::inbound::serve(inbound, dispatch, crate::inbound::Fallback::Refuse);
    }
    if registry.len() >= max_peers {
        // Tell the client why (its first call gets RESOURCE_EXHAUSTED), then
        // close the session.
        let err = Error::PeerLimit(max_peers);
        let status =
            tonic::Status::resource_exhausted(format!("the hub refused the session: {err}"));
        let window = config.handshake_timeout().min(REFUSAL_WINDOW);
        crate::refuse::serve_refusal(first, prefix, status, window)
            .instrument(span)
            .await;
        return Err(HandshakeError::Protocol(Box::new(err)));
    }
    let stream_id = first.id();
    let first = Rewind::new(prefix, first);

    let peer = PeerInfo {
        id,
        remote_addr: info.remote_addr(),
        connected_at: SystemTime::now(),
    };
    let endpoint = match endpoint {
        Some(e) => e,
        None => default_reverse_endpoint(info.remote_addr()),
    };
    registry.insert(
        peer,
        PeerChannel::new(
            reverse_channel(session.clone(), endpoint),
            format!("peer {id}"),
        ),
        session.clone(),
    );
    let reg = registry.clone();
    let done = session.closed_owned();
    tokio::spawn(
        async move {
            done.await;
            reg.remove(id);
            info!("peer disconnected");
        }
        .instrument(span.clone()),
    );
    span.in_scope(|| info!(stream = stream_id, "peer connected"));
    info.extensions_mut().insert(id);
    Ok(Handshaked::Connection(Connection::new(
        Box::new(PeerConn {
            stream: first,
            _guard: guard,
        }),
        info,
    )))
}

/// `http://<peer address>` (informational only: the client accepts any
/// authority) with the backchannel's HTTP/2 windows.
pub(crate) fn default_reverse_endpoint(remote: Option<std::net::SocketAddr>) -> Endpoint {
    let uri = match remote {
        Some(addr) => http::Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query("/")
            .build()
            .unwrap_or_else(|_| http::Uri::from_static("http://backchannel.local")),
        None => http::Uri::from_static("http://backchannel.local"),
    };
    Endpoint::from(uri)
        .initial_stream_window_size(crate::H2_STREAM_WINDOW)
        .initial_connection_window_size(crate::H2_CONNECTION_WINDOW)
}

/// A tonic channel to the client: each (re)connect opens a new yamux stream.
pub(crate) fn reverse_channel(
    session: SessionHandle,
    endpoint: Endpoint,
) -> tonic::transport::Channel {
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let session = session.clone();
        async move {
            let stream = session.open_stream()?;
            Ok::<_, Error>(TokioIo::new(stream))
        }
    }))
}

/// Stream 1 as the gRPC server's connection; when the server drops it, the
/// whole session (and the peer) goes.
#[derive(Debug)]
struct PeerConn {
    stream: Rewind<YamuxStream>,
    _guard: CloseOnDrop,
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
