//! `backchannel agent`: dials out to a hub, announces a name, and serves a
//! transparent proxy to a local gRPC server (`--expose`) on its backchannel.
//! Reconnects with exponential backoff and jitter.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use backchannel::{Backoff, ClientBuilder, ConnectionEvent, ReconnectingClient, Step};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::{
    addr::Target, pb::hub::registration_client::RegistrationClient, pb::hub::AnnounceRequest,
};

pub mod drain;
pub mod isolate;
pub mod probe;
pub(crate) mod token;

use isolate::PerConnection;

/// A session that lasted this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// How `backchannel agent` is set up.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The hub: `host:port` (or `tcp://host:port`) or `unix:PATH`.
    pub hub: String,
    /// Further hubs of the same cluster (`host:port`): the agent dials them
    /// in turn after `hub`, and moves to the next one when a hub goes away
    /// or drains.
    pub also_hubs: Vec<String>,
    /// The name to announce.
    pub name: String,
    /// Labels to announce.
    pub labels: Vec<(String, String)>,
    /// The local gRPC server to publish: `host:port`, `http://host:port` or
    /// `unix:PATH`.
    pub expose: String,
    /// TLS to the hub: trust this CA (PEM). Enables TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for hubs that require one.
    pub tls_cert: Option<PathBuf>,
    /// Key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The hub's name in its certificate (default: the host of `hub`).
    pub tls_server_name: Option<String>,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// On drain (SIGTERM), how long calls in flight may take to finish.
    pub grace: Duration,
    /// A file holding the bearer token sent on Announce (re-read on every
    /// connect, so it can be rotated in place).
    pub token_file: Option<PathBuf>,
}

impl AgentConfig {
    /// Defaults for everything but the essentials.
    pub fn new(hub: impl Into<String>, name: impl Into<String>, expose: impl Into<String>) -> Self {
        AgentConfig {
            hub: hub.into(),
            also_hubs: Vec::new(),
            name: name.into(),
            labels: Vec::new(),
            expose: expose.into(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            token_file: None,
        }
    }
}

/// What the agent is doing, published on a watch channel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// Sessions established so far (1 after the first connect, 2 after a
    /// reconnect...).
    pub sessions: u64,
    /// Whether a session is up now.
    pub connected: bool,
    /// Our peer ID on the hub, when the hub told us (Announce answered).
    pub peer_id: Option<u64>,
    /// Whether the hub accepted the announcement (false against a server
    /// without the Registration service).
    pub announced: bool,
}

/// A running agent.
pub struct Agent {
    status: watch::Receiver<AgentStatus>,
    stop: CancellationToken,
    drain: CancellationToken,
    task: tokio::task::JoinHandle<Option<drain::Drained>>,
    forwarder: PerConnection,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts the agent: it connects (and keeps reconnecting) in the
    /// background.
    pub fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        let labels: HashMap<String, String> = cfg.labels.iter().cloned().collect();
        crate::hub::state::validate_announcement(&cfg.name, &labels)
            .map_err(|s| anyhow::anyhow!("--name/--label: {}", s.message()))?;
        let hub: Target = cfg
            .hub
            .parse()
            .map_err(|e| anyhow::anyhow!("--hub '{}': {e}", cfg.hub))?;
        for h in &cfg.also_hubs {
            match h.parse::<Target>() {
                Ok(Target::Tcp { .. }) if matches!(hub, Target::Tcp { .. }) => {}
                Ok(_) => anyhow::bail!("--hub '{h}': several hubs must all be HOST:PORT"),
                Err(e) => anyhow::bail!("--hub '{h}': {e}"),
            }
        }
        let expose_addr: Target = cfg
            .expose
            .parse()
            .map_err(|e| anyhow::anyhow!("--expose '{}': {e}", cfg.expose))?;
        let expose = expose_channel(&expose_addr);
        if let Some(path) = &cfg.token_file {
            token::read(path)?;
            token::check_transport(&hub, cfg.tls_ca.is_some())?;
        }
        let tls = match &cfg.tls_ca {
            Some(ca) => {
                let cert_key = match (&cfg.tls_cert, &cfg.tls_key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                    (None, None) => None,
                    _ => anyhow::bail!("--tls-cert and --tls-key go together"),
                };
                let name = match &cfg.tls_server_name {
                    Some(n) => n.clone(),
                    None => hub.host().unwrap_or("localhost").to_string(),
                };
                let server_name = rustls_pki_types::ServerName::try_from(name.clone())
                    .with_context(|| format!("'{name}' is not a valid TLS server name"))?;
                Some((
                    tokio_rustls::TlsConnector::from(crate::tls::client_config(ca, cert_key)?),
                    server_name,
                ))
            }
            None if cfg.tls_cert.is_some() || cfg.tls_key.is_some() => {
                anyhow::bail!("--tls-cert/--tls-key need --tls-ca")
            }
            None => None,
        };
        let (tx, rx) = watch::channel(AgentStatus::default());
        let stop = CancellationToken::new();
        let drain = CancellationToken::new();
        let target = format!("exposed service {}", cfg.expose);
        let forwarder =
            PerConnection::new(move || Ok(expose_channel(&expose_addr)), expose, target);
        let task = tokio::spawn(run_loop(
            cfg,
            hub,
            forwarder.clone(),
            tls,
            tx,
            stop.clone(),
            drain.clone(),
        ));
        Ok(Agent {
            status: rx,
            stop,
            drain,
            task,
            forwarder,
        })
    }

    /// The current status.
    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// Waits (bounded) until at least `sessions` sessions have been
    /// established and one is up now.
    pub async fn wait_sessions(&self, sessions: u64, timeout: Duration) -> anyhow::Result<()> {
        let mut rx = self.status.clone();
        tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.connected && s.sessions >= sessions),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "agent did not reach {sessions} session(s) in {timeout:?} (status {:?})",
                self.status()
            )
        })?
        .map_err(|_| anyhow::anyhow!("agent stopped"))?;
        Ok(())
    }

    /// Stops the agent and closes its session at once (calls in flight
    /// fail).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Calls being forwarded to the exposed service now.
    pub fn calls_in_flight(&self) -> usize {
        self.forwarder.in_flight()
    }

    /// Drains and stops: tells the hub the agent is leaving (no new calls
    /// are routed to it), lets the calls in flight finish within the
    /// configured grace period, then closes the session. Returns how it
    /// went (`None` if no session was up).
    pub async fn drain(self) -> Option<drain::Drained> {
        self.drain.cancel();
        self.task.await.ok().flatten()
    }
}

