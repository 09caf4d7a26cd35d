//! What the hub knows about its peers beyond the core registry: names,
//! labels, per-peer call counters, and the Watch event stream.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use backchannel::{PeerEvent, PeerId, PeerInfo, Registry};
use tokio::sync::{broadcast, Notify};
use tonic::{transport::Channel, Code, Status};

use crate::{
    hub::{metrics::Metrics, policy::PeerView},
    pb::hub::{peer_event::Kind, Peer, PeerEvent as PbEvent},
    router::CallObserver,
};

/// Counters of one peer's routed calls.
#[derive(Default, Debug)]
pub struct PeerCounters {
    /// Routed calls still running.
    pub in_flight: AtomicI64,
    /// Routed calls so far.
    pub calls: AtomicU64,
    /// Request bytes sent to the peer.
    pub bytes_to_peer: AtomicU64,
    /// Response bytes received from the peer.
    pub bytes_from_peer: AtomicU64,
    /// The peer is leaving (it said so, or a newer session took its name):
    /// no new calls are routed to it.
    pub leaving: AtomicBool,
    /// Notified when `in_flight` drops to zero.
    pub idle: Notify,
}

struct Entry {
    info: PeerInfo,
    name: String,
    labels: HashMap<String, String>,
    counters: Arc<PeerCounters>,
    /// Who announced this session (empty until it announces).
    identity: String,
    /// The name's generation when this session took it (0: unnamed).
    generation: u64,
    /// A newer session of the same identity took the name: no new call is
    /// ever routed here, by name or by ID.
    superseded: bool,
}

#[derive(Default)]
struct Tables {
    peers: HashMap<PeerId, Entry>,
    names: HashMap<String, PeerId>,
    /// Last generation handed out: every handover of a name gets a larger
    /// one, so a name's generation only grows.
    last_generation: u64,
}

/// What an accepted announce did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// The session that held the name before (now superseded), if any.
    pub replaced: Option<PeerId>,
    /// The name's generation now.
    pub generation: u64,
}

/// Why a call cannot be routed: the authorizer's refusal, or a routing
/// failure (unknown peer on an open hub, peer gone).
#[derive(Debug)]
pub enum Unroutable<E> {
    /// The authorizer said no.
    Denied(E),
    /// Routing failed.
    Status(Status),
}

/// The hub's view of its peers. Shared by the router, the admin services
/// and the metrics endpoint.
pub struct HubState {
    registry: Registry,
    tables: Mutex<Tables>,
    events: broadcast::Sender<PbEvent>,
    /// Hub-wide counters (Prometheus).
    pub metrics: Arc<Metrics>,
    draining: AtomicBool,
    in_flight: AtomicI64,
    idle: Notify,
    /// How long a superseded session's calls may run (milliseconds).
    supersede_grace_ms: AtomicU64,
}

impl std::fmt::Debug for HubState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubState")
            .field("peers", &self.registry.len())
            .field("calls_in_flight", &self.calls_in_flight())
            .finish_non_exhaustive()
    }
}

/// Where a routed call goes.
pub struct Route {
    /// The peer's backchannel.
    pub channel: Channel,
    /// "peer 'name' (id N)", for messages.
    pub label: String,
    /// Counts the call.
    pub observer: Arc<dyn CallObserver>,
    /// The peer's ID.
    pub peer_id: PeerId,
    /// The peer's name (empty if unnamed).
    pub peer_name: String,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("label", &self.label)
            .field("peer_id", &self.peer_id)
            .field("peer_name", &self.peer_name)
            .finish_non_exhaustive()
    }
}

