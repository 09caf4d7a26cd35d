//! The client side: connect, write the magic, run a yamux client session,
//! use stream 1 as the channel to the server and serve the backchannel on
//! every stream the server opens.

use std::{
    io,
    path::Path,
    sync::{Arc, Mutex},
};

use backchannel_yamux::Mode;
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use listenmux::{BoxIo, Io};
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tonic::{
    service::Routes,
    transport::{server::Connected, Endpoint, Server},
};
use tracing::{debug, info_span, Instrument};

use crate::{
    authority::AuthorityFix,
    config::SessionConfig,
    session::{self, CloseOnDrop, SessionHandle},
    stream::YamuxStream,
    Error, PeerChannel, MAGIC,
};

/// Builds a backchannel [`Client`].
///
/// ```no_run
/// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
/// // `routes` is the gRPC service this client offers to the server, e.g.
/// // tonic::service::Routes::new(MyCallbackServer::new(MyCallback));
/// let client = backchannel::ClientBuilder::new()
///     .connect_tcp("127.0.0.1:50051", routes)
///     .await?;
/// // let mut api = MyServerApiClient::new(client.channel());
/// client.close();
/// # Ok(()) }
/// ```
pub struct ClientBuilder {
    config: SessionConfig,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    server: Server,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientBuilder {
    /// A builder with [`SessionConfig::client`] defaults and no TLS.
    pub fn new() -> Self {
        ClientBuilder {
            config: SessionConfig::client(),
            tls: None,
            server: Server::builder()
                .initial_stream_window_size(Some(crate::H2_STREAM_WINDOW))
                .initial_connection_window_size(Some(crate::H2_CONNECTION_WINDOW)),
        }
    }

    /// Sets the yamux session settings.
    ///
    /// ```
    /// let b = backchannel::ClientBuilder::new()
    ///     .config(backchannel::SessionConfig::client().with_window(16 << 20));
    /// # drop(b);
    /// ```
    pub fn config(mut self, config: SessionConfig) -> Self {
        self.config = config;
        self
    }

    /// Speaks TLS to the server (the magic and yamux travel inside TLS).
    ///
    /// ```no_run
    /// # fn f(cfg: std::sync::Arc<tokio_rustls::rustls::ClientConfig>) {
    /// let b = backchannel::ClientBuilder::new().tls(
    ///     tokio_rustls::TlsConnector::from(cfg),
    ///     rustls_pki_types::ServerName::try_from("hub.example.com").unwrap(),
    /// );
    /// # drop(b); }
    /// ```
    pub fn tls(
        mut self,
        connector: tokio_rustls::TlsConnector,
        server_name: ServerName<'static>,
    ) -> Self {
        self.tls = Some((connector, server_name));
        self
    }

    /// Sets the tonic server that serves the backchannel (timeouts,
    /// concurrency limits, layers...). Its TCP settings are ignored, and its
    /// `trace_fn` is replaced by one whose span names the server and stream.
    pub fn server(mut self, server: Server) -> Self {
        self.server = server;
        self
    }

    /// Connects over TCP to `addr` (`host:port`).
    pub async fn connect_tcp(self, addr: &str, routes: Routes) -> Result<Client, Error> {
        let timeout = self.config.handshake_timeout;
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| Error::HandshakeTimeout)??;
        let _ = tcp.set_nodelay(true);
        self.connect_io(tcp, addr, routes).await
    }

    /// Connects over a Unix domain socket.
    pub async fn connect_unix(
        self,
        path: impl AsRef<Path>,
        routes: Routes,
    ) -> Result<Client, Error> {
        let stream = tokio::net::UnixStream::connect(path).await?;
        self.connect_io(stream, "localhost", routes).await
    }

