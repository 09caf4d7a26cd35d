//! Counters kept by the mux.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of a [`ListenMux`](crate::ListenMux).
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) accepted: AtomicU64,
    pub(crate) plain: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) sniff_timeouts: AtomicU64,
    pub(crate) sniff_errors: AtomicU64,
    pub(crate) rejected_overload: AtomicU64,
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
    /// Handshakes that failed.
    pub handshake_failures: u64,
    /// Connections closed because they sent nothing (or too little) in time.
    pub sniff_timeouts: u64,
    /// Connections that failed or closed before their first bytes (including
    /// failed TLS handshakes).
    pub sniff_errors: u64,
    /// Connections closed at once because too many were being sniffed.
    pub rejected_overload: u64,
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
            sniff_timeouts: r(&self.sniff_timeouts),
            sniff_errors: r(&self.sniff_errors),
            rejected_overload: r(&self.rejected_overload),
        }
    }
}