impl HubState {
    /// State over `registry`. Call [`spawn_event_loop`](Self::spawn_event_loop)
    /// right away so no join or leave is missed.
    pub fn new(registry: Registry, metrics: Arc<Metrics>) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(HubState {
            registry,
            tables: Mutex::new(Tables::default()),
            events,
            metrics,
            draining: AtomicBool::new(false),
            in_flight: AtomicI64::new(0),
            idle: Notify::new(),
            supersede_grace_ms: AtomicU64::new(10_000),
        })
    }

    /// The core registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the registry's joins and leaves until the registry's event
    /// channel closes or the task is aborted.
    pub fn spawn_event_loop(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let mut rx = self.registry.subscribe();
        let this = self.clone();
        // Peers that joined before we subscribed.
        for info in self.registry.list() {
            this.joined(info);
        }
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(PeerEvent::Connected(info)) => this.joined(info),
                    Ok(PeerEvent::Disconnected(id)) => this.left(id),
                    Err(broadcast::error::RecvError::Lagged(_)) => this.resync(),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    fn joined(&self, info: PeerInfo) {
        let event = {
            let mut t = self.tables();
            // Re-check under our lock: a peer that left between the caller's
            // lookup and here must not be re-added (its LEFT already ran).
            // Lock order is tables -> registry; the registry never takes ours.
            if t.peers.contains_key(&info.id) || self.registry.get(info.id).is_none() {
                return;
            }
            self.metrics.sessions_opened.inc();
            let e = Entry {
                info,
                name: String::new(),
                labels: HashMap::new(),
                counters: Arc::default(),
                identity: String::new(),
                generation: 0,
                superseded: false,
            };
            let pb = to_pb(&e);
            t.peers.insert(e.info.id, e);
            pb
        };
        tracing::info!(peer = event.id, "peer joined");
        self.emit(Kind::Joined, event);
    }

    fn left(&self, id: PeerId) {
        let event = {
            let mut t = self.tables();
            let Some(e) = t.peers.remove(&id) else {
                return;
            };
            if t.names.get(&e.name) == Some(&id) {
                t.names.remove(&e.name);
            }
            // Give back what a burst of peers grew the tables to.
            if t.peers.capacity() > 4 * t.peers.len() + 256 {
                t.peers.shrink_to_fit();
                t.names.shrink_to_fit();
            }
            self.metrics.sessions_closed.inc();
            to_pb(&e)
        };
        tracing::info!(peer = id.get(), name = %event.name, "peer left");
        self.emit(Kind::Left, event);
    }

    fn resync(&self) {
        let live = self.registry.list();
        let known: Vec<PeerId> = self.tables().peers.keys().copied().collect();
        for id in known {
            if !live.iter().any(|p| p.id == id) {
                self.left(id);
            }
        }
        for info in live {
            self.joined(info);
        }
    }

    fn emit(&self, kind: Kind, peer: Peer) {
        let _ = self.events.send(PbEvent {
            kind: kind as i32,
            peer: Some(peer),
        });
    }

    /// Names peer `id`, announced by `identity`. A name belongs to the
    /// identity holding it: a newer session of the same identity takes it
    /// over (the old session is superseded and closed), another identity is
    /// refused with PERMISSION_DENIED.
    pub fn announce(
        &self,
        id: PeerId,
        name: String,
        labels: HashMap<String, String>,
        identity: &str,
    ) -> Result<Announced, Status> {
        validate_announcement(&name, &labels)?;
        // The join event may still be on its way to the event loop: record
        // the join now (idempotent), so watchers see JOINED before ANNOUNCED.
        match self.registry.get(id) {
            Some(info) => self.joined(info),
            None => return Err(Status::unavailable(format!("peer {id} is gone"))),
        }
        let (replaced, event) = {
            let mut t = self.tables();
            let Some(me) = t.peers.get(&id) else {
                return Err(Status::unavailable(format!("peer {id} is gone")));
            };
            if !me.identity.is_empty() && me.identity != identity {
                return Err(Status::permission_denied(format!(
                    "this session announced itself as '{}'",
                    me.identity
                )));
            }
            if me.superseded {
                return Err(Status::aborted(
                    "this session was superseded by a newer one",
                ));
            }
            let holder = t.names.get(&name).copied();
            if let Some(holder) = holder.filter(|&h| h != id) {
                let owner = t.peers.get(&holder).map(|e| e.identity.as_str());
                if owner.is_some_and(|o| o != identity) {
                    return Err(Status::permission_denied(format!(
                        "name '{name}' belongs to another identity"
                    )));
                }
                // Newest session wins: IDs only grow, so a late announce from
                // an older session must not take the name back.
                if holder > id {
                    return Err(Status::aborted(format!(
                        "name '{name}' is held by a newer session (peer {holder})"
                    )));
                }
            }
            let replaced = t.names.insert(name.clone(), id).filter(|&old| old != id);
            let generation = if holder == Some(id) {
                t.peers[&id].generation
            } else {
                t.last_generation += 1;
                t.last_generation
            };
            let e = t.peers.get_mut(&id).expect("checked above");
            let old_name = std::mem::replace(&mut e.name, name);
            e.labels = labels;
            e.identity = identity.to_string();
            e.generation = generation;
            let pb = to_pb(e);
            if !old_name.is_empty() && old_name != pb.name && t.names.get(&old_name) == Some(&id) {
                t.names.remove(&old_name);
            }
            if let Some(old) = replaced {
                if let Some(o) = t.peers.get_mut(&old) {
                    o.name.clear();
                    o.superseded = true;
                }
            }
            (replaced, pb)
        };
        tracing::info!(peer = id.get(), name = %event.name, generation = event.generation, replaced = ?replaced, "peer announced");
        let generation = event.generation;
        self.emit(Kind::Announced, event);
        if let Some(old) = replaced {
            // Drained like a leaving peer: calls in flight finish (within
            // the grace period), new ones go to the new session.
            let grace = Duration::from_millis(self.supersede_grace_ms.load(Ordering::Relaxed));
            crate::hub::drain::retire(self, old, grace);
        }
        Ok(Announced {
            replaced,
            generation,
        })
    }

    /// The identity that announced peer `id` (empty if it has not).
    pub fn identity_of(&self, id: PeerId) -> Option<String> {
        self.tables().peers.get(&id).map(|e| e.identity.clone())
    }

    /// All peers, in ID order, with their sessions' flow.
    pub fn list(&self) -> Vec<Peer> {
        let mut v: Vec<Peer> = self.tables().peers.values().map(to_pb).collect();
        v.sort_by_key(|p| p.id);
        for p in &mut v {
            p.flow = crate::hub::flow::of(self.registry(), p.id);
        }
        v
    }

    /// Every peer's ID and name (empty until it announces).
    pub fn list_plain(&self) -> Vec<(u64, String)> {
        let t = self.tables();
        t.peers
            .values()
            .map(|e| (e.info.id.get(), e.name.clone()))
            .collect()
    }

    /// How long calls in flight on a superseded session may run before it
    /// is closed (the hub's grace period).
    pub fn set_supersede_grace(&self, grace: Duration) {
        let ms = grace.as_millis().min(u128::from(u64::MAX)) as u64;
        self.supersede_grace_ms.store(ms, Ordering::Relaxed);
    }

    /// See [`set_supersede_grace`](Self::set_supersede_grace).
    pub fn supersede_grace(&self) -> Duration {
        Duration::from_millis(self.supersede_grace_ms.load(Ordering::Relaxed))
    }

    /// The counters of peer `id`, if it is known.
    pub fn counters_of(&self, id: PeerId) -> Option<Arc<PeerCounters>> {
        self.tables().peers.get(&id).map(|e| e.counters.clone())
    }

    /// Takes `id`'s name away from it (if it still holds one).
    pub(crate) fn unname(&self, id: PeerId) {
        let mut t = self.tables();
        let Some(name) = t.peers.get_mut(&id).map(|e| std::mem::take(&mut e.name)) else {
            return;
        };
        if t.names.get(&name) == Some(&id) {
            t.names.remove(&name);
        }
    }

    /// Whether peer `id` is connected and has announced a name.
    pub fn is_announced(&self, id: PeerId) -> bool {
        self.tables()
            .peers
            .get(&id)
            .is_some_and(|e| !e.name.is_empty())
    }

    /// The peer holding `name`, if any.
    pub fn peer_named(&self, name: &str) -> Option<PeerId> {
        self.tables().names.get(name).copied()
    }

    /// A snapshot followed by live events (subscribed before the snapshot is
    /// taken, so nothing is lost in between).
    pub fn watch(&self) -> (Vec<Peer>, broadcast::Receiver<PbEvent>) {
        let rx = self.events.subscribe();
        (self.list(), rx)
    }

    /// Resolves a `backchannel-peer` value (a name, else a numeric ID) and
    /// asks `authorize` about the peer it names (`None`: no such peer, or a
    /// superseded session), all under one lock, so that a handover either
    /// happens before (the call goes to the new session) or after (the call
    /// was in flight already). No call is routed to a superseded session.
    pub fn resolve<A, E>(
        self: &Arc<Self>,
        target: &str,
        authorize: impl FnOnce(Option<PeerView<'_>>) -> Result<A, E>,
    ) -> Result<(Route, A), Unroutable<E>> {
        let target = target.trim();
        if let Ok(id) = target.parse::<PeerId>() {
            if let Some(info) = self.registry.get(id) {
                self.joined(info); // idempotent: the join event may be on its way
            }
        }
        let t = self.tables();
        let by_name = t.names.get(target).copied();
        let id = by_name.or_else(|| target.parse::<PeerId>().ok());
        let found = id.and_then(|id| t.peers.get(&id));
        let superseded = found.is_some_and(|e| e.superseded);
        let entry = found.filter(|e| !e.superseded);
        let granted = authorize(entry.map(|e| PeerView {
            name: &e.name,
            labels: &e.labels,
        }))
        .map_err(Unroutable::Denied)?;
        let Some(entry) = entry else {
            return Err(Unroutable::Status(match id {
                None => {
                    Status::not_found(format!("no peer named '{target}' is connected to this hub"))
                }
                Some(id) if superseded => Status::not_found(format!(
                    "peer {id} was superseded by a newer session of its name; call it by name"
                )),
                Some(id) => {
                    Status::not_found(format!("no peer with id {id} is connected to this hub"))
                }
            }));
        };
        let id = entry.info.id;
        let label = match by_name {
            Some(_) => format!("peer '{target}' (id {id})"),
            None => format!("peer {id}"),
        };
        let channel = match self.registry.backchannel(id) {
            // The router maps transport failures itself (naming the peer).
            Ok(c) => c.into_inner(),
            Err(_) => {
                return Err(Unroutable::Status(Status::unavailable(format!(
                    "{label} is gone"
                ))))
            }
        };
        let counters = entry.counters.clone();
        // Count the call before looking at `leaving`: a drain sets `leaving`
        // before it reads `in_flight`, so either it waits for this call or
        // this call sees the drain (both SeqCst).
        counters.in_flight.fetch_add(1, Ordering::SeqCst);
        if counters.leaving.load(Ordering::SeqCst) {
            if counters.in_flight.fetch_sub(1, Ordering::SeqCst) <= 1 {
                counters.idle.notify_waiters();
            }
            return Err(Unroutable::Status(Status::unavailable(format!(
                "{label} is leaving (draining its calls); not routing new calls to it"
            ))));
        }
        let route = Route {
            channel,
            label,
            observer: Arc::new(CallGuard::start(self.clone(), counters)),
            peer_id: id,
            peer_name: entry.name.clone(),
        };
        Ok((route, granted))
    }

    /// Stops routing new calls (they get UNAVAILABLE).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.idle.notify_waiters();
    }

    /// Whether the hub is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Routed calls in flight, hub-wide.
    pub fn calls_in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until no routed call is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.calls_in_flight() <= 0 {
                return;
            }
            notified.await;
        }
    }
}

