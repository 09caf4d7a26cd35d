//! Giving freed memory back after many peers leave.

use std::{sync::Arc, time::Duration};

use backchannel::PeerEvent;
use tokio::sync::broadcast::error::RecvError;

use crate::hub::state::HubState;

/// After this many peers have left since the last trim, the heap is trimmed.
const TRIM_AFTER_LEAVES: u64 = 512;

/// Gives freed heap memory back to the OS after many peers have left (or the
/// last one has), at most once a second: glibc keeps freed memory in its
/// arenas, so without this the hub's RSS stays at its peak after a burst of
/// sessions. A trim runs on a blocking thread: under 1 ms on a small heap, about 50 ms
/// right after 10,000 peers left a 300 MB heap. Runs until
/// aborted; a no-op where the allocator is not glibc's.
pub fn spawn_heap_trimmer(state: Arc<HubState>) -> tokio::task::JoinHandle<()> {
    let mut events = state.registry().subscribe();
    tokio::spawn(async move {
        let mut left = 0u64;
        let mut last = tokio::time::Instant::now();
        loop {
            match events.recv().await {
                Ok(PeerEvent::Disconnected(_)) => left += 1,
                Ok(PeerEvent::Connected(_)) => continue,
                Err(RecvError::Lagged(n)) => left += n,
                Err(RecvError::Closed) => return,
            }
            let due = left >= TRIM_AFTER_LEAVES || (left > 0 && state.registry().is_empty());
            if !due {
                continue;
            }
            // Let a burst of leaves finish first (bounded: at most 1 s).
            let wait = Duration::from_secs(1).saturating_sub(last.elapsed());
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
            while let Ok(ev) = events.try_recv() {
                if matches!(ev, PeerEvent::Disconnected(_)) {
                    left += 1;
                }
            }
            let took = tokio::task::spawn_blocking(trim_heap)
                .await
                .unwrap_or_default();
            state.metrics.heap_trims.inc();
            tracing::debug!(peers_left = left, ?took, "trimmed the heap");
            left = 0;
            last = tokio::time::Instant::now();
        }
    })
}

/// Returns free heap pages to the OS (glibc's `malloc_trim`); how long it took.
pub fn trim_heap() -> Duration {
    let t = std::time::Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    t.elapsed()
}

/// Listen backlog of the hub's TCP listener (the kernel caps it at
/// `net.core.somaxconn`). Deeper than tokio's 1024, so a burst of
/// connections from one source (closed at once by the source limits) does
/// not overflow the queue and make other clients' SYNs wait for a
/// retransmit.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Binds `addr` (`host:port`) with [`LISTEN_BACKLOG`].
pub async fn bind_tcp(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "no address to listen on",
        )
    }))
}
