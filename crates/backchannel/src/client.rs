//! The client side: connect, write the magic, run a yamux client session,
//! use stream 1 as the channel to the server and serve the backchannel on
//! every stream the server opens.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
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
use tracing::{debug, info_span, Instrument, Span};

use crate::{
    authority::AuthorityFix,
    config::SessionConfig,
    error::Step,
    reconnect::{Backoff, ReconnectingClient},
    session::{self, CloseOnDrop, SessionEnd, SessionHandle},
    stream::YamuxStream,
    Error, PeerChannel, MAGIC,
};

/// Builds a backchannel [`Client`] (one session) or a
/// [`ReconnectingClient`] (a session kept up by redialling).
///
/// The forward channel (the client's calls to the server) is configured the
/// tonic way, with an [`Endpoint`]; the backchannel service the client offers
/// runs on a tonic [`Server`].
///
/// ```no_run
/// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
/// use std::time::Duration;
/// // `routes` is the gRPC service this client offers to the server, e.g.
/// // tonic::service::Routes::new(MyCallbackServer::new(MyCallback));
/// let endpoint = tonic::transport::Endpoint::from_static("http://hub.example.com")
///     .timeout(Duration::from_secs(30))
///     .user_agent("my-agent/1.0")
///     .unwrap();
/// let client = backchannel::ClientBuilder::new()
///     .endpoint(endpoint)
///     .connect_timeout(Duration::from_secs(3))
///     .connect_tcp("127.0.0.1:50051", routes)
///     .await?;
/// // let mut api = MyServerApiClient::new(client.channel());
/// client.close();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ClientBuilder {
    pub(crate) config: SessionConfig,
    pub(crate) tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    pub(crate) server: Server,
    pub(crate) endpoint: Option<Endpoint>,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) raw: Option<crate::RawStreams>,
    pub(crate) tunnels: crate::Tunnels,
    pub(crate) waiters: crate::sidechannel::Waiters,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("config", &self.config)
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .field("server", &self.server)
            .field("endpoint", &self.endpoint)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff", &self.backoff)
            .field("raw", &self.raw)
            .field("tunnels", &self.tunnels)
            .finish()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientBuilder {
    /// A builder with [`SessionConfig::client`] defaults, no TLS, a 10 s
    /// connect timeout and [`Backoff::default`].
    pub fn new() -> Self {
        ClientBuilder {
            config: SessionConfig::client(),
            tls: None,
            server: Server::builder()
                .initial_stream_window_size(Some(crate::H2_STREAM_WINDOW))
                .initial_connection_window_size(Some(crate::H2_CONNECTION_WINDOW)),
            endpoint: None,
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            raw: None,
            tunnels: crate::Tunnels::new(),
            waiters: Default::default(),
        }
    }

    /// The tunnel services this client offers the server (see
    /// [`Tunnels`](crate::Tunnels)); streams the server opens with the
    /// tunnel magic go to them. None by default.
    ///
    /// ```
    /// let b = backchannel::ClientBuilder::new().tunnels(
    ///     backchannel::Tunnels::new().handle("echo", |t| async move {
    ///         if let Ok(t) = t.accept().await {
    ///             let (mut r, mut w) = tokio::io::split(t);
    ///             let _ = tokio::io::copy(&mut r, &mut w).await;
    ///         }
    ///     }),
    /// );
    /// # drop(b);
    /// ```
    pub fn tunnels(mut self, tunnels: crate::Tunnels) -> Self {
        self.tunnels = tunnels;
        self
    }

    /// How streams the server opens are dispatched on a session to `label`.
    pub(crate) fn dispatch(&self, label: &str) -> Arc<crate::inbound::Dispatch> {
        Arc::new(crate::inbound::Dispatch {
            tunnels: self.tunnels.clone(),
            sidechannels: Some(self.waiters.clone()),
            raw: self.raw.clone(),
            sniff_timeout: self.config.handshake_timeout(),
            side: format!("server {label}").into(),
        })
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
    /// concurrency limits, windows...). Its TCP settings are ignored, and its
    /// `trace_fn` is replaced by one whose span names the server and stream.
    ///
    /// ```
    /// let server = tonic::transport::Server::builder().concurrency_limit_per_connection(32);
    /// let b = backchannel::ClientBuilder::new().server(server);
    /// # drop(b);
    /// ```
    pub fn server(mut self, server: Server) -> Self {
        self.server = server;
        self
    }

    /// Configures the forward channel with a tonic [`Endpoint`]: request
    /// timeout, HTTP/2 keepalive, user agent, concurrency and rate limits,
    /// windows. Its URI gives the `:authority` of the forward calls; where it
    /// connects is decided by `connect_*`, and its TCP and TLS settings are
    /// not used (the session has its own).
    ///
    /// Without it the channel uses `http://<the address dialled>` and
    /// [`H2_STREAM_WINDOW`](crate::H2_STREAM_WINDOW) /
    /// [`H2_CONNECTION_WINDOW`](crate::H2_CONNECTION_WINDOW).
    ///
    /// ```
    /// let endpoint = tonic::transport::Endpoint::from_static("http://hub.internal")
    ///     .concurrency_limit(64)
    ///     .http2_keep_alive_interval(std::time::Duration::from_secs(20));
    /// let b = backchannel::ClientBuilder::new().endpoint(endpoint);
    /// # drop(b);
    /// ```
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    /// How long connecting the socket may take (default 10 s). The later
    /// steps are bounded by [`SessionConfig::handshake_timeout`].
    ///
    /// ```
    /// let b = backchannel::ClientBuilder::new().connect_timeout(std::time::Duration::from_secs(2));
    /// # drop(b);
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How a [`ReconnectingClient`] waits between attempts.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = backchannel::ClientBuilder::new()
    ///     .backoff(backchannel::Backoff::default().with_max(Duration::from_secs(30)));
    /// # drop(b);
    /// ```
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Connects over TCP to `addr` (`host:port`).
    ///
    /// ```no_run
    /// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
    /// let client = backchannel::ClientBuilder::new().connect_tcp("127.0.0.1:50051", routes).await?;
    /// # drop(client); Ok(()) }
    /// ```
    pub async fn connect_tcp(self, addr: &str, routes: Routes) -> Result<Client, Error> {
        let endpoint = self.forward_endpoint(addr)?;
        let (io, remote) = connect(&Target::Tcp(addr.to_string()), self.connect_timeout).await?;
        self.handshake(io, endpoint, addr, remote, routes).await
    }

    /// Connects over a Unix domain socket (the forward calls' authority is
    /// `localhost` unless an [`endpoint`](Self::endpoint) says otherwise).
    ///
    /// ```no_run
    /// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
    /// let client = backchannel::ClientBuilder::new().connect_unix("/run/hub.sock", routes).await?;
    /// # drop(client); Ok(()) }
    /// ```
    pub async fn connect_unix(
        self,
        path: impl AsRef<Path>,
        routes: Routes,
    ) -> Result<Client, Error> {
        let path = path.as_ref();
        let endpoint = self.forward_endpoint("localhost")?;
        let (io, remote) = connect(&Target::Unix(path.to_path_buf()), self.connect_timeout).await?;
        self.handshake(io, endpoint, &path.display().to_string(), remote, routes)
            .await
    }

    /// Runs the handshake over an already connected byte stream. `authority`
    /// is what the forward channel sends as `:authority` (`host[:port]`)
    /// unless an [`endpoint`](Self::endpoint) is set.
    ///
    /// ```no_run
    /// # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
    /// let tcp = tokio::net::TcpStream::connect("127.0.0.1:50051").await?;
    /// let client = backchannel::ClientBuilder::new().connect_io(tcp, "hub:50051", routes).await?;
    /// # drop(client); Ok(()) }
    /// ```
    pub async fn connect_io<T: Io>(
        self,
        io: T,
        authority: &str,
        routes: Routes,
    ) -> Result<Client, Error> {
        let endpoint = self.forward_endpoint(authority)?;
        self.handshake(Box::new(io), endpoint, authority, None, routes)
            .await
    }

    /// A client that keeps a session to `addr` (`host:port`) up: when the
    /// session ends it dials again (new TCP connection, TLS, magic, yamux
    /// session) with exponential backoff and jitter, and serves `routes` on
    /// every new session. Returns at once; the first session is dialled in the
    /// background, on the tokio runtime this is called from (like tonic's
    /// `connect_lazy`, it must be called within one). See
    /// [`ReconnectingClient`].
    ///
    /// ```no_run
    /// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
    /// let client = backchannel::ClientBuilder::new().reconnecting_tcp("127.0.0.1:50051", routes)?;
    /// client.wait_connected().await;
    /// // let mut api = MyServerApiClient::new(client.channel());
    /// # Ok(()) }
    /// ```
    pub fn reconnecting_tcp(self, addr: &str, routes: Routes) -> Result<ReconnectingClient, Error> {
        let endpoint = self.forward_endpoint(addr)?;
        Ok(ReconnectingClient::start(
            self,
            vec![Target::Tcp(addr.to_string())],
            endpoint,
            routes,
        ))
    }

    /// [`reconnecting_tcp`](Self::reconnecting_tcp) over several servers
    /// (`host:port` each, at least one): each dial goes to the next one in
    /// turn, with the backoff between failed attempts; a session the server
    /// ends with GoAway (a server draining) is followed at once by a dial to
    /// the next server.
    ///
    /// ```no_run
    /// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
    /// let hubs = ["10.0.0.1:7443", "10.0.0.2:7443"];
    /// let client = backchannel::ClientBuilder::new().reconnecting_tcp_any(&hubs, routes)?;
    /// client.wait_connected().await;
    /// # Ok(()) }
    /// ```
    pub fn reconnecting_tcp_any(
        self,
        addrs: &[impl AsRef<str>],
        routes: Routes,
    ) -> Result<ReconnectingClient, Error> {
        let first = addrs.first().ok_or_else(|| Error::Connect {
            target: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no server address"),
        })?;
        let endpoint = self.forward_endpoint(first.as_ref())?;
        let targets = addrs
            .iter()
            .map(|a| Target::Tcp(a.as_ref().to_string()))
            .collect();
        Ok(ReconnectingClient::start(self, targets, endpoint, routes))
    }

    /// [`reconnecting_tcp`](Self::reconnecting_tcp) over a Unix domain socket.
    ///
    /// ```no_run
    /// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
    /// let client = backchannel::ClientBuilder::new().reconnecting_unix("/run/hub.sock", routes)?;
    /// # drop(client); Ok(()) }
    /// ```
    pub fn reconnecting_unix(
        self,
        path: impl AsRef<Path>,
        routes: Routes,
    ) -> Result<ReconnectingClient, Error> {
        let endpoint = self.forward_endpoint("localhost")?;
        Ok(ReconnectingClient::start(
            self,
            vec![Target::Unix(path.as_ref().to_path_buf())],
            endpoint,
            routes,
        ))
    }

    /// The user's endpoint, or one for `http://{authority}` with our windows.
    fn forward_endpoint(&self, authority: &str) -> Result<Endpoint, Error> {
        if let Some(endpoint) = &self.endpoint {
            return Ok(endpoint.clone());
        }
        let invalid = |source| Error::InvalidAuthority {
            authority: authority.to_string(),
            source,
        };
        // An authority alone: `host:port/path` is refused.
        let parsed: http::uri::Authority = authority.parse().map_err(invalid)?;
        let uri: http::Uri = format!("http://{parsed}/").parse().map_err(invalid)?;
        Ok(Endpoint::from(uri)
            .initial_stream_window_size(crate::H2_STREAM_WINDOW)
            .initial_connection_window_size(crate::H2_CONNECTION_WINDOW))
    }

    /// TLS, magic, session, stream 1, HTTP/2 on it.
    async fn handshake(
        self,
        io: BoxIo,
        endpoint: Endpoint,
        label: &str,
        remote: Option<SocketAddr>,
        routes: Routes,
    ) -> Result<Client, Error> {
        let span = info_span!("backchannel_client", server = %label);
        let io = secure(io, &self.tls, self.config.handshake_timeout()).await?;
        let dispatch = self.dispatch(label);
        let started = start_session(
            io,
            &self.config,
            &self.server,
            routes,
            dispatch,
            label,
            span,
        );
        let Started { session, first, .. } = started?;
        let guard = Arc::new(CloseOnDrop(session.clone()));
        let slot = Arc::new(Mutex::new(Some(first)));
        let timeout = self.config.handshake_timeout();
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
        .map_err(|_| Error::Timeout {
            step: Step::Http2,
            after: timeout,
        })?
        .map_err(Error::Http2)?;
        Ok(Client {
            channel: PeerChannel::new(channel, format!("server {label}")),
            waiters: self.waiters.clone(),
            label: Arc::from(format!("server {label}")),
            session,
            remote_addr: remote,
            _guard: guard,
        })
    }
}

/// Where a client dials.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => f.write_str(a),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Connects the socket: a new connection every call.
pub(crate) async fn connect(
    target: &Target,
    timeout: Duration,
) -> Result<(BoxIo, Option<SocketAddr>), Error> {
    let failed = |source| Error::Connect {
        target: target.to_string(),
        source,
    };
    let connecting = async {
        match target {
            Target::Tcp(addr) => {
                let tcp = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(failed)?;
                let _ = tcp.set_nodelay(true);
                let remote = tcp.peer_addr().ok();
                Ok((Box::new(tcp) as BoxIo, remote))
            }
            Target::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(failed)?;
                Ok((Box::new(s) as BoxIo, None))
            }
        }
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| Error::Timeout {
            step: Step::Connect,
            after: timeout,
        })?
}

