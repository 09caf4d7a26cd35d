//! `backchannel hub`: one port for agents (backchannel handshake) and plain
//! gRPC callers; routes calls carrying `backchannel-peer` to that peer's
//! backchannel, and serves health, reflection and the admin API.

pub mod access;
pub mod admin;
pub mod announce_deadline;
pub mod audit;
pub mod cluster;
pub mod drain;
pub mod fate;
pub mod flags;
pub mod flow;
pub mod identity;
pub mod isolation;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod routing;
pub mod state;

use std::{
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use backchannel::{Registry, ServerHandshaker, SessionConfig};
use futures::{Stream, StreamExt};
use listenmux::{Connection, ListenMux};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::pb::hub::{peers_server::PeersServer, registration_server::RegistrationServer};

pub use state::HubState;

/// How `backchannel hub` is set up.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// TCP address to listen on (`host:port`; port 0 picks one).
    pub listen: Option<String>,
    /// Unix socket to listen on (replaced if it exists).
    pub unix: Option<PathBuf>,
    /// PEM certificate chain: enables TLS on every listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA: require client certificates signed by it.
    pub client_ca: Option<PathBuf>,
    /// Address for the Prometheus endpoint.
    pub metrics: Option<String>,
    /// How long in-flight calls may run on shutdown.
    pub grace: Duration,
    /// Most agents connected at once; further handshakes are refused (the
    /// agent's announce gets `RESOURCE_EXHAUSTED` naming the limit).
    pub max_peers: usize,
    /// How long a new connection may take to send its first bytes (and finish
    /// TLS), and then a backchannel client to open stream 1 and send its
    /// HTTP/2 preface and SETTINGS: only then is it a peer. Default 10 s.
    pub handshake_timeout: Duration,
    /// Connections being sniffed or handshaked at once, all sources
    /// together. Default 1024.
    pub max_pending: usize,
    /// Of those, the most one source (IPv4 address, IPv6 /64) may hold;
    /// when all are taken, a newcomer from a smaller source evicts the
    /// biggest source's oldest. Default 256.
    pub max_pending_per_source: usize,
    /// Close sessions that have not announced a name this long after their
    /// handshake (zero: never). `None`: 10 s with a policy; never on an open
    /// hub, so Gitaly-style clients that never announce stay connected and
    /// routable by peer ID.
    pub announce_timeout: Option<Duration>,
    /// How many caller connections get an upstream connection of their own
    /// to each peer (see [`isolation`]); further ones share the peer's
    /// common connection. 0 turns isolation off. Default 128.
    pub isolated_callers_per_peer: usize,
    /// The access policy (TOML). Without one the hub is open, which it only
    /// accepts on loopback and Unix sockets unless `allow_anyone` is set.
    pub policy: Option<PathBuf>,
    /// Run open (no policy) on a non-loopback address.
    pub allow_anyone: bool,
    /// Join a cluster of hubs (see [`cluster`]).
    pub cluster: Option<cluster::ClusterConfig>,
}

/// Default of [`HubConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            listen: Some("127.0.0.1:0".into()),
            unix: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            metrics: None,
            grace: Duration::from_secs(10),
            max_peers: 10_000,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending: 1024,
            max_pending_per_source: 256,
            announce_timeout: None,
            isolated_callers_per_peer: isolation::DEFAULT_ISOLATED_CALLERS_PER_PEER,
            policy: None,
            allow_anyone: false,
            cluster: None,
        }
    }
}

/// The buffer budget of each agent's session on the hub.
const HUB_SESSION_BUFFER: usize = 256 << 20;

