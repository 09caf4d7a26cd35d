//! The agent's drain: tell the hub we are leaving, let the calls in flight
//! finish (within the grace period), then close the session.

use std::time::Duration;

use backchannel::{ConnectionEvent, ReconnectingClient};
use tokio::sync::broadcast;

use crate::{
    agent::splice::Forwarders,
    pb::hub::{registration_client::RegistrationClient, LeaveRequest},
};

/// How a drain went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Whether the hub acknowledged the leave (false against a hub without
    /// `Registration.Leave`, or one that is gone).
    pub hub_told: bool,
    /// Calls still running when the grace period ran out (0: all finished).
    pub cut: usize,
}

/// Drains `client`'s session (`events` is its subscription): `Registration.Leave`; the hub then routes no
/// new calls here and closes the session once it has received the end of
/// every call in flight. Waits for that (or, against a hub without `Leave`,
/// for the forwarded calls to finish), at most `grace`, then closes the
/// session.
pub async fn drain(
    client: &ReconnectingClient,
    events: &mut broadcast::Receiver<ConnectionEvent>,
    forwarder: &Forwarders,
    grace: Duration,
) -> Drained {
    let deadline = tokio::time::Instant::now() + grace;
    let mut ended = false;
    let mut rc = RegistrationClient::new(client.channel());
    let mut req = tonic::Request::new(LeaveRequest {});
    req.set_timeout(grace.clamp(Duration::from_millis(100), Duration::from_secs(5)));
    let hub_told = match tokio::time::timeout_at(deadline, rc.leave(req)).await {
        Ok(Ok(r)) => {
            tracing::info!(
                in_flight = r.get_ref().calls_in_flight,
                "told the hub we are leaving; draining"
            );
            true
        }
        Ok(Err(status)) => {
            // With nothing in flight the hub closes the session at once,
            // which can beat its answer to us: that is a completed leave.
            if tokio::time::timeout(Duration::from_millis(200), session_ended(events))
                .await
                .is_ok()
            {
                tracing::info!("the hub closed the session on our leave");
                ended = true;
                true
            } else {
                tracing::warn!(%status, "the hub did not take the leave; draining anyway");
                false
            }
        }
        Err(_) => false,
    };
    let done = async {
        if hub_told {
            // The hub closes the session once every call in flight has ended.
            if !ended {
                session_ended(events).await;
            }
        } else {
            forwarder.wait_idle().await;
        }
    };
    let cut = match tokio::time::timeout_at(deadline, done).await {
        Ok(()) => forwarder.in_flight(),
        Err(_) => {
            let n = forwarder.in_flight();
            tracing::warn!(
                in_flight = n,
                ?grace,
                "grace period over; cutting the remaining calls"
            );
            n
        }
    };
    client.close();
    Drained { hub_told, cut }
}

/// Waits for the session of the moment to end.
async fn session_ended(events: &mut broadcast::Receiver<ConnectionEvent>) {
    loop {
        match events.recv().await {
            Ok(ConnectionEvent::Disconnected { .. }) | Err(broadcast::error::RecvError::Closed) => {
                return
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
        }
    }
}
