//! A cluster of hubs: one namespace of peer names over several hubs.
//!
//! Each hub records the names its peers announce in a shared
//! [`Directory`] (Redis: [`backchannel_directory::RedisDirectory`]) and
//! forwards a call for a name another hub holds over one hub-to-hub hop.
//!
//! - **Registration**: an announce claims the name cluster-wide (a new,
//!   larger generation); a peer that leaves releases it at once; every
//!   `refresh` period each held name's TTL starts over, and a name that
//!   vanished (expired while Redis was down, or Redis lost its data) is
//!   recorded again, unless a newer generation exists.
//! - **Fencing**: a hub that hears (or finds on refresh) a newer generation
//!   of a name it holds closes its stale session and never routes to it
//!   again.
//! - **Hop**: see [`hop`]. A hop is authenticated (cluster token or a
//!   listed hub certificate identity), carries the caller's identity (the
//!   first hub checked it against its policy) and is never routed further.
//! - **Redis down**: a hub serves its own peers as before; calls for names
//!   it does not hold fail at once with `UNAVAILABLE` naming the cause.

pub mod hop;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use backchannel::PeerId;
use backchannel_directory::{Directory, DirectoryError, Entry, Event, Refreshed, Registration};
use futures::StreamExt;
use tonic::{body::Body, Status};

use crate::{
    hub::{
        access::Access,
        audit,
        fate::{respond, Fate},
        identity::AUTHORIZATION,
        policy::PeerView,
        routing::CALLER_HEADER,
        state::HubState,
    },
    pb::hub::{peer_event::Kind, Peer},
    router::{forward, BoxFuture, NoObserver},
};

/// How a hub joins a cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub redis: String,
    /// Key prefix on Redis: hubs with the same one form a cluster.
    pub namespace: String,
    /// This hub's ID (unique in the cluster).
    pub hub_id: String,
    /// Where the other hubs reach this hub (`HOST:PORT`).
    pub advertise: String,
    /// How long a name's entry lives unless refreshed.
    pub ttl: Duration,
    /// How often held names are refreshed (and re-recorded if lost).
    pub refresh: Duration,
    /// Longest wait for any one Redis call.
    pub redis_timeout: Duration,
    /// The Redis ACL user to authenticate as (`None`: `default`).
    pub redis_username: Option<String>,
    /// A file holding the Redis password (its content, surrounding
    /// whitespace removed), read at start.
    pub redis_password_file: Option<PathBuf>,
    /// For a `rediss://` URL: the CA (PEM) to verify Redis with (default:
    /// the system's trust store).
    pub redis_tls_ca: Option<PathBuf>,
    /// For a `rediss://` URL: this hub's client certificate and key (PEM),
    /// for a Redis that checks clients.
    pub redis_tls_client: Option<(PathBuf, PathBuf)>,
    /// A file holding the token hubs of the cluster present to each other.
    pub token_file: Option<PathBuf>,
    /// Client-certificate identities (URI or DNS SAN) of the other hubs:
    /// their hop calls are honoured without a token.
    pub hub_identities: Vec<String>,
    /// Hops to the other hubs over TLS, verified with this CA.
    pub tls_ca: Option<PathBuf>,
    /// This hub's certificate and key for those hops (the hub's own
    /// `--tls-cert`/`--tls-key`).
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &backchannel_directory::store_label(&self.redis))
            .field("namespace", &self.namespace)
            .field("hub_id", &self.hub_id)
            .field("advertise", &self.advertise)
            .field("ttl", &self.ttl)
            .field("refresh", &self.refresh)
            .field("token_file", &self.token_file)
            .field("hub_identities", &self.hub_identities)
            .field("redis_username", &self.redis_username)
            .field("redis_password_file", &self.redis_password_file)
            .field("redis_tls_ca", &self.redis_tls_ca)
            .field("redis_tls_client", &self.redis_tls_client)
            .finish()
    }
}