    /// Runs the handshake over an already connected byte stream. `authority`
    /// is what the forward channel sends as `:authority` (`host[:port]`).
    pub async fn connect_io<T: Io>(
        self,
        io: T,
        authority: &str,
        routes: Routes,
    ) -> Result<Client, Error> {
        let ClientBuilder {
            config,
            tls,
            server,
        } = self;
        let timeout = config.handshake_timeout;
        let span = info_span!("backchannel_client", server = %authority);
        let handshake = async {
            let mut io: BoxIo = match tls {
                Some((connector, name)) => Box::new(connector.connect(name, io).await?),
                None => Box::new(io),
            };
            io.write_all(&MAGIC).await?;
            io.flush().await?;
            Ok::<_, Error>(io)
        };
        let io = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| Error::HandshakeTimeout)??;

        let (session, inbound) = session::spawn(io, &config, Mode::Client, span.clone());
        let guard = Arc::new(CloseOnDrop(session.clone()));
        let first = session.open_stream()?;
        debug_assert_eq!(first.id(), 1);
        let slot = Arc::new(Mutex::new(Some(first)));
        let uri = format!("http://{authority}");
        let endpoint = Endpoint::from_shared(uri)
            .unwrap_or_else(|_| Endpoint::from_static("http://localhost"))
            .initial_stream_window_size(crate::H2_STREAM_WINDOW)
            .initial_connection_window_size(crate::H2_CONNECTION_WINDOW);
        let channel = tokio::time::timeout(
            timeout,
            endpoint.connect_with_connector(tower::service_fn(move |_uri| {
                // Stream 1 is handed out once: Gitaly's server accepts exactly
                // one client-opened stream, so we never open a second.
                let stream = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                async move { stream.map(TokioIo::new).ok_or(Error::SessionClosed) }
            })),
        )
        .await
        .map_err(|_| Error::HandshakeTimeout)??;

        let incoming = inbound.map(|s| Ok::<_, io::Error>(AuthorityFix::new(s)));
        let done = session.closed_owned();
        // Every reverse call gets a span naming the server and the yamux stream
        // (the client does not know the peer ID the server gave it).
        let server_label = authority.to_string();
        let mut server = server.trace_fn(move |req| {
            let stream = req.extensions().get::<InboundInfo>().map(|i| i.stream_id);
            info_span!("backchannel_reverse_call", server = %server_label, stream, path = req.uri().path())
        });
        let router = server.add_routes(routes);
        tokio::spawn(
            async move {
                if let Err(err) = router.serve_with_incoming_shutdown(incoming, done).await {
                    debug!(error = %err, "backchannel server ended");
                }
            }
            .instrument(span),
        );
        Ok(Client {
            channel: PeerChannel::new(channel, format!("server {authority}")),
            session,
            _guard: guard,
        })
    }
}

/// A connected backchannel client: a [`PeerChannel`] to the server (yamux stream
/// 1) while its backchannel service answers the server's calls.
///
/// The session lives until [`close`](Self::close), until the server or the
/// network ends it, or until the `Client` (and all its clones) are dropped.
/// A reconnect is a new `Client`: a new connection, session and peer ID.
#[derive(Clone)]
pub struct Client {
    channel: PeerChannel,
    session: SessionHandle,
    _guard: Arc<CloseOnDrop>,
}

impl Client {
    /// The gRPC channel to the server.
    pub fn channel(&self) -> PeerChannel {
        self.channel.clone()
    }

    /// Closes the session (GoAway, then the connection). Idempotent.
    pub fn close(&self) {
        self.session.close();
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    /// Completes when the session has ended.
    pub async fn closed(&self) {
        self.session.closed().await
    }
}

/// Connection info of an inbound (server-opened) stream on the client, found
/// in the backchannel handlers' request extensions.
#[derive(Clone, Copy, Debug)]
pub struct InboundInfo {
    /// The yamux stream ID (even: opened by the server).
    pub stream_id: u32,
}

impl Connected for AuthorityFix<YamuxStream> {
    type ConnectInfo = InboundInfo;
    fn connect_info(&self) -> InboundInfo {
        InboundInfo {
            stream_id: self.get_ref().id(),
        }
    }
}
