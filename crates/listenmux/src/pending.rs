//! Fair sharing of the pending-connection slots (connections being sniffed
//! or handshaked) between sources.
//!
//! Every pending connection is charged to its *source*: the remote IPv4
//! address, or the /64 prefix of an IPv6 address (one host usually owns a
//! whole /64); all Unix-socket and other connections share one source.
//! Two rules keep one source from taking the slots away from everyone else:
//!
//! 1. A source may hold at most [`SourceLimits::max_per_source`] pending
//!    connections; a further one from it is closed at once
//!    ([`StatsSnapshot::rejected_source_limit`](crate::StatsSnapshot::rejected_source_limit)).
//! 2. When all [`MuxConfig::max_pending`](crate::MuxConfig::max_pending)
//!    slots are taken, a newcomer from a source holding fewer connections
//!    than the biggest source takes the slot of that source's *oldest*
//!    pending connection, which is closed
//!    ([`StatsSnapshot::evicted`](crate::StatsSnapshot::evicted)). Only a
//!    newcomer from the biggest source itself is refused
//!    ([`StatsSnapshot::rejected_overload`](crate::StatsSnapshot::rejected_overload)).
//!
//! So silent or trickling connections from one address cost that address
//! its own slots, while connections from other addresses keep being served.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::oneshot;

/// Per-source limits on pending connections. See the module docs of
/// [`ListenMux::with_source_limits`](crate::ListenMux::with_source_limits).
///
/// ```
/// let limits = listenmux::SourceLimits::default();
/// assert_eq!(limits.max_per_source, 256);
/// let strict = listenmux::SourceLimits::default().with_max_per_source(16);
/// assert_eq!(strict.max_per_source, 16);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct SourceLimits {
    /// Most connections one source may have pending at once (default 256, a
    /// quarter of the default [`MuxConfig::max_pending`](crate::MuxConfig::max_pending)).
    pub max_per_source: usize,
    /// Whether a newcomer from a smaller source evicts the oldest pending
    /// connection of the biggest source when all slots are taken (default
    /// true); if false, newcomers are refused then.
    pub evict: bool,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            max_per_source: 256,
            evict: true,
        }
    }
}

impl SourceLimits {
    /// Sets [`max_per_source`](Self::max_per_source) (at least 1).
    pub fn with_max_per_source(mut self, n: usize) -> Self {
        self.max_per_source = n.max(1);
        self
    }

    /// Sets [`evict`](Self::evict).
    pub fn with_eviction(mut self, evict: bool) -> Self {
        self.evict = evict;
        self
    }
}

/// The source a connection is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SourceKey {
    V4(u32),
    V6Prefix(u64),
    Local,
}