/// A running hub.
pub struct Hub {
    /// The bound TCP address, if listening on TCP.
    pub addr: Option<SocketAddr>,
    /// The bound metrics address, if any.
    pub metrics_addr: Option<SocketAddr>,
    state: Arc<HubState>,
    stats: Arc<listenmux::Stats>,
    access: Arc<access::Access>,
    cluster: Option<Arc<cluster::Cluster>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

/// Stops yielding connections (and drops the listeners) once `stop` fires,
/// without ending the stream: ending it would make tonic close every
/// connection at once, including the agents' sessions that in-flight routed
/// calls still use.
struct Drainable<S> {
    inner: Option<S>,
    stop: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<S: Stream + Unpin> Stream for Drainable<S> {
    type Item = S::Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.inner.is_some() && self.stop.as_mut().poll(cx).is_ready() {
            self.inner = None;
        }
        match self.inner.as_mut() {
            Some(s) => s.poll_next_unpin(cx),
            None => Poll::Pending,
        }
    }
}

use std::future::Future as _;

type ConnStream = Pin<Box<dyn Stream<Item = Result<Connection, std::io::Error>> + Send>>;
type CallerStream =
    Pin<Box<dyn Stream<Item = Result<isolation::CallerConn, std::io::Error>> + Send>>;

impl Hub {
    /// Binds the listeners and starts serving.
    pub async fn start(cfg: HubConfig) -> anyhow::Result<Hub> {
        if cfg.listen.is_none() && cfg.unix.is_none() {
            anyhow::bail!("nothing to listen on: give --listen and/or --unix");
        }
        let access = match &cfg.policy {
            Some(p) => access::Access::load(p)?,
            None => access::Access::open(),
        };
        let registry = Registry::new();
        let metrics = Arc::new(metrics::Metrics::default());
        let state = HubState::new(registry.clone(), metrics);
        let events = state.spawn_event_loop();
        state.set_supersede_grace(cfg.grace);
        let mut side_tasks = vec![limits::spawn_heap_trimmer(state.clone())];

        let isolation = isolation::Isolation::new(cfg.isolated_callers_per_peer);

        // An agent's session carries every caller's isolated HTTP/2
        // connection (one yamux stream each, up to a 4 MiB window): its
        // buffer budget must cover many stalled callers at once, or one
        // caller that stops reading would exhaust it for the others.
        let session = SessionConfig::server()
            .with_handshake_timeout(cfg.handshake_timeout)
            .with_max_buffered(HUB_SESSION_BUFFER);
        // Joined below, once the listen address (for --advertise) is known.
        let tunnel_cluster = Arc::new(std::sync::OnceLock::new());
        let mut mux = ListenMux::builder()
            .sniff_timeout(cfg.handshake_timeout)
            .max_pending(cfg.max_pending.max(1))
            .source_limits(
                listenmux::SourceLimits::default().with_max_per_source(cfg.max_pending_per_source),
            )
            .handshaker(
                ServerHandshaker::new(registry.clone(), session).with_max_peers(cfg.max_peers),
            )
            // Connections of `backchannel tunnel` callers.
            .handshaker(
                crate::tunnel::hub::TunnelHandshaker::new(
                    state.clone(),
                    access.clone(),
                    cfg.handshake_timeout,
                )
                .with_cluster(tunnel_cluster.clone()),
            );
        match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(c), Some(k)) => {
                let tls = crate::tls::server_config_with(
                    c,
                    k,
                    cfg.client_ca.as_deref(),
                    access.enforcing(),
                )?;
                mux = mux.tls(tokio_rustls::TlsAcceptor::from(tls));
            }
            (None, None) if cfg.client_ca.is_none() => {}
            _ => anyhow::bail!(
                "TLS needs both --tls-cert and --tls-key (--client-ca needs them too)"
            ),
        }
        let mux = mux.build();
        let stats = mux.stats();

