//! Caller isolation: every caller connection reaches a peer over an HTTP/2
//! connection of its own.
//!
//! A routed call's response travels peer → hub → caller. When a caller stops
//! reading, the hub stops reading that call from the peer, and the bytes the
//! peer already sent sit in the hub's receive buffers, holding HTTP/2
//! connection-level credit (a connection window is shared by all its
//! streams). If every caller shared one connection per peer, a handful of
//! never-read calls would hold all of it and stall every other caller of that
//! peer. So each caller connection gets its own upstream connection to each
//! peer it calls (a new yamux stream, see
//! [`Registry::dedicated_backchannel`](backchannel::Registry::dedicated_backchannel)):
//! a slow caller can only exhaust its own connection's window, so its cost
//! is bounded by that window, and other callers are untouched. The agent does
//! the same on its side towards the exposed service.
//!
//! The upstream connection opens with the caller's first call to that peer
//! (no extra round trip: yamux opens streams without one, and HTTP/2 sends
//! the request right behind its preface) and closes when the caller's
//! connection closes. At most `max_per_peer` caller connections get one per
//! peer at a time (a peer's session has a bounded number of streams); later
//! ones share the peer's common connection until a slot frees.

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use backchannel::{PeerId, Registry};
use listenmux::{ConnInfo, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::router::h2::{Corked, H2Upstream};

/// HTTP/2 connections one caller connection may have to one peer: calls
/// beyond [`CALLS_PER_CONNECTION`] in flight on each open a further one, so
/// one caller's concurrent calls do not all queue on one connection's task.
pub const CONNECTIONS_PER_CALLER: usize = 2;

/// Calls in flight on an upstream connection before another opens.
pub const CALLS_PER_CONNECTION: usize = 16;

/// Default of [`HubConfig::isolated_callers_per_peer`](crate::hub::HubConfig::isolated_callers_per_peer).
pub const DEFAULT_ISOLATED_CALLERS_PER_PEER: usize = 128;

/// Counts the dedicated connections per peer, hub-wide.
#[derive(Debug)]
pub struct Isolation {
    max_per_peer: usize,
    per_peer: Mutex<HashMap<PeerId, usize>>,
}

impl Isolation {
    /// At most `max_per_peer` dedicated connections per peer (0: none, every
    /// caller shares the peer's one connection).
    pub fn new(max_per_peer: usize) -> Arc<Self> {
        Arc::new(Isolation {
            max_per_peer,
            per_peer: Mutex::new(HashMap::new()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, usize>> {
        self.per_peer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, peer: PeerId) -> bool {
        let mut c = self.counts();
        let n = c.entry(peer).or_default();
        if *n >= self.max_per_peer {
            if *n == 0 {
                c.remove(&peer);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn give_back(&self, peer: PeerId) {
        let mut c = self.counts();
        if let Some(n) = c.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&peer);
            }
        }
    }

    /// Dedicated upstream connections open now, all peers together.
    pub fn dedicated(&self) -> usize {
        self.counts().values().sum()
    }
}

/// One caller connection's upstream channels, by peer. Dropped (closing
/// them) when the caller's connection and its last call are gone.
pub struct CallerScope {
    isolation: Arc<Isolation>,
    channels: Mutex<HashMap<PeerId, H2Upstream>>,
}

impl std::fmt::Debug for CallerScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerScope").finish_non_exhaustive()
    }
}

impl CallerScope {
    fn new(isolation: Arc<Isolation>) -> Self {
        CallerScope {
            isolation,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// This caller's own upstream to `peer` (HTTP/2 connections on yamux
    /// streams of its own, opened on first use); `None` when the peer has no
    /// dedicated slot left (or is gone): use the shared one.
    pub fn channel(&self, registry: &Registry, peer: PeerId) -> Option<H2Upstream> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&peer) {
            return Some(c.clone());
        }
        // Forget peers that have left (IDs are never reused).
        if map.len() >= 8 {
            let gone: Vec<PeerId> = map
                .keys()
                .copied()
                .filter(|id| registry.get(*id).is_none())
                .collect();
            for id in gone {
                map.remove(&id);
                self.isolation.give_back(id);
            }
        }
        if !self.isolation.take(peer) {
            return None;
        }
        let Some(info) = registry.get(peer) else {
            self.isolation.give_back(peer);
            return None;
        };
        let origin = info
            .remote_addr
            .and_then(|a| http::uri::Authority::try_from(a.to_string()).ok())
            .unwrap_or_else(|| http::uri::Authority::from_static("backchannel.local"));
        let reg = registry.clone();
        let upstream = H2Upstream::new(
            move || reg.open_stream(peer).map_err(Into::into),
            origin,
            CONNECTIONS_PER_CALLER,
            CALLS_PER_CONNECTION,
        );
        map.insert(peer, upstream.clone());
        Some(upstream)
    }
}

impl Drop for CallerScope {
    fn drop(&mut self) {
        let map = self.channels.get_mut().unwrap_or_else(|e| e.into_inner());
        for (peer, _) in map.drain() {
            self.isolation.give_back(peer);
        }
    }
}

/// What tonic puts into the extensions of every request of a [`CallerConn`]:
/// the connection's [`ConnInfo`] and its [`CallerScope`]. The router takes it
/// out and puts the plain `ConnInfo` back for the services behind it.
#[derive(Clone, Debug)]
pub struct CallerInfo {
    /// The connection's info from the listener.
    pub info: ConnInfo,
    /// The connection's upstream channels.
    pub scope: Arc<CallerScope>,
}

/// A connection from the listener, carrying its [`CallerScope`]. Its small
/// writes are held until a flush that first lets the call's tasks run
/// ([`Corked`]): a response's HEADERS, DATA and trailers go out together.
pub struct CallerConn {
    inner: Corked<Connection>,
    info: CallerInfo,
}

impl std::fmt::Debug for CallerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerConn").finish_non_exhaustive()
    }
}

impl CallerConn {
    /// Wraps `conn`, with dedicated slots counted in `isolation`.
    pub fn new(conn: Connection, isolation: &Arc<Isolation>) -> Self {
        let info = CallerInfo {
            info: conn.info().clone(),
            scope: Arc::new(CallerScope::new(isolation.clone())),
        };
        CallerConn {
            inner: Corked::new(conn),
            info,
        }
    }
}

impl Connected for CallerConn {
    type ConnectInfo = CallerInfo;
    fn connect_info(&self) -> CallerInfo {
        self.info.clone()
    }
}

impl AsyncRead for CallerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The hub's request span: [`backchannel::request_span`] over the
/// connection's [`ConnInfo`] (found inside [`CallerInfo`]).
pub fn request_span(request: &http::Request<()>) -> tracing::Span {
    match request.extensions().get::<CallerInfo>() {
        Some(ci) => {
            let mut r = http::Request::new(());
            *r.uri_mut() = request.uri().clone();
            r.extensions_mut().insert(ci.info.clone());
            backchannel::request_span(&r)
        }
        None => backchannel::request_span(request),
    }
}
