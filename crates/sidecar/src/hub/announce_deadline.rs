//! A session must announce itself within `--announce-timeout` (on by
//! default under an access policy), or the hub closes it: an unnamed session
//! is unreachable under a policy, so it would only hold a peer slot.

use std::{sync::Arc, time::Duration};

use backchannel::{PeerEvent, PeerId};
use tokio::sync::broadcast::error::RecvError;

use crate::hub::{access::Denial, audit, state::HubState};

/// Closes every session of `state`'s registry that has not announced within
/// `timeout` of joining. Runs until the registry's event channel closes or
/// the task is aborted.
pub fn spawn(state: Arc<HubState>, timeout: Duration) -> tokio::task::JoinHandle<()> {
    let mut rx = state.registry().subscribe();
    tokio::spawn(async move {
        for p in state.registry().list() {
            arm(&state, p.id, timeout);
        }
        loop {
            match rx.recv().await {
                Ok(PeerEvent::Connected(info)) => arm(&state, info.id, timeout),
                Ok(PeerEvent::Disconnected(_)) => {}
                // Missed joins: re-arm every live session (closing twice is
                // harmless; an announced session is left alone).
                Err(RecvError::Lagged(_)) => {
                    for p in state.registry().list() {
                        arm(&state, p.id, timeout);
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    })
}

fn arm(state: &Arc<HubState>, id: PeerId, timeout: Duration) {
    let state = state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if state.registry().get(id).is_none() {
            return;
        }
        let announced = state.identity_of(id).is_some_and(|i| !i.is_empty());
        if !announced {
            let d = Denial {
                status: tonic::Status::deadline_exceeded(format!(
                    "peer {id} did not announce itself within {timeout:?}"
                )),
                reason: "announce_timeout",
            };
            state.metrics.announce_timeouts.inc();
            audit::refused(&state.metrics, &d, None, "session", &id.to_string());
            state.registry().close(id);
        }
    });
}
