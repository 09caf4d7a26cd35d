//! The peer registry: which backchannel belongs to which peer.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::SystemTime,
};

use tokio::sync::broadcast;

use crate::{session::SessionHandle, Error, PeerChannel};

/// A peer's ID: from 1, increasing, never reused within a process (as in
/// Gitaly). Written and parsed as its decimal number.
///
/// ```
/// let id: backchannel::PeerId = "42".parse().unwrap();
/// assert_eq!(id.get(), 42);
/// assert_eq!(id.to_string(), "42");
/// assert_eq!(id, backchannel::PeerId::new(42));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(u64);

impl PeerId {
    /// The ID with this number.
    pub const fn new(id: u64) -> Self {
        PeerId(id)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::str::FromStr for PeerId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(PeerId)
    }
}

impl From<PeerId> for u64 {
    fn from(id: PeerId) -> u64 {
        id.0
    }
}

/// What the registry knows about a connected peer.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's ID.
    pub id: PeerId,
    /// Its remote address (TCP only).
    pub remote_addr: Option<SocketAddr>,
    /// When its session was established.
    pub connected_at: SystemTime,
}

/// A change in the set of connected peers.
#[derive(Clone, Debug)]
pub enum PeerEvent {
    /// A peer completed its handshake and can be called back.
    Connected(PeerInfo),
    /// A peer's session ended; its backchannel is gone.
    Disconnected(PeerId),
}

struct Entry {
    info: PeerInfo,
    channel: PeerChannel,
    session: SessionHandle,
}

struct Inner {
    next_id: AtomicU64,
    peers: Mutex<HashMap<PeerId, Entry>>,
    events: broadcast::Sender<PeerEvent>,
}