        let mut streams: Vec<ConnStream> = Vec::new();
        let mut addr = None;
        if let Some(listen) = &cfg.listen {
            let l = limits::bind_tcp(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            let local = l.local_addr()?;
            if !access.enforcing() && !cfg.allow_anyone && !local.ip().is_loopback() {
                anyhow::bail!(
                    "refusing to run an open hub on {local}: anyone who can reach it could call \
                     every agent and take any name. Give --policy FILE, listen on loopback or \
                     --unix, or pass --allow-anyone to run open anyway"
                );
            }
            addr = Some(local);
            streams.push(Box::pin(mux.clone().incoming(l)));
        }
        if let Some(path) = &cfg.unix {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("listening on {}", path.display()))?;
            streams.push(Box::pin(mux.clone().incoming(l)));
        }
        // Port 0 in --advertise: the port this hub listens on.
        let cluster = match &cfg.cluster {
            Some(c) => {
                let mut c = c.clone();
                if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
                    c.tls_client = Some((cert.clone(), key.clone()));
                }
                if let (Some(a), Some(host)) =
                    (addr, c.advertise.strip_suffix(":0").map(str::to_string))
                {
                    c.advertise = format!("{host}:{}", a.port());
                    if c.hub_id == format!("{host}:0") {
                        c.hub_id = c.advertise.clone();
                    }
                }
                let (cluster, tasks) = cluster::Cluster::start(&c, state.clone())?;
                side_tasks.extend(tasks);
                let _ = tunnel_cluster.set(cluster.clone());
                Some(cluster)
            }
            None => None,
        };
        let iso = isolation.clone();
        let incoming = futures::stream::select_all(streams)
            .map(move |c| c.map(|c| isolation::CallerConn::new(c, &iso)));
        match access.path() {
            Some(p) => audit::policy_reloaded(p, &Ok(())),
            None if cfg.allow_anyone => tracing::warn!(
                "no --policy and --allow-anyone: the hub is open to anyone who can reach it"
            ),
            None => tracing::warn!(
                "no --policy: the hub is open (any local caller may call any agent); it listens on loopback/Unix only"
            ),
        }
        let announce_timeout = cfg
            .announce_timeout
            .or(access.enforcing().then_some(Duration::from_secs(10)))
            .filter(|t| !t.is_zero());
        let deadline_task = announce_timeout.map(|t| announce_deadline::spawn(state.clone(), t));

        let mut metrics_addr = None;
        let metrics_task = match &cfg.metrics {
            Some(m) => {
                let l = tokio::net::TcpListener::bind(m)
                    .await
                    .with_context(|| format!("listening for metrics on {m}"))?;
                metrics_addr = Some(l.local_addr()?);
                let mut registry = prometheus_client::registry::Registry::default();
                state.metrics.register(&mut registry);
                registry.register_collector(Box::new(state::StateCollector(state.clone())));
                registry.register_collector(Box::new(flow::FlowCollector(state.clone())));
                registry.register_collector(Box::new(metrics::MuxCollector(vec![stats.clone()])));
                Some(tokio::spawn(metrics::serve(l, Arc::new(registry))))
            }
            None => None,
        };

        let (health, health_svc) = tonic_health::server::health_reporter();
        health.set_serving::<PeersServer<admin::HubApi>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::hub::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::hub::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building the reflection service")?;
        let api = admin::HubApi {
            state: state.clone(),
            access: access.clone(),
            cluster: cluster.clone(),
        };

        let shutdown = CancellationToken::new();
        let stop_accepting = CancellationToken::new();
        let stop_conns = CancellationToken::new();
        let incoming = Drainable {
            inner: Some(Box::pin(incoming) as CallerStream),
            stop: Box::pin(stop_accepting.clone().cancelled_owned()),
        };
        let server = Server::builder()
            .trace_fn(isolation::request_span)
            // Bounds per caller connection, and dead callers are noticed even
            // when they hold streams open.
            .max_concurrent_streams(Some(1024))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            // A connection window well above the stream window: one slow
            // call cannot stall the others sharing the connection.
            .initial_stream_window_size(Some(backchannel::H2_STREAM_WINDOW))
            .initial_connection_window_size(Some(backchannel::H2_CONNECTION_WINDOW))
            // First: tonic's remote_addr()/peer_certs() for every layer below.
            .layer(listenmux::ConnectInfoLayer::new())
            .layer(
                routing::RouterLayer::new(state.clone(), access.clone())
                    .with_cluster(cluster.clone()),
            )
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(PeersServer::new(api.clone()))
            // Announcements are tiny; do not let one pin megabytes.
            .add_service(RegistrationServer::new(api).max_decoding_message_size(64 * 1024))
            .serve_with_incoming_shutdown(incoming, stop_conns.clone().cancelled_owned());

        let grace = cfg.grace;
        let cluster_handle = cluster.clone();
        let unix = cfg.unix.clone();
        let st = state.clone();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move {
            let mut server = std::pin::pin!(server);
            tokio::select! {
                r = &mut server => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "hub server failed");
                    }
                }
                _ = sd.cancelled() => {
                    // 1. Stop accepting and stop routing new calls.
                    stop_accepting.cancel();
                    st.start_draining();
                    // Other hubs stop routing here at once.
                    if let Some(c) = &cluster {
                        c.release_all().await;
                    }
                    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                    // 2. Let in-flight routed calls finish, within the grace period.
                    if tokio::time::timeout(grace, st.wait_idle()).await.is_err() {
                        tracing::warn!(in_flight = st.calls_in_flight(), "grace period over; cancelling calls");
                    }
                    // 3. Close every connection and session.
                    stop_conns.cancel();
                    for p in st.registry().list() {
                        st.registry().close(p.id);
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
                }
            }
            for p in st.registry().list() {
                st.registry().close(p.id);
            }
            if let Some(t) = metrics_task {
                t.abort();
            }
            for t in side_tasks {
                t.abort();
            }
            events.abort();
            if let Some(t) = deadline_task {
                t.abort();
            }
            if let Some(path) = unix {
                let _ = std::fs::remove_file(path);
            }
        });
        Ok(Hub {
            addr,
            metrics_addr,
            state,
            stats,
            access,
            cluster: cluster_handle,
            shutdown,
            task,
        })
    }

    /// Re-reads the policy file (what SIGHUP does). Sessions and calls stay;
    /// on error the policy in force stays and the error names the line.
    pub fn reload_policy(&self) -> Result<(), policy::PolicyError> {
        let r = self.access.reload();
        if let Some(p) = self.access.path() {
            audit::policy_reloaded(p, &r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
        r
    }

    /// Whether an access policy is in force.
    pub fn enforcing(&self) -> bool {
        self.access.enforcing()
    }

    /// The hub's view of its peers.
    pub fn state(&self) -> &Arc<HubState> {
        &self.state
    }

    /// The listener's counters (connections accepted, refused, evicted...).
    pub fn mux_stats(&self) -> listenmux::StatsSnapshot {
        self.stats.snapshot()
    }

    /// The cluster this hub belongs to, if any.
    pub fn cluster(&self) -> Option<&Arc<cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// The core registry (for reverse calls from the hub itself).
    pub fn registry(&self) -> &Registry {
        self.state.registry()
    }

    /// Waits (bounded) until a peer has announced `name`; returns its ID.
    pub async fn wait_for_name(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Option<backchannel::PeerId> {
        let (_, mut rx) = self.state.watch();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(id) = self.state.peer_named(name) {
                    return id;
                }
                let _ = rx.recv().await;
            }
        })
        .await
        .ok()
    }

    /// Graceful shutdown: stop accepting, drain in-flight calls within the
    /// grace period, close all sessions; returns when done.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// Runs the hub until SIGINT or SIGTERM.
