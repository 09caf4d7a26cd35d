//! A client that keeps its session up: when it ends, dial again.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use tokio::sync::{broadcast, watch};
use tonic::{service::Routes, transport::Endpoint};
use tracing::{info, info_span, warn, Instrument};

use crate::{
    client::{self, ClientBuilder, Started, Target},
    session::{CloseOnDrop, SessionHandle},
    stream::YamuxStream,
    Error, PeerChannel,
};

/// How a [`ReconnectingClient`] waits between dial attempts: exponential,
/// capped, with random jitter so that many clients of one server do not
/// redial in step.
///
/// The n-th consecutive failed attempt waits `initial * multiplier^(n-1)`,
/// at most `max`, then varied by ±`jitter` (a fraction). After a session
/// that lasted at least `reset_after`, the next dial is immediate and the
/// count starts again; a session that ended sooner counts as a failed
/// attempt, so a server that accepts and drops at once is not hammered.
///
/// ```
/// use std::time::Duration;
/// let backoff = backchannel::Backoff::default()
///     .with_initial(Duration::from_millis(50))
///     .with_max(Duration::from_secs(2))
///     .with_jitter(0.1);
/// assert_eq!(backoff.max(), Duration::from_secs(2));
/// ```
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    reset_after: Duration,
}

impl Default for Backoff {
    /// 100 ms, doubling, at most 10 s, ±20 % jitter, reset after a session
    /// of 10 s.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.2,
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The wait after the first failed attempt.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// Sets [`initial`](Self::initial).
    pub fn with_initial(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }

    /// The longest wait (before jitter).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Sets [`max`](Self::max).
    pub fn with_max(mut self, d: Duration) -> Self {
        self.max = d;
        self
    }

    /// The growth factor per failed attempt.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// Sets [`multiplier`](Self::multiplier) (at least 1).
    pub fn with_multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() { m.max(1.0) } else { 1.0 };
        self
    }

    /// The random variation, as a fraction of the wait (0 to 1).
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Sets [`jitter`](Self::jitter) (clamped to 0..=1).
    pub fn with_jitter(mut self, j: f64) -> Self {
        self.jitter = if j.is_finite() {
            j.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// How long a session must last for the next dial to be immediate.
    pub fn reset_after(&self) -> Duration {
        self.reset_after
    }

    /// Sets [`reset_after`](Self::reset_after).
    pub fn with_reset_after(mut self, d: Duration) -> Self {
        self.reset_after = d;
        self
    }

    /// The wait before attempt `failures + 1`, after `failures` consecutive
    /// failures (0: no wait).
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = backchannel::Backoff::default().with_jitter(0.0);
    /// assert_eq!(b.delay(0), Duration::ZERO);
    /// assert_eq!(b.delay(1), Duration::from_millis(100));
    /// assert_eq!(b.delay(3), Duration::from_millis(400));
    /// assert_eq!(b.delay(100), Duration::from_secs(10));
    /// ```
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let exp = self
            .multiplier
            .powi(failures.saturating_sub(1).min(64) as i32);
        let base = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let factor = 1.0 + self.jitter * (2.0 * fastrand::f64() - 1.0);
        Duration::try_from_secs_f64(base * factor).unwrap_or(self.max)
    }
}

/// A change in a [`ReconnectingClient`]'s connection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// A new session is up: the server sees a new peer (with a new peer
    /// ID), and the reverse routes are served on it. Re-register here.
    Connected {
        /// Sessions established so far, this one included (1, 2, ...).
        session: u64,
        /// The server's address (TCP).
        remote_addr: Option<SocketAddr>,
    },
    /// The session ended; calls fail with `UNAVAILABLE` until the next
    /// `Connected`.
    Disconnected {
        /// The session that ended.
        session: u64,
        /// Why.
        reason: DisconnectReason,
    },
    /// A dial attempt failed; the next one follows after `retry_in`.
    ConnectFailed {
        /// Consecutive failed attempts, this one included.
        attempt: u32,
        /// What failed (its [`Error::step`] names the step).
        error: Arc<Error>,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
}