/// The Redis password from `--cluster-password-file`, checked; warns when
/// the URL carries one instead (other local users can read a command line).
fn redis_password(cfg: &ClusterConfig) -> anyhow::Result<Option<String>> {
    let Some(path) = &cfg.redis_password_file else {
        if backchannel_directory::url_has_password(&cfg.redis) {
            tracing::warn!(
                "the Redis password in --cluster can be read by other local users (ps): use --cluster-password-file"
            );
        }
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--cluster-password-file {}: {e}", path.display()))?;
    let password = text.trim();
    if password.is_empty() {
        anyhow::bail!(
            "--cluster-password-file {}: the file is empty",
            path.display()
        );
    }
    Ok(Some(password.to_string()))
}

impl ClusterConfig {
    /// A cluster on `redis`, this hub reachable at `advertise`; TTL 15 s,
    /// refresh 5 s, hub ID from the advertised address.
    ///
    /// ```
    /// let c = backchannel_sidecar::hub::cluster::ClusterConfig::new("redis://127.0.0.1:6379", "10.0.0.1:7443");
    /// assert_eq!(c.hub_id, "10.0.0.1:7443");
    /// ```
    pub fn new(redis: impl Into<String>, advertise: impl Into<String>) -> Self {
        let advertise = advertise.into();
        ClusterConfig {
            redis: redis.into(),
            namespace: "backchannel".into(),
            hub_id: advertise.clone(),
            advertise,
            ttl: Duration::from_secs(15),
            refresh: Duration::from_secs(5),
            redis_timeout: Duration::from_secs(1),
            redis_username: None,
            redis_password_file: None,
            redis_tls_ca: None,
            redis_tls_client: None,
            token_file: None,
            hub_identities: Vec::new(),
            tls_ca: None,
            tls_client: None,
        }
    }
}

/// A name this hub holds.
#[derive(Debug, Clone)]
struct Held {
    peer: PeerId,
    identity: String,
    labels: BTreeMap<String, String>,
    /// What the directory recorded (`None`: not yet, the directory was
    /// unreachable at the announce; the refresh loop records it).
    entry: Option<Entry>,
}

/// This hub's membership in the cluster.
pub struct Cluster {
    dir: Arc<dyn Directory>,
    hub_id: String,
    advertise: String,
    auth: hop::HopAuth,
    state: Arc<HubState>,
    held: Mutex<HashMap<String, Held>>,
    hops: Mutex<hop::Channels>,
    refresh: Duration,
    /// Wakes the refresh loop at once (the event feed came back).
    kick: tokio::sync::Notify,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("hub_id", &self.hub_id)
            .field("advertise", &self.advertise)
            .field("directory", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Joins the cluster described by `cfg` (never waits for Redis).
    pub fn start(
        cfg: &ClusterConfig,
        state: Arc<HubState>,
    ) -> anyhow::Result<(Arc<Cluster>, Vec<tokio::task::JoinHandle<()>>)> {
        crate::hub::flags::host_port(&cfg.advertise)
            .map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
        if cfg.hub_id.is_empty()
            || cfg.hub_id.len() > 253
            || cfg.hub_id.contains(char::is_whitespace)
        {
            anyhow::bail!("--hub-id must be 1 to 253 characters without spaces");
        }
        if cfg.refresh >= cfg.ttl {
            anyhow::bail!(
                "--cluster-refresh ({:?}) must be shorter than --cluster-ttl ({:?})",
                cfg.refresh,
                cfg.ttl
            );
        }
        let auth = hop::HopAuth::load(cfg.token_file.as_deref(), cfg.hub_identities.clone())?;
        let mut rc = backchannel_directory::RedisConfig::new(cfg.redis.clone());
        rc.username = cfg.redis_username.clone();
        rc.password = redis_password(cfg)?;
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
        };
        if let Some(ca) = &cfg.redis_tls_ca {
            rc.tls_ca_pem = Some(read("--cluster-redis-ca", ca)?);
        }
        if let Some((cert, key)) = &cfg.redis_tls_client {
            rc.tls_client_pem = Some((
                read("--cluster-redis-cert", cert)?,
                read("--cluster-redis-key", key)?,
            ));
        }
        rc.namespace = cfg.namespace.clone();
        rc.ttl = cfg.ttl;
        rc.timeout = cfg.redis_timeout;
        let dir = backchannel_directory::RedisDirectory::start(rc)?;
        let hops = match &cfg.tls_ca {
            Some(ca) => hop::Channels::tls(
                ca,
                cfg.tls_client
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path())),
            )?,
            None => hop::Channels::default(),
        };
        let (c, tasks) = Self::with_directory(dir, cfg, auth, state);
        *c.hops.lock().unwrap_or_else(|e| e.into_inner()) = hops;
        Ok((c, tasks))
    }

    /// Joins a cluster over any [`Directory`] (tests, embedding).
    pub fn with_directory(
        dir: Arc<dyn Directory>,
        cfg: &ClusterConfig,
        auth: hop::HopAuth,
        state: Arc<HubState>,
    ) -> (Arc<Cluster>, Vec<tokio::task::JoinHandle<()>>) {
        let c = Arc::new(Cluster {
            dir,
            hub_id: cfg.hub_id.clone(),
            advertise: cfg.advertise.clone(),
            auth,
            state,
            held: Mutex::default(),
            hops: Mutex::default(),
            refresh: cfg.refresh,
            kick: tokio::sync::Notify::new(),
        });
        let tasks = vec![
            tokio::spawn(c.clone().follow_directory()),
            tokio::spawn(c.clone().follow_local()),
            tokio::spawn(c.clone().refresh_loop()),
        ];
        tracing::info!(hub_id = %c.hub_id, advertise = %c.advertise, "joined the cluster");
        (c, tasks)
    }

    /// This hub's ID.
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// The directory.
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.dir
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names this hub holds and has recorded in the directory.
    pub fn held_names(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .held()
            .iter()
            .map(|(n, h)| (n.clone(), h.entry.as_ref().map_or(0, |e| e.generation)))
            .collect();
        v.sort();
        v
    }

    /// Records that peer `id` announced `name`: claims it cluster-wide and
    /// returns the cluster generation (`None`: the directory is unreachable;
    /// the name is served locally and recorded by the refresh loop).
    /// Another identity holding the name on another hub is refused.
    pub async fn claim(
        &self,
        id: PeerId,
        name: &str,
        labels: &HashMap<String, String>,
        identity: &str,
    ) -> Result<Option<u64>, Status> {
        if self.state.is_draining() {
            return Err(Status::unavailable("the hub is shutting down"));
        }
        let labels: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        self.held().insert(
            name.to_string(),
            Held {
                peer: id,
                identity: identity.to_string(),
                labels: labels.clone(),
                entry: None,
            },
        );
        if !self.dir.is_connected() {
            tracing::warn!(peer = id.get(), %name, "cluster directory unreachable: the name is served by this hub only until it is recorded");
            return Ok(None);
        }
        let reg = Registration::new(name, &self.hub_id, &self.advertise, id.get(), identity)
            .with_labels(labels);
        match self.dir.claim(reg).await {
            Ok(e) => {
                let generation = e.generation;
                let mut held = self.held();
                match held.get_mut(name) {
                    Some(h) if h.peer == id => h.entry = Some(e),
                    // A newer local session took the name meanwhile; its
                    // own claim follows.
                    _ => {}
                }
                tracing::info!(peer = id.get(), %name, generation, "name recorded in the cluster");
                Ok(Some(generation))
            }
            Err(DirectoryError::Owned { hub_id, .. }) => {
                self.forget(name, id);
                Err(Status::permission_denied(format!(
                    "name '{name}' belongs to another identity (on hub '{hub_id}')"
                )))
            }
            Err(e) => {
                tracing::warn!(peer = id.get(), %name, error = %e, "cannot record the name in the cluster yet");
                Ok(None)
            }
        }
    }

    /// Drops `name` from the held set if peer `id` holds it; returns the
    /// recorded entry.
    fn forget(&self, name: &str, id: PeerId) -> Option<Option<Entry>> {
        let mut held = self.held();
        match held.get(name) {
            Some(h) if h.peer == id => held.remove(name).map(|h| h.entry),
            _ => None,
        }
    }

    /// This hub lost `name` to a newer generation elsewhere: its session is
    /// no longer routed to and closed once its calls are done.
    fn lost(&self, name: &str, newer: Option<&Entry>) {
        let Some(h) = self.held().remove(name) else {
            return;
        };
        tracing::warn!(
            peer = h.peer.get(),
            %name,
            generation = h.entry.as_ref().map(|e| e.generation),
            newer_hub = newer.map(|e| e.hub_id.as_str()),
            newer_generation = newer.map(|e| e.generation),
            "a newer session of this name is on another hub: closing ours"
        );
        if self.state.peer_named(name) == Some(h.peer) {
            self.state.unname(h.peer);
        }
        crate::hub::drain::retire(&self.state, h.peer, self.state.supersede_grace());
    }

    /// Unregisters every held name (a drain): other hubs stop routing here.
    pub async fn release_all(&self) {
        let entries: Vec<Entry> = self.held().drain().filter_map(|(_, h)| h.entry).collect();
        let n = entries.len();
        let dir = self.dir.clone();
        futures::stream::iter(entries)
            .for_each_concurrent(64, |e| {
                let dir = dir.clone();
                async move {
                    let _ = dir.release(&e).await;
                }
            })
            .await;
        tracing::info!(names = n, "released this hub's names from the cluster");
    }

    async fn follow_directory(self: Arc<Self>) {
        let mut rx = self.dir.events();
        loop {
            match rx.recv().await {
                Ok(Event::Claimed(e)) if e.hub_id != self.hub_id => {
                    // A name whose claim is still in flight (no entry yet)
                    // is not judged on an event: the claim's answer (fenced
                    // in Redis) or the next refresh says who holds it. An
                    // older claim's event arriving after ours went through
                    // must not retire the winner.
                    let stale = self.held().get(&e.name).is_some_and(|h| {
                        h.entry
                            .as_ref()
                            .is_some_and(|mine| mine.generation < e.generation)
                    });
                    if stale {
                        self.lost(&e.name.clone(), Some(&e));
                    }
                }
                Ok(Event::Connected) => self.kick.notify_one(),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.kick.notify_one(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Releases the names of peers that leave this hub, at once.
    async fn follow_local(self: Arc<Self>) {
        let (_, mut rx) = self.state.watch();
        loop {
            match rx.recv().await {
                Ok(ev) if ev.kind == Kind::Left as i32 => {
                    let Some(p) = ev.peer else { continue };
                    let id = PeerId::new(p.id);
                    let gone: Vec<(String, Option<Entry>)> = {
                        let mut held = self.held();
                        let names: Vec<String> = held
                            .iter()
                            .filter(|(_, h)| h.peer == id)
                            .map(|(n, _)| n.clone())
                            .collect();
                        names
                            .into_iter()
                            .filter_map(|n| held.remove(&n).map(|h| (n, h.entry)))
                            .collect()
                    };
                    for (name, entry) in gone {
                        if let Some(e) = entry {
                            match self.dir.release(&e).await {
                                Ok(_) => tracing::info!(%name, "name released from the cluster"),
                                Err(err) => {
                                    tracing::warn!(%name, error = %err, "cannot release the name; it expires after the TTL")
                                }
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.kick.notify_one(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn refresh_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.refresh) => {}
                _ = self.kick.notified() => {}
            }
            self.refresh_once().await;
        }
    }

    /// One refresh round: every held name's entry is kept alive, recorded
    /// (again) if missing, or found lost; names whose peer is gone are
    /// released.
    pub async fn refresh_once(&self) {
        if self.state.is_draining() {
            return;
        }
        let snapshot: Vec<(String, Held)> = self
            .held()
            .iter()
            .map(|(n, h)| (n.clone(), h.clone()))
            .collect();
        futures::stream::iter(snapshot)
            .for_each_concurrent(64, |(name, h)| async move {
                if self.state.peer_named(&name) != Some(h.peer) {
                    if let Some(Some(e)) = self.forget(&name, h.peer) {
                        let _ = self.dir.release(&e).await;
                    }
                    return;
                }
                match &h.entry {
                    None => {
                        let _ = self.claim(h.peer, &name, &to_map(&h.labels), &h.identity).await;
                    }
                    Some(e) => match self.dir.refresh(e).await {
                        Ok(Refreshed::Kept) => {}
                        Ok(Refreshed::Restored) => {
                            tracing::info!(%name, generation = e.generation, "name recorded in the cluster again")
                        }
                        Ok(Refreshed::Lost(newer)) => self.lost(&name, newer.as_ref()),
                        Err(err) => tracing::debug!(%name, error = %err, "refresh failed"),
                    },
                }
            })
            .await;
    }

    /// The cluster's peers not held by this hub, as `Peers.List` shows them.
    pub async fn remote_peers(&self) -> Result<Vec<Peer>, Status> {
        let entries = self
            .dir
            .list()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(entries
            .into_iter()
            .filter(|e| e.hub_id != self.hub_id)
            .map(peer_of)
            .collect())
    }

    /// The other hubs' claims and releases, as `Peers.Watch` events, from
    /// `events` (subscribed before any snapshot is taken). Ends with
    /// DATA_LOSS when events may have been missed: the watcher fell behind,
    /// or the directory's feed was lost and came back.
    pub fn remote_events(
        self: Arc<Self>,
        events: tokio::sync::broadcast::Receiver<Event>,
    ) -> impl futures::Stream<Item = Result<crate::pb::hub::PeerEvent, Status>> + Send + 'static
    {
        use tokio::sync::broadcast::error::RecvError;
        futures::stream::unfold(Some(events), move |rx| {
            let this = self.clone();
            async move {
                let mut rx = rx?;
                loop {
                    let (kind, e) = match rx.recv().await {
                        Ok(Event::Claimed(e)) => (Kind::Announced, e),
                        Ok(Event::Released(e)) => (Kind::Left, e),
                        Ok(Event::Disconnected(_)) => continue,
                        Ok(Event::Connected) => {
                            return Some((
                                Err(Status::data_loss(
                                    "the cluster directory's event feed was lost and is back; events may have been missed: call List and Watch again",
                                )),
                                None,
                            ))
                        }
                        Err(RecvError::Lagged(n)) => {
                            return Some((
                                Err(Status::data_loss(format!(
                                    "watcher fell {n} cluster events behind; call List and Watch again"
                                ))),
                                None,
                            ))
                        }
                        Err(RecvError::Closed) => return None,
                    };
                    if e.hub_id == this.hub_id {
                        continue; // this hub's own peers come from its own events
                    }
                    let ev = crate::pb::hub::PeerEvent {
                        kind: kind as i32,
                        peer: Some(peer_of(e)),
                    };
                    return Some((Ok(ev), Some(rx)));
                }
            }
        })
    }

    /// Routes a call for `target`, a name this hub does not hold: looks it
    /// up and forwards it to the hub holding it, or hands it back to
    /// `local` when no other hub does (the local answer: NOT_FOUND or the
    /// policy's refusal).
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        self: Arc<Self>,
        mut req: http::Request<Body>,
        target: String,
        caller: String,
        method: String,
        deadline: Option<tokio::time::Instant>,
        access: Arc<Access>,
        local: impl FnOnce(http::Request<Body>) -> BoxFuture<http::Response<Body>> + Send + 'static,
    ) -> BoxFuture<Result<http::Response<Body>, std::convert::Infallible>> {
        Box::pin(async move {
            let state = self.state.clone();
            let fail = |status: Status| {
                state.metrics.call_finished(Some(status.code()));
                Ok(respond(status, Fate::NotSent))
            };
            let entry = match self.locate(&target).await {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(local(req).await),
                Err(status) => return fail(status),
            };
            let labels = to_map(&entry.labels);
            let view = PeerView {
                name: &entry.name,
                labels: &labels,
            };
            let permit = match access.authorize_call(&caller, &target, Some(view), &method) {
                Ok(p) => p,
                Err(d) => {
                    audit::refused(&state.metrics, &d, Some(&caller), &method, &target);
                    return fail(d.status);
                }
            };
            let headers = req.headers_mut();
            headers.remove(CALLER_HEADER);
            if access.enforcing() {
                headers.remove(AUTHORIZATION);
            }
            if let Ok(v) = http::HeaderValue::from_str(&caller) {
                headers.insert(CALLER_HEADER, v);
            }
            self.auth.stamp(headers, &self.hub_id);
            let channel = self
                .hops
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&entry.addr);
            let label: Arc<str> = format!(
                "peer '{target}' (id {} on hub '{}')",
                entry.peer_id, entry.hub_id
            )
            .into();
            state.metrics.streams_opened.inc();
            let resp = forward(channel, req, label, deadline, Arc::new(NoObserver)).await;
            drop(permit);
            Ok(resp)
        })
    }

    /// Where a tunnel for `target`, a name this hub does not hold, goes:
    /// `Ok(Some(entry))` when another hub holds it, `Ok(None)` when no
    /// other hub does (the local answer applies), an UNAVAILABLE status
    /// when the directory cannot be asked.
    pub async fn locate(&self, target: &str) -> Result<Option<Entry>, Status> {
        if !self.dir.is_connected() {
            return Err(Status::unavailable(format!(
                "peer '{target}' is not on this hub, and the cluster directory is unreachable, so other hubs cannot be asked"
            )));
        }
        match self.dir.lookup(target).await {
            Ok(Some(e)) if e.hub_id != self.hub_id => Ok(Some(e)),
            Ok(_) => Ok(None),
            Err(e) => Err(Status::unavailable(format!(
                "peer '{target}' is not on this hub, and looking it up failed: {e}"
            ))),
        }
    }

    /// Opens the hop of a tunnel to the hub of `entry`: connects, sends
    /// `request` marked as a hop from this hub, and waits for that hub's
    /// answer (which is the agent's).
    pub async fn open_tunnel_hop(
        &self,
        entry: &Entry,
        request: backchannel::TunnelRequest,
    ) -> Result<backchannel::Tunnel<listenmux::BoxIo>, backchannel::TunnelError> {
        let side = format!("hub '{}'", entry.hub_id);
        let timeout = request.timeout();
        let dialer = self.hops.lock().unwrap_or_else(|e| e.into_inner()).dialer();
        let io = dialer.dial(&entry.addr, timeout).await.map_err(|source| {
            backchannel::TunnelError::NoAnswer {
                service: request.service().to_string(),
                side: side.clone(),
                source,
            }
        })?;
        let request = self.auth.stamp_tunnel(request, &self.hub_id);
        backchannel::tunnel::connect(io, request, &side).await
    }

    /// If `headers` mark a hop, whether it comes from a hub of this cluster:
    /// `Some(Ok(caller))` for an authenticated hop (with the caller's
    /// identity), `Some(Err(status))` for a refused one, `None` for a
    /// normal call.
    pub fn check_hop(
        &self,
        info: Option<&listenmux::ConnInfo>,
        headers: &http::HeaderMap,
    ) -> Option<Result<String, Status>> {
        self.auth.check(info, headers)
    }
}

/// A directory entry as `Peers.List` shows it.
fn peer_of(e: Entry) -> Peer {
    Peer {
        id: e.peer_id,
        name: e.name,
        labels: e.labels.into_iter().collect(),
        generation: e.generation,
        identity: e.identity,
        hub_id: e.hub_id,
        ..Default::default()
    }
}

fn to_map(labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A hop header on a hub that is not in a cluster: refused.
pub fn refuse_hop_without_cluster(headers: &http::HeaderMap) -> Option<Status> {
    headers.contains_key(hop::HOP_HEADER).then(|| {
        Status::unauthenticated(format!(
            "{} is only accepted from the hubs of a cluster",
            hop::HOP_HEADER
        ))
    })
}

/// `--cluster`: `redis://HOST:PORT[/DB]` (or `rediss://` for TLS).
pub fn redis_url(s: &str) -> Result<String, String> {
    let ok = (s.starts_with("redis://") || s.starts_with("rediss://")) && redis_url_parses(s);
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{}' is not redis://HOST:PORT[/DB]",
            backchannel_directory::store_label(s)
        ))
    }
}

fn redis_url_parses(s: &str) -> bool {
    let rest = s.split_once("://").map_or("", |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let (hostport, db) = rest.split_once('/').unwrap_or((rest, ""));
    (db.is_empty() || db.parse::<u32>().is_ok()) && crate::hub::flags::host_port(hostport).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_urls() {
        assert!(super::redis_url("redis://127.0.0.1:6379").is_ok());
        assert!(super::redis_url("redis://h:6379/2").is_ok());
        assert!(super::redis_url("redis://h").is_err());
        assert!(super::redis_url("http://h:1").is_err());
        assert!(super::redis_url("redis://h:1/x").is_err());
        let e = super::redis_url("redis://u:secret@h").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
