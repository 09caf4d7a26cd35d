//! Counters kept by the mux.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of a [`ListenMux`](crate::ListenMux).
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) accepted: AtomicU64,
    pub(crate) plain: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) handshake_io_errors: AtomicU64,
    pub(crate) handshake_protocol_errors: AtomicU64,
    pub(crate) tls_failures: AtomicU64,
    pub(crate) sniff_timeouts: AtomicU64,
    pub(crate) sniff_errors: AtomicU64,
    pub(crate) rejected_overload: AtomicU64,
    pub(crate) rejected_source_limit: AtomicU64,
    pub(crate) evicted: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted from the listener.
    pub accepted: u64,
    /// Connections handed to the gRPC server as plain connections.
    pub plain: u64,
    /// Connections whose magic selected a handshaker.
    pub handshakes: u64,
    /// Handshakes that failed (the sum of the three below).
    pub handshake_failures: u64,
    /// Handshakes that failed because the peer was too slow.
    pub handshake_timeouts: u64,
    /// Handshakes that failed on reading or writing the connection.
    pub handshake_io_errors: u64,
    /// Handshakes that failed because the peer spoke the protocol wrongly
    /// or was refused (for example a peer limit).
    pub handshake_protocol_errors: u64,
    /// Connections whose TLS handshake failed (not counted in `sniff_errors`).
    pub tls_failures: u64,
    /// Connections closed because they sent nothing (or too little) in time.
    pub sniff_timeouts: u64,
    /// Connections that failed or closed before their first bytes.
    pub sniff_errors: u64,
    /// Connections closed at once because too many were being sniffed (and
    /// their source was the one holding the most).
    pub rejected_overload: u64,
    /// Connections closed at once because their source already had its
    /// share of pending connections ([`SourceLimits::max_per_source`](crate::SourceLimits::max_per_source)).
    pub rejected_source_limit: u64,
    /// Pending connections closed to make room for a newcomer from a source
    /// holding fewer.
    pub evicted: u64,
}

impl Stats {
    pub(crate) fn inc(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            accepted: r(&self.accepted),
            plain: r(&self.plain),
            handshakes: r(&self.handshakes),
            handshake_failures: r(&self.handshake_failures),
            handshake_timeouts: r(&self.handshake_timeouts),
            handshake_io_errors: r(&self.handshake_io_errors),
            handshake_protocol_errors: r(&self.handshake_protocol_errors),
            tls_failures: r(&self.tls_failures),
            sniff_timeouts: r(&self.sniff_timeouts),
            sniff_errors: r(&self.sniff_errors),
            rejected_overload: r(&self.rejected_overload),
            rejected_source_limit: r(&self.rejected_source_limit),
            evicted: r(&self.evicted),
        }
    }
}

/// Adds counters field by field (to total several muxes).
///
/// ```
/// let a = listenmux::StatsSnapshot { accepted: 1, ..Default::default() };
/// assert_eq!((a + a).accepted, 2);
/// ```
impl std::ops::Add for StatsSnapshot {
    type Output = StatsSnapshot;

    fn add(self, o: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted + o.accepted,
            plain: self.plain + o.plain,
            handshakes: self.handshakes + o.handshakes,
            handshake_failures: self.handshake_failures + o.handshake_failures,
            handshake_timeouts: self.handshake_timeouts + o.handshake_timeouts,
            handshake_io_errors: self.handshake_io_errors + o.handshake_io_errors,
            handshake_protocol_errors: self.handshake_protocol_errors + o.handshake_protocol_errors,
            tls_failures: self.tls_failures + o.tls_failures,
            sniff_timeouts: self.sniff_timeouts + o.sniff_timeouts,
            sniff_errors: self.sniff_errors + o.sniff_errors,
            rejected_overload: self.rejected_overload + o.rejected_overload,
            rejected_source_limit: self.rejected_source_limit + o.rejected_source_limit,
            evicted: self.evicted + o.evicted,
        }
    }
}