/// Why a session of a [`ReconnectingClient`] ended.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// One side sent GoAway (the server shut the session down, or it was
    /// closed here).
    GoAway,
    /// The session failed: transport error, keepalive or write timeout, the
    /// peer closing the connection, a protocol error.
    Failed(Arc<backchannel_yamux::SessionError>),
    /// [`ReconnectingClient::close`] was called: no more dialling.
    Closed,
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisconnectReason::GoAway => f.write_str("session closed with GoAway"),
            DisconnectReason::Failed(e) => std::fmt::Display::fmt(e, f),
            DisconnectReason::Closed => f.write_str("client closed"),
        }
    }
}

/// The session of the moment and its forward channel.
#[derive(Debug, Default)]
struct Current {
    session: Option<SessionHandle>,
    /// The HTTP/2 connection on `session`'s stream 1, connected as soon as
    /// the session is (the server makes a session a peer only then).
    channel: Option<tonic::transport::Channel>,
}

/// What [`ReconnectingClient::channel`] calls through.
#[derive(Debug)]
struct Follow {
    shared: Arc<Shared>,
    /// A channel whose connector always fails: calls while no session is up.
    unconnected: tonic::transport::Channel,
    /// Keeps the dial loop alive while a channel clone exists.
    _supervisor: Arc<Supervisor>,
}

impl crate::channel::CurrentChannel for Follow {
    fn current(&self) -> Option<tonic::transport::Channel> {
        self.shared.current().channel.clone()
    }
    fn fallback(&self) -> tonic::transport::Channel {
        self.unconnected.clone()
    }
}

#[derive(Debug)]
struct Shared {
    current: Mutex<Current>,
    events: broadcast::Sender<ConnectionEvent>,
    /// The number of the session that is up, or `None`.
    state: watch::Sender<Option<u64>>,
    closed: AtomicBool,
}

impl Shared {
    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Aborts the dial loop (and so closes its session) when the last client
/// handle and the last channel clone are gone.
#[derive(Debug)]
struct Supervisor(tokio::task::JoinHandle<()>);

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A backchannel client that keeps a session to its server up, as Gitaly's
/// grpc-go clients do through their dialer: when the session ends, it
/// dials again (a new socket, TLS, magic and yamux session every time) with
/// [`Backoff`], serves the same reverse routes on the new session and
/// reports every change as a [`ConnectionEvent`].
///
/// [`channel`](Self::channel) is one gRPC channel for the client's whole
/// life: its calls fail with `UNAVAILABLE` while no session is up and work
/// again once one is. Each new session is a new peer (with a new peer ID) on
/// the server, so anything registered with the server must be registered
/// again on [`ConnectionEvent::Connected`].
///
/// Built by [`ClientBuilder::reconnecting_tcp`] or
/// [`ClientBuilder::reconnecting_unix`]. Cheap to clone; the dialling stops
/// (and the session closes) on [`close`](Self::close), or once every clone
/// and every clone of its channel are dropped.
///
/// ```no_run
/// # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
/// use backchannel::ConnectionEvent;
/// let client = backchannel::ClientBuilder::new().reconnecting_tcp("127.0.0.1:50051", routes)?;
/// let mut events = client.subscribe();
/// while let Ok(event) = events.recv().await {
///     if let ConnectionEvent::Connected { session, .. } = event {
///         println!("session {session} is up");
///         // let mut api = MyServerApiClient::new(client.channel()); api.register(..).await?;
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ReconnectingClient {
    channel: PeerChannel,
    waiters: crate::sidechannel::Waiters,
    label: Arc<str>,
    shared: Arc<Shared>,
    _supervisor: Arc<Supervisor>,
}

impl ReconnectingClient {
    pub(crate) fn start(
        builder: ClientBuilder,
        targets: Vec<Target>,
        endpoint: Endpoint,
        routes: Routes,
    ) -> Self {
        let waiters = builder.waiters.clone();
        let target = targets
            .first()
            .cloned()
            .unwrap_or_else(|| Target::Tcp(String::new()));
        let (events, _) = broadcast::channel(64);
        let (state, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            current: Mutex::new(Current::default()),
            events,
            state,
            closed: AtomicBool::new(false),
        });
        let span = info_span!("backchannel_client", server = %target, reconnecting = true);
        let task = tokio::spawn(
            dial_loop(builder, targets, endpoint.clone(), routes, shared.clone()).instrument(span),
        );
        let supervisor = Arc::new(Supervisor(task));
        let unconnected = endpoint.connect_with_connector_lazy(tower::service_fn(|_uri| async {
            Err::<TokioIo<YamuxStream>, _>(Error::NotConnected)
        }));
        let follow = Follow {
            shared: shared.clone(),
            unconnected,
            _supervisor: supervisor.clone(),
        };
        ReconnectingClient {
            waiters,
            label: Arc::from(format!("server {target}")),
            channel: PeerChannel::following(Arc::new(follow), format!("server {target}")),
            shared,
            _supervisor: supervisor,
        }
    }

