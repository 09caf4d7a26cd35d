//! Peers that leave without cutting calls: a peer that said it is leaving
//! (`Registration.Leave`), or a session superseded by a newer one with the
//! same name, gets no new calls, and its calls in flight run to their end.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use backchannel::PeerId;
use tonic::Status;

use crate::hub::state::{HubState, PeerCounters};

/// Completes when `c` has no routed call in flight.
pub async fn idle(c: &PeerCounters) {
    loop {
        let notified = c.idle.notified();
        if c.in_flight.load(Ordering::SeqCst) <= 0 {
            return;
        }
        notified.await;
    }
}

/// Stops routing to `id`; closes its session once its calls have finished,
/// or after `grace`.
pub fn retire(state: &HubState, id: PeerId, grace: Duration) {
    let Some(c) = state.counters_of(id) else {
        state.registry().close(id);
        return;
    };
    c.leaving.store(true, Ordering::SeqCst);
    let registry = state.registry().clone();
    tokio::spawn(async move {
        if tokio::time::timeout(grace, idle(&c)).await.is_err() {
            tracing::warn!(
                peer = id.get(),
                in_flight = c.in_flight.load(Ordering::SeqCst),
                ?grace,
                "leaving session still had calls after the grace period; closing it"
            );
        } else {
            tracing::info!(peer = id.get(), "leaving session drained; closing it");
        }
        registry.close(id);
    });
}

impl HubState {
    /// Peer `id` is leaving: no new calls are routed to it, it loses its
    /// name, and its session is closed once the hub has received the end of
    /// every call in flight (or after the hub's grace period). Returns the
    /// calls in flight.
    pub fn leave(self: &Arc<Self>, id: PeerId) -> Result<i64, Status> {
        let c = self
            .counters_of(id)
            .ok_or_else(|| Status::unavailable(format!("peer {id} is gone")))?;
        self.unname(id);
        let n = c.in_flight.load(Ordering::SeqCst);
        tracing::info!(peer = id.get(), in_flight = n, "peer is leaving");
        retire(self, id, self.supersede_grace());
        Ok(n)
    }
}