fn to_pb(e: &Entry) -> Peer {
    let c = &e.counters;
    Peer {
        id: e.info.id.get(),
        name: e.name.clone(),
        labels: e.labels.clone(),
        remote_addr: e
            .info
            .remote_addr
            .map(|a| a.to_string())
            .unwrap_or_default(),
        connected_since: Some(prost_types::Timestamp::from(e.info.connected_at)),
        calls_in_flight: c.in_flight.load(Ordering::Relaxed),
        calls_total: c.calls.load(Ordering::Relaxed),
        bytes_to_peer: c.bytes_to_peer.load(Ordering::Relaxed),
        bytes_from_peer: c.bytes_from_peer.load(Ordering::Relaxed),
        generation: e.generation,
        identity: e.identity.clone(),
        hub_id: String::new(),
        flow: None,
    }
}

/// The hub's gauges, read at scrape time: peers connected and routed calls
/// in flight.
pub struct StateCollector(pub Arc<HubState>);

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for StateCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{gauge::ConstGauge, MetricType},
        };
        let gauges = [
            (
                "backchannel_hub_peers",
                "Peers connected now",
                self.0.registry().len() as i64,
            ),
            (
                "backchannel_hub_streams_in_flight",
                "Routed calls running now",
                self.0.calls_in_flight().max(0),
            ),
        ];
        for (name, help, value) in gauges {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(m)?;
        }
        Ok(())
    }
}