impl SourceKey {
    pub(crate) fn of(addr: Option<std::net::SocketAddr>) -> SourceKey {
        match addr.map(|a| a.ip()) {
            None => SourceKey::Local,
            Some(IpAddr::V4(v4)) => SourceKey::V4(u32::from(v4)),
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Why a connection got no slot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Its source already holds its share.
    SourceLimit,
    /// Every slot is taken and its source is the biggest.
    Overload,
}

struct Slot {
    id: u64,
    evict: oneshot::Sender<()>,
}

#[derive(Default)]
struct Table {
    total: usize,
    next_id: u64,
    sources: HashMap<SourceKey, VecDeque<Slot>>,
}

/// The pending-connection table of one accept loop.
pub(crate) struct Pending {
    max_total: usize,
    limits: SourceLimits,
    table: Mutex<Table>,
}

/// A connection's slot; dropping it frees the slot.
pub(crate) struct PendingGuard {
    pending: Arc<Pending>,
    key: SourceKey,
    id: u64,
}

/// Resolves when the slot's connection has been evicted.
pub(crate) struct Evicted(oneshot::Receiver<()>);

/// What admitting a connection did.
pub(crate) struct Admitted {
    pub(crate) guard: PendingGuard,
    pub(crate) evicted: Evicted,
    /// Whether another source's connection was evicted to make room.
    pub(crate) made_room: bool,
}

impl Pending {
    pub(crate) fn new(max_total: usize, limits: SourceLimits) -> Arc<Pending> {
        Arc::new(Pending {
            max_total: max_total.max(1),
            limits,
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a connection from `key`, evicting another source's
    /// connection if need be.
    pub(crate) fn admit(self: &Arc<Self>, key: SourceKey) -> Result<Admitted, Refused> {
        let mut t = self.table();
        let mine = t.sources.get(&key).map_or(0, VecDeque::len);
        if mine >= self.limits.max_per_source {
            return Err(Refused::SourceLimit);
        }
        let mut made_room = false;
        if t.total >= self.max_total {
            if !self.limits.evict {
                return Err(Refused::Overload);
            }
            let biggest = t
                .sources
                .iter()
                .max_by_key(|(_, q)| q.len())
                .map(|(k, q)| (*k, q.len()));
            match biggest {
                Some((victim, n)) if n > mine + 1 => {
                    let q = t.sources.get_mut(&victim).expect("found above");
                    if let Some(slot) = q.pop_front() {
                        let _ = slot.evict.send(());
                    }
                    if q.is_empty() {
                        t.sources.remove(&victim);
                    }
                    t.total -= 1;
                    made_room = true;
                }
                _ => return Err(Refused::Overload),
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let (tx, rx) = oneshot::channel();
        t.sources
            .entry(key)
            .or_default()
            .push_back(Slot { id, evict: tx });
        t.total += 1;
        Ok(Admitted {
            guard: PendingGuard {
                pending: self.clone(),
                key,
                id,
            },
            evicted: Evicted(rx),
            made_room,
        })
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let t = self.table();
        (t.total, t.sources.len())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut t = self.pending.table();
        let Some(q) = t.sources.get_mut(&self.key) else {
            return;
        };
        // An evicted slot is already gone from its queue.
        if let Some(i) = q.iter().position(|s| s.id == self.id) {
            q.remove(i);
            if q.is_empty() {
                t.sources.remove(&self.key);
            }
            t.total -= 1;
        }
    }
}

/// Runs `work` until it finishes or its slot is evicted (then `work` is
/// dropped, which closes its connection, and `on_evict` runs).
pub(crate) async fn evictable<F: Future<Output = ()>>(
    evicted: Evicted,
    on_evict: impl FnOnce(),
    work: F,
) {
    let evicted = async {
        // A dropped sender (the slot was released normally) is no eviction.
        if evicted.0.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = work => {}
        _ = evicted => on_evict(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> SourceKey {
        SourceKey::of(Some(([127, 0, 0, last], 1000).into()))
    }

    #[test]
    fn per_source_limit_refuses_only_that_source() {
        let p = Pending::new(100, SourceLimits::default().with_max_per_source(2));
        let _a = p.admit(v4(1)).ok().unwrap();
        let _b = p.admit(v4(1)).ok().unwrap();
        assert_eq!(p.admit(v4(1)).err(), Some(Refused::SourceLimit));
        assert!(p.admit(v4(2)).is_ok());
    }

    #[test]
    fn a_full_table_evicts_the_oldest_of_the_biggest_source() {
        let p = Pending::new(4, SourceLimits::default());
        let mut big: Vec<_> = (0..3).map(|_| p.admit(v4(1)).ok().unwrap()).collect();
        let _small = p.admit(v4(2)).ok().unwrap();
        // Full. The biggest source itself is refused...
        assert_eq!(p.admit(v4(1)).err(), Some(Refused::Overload));
        // ...another source takes the oldest slot of the biggest.
        let c = p.admit(v4(3)).ok().unwrap();
        assert!(c.made_room);
        assert_eq!(p.counts(), (4, 3));
        let mut first = big.remove(0);
        assert!(first.evicted.0.try_recv().is_ok(), "oldest was evicted");
        assert!(big[0].evicted.0.try_recv().is_err());
        drop(first); // releasing an evicted slot frees nothing twice
        assert_eq!(p.counts(), (4, 3));
        drop(big);
        assert_eq!(p.counts(), (2, 2));
        // Sources with one each: nobody is evicted for a newcomer.
        let _d = p.admit(v4(4)).ok().unwrap();
        let _e = p.admit(v4(5)).ok().unwrap();
        assert_eq!(p.admit(v4(6)).err(), Some(Refused::Overload));
    }

    #[test]
    fn ipv6_is_grouped_by_64_and_mapped_v4_is_v4() {
        let a: std::net::SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let b: std::net::SocketAddr = "[2001:db8::ffff:1]:1".parse().unwrap();
        assert_eq!(SourceKey::of(Some(a)), SourceKey::of(Some(b)));
        let m: std::net::SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        assert_eq!(SourceKey::of(Some(m)), v4(1));
        assert_eq!(SourceKey::of(None), SourceKey::Local);
    }
}