/// TLS (when configured) and the magic, each bounded by `timeout`.
pub(crate) async fn secure(
    io: BoxIo,
    tls: &Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    timeout: Duration,
) -> Result<BoxIo, Error> {
    let mut io: BoxIo = match tls {
        Some((connector, name)) => {
            let tls = tokio::time::timeout(timeout, connector.connect(name.clone(), io))
                .await
                .map_err(|_| Error::Timeout {
                    step: Step::Tls,
                    after: timeout,
                })?
                .map_err(Error::Tls)?;
            Box::new(tls)
        }
        None => io,
    };
    let magic = async {
        io.write_all(&MAGIC).await?;
        io.flush().await
    };
    tokio::time::timeout(timeout, magic)
        .await
        .map_err(|_| Error::Timeout {
            step: Step::Magic,
            after: timeout,
        })?
        .map_err(Error::Magic)?;
    Ok(io)
}

/// A client session whose backchannel server is running.
pub(crate) struct Started {
    pub(crate) session: SessionHandle,
    pub(crate) first: YamuxStream,
    pub(crate) end: SessionEnd,
}

/// Starts the yamux client session over `io`, opens stream 1 and serves
/// `routes` on every stream the server opens, until the session ends.
pub(crate) fn start_session(
    io: BoxIo,
    config: &SessionConfig,
    server: &Server,
    routes: Routes,
    dispatch: Arc<crate::inbound::Dispatch>,
    label: &str,
    span: Span,
) -> Result<Started, Error> {
    let (session, inbound, end) = session::spawn(io, config, Mode::Client, span.clone());
    let first = match session.open_stream() {
        Ok(s) => s,
        Err(e) => {
            session.close();
            return Err(e);
        }
    };
    debug_assert_eq!(first.id(), 1);
    // Streams the server opens: sidechannels and tunnels to their handlers,
    // the rest to the raw handler when there is one, else (HTTP/2
    // connections) to the backchannel server.
    if let Some(raw) = dispatch.raw.clone() {
        let _entered = span.enter();
        crate::inbound::serve(inbound, dispatch, crate::inbound::Fallback::Raw(raw));
        drop(_entered);
        return Ok(Started {
            session,
            first,
            end,
        });
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<crate::inbound::Replayed>(16);
    {
        let _entered = span.enter();
        crate::inbound::serve(inbound, dispatch, crate::inbound::Fallback::Grpc(tx));
    }
    let incoming = tokio_stream_from(rx).map(|s| Ok::<_, io::Error>(AuthorityFix::new(s)));
    let done = session.closed_owned();
    // Every reverse call gets a span naming the server and the yamux stream
    // (the client does not know the peer ID the server gave it).
    let server_label = label.to_string();
    let mut server = server.clone().trace_fn(move |req| {
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
    Ok(Started {
        session,
        first,
        end,
    })
}

/// A connected backchannel client: a [`PeerChannel`] to the server (yamux stream
/// 1) while its backchannel service answers the server's calls.
///
/// The session lives until [`close`](Self::close), until the server or the
/// network ends it, or until the `Client` (and all its clones) are dropped.
/// A reconnect is a new `Client`: a new connection, session and peer ID; a
/// [`ReconnectingClient`] does that by itself.
///
/// ```no_run
/// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
/// let client = backchannel::ClientBuilder::new().connect_tcp("127.0.0.1:50051", routes).await?;
/// // let mut api = MyServerApiClient::new(client.channel());
/// client.closed().await; // until the server goes away
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    channel: PeerChannel,
    waiters: crate::sidechannel::Waiters,
    label: Arc<str>,
    session: SessionHandle,
    remote_addr: Option<SocketAddr>,
    _guard: Arc<CloseOnDrop>,
}

impl Client {
    /// The gRPC channel to the server.
    pub fn channel(&self) -> PeerChannel {
        self.channel.clone()
    }

    /// The server's address, for a TCP connection made by `connect_tcp`.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// The session's flow statistics (round-trip time, windows, bytes in
    /// flight).
    pub fn session_stats(&self) -> crate::SessionStats {
        self.session.stats()
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

    /// Opens a [`Tunnel`](crate::Tunnel) to the server: a new stream,
    /// answered by the server's handler for the service (see
    /// [`ServerHandshaker::tunnels`](crate::ServerHandshaker::tunnels)).
    ///
    /// ```no_run
    /// # async fn run(client: backchannel::Client) -> Result<(), backchannel::TunnelError> {
    /// let tunnel = client.open_tunnel(backchannel::TunnelRequest::new("logs")).await?;
    /// # drop(tunnel); Ok(()) }
    /// ```
    pub async fn open_tunnel(
        &self,
        request: crate::TunnelRequest,
    ) -> Result<crate::Tunnel, crate::TunnelError> {
        crate::tunnel::open_on(&self.session, request, &self.label).await
    }

    /// Registers a Gitaly sidechannel waiter: put its ID on a call with
    /// [`SidechannelWaiter::attach`](crate::SidechannelWaiter::attach) and
    /// accept the stream the server's handler opens (see
    /// [`sidechannel`](crate::sidechannel)).
    ///
    /// ```no_run
    /// # async fn run(client: backchannel::Client) {
    /// let waiter = client.sidechannel();
    /// assert!(waiter.id() > 0);
    /// # }
    /// ```
    pub fn sidechannel(&self) -> crate::SidechannelWaiter {
        self.waiters.register()
    }
}

/// Connection info of an inbound (server-opened) stream on the client, found
/// in the backchannel handlers' request extensions.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct InboundInfo {
    /// The yamux stream ID (even: opened by the server).
    pub stream_id: u32,
}

impl Connected for AuthorityFix<crate::inbound::Replayed> {
    type ConnectInfo = InboundInfo;
    fn connect_info(&self) -> InboundInfo {
        InboundInfo {
            stream_id: self.get_ref().id(),
        }
    }
}

/// The receiver as a `Stream`.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl Connected for AuthorityFix<YamuxStream> {
    type ConnectInfo = InboundInfo;
    fn connect_info(&self) -> InboundInfo {
        InboundInfo {
            stream_id: self.get_ref().id(),
        }
    }
}