pub async fn run(cfg: HubConfig) -> anyhow::Result<()> {
    let hub = Hub::start(cfg.clone()).await?;
    if let Some(a) = hub.addr {
        println!("hub listening on {a}");
    }
    if let Some(p) = &cfg.unix {
        println!("hub listening on unix:{}", p.display());
    }
    if let Some(m) = hub.metrics_addr {
        println!("metrics on http://{m}/metrics");
    }
    let stop = crate::signal::shutdown();
    let mut stop = std::pin::pin!(stop);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hup.recv() => {
                if !hub.enforcing() {
                    println!("SIGHUP: no --policy, nothing to reload");
                    continue;
                }
                match hub.reload_policy() {
                    Ok(()) => println!("policy reloaded"),
                    Err(e) => println!("policy reload failed, the previous policy stays: {e}"),
                }
            }
        }
    }
    println!("shutting down (grace {:?})", cfg.grace);
    hub.shutdown().await;
    println!("hub stopped");
    Ok(())
}

/// Command-line flags of `backchannel hub`.
#[derive(clap::Args, Debug, Clone)]
pub struct HubArgs {
    /// TCP address for agents and gRPC callers (one port for both).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7443", value_parser = flags::host_port)]
    pub listen: String,
    /// Also (or, with --no-tcp, only) listen on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Do not listen on TCP (use with --unix).
    #[arg(long, requires = "unix")]
    pub no_tcp: bool,
    /// PEM certificate chain: serve TLS on every listener.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): require client certificates signed by them.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics (text format) on this address, at /metrics.
    #[arg(long, value_name = "ADDR", value_parser = flags::host_port)]
    pub metrics: Option<String>,
    /// On SIGINT/SIGTERM, how long in-flight calls may take to finish
    /// (seconds, or 500ms, 2m; 0: do not wait; inf: no limit).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = flags::seconds_or_zero, allow_hyphen_values = true)]
    pub grace: Duration,
    /// Most agents connected at once (at least 1); further agents are
    /// refused with a message naming the limit (and retry).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = flags::at_least_one, allow_hyphen_values = true)]
    pub max_peers: usize,
    /// How long a new connection may take to finish TLS and send its first
    /// bytes, and a backchannel client then to start HTTP/2 (more than 0).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = flags::positive_seconds, allow_hyphen_values = true)]
    pub handshake_timeout: Duration,
    /// Connections being sniffed or handshaked at once (at least 1).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = flags::at_least_one, allow_hyphen_values = true)]
    pub max_pending: usize,
    /// Of those, the most one source address (IPv6: /64) may hold (at least 1).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = flags::at_least_one, allow_hyphen_values = true)]
    pub max_pending_per_source: usize,
    /// Close sessions that have not announced a name this long after their
    /// handshake (more than 0). Default: off, so clients that never
    /// announce (Gitaly-style) stay routable by peer ID.
    #[arg(long, value_name = "SECONDS", value_parser = flags::positive_seconds, allow_hyphen_values = true)]
    pub announce_timeout: Option<Duration>,
    /// Caller connections that get an upstream connection of their own to
    /// each peer, so a caller that stops reading cannot stall the others
    /// (0: all callers share one connection per peer).
    #[arg(long, value_name = "N", default_value_t = isolation::DEFAULT_ISOLATED_CALLERS_PER_PEER, value_parser = flags::count, allow_hyphen_values = true)]
    pub isolated_callers_per_peer: usize,
    /// Access policy (TOML): identities, who may announce which names, who
    /// may call which peers and methods, admins. Reloaded on SIGHUP.
    /// Without it the hub is open, and listens on loopback or Unix only.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Run without --policy on a non-loopback address: anyone who can reach
    /// the port may call every agent and take any name.
    #[arg(long, conflicts_with = "policy")]
    pub allow_anyone: bool,
    /// Join a cluster of hubs sharing this Redis (`redis://HOST:PORT[/DB]`):
    /// callers on any hub reach the agents of every hub.
    #[arg(long, value_name = "URL", requires = "advertise", value_parser = cluster::redis_url)]
    pub cluster: Option<String>,
    /// Where the other hubs of the cluster reach this hub (`HOST:PORT`).
    #[arg(long, value_name = "HOST:PORT", requires = "cluster", value_parser = flags::host_port)]
    pub advertise: Option<String>,
    /// This hub's ID in the cluster (default: the --advertise address).
    #[arg(long, value_name = "ID", requires = "cluster")]
    pub hub_id: Option<String>,
    /// How long a name's cluster entry lives unless refreshed.
    #[arg(long, value_name = "SECONDS", default_value = "15", value_parser = flags::positive_seconds, allow_hyphen_values = true)]
    pub cluster_ttl: Duration,
    /// How often this hub refreshes its names (shorter than --cluster-ttl).
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = flags::positive_seconds, allow_hyphen_values = true)]
    pub cluster_refresh: Duration,
    /// A file holding the token the hubs of the cluster present to each
    /// other on hops (the same file on every hub).
    #[arg(long, value_name = "FILE", requires = "cluster")]
    pub cluster_token_file: Option<PathBuf>,
    /// A file holding the password of the cluster's Redis (`AUTH`); keeps
    /// it off the command line.
    #[arg(long, value_name = "FILE", requires = "cluster")]
    pub cluster_password_file: Option<PathBuf>,
    /// The Redis ACL user to authenticate as (Redis 6+; default: `default`).
    #[arg(long, value_name = "NAME", requires = "cluster")]
    pub cluster_username: Option<String>,
    /// For a `rediss://` cluster URL: the CA certificate(s) (PEM) to verify
    /// Redis with (default: the system's trust store).
    #[arg(long, value_name = "FILE", requires = "cluster")]
    pub cluster_redis_ca: Option<PathBuf>,
    /// For a `rediss://` cluster URL: this hub's client certificate (PEM),
    /// for a Redis that checks clients. Needs --cluster-redis-key.
    #[arg(long, value_name = "FILE", requires_all = ["cluster", "cluster_redis_key"])]
    pub cluster_redis_cert: Option<PathBuf>,
    /// The private key (PEM) of --cluster-redis-cert.
    #[arg(long, value_name = "FILE", requires = "cluster_redis_cert")]
    pub cluster_redis_key: Option<PathBuf>,
    /// A client-certificate identity (URI or DNS SAN) of another hub whose
    /// hops are honoured without a token (repeatable).
    #[arg(
        long = "cluster-hub-identity",
        value_name = "NAME",
        requires = "cluster"
    )]
    pub cluster_hub_identities: Vec<String>,
    /// Key prefix on Redis: hubs with the same one form a cluster.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "backchannel",
        requires = "cluster"
    )]
    pub cluster_namespace: String,
    /// Hops to the other hubs over TLS, verifying them with this CA (PEM);
    /// this hub's --tls-cert/--tls-key is its client certificate.
    #[arg(long, value_name = "FILE", requires = "cluster")]
    pub cluster_tls_ca: Option<PathBuf>,
}

