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
    BoxFuture, BoxIo, ConnInfo, Connection, HandshakeError, Handshaked, Handshaker, Magic,
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
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use backchannel::{Registry, ServerHandshaker, SessionConfig};
/// let registry = Registry::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let incoming = listenmux::ListenMux::new(Default::default())
///     .register(ServerHandshaker::new(registry.clone(), SessionConfig::server()))
///     .incoming(listener);
/// // tonic::transport::Server::builder()
/// //     .add_service(MyServiceServer::new(MyService { registry }))
/// //     .serve_with_incoming(incoming).await?;
/// # drop(incoming); Ok(()) }
/// ```
pub struct ServerHandshaker {
    registry: Registry,
    config: SessionConfig,
    max_peers: usize,
}

impl ServerHandshaker {
    /// Registers peers in `registry`, running sessions with `config`.
    pub fn new(registry: Registry, config: SessionConfig) -> Self {
        ServerHandshaker {
            registry,
            config,
            max_peers: usize::MAX,
        }
    }

    /// Refuses new peers (closing their connection) while `max` are
    /// connected. Unlimited by default.
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
        if registry.len() >= self.max_peers {
            let max = self.max_peers;
            return Box::pin(async move {
                Err(HandshakeError::Protocol(Box::new(Error::PeerLimit(max))))
            });
        }
        Box::pin(async move { accept_peer(io, info, registry, config).await })
    }
}

async fn accept_peer(
    io: BoxIo,
    mut info: ConnInfo,
    registry: Registry,
    config: SessionConfig,
) -> Result<Handshaked, HandshakeError> {
    let id = registry.next_id();
    let span = info_span!("backchannel_peer", peer_id = id, remote = ?info.remote_addr);
    let (session, mut inbound) = session::spawn(io, &config, Mode::Server, span.clone());
    let guard = CloseOnDrop(session.clone());
    let first = match tokio::time::timeout(config.handshake_timeout, inbound.accept()).await {
        Ok(Some(stream)) => stream,
        Ok(None) => {
            return Err(HandshakeError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "session ended before the client opened its stream",
            )))
        }
        Err(_) => return Err(HandshakeError::Timeout(config.handshake_timeout)),
    };
    // Exactly one client-opened stream, as in Gitaly: later ones are reset.
    drop(inbound);

    let peer = PeerInfo {
        id,
        remote_addr: info.remote_addr,
        connected_at: SystemTime::now(),
    };
    registry.insert(
        peer,
        PeerChannel::new(
            reverse_channel(session.clone(), info.remote_addr),
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
    span.in_scope(|| info!(stream = first.id(), "peer connected"));
    info.peer_id = Some(id);
    Ok(Handshaked::Connection(Connection::new(
        Box::new(PeerConn {
            stream: first,
            _guard: guard,
        }),
        info,
    )))
}

/// A tonic channel to the client: each (re)connect opens a new yamux stream.
fn reverse_channel(
    session: SessionHandle,
    remote: Option<std::net::SocketAddr>,
) -> tonic::transport::Channel {
    // The authority is informational only; the client accepts any.
    let uri = match remote {
        Some(addr) => format!("http://{addr}"),
        None => "http://backchannel.local".to_string(),
    };
    let endpoint = Endpoint::from_shared(uri)
        .unwrap_or_else(|_| Endpoint::from_static("http://backchannel.local"));
    endpoint
        .initial_stream_window_size(crate::H2_STREAM_WINDOW)
        .initial_connection_window_size(crate::H2_CONNECTION_WINDOW)
        .connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let session = session.clone();
            async move {
                let stream = session.open_stream()?;
                Ok::<_, Error>(TokioIo::new(stream))
            }
        }))
}

/// Stream 1 as the gRPC server's connection; when the server drops it, the
/// whole session (and the peer) goes.
struct PeerConn {
    stream: YamuxStream,
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