    /// The gRPC channel to the server, across sessions.
    pub fn channel(&self) -> PeerChannel {
        self.channel.clone()
    }

    /// Opens a [`Tunnel`](crate::Tunnel) to the server on the session of
    /// the moment ([`Error::NotConnected`] while there is none).
    ///
    /// ```no_run
    /// # async fn run(client: backchannel::ReconnectingClient) -> Result<(), backchannel::TunnelError> {
    /// client.wait_connected().await;
    /// let tunnel = client.open_tunnel(backchannel::TunnelRequest::new("logs")).await?;
    /// # drop(tunnel); Ok(()) }
    /// ```
    pub async fn open_tunnel(
        &self,
        request: crate::TunnelRequest,
    ) -> Result<crate::Tunnel, crate::TunnelError> {
        let session = self.shared.current().session.clone();
        let session = session.ok_or(Error::NotConnected)?;
        crate::tunnel::open_on(&session, request, &self.label).await
    }

    /// Registers a Gitaly sidechannel waiter (see
    /// [`Client::sidechannel`](crate::Client::sidechannel)); it is answered
    /// on whichever session the server opens it.
    pub fn sidechannel(&self) -> crate::SidechannelWaiter {
        self.waiters.register()
    }

    /// Connection events from now on (the latest state is
    /// [`is_connected`](Self::is_connected)). A subscriber more than 64
    /// events behind gets `Lagged` and misses the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.shared.events.subscribe()
    }

    /// Whether a session is up.
    pub fn is_connected(&self) -> bool {
        self.shared.state.borrow().is_some()
    }

    /// The flow statistics of the session that is up, if any.
    pub fn session_stats(&self) -> Option<crate::SessionStats> {
        self.shared.current().session.as_ref().map(|s| s.stats())
    }

    /// The number of the session that is up (1 for the first), if any.
    pub fn session(&self) -> Option<u64> {
        *self.shared.state.borrow()
    }

    /// Waits until a session is up and returns its number (at once if one
    /// is).
    pub async fn wait_connected(&self) -> u64 {
        let mut state = self.shared.state.subscribe();
        let session = match state.wait_for(|s| s.is_some()).await {
            Ok(n) => n.unwrap_or_default(),
            // The sender lives in `shared`, which `self` holds: not reached.
            Err(_) => std::future::pending().await,
        };
        session
    }

    /// Ends the session of the moment, if any (the server sees its peer
    /// leave), and dials a new one after the backoff: for an application
    /// that finds a session unusable, such as one the server refused to
    /// register. The ended session counts as a failed attempt unless it
    /// lasted [`Backoff::reset_after`].
    pub fn reconnect(&self) {
        let mut current = self.shared.current();
        if let Some(session) = current.session.take() {
            session.close();
        }
        current.channel = None;
    }

    /// Stops dialling and closes the session of the moment, reporting
    /// [`DisconnectReason::Closed`] if one was up. Idempotent.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self._supervisor.0.abort();
        let mut current = self.shared.current();
        if let Some(session) = current.session.take() {
            session.close();
        }
        current.channel = None;
        let was = self.shared.state.send_replace(None);
        drop(current);
        if let Some(session) = was {
            let _ = self.shared.events.send(ConnectionEvent::Disconnected {
                session,
                reason: DisconnectReason::Closed,
            });
        }
    }
}