type Tls = Option<(
    tokio_rustls::TlsConnector,
    rustls_pki_types::ServerName<'static>,
)>;

/// Keeps a session to the hub with a [`ReconnectingClient`] (a new
/// connection, session and peer ID after every loss, with backoff and
/// jitter), announces on every new session, and drains on request.
async fn run_loop(
    cfg: AgentConfig,
    hub: Target,
    forwarder: PerConnection,
    tls: Tls,
    status: watch::Sender<AgentStatus>,
    stop: CancellationToken,
    drain: CancellationToken,
) -> Option<drain::Drained> {
    // Only a session that stayed up resets the backoff: two agents fighting
    // over one name then slow down instead of flapping at the initial delay.
    let backoff = Backoff::default()
        .with_initial(cfg.backoff_initial)
        .with_max(cfg.backoff_max)
        .with_reset_after(STABLE_SESSION);
    let mut builder = ClientBuilder::new().backoff(backoff);
    if let Some((c, n)) = &tls {
        builder = builder.tls(c.clone(), n.clone());
    }
    let routes = forwarder.clone().into_routes();
    let client = match &hub {
        Target::Unix(path) => builder.reconnecting_unix(path, routes),
        Target::Tcp { .. } if !cfg.also_hubs.is_empty() => {
            let mut all = vec![hub.to_string()];
            all.extend(
                cfg.also_hubs
                    .iter()
                    .filter_map(|h| h.parse::<Target>().ok())
                    .map(|t| t.to_string()),
            );
            builder.reconnecting_tcp_any(&all, routes)
        }
        Target::Tcp { .. } => builder.reconnecting_tcp(&hub.to_string(), routes),
    };
    let client = match client {
        Ok(c) => c,
        Err(err) => {
            tracing::error!(hub = %hub, error = %err, "cannot dial the hub");
            return None;
        }
    };
    let mut events = client.subscribe();
    let mut tls_checked = false;
    // A session may have come up before the subscription: announce on it
    // too, and on each session only once.
    let mut announced_session = 0u64;
    let mut pending = client.session();
    loop {
        if let Some(session) = pending.take().filter(|&n| n > announced_session) {
            announced_session = session;
            match announce(&cfg, &client).await {
                Ok((peer_id, announced)) => status.send_modify(|s| {
                    s.sessions += 1;
                    s.connected = true;
                    s.peer_id = peer_id;
                    s.announced = announced;
                }),
                Err(st) => {
                    // Connected but unnamed would leave callers with
                    // NOT_FOUND for ever: start over with a new session.
                    if st.code() == tonic::Code::ResourceExhausted {
                        tracing::warn!(
                            reason = st.message(),
                            "the hub refused this agent; retrying"
                        );
                    } else {
                        tracing::warn!(status = %st, "announcing to the hub failed; reconnecting");
                    }
                    client.reconnect();
                }
            }
            continue;
        }
        let event = tokio::select! {
            e = events.recv() => e,
            _ = stop.cancelled() => {
                client.close();
                status.send_modify(|s| s.connected = false);
                return None;
            }
            _ = drain.cancelled() => {
                let drained = if client.is_connected() {
                    Some(drain::drain(&client, &mut events, &forwarder, cfg.grace).await)
                } else {
                    None
                };
                client.close();
                status.send_modify(|s| s.connected = false);
                return drained;
            }
        };
        match event {
            Ok(ConnectionEvent::Connected { session, .. }) => pending = Some(session),
            Ok(ConnectionEvent::Disconnected { reason, .. }) => {
                status.send_modify(|s| s.connected = false);
                tracing::warn!(hub = %hub, %reason, "session to the hub ended; reconnecting");
            }
            Ok(ConnectionEvent::ConnectFailed {
                error, retry_in, ..
            }) => {
                let hint = connect_hint(&cfg, &error);
                tracing::warn!(hub = %hub, error = %error, hint, ?retry_in, "cannot connect to the hub");
                // A plaintext agent against a TLS hub only sees its session
                // fail: look once at what the hub answers.
                if tls.is_none() && !tls_checked && error.step() != Some(Step::Connect) {
                    tls_checked = true;
                    if probe::hub_speaks_tls(&hub, Duration::from_secs(2)).await {
                        tracing::error!(hub = %hub, "the hub speaks TLS but this agent connects in plaintext: pass --tls-ca (and --tls-server-name if needed)");
                    }
                }
            }
            // Events of a newer kind, or a subscriber that fell behind.
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// Announces name and labels; a server without the Registration service
/// (UNIMPLEMENTED) is fine: the backchannel works without a name. Any other
/// failure is returned, and the caller reconnects.
async fn announce(
    cfg: &AgentConfig,
    client: &ReconnectingClient,
) -> Result<(Option<u64>, bool), tonic::Status> {
    let labels: HashMap<String, String> = cfg.labels.iter().cloned().collect();
    let mut rc = RegistrationClient::new(client.channel());
    let mut req = tonic::Request::new(AnnounceRequest {
        name: cfg.name.clone(),
        labels,
    });
    if let Some(path) = &cfg.token_file {
        let value = token::read(path)
            .and_then(|t| token::header_value(&t))
            .map_err(|e| tonic::Status::failed_precondition(format!("{e:#}")))?;
        req.metadata_mut().insert("authorization", value);
    }
    req.set_timeout(Duration::from_secs(10));
    match rc.announce(req).await {
        Ok(r) => {
            let r = r.into_inner();
            if r.replaced_peer_id != 0 {
                tracing::info!(
                    replaced = r.replaced_peer_id,
                    generation = r.generation,
                    "took the name over from an older session"
                );
            }
            Ok((Some(r.peer_id), true))
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            tracing::info!("the server has no backchannel.hub.v1.Registration; serving the backchannel unnamed");
            Ok((None, false))
        }
        Err(s) => Err(s),
    }
}

/// A hint for a failed connect, when the error says more than it shows: TLS
/// on one side only.
fn connect_hint(cfg: &AgentConfig, err: &backchannel::Error) -> &'static str {
    let text = error_chain(err).to_ascii_lowercase();
    let tls_failed = text.contains("corrupt message")
        || text.contains("invalidcontenttype")
        || text.contains("wrong version")
        || text.contains("unexpected eof")
        || text.contains("handshake");
    if cfg.tls_ca.is_some() && tls_failed {
        return "TLS handshake with the hub failed: is the hub serving plaintext (started without --tls-cert)? Then drop --tls-ca";
    }
    ""
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

/// A lazy channel to the exposed service: the agent starts even if the
/// service is not up yet; calls then fail with UNAVAILABLE.
/// HTTP/2 windows for the channel to the exposed service: a connection
/// window well above the stream window, so one slow call cannot stall the
/// others multiplexed on it.
fn with_windows(ep: Endpoint) -> Endpoint {
    ep.initial_stream_window_size(backchannel::H2_STREAM_WINDOW)
        .initial_connection_window_size(backchannel::H2_CONNECTION_WINDOW)
}

/// A lazy channel to the exposed service `expose`.
pub fn expose_channel(expose: &Target) -> Channel {
    match expose {
        Target::Unix(path) => {
            let path = Arc::new(path.clone());
            let ep = with_windows(Endpoint::from_static("http://localhost"));
            ep.connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(&*path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                }
            }))
        }
        Target::Tcp { .. } => {
            // A host:port always makes a valid authority.
            let ep = Endpoint::from_shared(expose.http_uri())
                .unwrap_or_else(|_| Endpoint::from_static("http://localhost"));
            with_windows(ep).tcp_nodelay(true).connect_lazy()
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let (name, hub, expose) = (cfg.name.clone(), cfg.hub.clone(), cfg.expose.clone());
    let grace = cfg.grace;
    let agent = Agent::start(cfg)?;
    let mut rx = agent.status.clone();
    let report = async move {
        let mut last = AgentStatus::default();
        while rx.changed().await.is_ok() {
            let now = rx.borrow_and_update().clone();
            if now.connected && now.sessions > last.sessions {
                let peer = now
                    .peer_id
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into());
                let how = if now.announced {
                    "announced"
                } else {
                    "connected, unnamed (no Registration service)"
                };
                println!("agent '{name}' {how} on {hub} as peer {peer}, exposing {expose}");
            } else if !now.connected && last.connected {
                println!("agent '{name}': session ended, reconnecting");
            }
            last = now;
        }
    };
    tokio::select! {
        _ = crate::signal::shutdown() => {}
        _ = report => {}
    }
    println!(
        "agent draining (grace {:?}; a second signal stops at once)",
        grace
    );
    let drain = agent.drain();
    tokio::select! {
        d = drain => match d {
            Some(d) if d.cut > 0 => println!("agent stopped; {} call(s) cut at the end of the grace period", d.cut),
            Some(_) => println!("agent stopped; every call finished"),
            None => println!("agent stopped"),
        },
        _ = crate::signal::shutdown() => println!("agent stopped at once (second signal)"),
    }
    Ok(())
}

/// Command-line flags of `backchannel agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The hub: `host:port`, `tcp://host:port` or `unix:PATH`. Repeat it
    /// for the hubs of a cluster (`host:port` each): the agent connects to
    /// one, and moves to the next when that hub goes away or drains.
    #[arg(long, value_name = "ADDR", required = true, value_parser = crate::hub::flags::hub_addr)]
    pub hub: Vec<String>,
    /// The name callers use in `backchannel-peer`.
    #[arg(long)]
    pub name: String,
    /// A label `key=value` announced with the name (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::hub::flags::label)]
    pub labels: Vec<(String, String)>,
    /// The local gRPC server to publish: `host:port`, `http://host:port` or
    /// `unix:PATH`.
    #[arg(long, value_name = "ADDR", value_parser = crate::hub::flags::expose_addr)]
    pub expose: String,
    /// PEM CA certificate(s) to verify the hub with: enables TLS.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for hubs started with --client-ca.
    #[arg(long, value_name = "FILE", requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The hub's name in its certificate (default: the host part of --hub).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// Largest delay between reconnect attempts (seconds, or 500ms, 1m; at
    /// least 0.1 s).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::hub::flags::backoff_seconds, allow_hyphen_values = true)]
    pub max_backoff: Duration,
    /// On SIGINT/SIGTERM, how long calls in flight may take to finish after
    /// the agent told the hub it is leaving (0: do not wait).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::hub::flags::seconds_or_zero, allow_hyphen_values = true)]
    pub grace: Duration,
    /// A file holding a bearer token for hubs with an access policy; sent on
    /// Announce (only over TLS, or to a loopback or Unix-socket hub).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl AgentArgs {
    /// The agent configuration these flags describe.
    pub fn into_config(self) -> anyhow::Result<AgentConfig> {
        let mut hubs = self.hub.into_iter();
        let mut cfg = AgentConfig::new(hubs.next().unwrap_or_default(), self.name, self.expose);
        cfg.also_hubs = hubs.collect();
        cfg.labels = self.labels;
        cfg.tls_ca = self.tls_ca;
        cfg.tls_cert = self.tls_cert;
        cfg.tls_key = self.tls_key;
        cfg.tls_server_name = self.tls_server_name;
        cfg.token_file = self.token_file;
        cfg.backoff_max = self.max_backoff;
        cfg.backoff_initial = cfg.backoff_initial.min(cfg.backoff_max);
        cfg.grace = self.grace.min(Duration::from_secs(365 * 86400));
        let labels: HashMap<String, String> = cfg.labels.iter().cloned().collect();
        crate::hub::state::validate_announcement(&cfg.name, &labels)
            .map_err(|s| anyhow::anyhow!("--name/--label: {}", s.message()))?;
        Ok(cfg)
    }
}