/// Maps connected peers to their backchannels. Cheap to clone; all clones
/// share one table.
///
/// ```
/// # async fn handler(registry: backchannel::Registry, request: tonic::Request<()>) -> Result<(), tonic::Status> {
/// use backchannel::RequestExt;
/// // In a gRPC handler of the server: who is calling, and how do I call it back?
/// let peer = request.peer_id()?;                // FAILED_PRECONDITION for plain clients
/// let channel = registry.backchannel(peer)?;    // a gRPC channel to the caller
/// // let mut client = MyClientServiceClient::new(channel);
/// # drop(channel); Ok(()) }
/// ```
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("peers", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry.
    ///
    /// ```
    /// let registry = backchannel::Registry::new();
    /// assert!(registry.is_empty());
    /// ```
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(1024);
        Registry {
            inner: Arc::new(Inner {
                next_id: AtomicU64::new(1),
                peers: Mutex::new(HashMap::new()),
                events,
            }),
        }
    }

    pub(crate) fn next_id(&self) -> PeerId {
        PeerId(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every critical section is a single insert/remove/read).
        self.inner.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn insert(&self, info: PeerInfo, channel: PeerChannel, session: SessionHandle) {
        let id = info.id;
        self.peers().insert(
            id,
            Entry {
                info: info.clone(),
                channel,
                session,
            },
        );
        let _ = self.inner.events.send(PeerEvent::Connected(info));
    }

    pub(crate) fn remove(&self, id: PeerId) {
        let removed = {
            let mut peers = self.peers();
            let removed = peers.remove(&id);
            // Give back what a burst of peers grew the table to.
            if peers.capacity() > 4 * peers.len() + 256 {
                peers.shrink_to_fit();
            }
            removed
        };
        if removed.is_some() {
            let _ = self.inner.events.send(PeerEvent::Disconnected(id));
        }
    }

    /// The backchannel of peer `id`: a [`PeerChannel`] whose every
    /// (re)connect opens a new yamux stream to the peer.
    ///
    /// ```
    /// let registry = backchannel::Registry::new();
    /// let id = backchannel::PeerId::new(7);
    /// assert!(matches!(registry.backchannel(id), Err(backchannel::Error::NoBackchannel(i)) if i == id));
    /// ```
    pub fn backchannel(&self, id: PeerId) -> Result<PeerChannel, Error> {
        self.peers()
            .get(&id)
            .map(|e| e.channel.clone())
            .ok_or(Error::NoBackchannel(id))
    }

    /// A new backchannel to peer `id` with an HTTP/2 connection of its own
    /// (its own yamux stream, opened on first use), not shared with the
    /// channel [`backchannel`](Self::backchannel) returns: calls on it
    /// cannot be slowed by another channel's stalled streams. The
    /// connection closes when the last clone is dropped.
    ///
    /// ```
    /// let registry = backchannel::Registry::new();
    /// assert!(registry.dedicated_backchannel(backchannel::PeerId::new(7)).is_err());
    /// ```
    pub fn dedicated_backchannel(&self, id: PeerId) -> Result<PeerChannel, Error> {
        let peers = self.peers();
        let e = peers.get(&id).ok_or(Error::NoBackchannel(id))?;
        Ok(PeerChannel::new(
            crate::server::reverse_channel(
                e.session.clone(),
                crate::server::default_reverse_endpoint(e.info.remote_addr),
            ),
            format!("peer {id}"),
        ))
    }

    /// The backchannel of the peer that sent `request`.
    ///
    /// ```
    /// let registry = backchannel::Registry::new();
    /// let status = registry.backchannel_for(&tonic::Request::new(())).unwrap_err();
    /// assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    /// ```
    pub fn backchannel_for<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<PeerChannel, tonic::Status> {
        let id = crate::RequestExt::peer_id(request)?;
        Ok(self.backchannel(id)?)
    }

    /// Information about peer `id`, if connected.
    pub fn get(&self, id: PeerId) -> Option<PeerInfo> {
        self.peers().get(&id).map(|e| e.info.clone())
    }

    /// The flow statistics of peer `id`'s session (round-trip time, windows,
    /// bytes in flight), if connected.
    ///
    /// ```
    /// let registry = backchannel::Registry::new();
    /// assert!(registry.session_stats(backchannel::PeerId::new(1)).is_none());
    /// ```
    pub fn session_stats(&self, id: PeerId) -> Option<crate::SessionStats> {
        self.peers().get(&id).map(|e| e.session.stats())
    }

    /// All connected peers, in ID order.
    ///
    /// ```
    /// assert!(backchannel::Registry::new().list().is_empty());
    /// ```
    pub fn list(&self) -> Vec<PeerInfo> {
        let mut v: Vec<_> = self.peers().values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Number of connected peers.
    pub fn len(&self) -> usize {
        self.peers().len()
    }

    /// Whether no peer is connected.
    pub fn is_empty(&self) -> bool {
        self.peers().is_empty()
    }

    /// Closes peer `id`'s session (its in-flight calls fail with
    /// UNAVAILABLE). Returns whether the peer was connected. Idempotent.
    ///
    /// ```
    /// assert!(!backchannel::Registry::new().close(backchannel::PeerId::new(1)));
    /// ```
    pub fn close(&self, id: PeerId) -> bool {
        let session = self.peers().get(&id).map(|e| e.session.clone());
        match session {
            Some(s) => {
                s.close();
                true
            }
            None => false,
        }
    }

    /// Waits until peer `id` has been removed from the registry (returns at
    /// once if it is not connected).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// // Not connected: returns at once.
    /// backchannel::Registry::new().wait_gone(backchannel::PeerId::new(3)).await;
    /// # });
    /// ```
    pub async fn wait_gone(&self, id: PeerId) {
        let mut events = self.subscribe();
        loop {
            if !self.peers().contains_key(&id) {
                return;
            }
            match events.recv().await {
                Ok(PeerEvent::Disconnected(gone)) if gone == id => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Subscribes to connect/disconnect events from now on. A subscriber
    /// that falls more than 1024 events behind sees
    /// [`broadcast::error::RecvError::Lagged`] and should re-read [`list`](Self::list).
    ///
    /// ```
    /// let mut events = backchannel::Registry::new().subscribe();
    /// assert!(events.try_recv().is_err());
    /// ```
    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.inner.events.subscribe()
    }
}