impl HubArgs {
    /// The hub configuration these flags describe.
    pub fn into_config(self) -> HubConfig {
        HubConfig {
            listen: (!self.no_tcp).then_some(self.listen),
            unix: self.unix,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            client_ca: self.client_ca,
            metrics: self.metrics,
            max_peers: self.max_peers,
            // `inf` means "wait as long as it takes".
            grace: self.grace.min(Duration::from_secs(365 * 86400)),
            handshake_timeout: self.handshake_timeout,
            max_pending: self.max_pending,
            max_pending_per_source: self.max_pending_per_source,
            announce_timeout: self.announce_timeout,
            isolated_callers_per_peer: self.isolated_callers_per_peer,
            policy: self.policy,
            allow_anyone: self.allow_anyone,
            cluster: self.cluster.map(|redis| {
                let advertise = self.advertise.unwrap_or_default();
                let mut c = cluster::ClusterConfig::new(redis, advertise);
                if let Some(id) = self.hub_id {
                    c.hub_id = id;
                }
                c.ttl = self.cluster_ttl;
                c.refresh = self.cluster_refresh;
                c.token_file = self.cluster_token_file;
                c.redis_password_file = self.cluster_password_file;
                c.redis_username = self.cluster_username;
                c.redis_tls_ca = self.cluster_redis_ca;
                c.redis_tls_client = self.cluster_redis_cert.zip(self.cluster_redis_key);
                c.hub_identities = self.cluster_hub_identities;
                c.namespace = self.cluster_namespace;
                c.tls_ca = self.cluster_tls_ca;
                c
            }),
        }
    }
}