async fn dial_loop(
    builder: ClientBuilder,
    targets: Vec<Target>,
    endpoint: Endpoint,
    routes: Routes,
    shared: Arc<Shared>,
) {
    let mut failures: u32 = 0;
    let mut sessions: u64 = 0;
    // With several servers: each attempt goes to the next one, and a session
    // the server ended with GoAway after it had lasted is followed at once
    // by a dial to another server (the server asked its clients to move).
    let mut next: usize = 0;
    let mut moved = false;
    loop {
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let delay = builder.backoff.delay(failures);
        if !delay.is_zero() && !std::mem::take(&mut moved) {
            tokio::time::sleep(delay).await;
        }
        let Some(target) = targets.get(next % targets.len().max(1)) else {
            return;
        };
        next = next.wrapping_add(1);
        let label = target.to_string();
        let dialled = async {
            let (io, remote) = client::connect(target, builder.connect_timeout).await?;
            let io = client::secure(io, &builder.tls, builder.config.handshake_timeout()).await?;
            let started = client::start_session(
                io,
                &builder.config,
                &builder.server,
                routes.clone(),
                builder.dispatch(&label),
                &label,
                tracing::Span::current(),
            )?;
            // The forward HTTP/2 connection on stream 1, at once: the server
            // counts a session as a peer only once it is up.
            let Started {
                session,
                first,
                end,
            } = started;
            let slot = Arc::new(Mutex::new(Some(first)));
            let owner = session.clone();
            let connector = tower::service_fn(move |_uri| {
                let stream = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                let owner = owner.clone();
                async move {
                    match stream {
                        Some(s) => Ok(TokioIo::new(s)),
                        None => {
                            // Stream 1's HTTP/2 connection failed: a session
                            // without a forward channel is of no use, so end
                            // it and let the dial loop make a new one (Gitaly's
                            // server accepts one client stream only).
                            owner.close();
                            Err(Error::NotConnected)
                        }
                    }
                }
            });
            let timeout = builder.config.handshake_timeout();
            let channel = match tokio::time::timeout(
                timeout,
                endpoint.clone().connect_with_connector(connector),
            )
            .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    session.close();
                    return Err(Error::Http2(e));
                }
                Err(_) => {
                    session.close();
                    return Err(Error::Timeout {
                        step: crate::Step::Http2,
                        after: timeout,
                    });
                }
            };
            Ok::<_, Error>((session, channel, end, remote))
        }
        .await;
        let (session, channel, end, remote) = match dialled {
            Ok(d) => d,
            Err(error) => {
                failures = failures.saturating_add(1);
                let retry_in = builder.backoff.delay(failures);
                warn!(%error, attempt = failures, ?retry_in, "connecting to the server failed");
                let _ = shared.events.send(ConnectionEvent::ConnectFailed {
                    attempt: failures,
                    error: Arc::new(error),
                    retry_in,
                });
                // The next iteration waits `delay(failures)`.
                continue;
            }
        };
        sessions += 1;
        let since = Instant::now();
        let guard = CloseOnDrop(session.clone());
        {
            let mut current = shared.current();
            if shared.closed.load(Ordering::Acquire) {
                // `close` ran meanwhile; `guard` ends the session.
                return;
            }
            current.session = Some(session);
            current.channel = Some(channel);
            shared.state.send_replace(Some(sessions));
        }
        info!(session = sessions, remote = ?remote, "connected");
        let _ = shared.events.send(ConnectionEvent::Connected {
            session: sessions,
            remote_addr: remote,
        });

        let reason = match end.await {
            Ok(Ok(())) | Err(_) => DisconnectReason::GoAway,
            Ok(Err(e)) => DisconnectReason::Failed(Arc::new(e)),
        };
        let asked_to_move = targets.len() > 1
            && matches!(reason, DisconnectReason::GoAway)
            && since.elapsed() >= MOVE_AFTER;
        drop(guard);
        {
            let mut current = shared.current();
            current.session = None;
            current.channel = None;
        }
        shared.state.send_replace(None);
        info!(session = sessions, %reason, "disconnected");
        let _ = shared.events.send(ConnectionEvent::Disconnected {
            session: sessions,
            reason,
        });
        if asked_to_move {
            moved = true;
        } else if since.elapsed() >= builder.backoff.reset_after {
            failures = 0;
        } else {
            failures = failures.saturating_add(1);
        }
    }
}

/// With several servers, a session ended by the server's GoAway after at
/// least this long is followed by a dial to the next server without
/// backoff; shorter sessions back off (a server that closes every session
/// at once must not be dialled in a tight loop).
const MOVE_AFTER: Duration = Duration::from_secs(1);