/// Counts one routed call in the peer's counters and the hub's metrics.
struct CallGuard {
    state: Arc<HubState>,
    counters: Arc<PeerCounters>,
}

impl CallGuard {
    /// `counters.in_flight` already counts the call.
    fn start(state: Arc<HubState>, counters: Arc<PeerCounters>) -> Self {
        counters.calls.fetch_add(1, Ordering::Relaxed);
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        state.metrics.streams_opened.inc();
        CallGuard { state, counters }
    }
}

impl CallObserver for CallGuard {
    fn bytes_to_target(&self, n: u64) {
        self.counters.bytes_to_peer.fetch_add(n, Ordering::Relaxed);
        self.state.metrics.bytes_to_peers.inc_by(n);
    }
    fn bytes_from_target(&self, n: u64) {
        self.counters
            .bytes_from_peer
            .fetch_add(n, Ordering::Relaxed);
        self.state.metrics.bytes_from_peers.inc_by(n);
    }
    fn finished(&self, code: Option<Code>) {
        self.state.metrics.call_finished(code);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.counters.in_flight.fetch_sub(1, Ordering::SeqCst) <= 1 {
            self.counters.idle.notify_waiters();
        }
        if self.state.in_flight.fetch_sub(1, Ordering::SeqCst) <= 1 {
            self.state.idle.notify_waiters();
        }
    }
}

/// Longest peer name, in bytes (a DNS name's limit).
pub const MAX_NAME_LEN: usize = 253;
/// Most labels a peer may announce.
pub const MAX_LABELS: usize = 32;
/// Longest label key and value, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

/// Checks a name and labels from the network before the hub keeps them.
pub fn validate_announcement(name: &str, labels: &HashMap<String, String>) -> Result<(), Status> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Status::invalid_argument(format!(
            "the name must be 1 to {MAX_NAME_LEN} bytes"
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(Status::invalid_argument(
            "the name may only contain ASCII letters, digits, '.', '_' and '-'",
        ));
    }
    if name.parse::<u64>().is_ok() {
        return Err(Status::invalid_argument(
            "the name must not be a number (numbers address peers by ID)",
        ));
    }
    if labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_LABELS} labels"
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_LEN || v.len() > MAX_LABEL_VALUE_LEN {
            return Err(Status::invalid_argument(format!(
                "label keys must be 1 to {MAX_LABEL_KEY_LEN} bytes and values at most {MAX_LABEL_VALUE_LEN}"
            )));
        }
    }
    Ok(())
}
