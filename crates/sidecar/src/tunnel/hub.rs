//! The hub's side of `backchannel tunnel`: a listenmux handshaker for
//! connections that start with the tunnel magic. It reads the request
//! (service, `peer`, optional `authorization`), identifies the caller and
//! asks the policy, opens the tunnel on the agent's session, answers the
//! caller with the agent's answer, and relays in a task of its own.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use backchannel::{tunnel::TUNNEL_MAGIC, IncomingTunnel, RefusalKind, TunnelError, TunnelRequest};
use listenmux::{BoxFuture, BoxIo, ConnInfo, HandshakeError, Handshaked, Handshaker, Magic};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::{debug, info, Instrument};

use crate::hub::{
    access::Access,
    audit,
    identity::AUTHORIZATION,
    state::{HubState, Unroutable},
};

use super::frames::{FrameReader, FrameWriter};

/// The metadata key naming the peer a caller's tunnel goes to.
pub const PEER_KEY: &str = "peer";
/// The metadata key the hub sets on the tunnel to the agent: the caller's
/// identity.
pub const CALLER_KEY: &str = "caller";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// Hub-wide tunnel metrics.
#[derive(Debug, Default)]
pub struct TunnelMetrics {
    opened: Family<ResultLabel, Counter>,
    open: Gauge,
    bytes: Family<DirectionLabel, Counter>,
}

impl TunnelMetrics {
    fn result(&self, result: &'static str) {
        self.opened.get_or_create(&ResultLabel { result }).inc();
    }

    /// Registers `backchannel_hub_tunnels_total{result}`,
    /// `backchannel_hub_tunnels_open` and
    /// `backchannel_hub_tunnel_bytes_total{direction}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "backchannel_hub_tunnels",
            "Tunnel requests by result (accepted, denied, refused, unavailable, bad_request)",
            self.opened.clone(),
        );
        registry.register(
            "backchannel_hub_tunnels_open",
            "Tunnels relayed now",
            self.open.clone(),
        );
        registry.register(
            "backchannel_hub_tunnel_bytes",
            "Bytes relayed by tunnels, by direction",
            self.bytes.clone(),
        );
    }
}

/// The tunnel handshaker of a hub.
pub struct TunnelHandshaker {
    state: Arc<HubState>,
    access: Arc<Access>,
    timeout: Duration,
}

impl std::fmt::Debug for TunnelHandshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelHandshaker")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TunnelHandshaker {
    /// Routes tunnels to the peers in `state` as `access` allows; a caller
    /// has `timeout` to send its request, and the agent as long to answer.
    pub fn new(state: Arc<HubState>, access: Arc<Access>, timeout: Duration) -> Self {
        TunnelHandshaker {
            state,
            access,
            timeout,
        }
    }
}

impl Handshaker for TunnelHandshaker {
    fn magic(&self) -> Magic {
        TUNNEL_MAGIC
    }

    fn handshake(
        &self,
        io: BoxIo,
        info: ConnInfo,
    ) -> BoxFuture<Result<Handshaked, HandshakeError>> {
        let state = self.state.clone();
        let access = self.access.clone();
        let timeout = self.timeout;
        let remote = info.remote_addr();
        let span = tracing::info_span!("tunnel", remote = ?remote);
        Box::pin(
            async move {
                let caller = match IncomingTunnel::read_request(io, "the caller", timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        state.metrics.tunnels.result("bad_request");
                        return Err(HandshakeError::Protocol(Box::new(e)));
                    }
                };
                route(caller, info, state, access, timeout, remote).await;
                Ok(Handshaked::Dispatched)
            }
            .instrument(span),
        )
    }
}

async fn route(
    caller: IncomingTunnel<BoxIo>,
    info: ConnInfo,
    state: Arc<HubState>,
    access: Arc<Access>,
    timeout: Duration,
    remote: Option<SocketAddr>,
) {
    let metrics = &state.metrics.tunnels;
    let service = caller.service().to_string();
    let Some(target) = caller.request().metadata(PEER_KEY).map(str::to_string) else {
        return refuse(
            caller,
            metrics,
            RefusalKind::Failed,
            "bad_request",
            "the tunnel request names no peer (metadata 'peer')".into(),
        )
        .await;
    };
    if state.is_draining() {
        return refuse(
            caller,
            metrics,
            RefusalKind::Unavailable,
            "unavailable",
            "the hub is shutting down".into(),
        )
        .await;
    }
    let mut headers = http::HeaderMap::new();
    if let Some(v) = caller.request().metadata(AUTHORIZATION) {
        match http::HeaderValue::from_str(v) {
            Ok(v) => {
                headers.insert(AUTHORIZATION, v);
            }
            Err(_) => {
                return refuse(
                    caller,
                    metrics,
                    RefusalKind::Denied,
                    "denied",
                    "malformed authorization".into(),
                )
                .await
            }
        }
    }
    let what = format!("tunnel {service}");
    let identity = match access.identify(Some(&info), &headers) {
        Ok(i) => i,
        Err(d) => {
            audit::refused(&state.metrics, &d, None, &what, &target);
            return refuse(
                caller,
                metrics,
                RefusalKind::Denied,
                "denied",
                d.status.message().to_string(),
            )
            .await;
        }
    };
    let resolved = state.resolve_tunnel(&target, |peer| {
        access.authorize_tunnel(&identity, &target, peer, &service)
    });
    let (peer_id, label, counters, permit) = match resolved {
        Ok(r) => r,
        Err(Unroutable::Denied(d)) => {
            audit::refused(&state.metrics, &d, Some(&identity), &what, &target);
            return refuse(
                caller,
                metrics,
                RefusalKind::Denied,
                "denied",
                d.status.message().to_string(),
            )
            .await;
        }
        Err(Unroutable::Status(s)) => {
            return refuse(
                caller,
                metrics,
                RefusalKind::Unavailable,
                "unavailable",
                s.message().to_string(),
            )
            .await
        }
    };
    let request = TunnelRequest::new(service.clone())
        .with_metadata(CALLER_KEY, identity.clone())
        .with_timeout(timeout);
    let upstream = match state.registry().open_tunnel(peer_id, request).await {
        Ok(t) => t,
        Err(TunnelError::Refused { kind, reason, .. }) => {
            return refuse(
                caller,
                metrics,
                kind,
                "refused",
                format!("{label}: {reason}"),
            )
            .await;
        }
        Err(e) => {
            return refuse(
                caller,
                metrics,
                RefusalKind::Unavailable,
                "unavailable",
                format!("{label}: {e}"),
            )
            .await;
        }
    };
    let Ok(caller) = caller.accept().await else {
        metrics.result("caller_gone");
        return;
    };
    metrics.result("accepted");
    info!(target: "audit", caller = %identity, peer = %label, service = %service, remote = ?remote, "tunnel opened");
    counters.tunnels.fetch_add(1, Ordering::Relaxed);
    counters.tunnels_open.fetch_add(1, Ordering::Relaxed);
    metrics.open.inc();
    let state2 = state.clone();
    tokio::spawn(
        async move {
            let _permit = permit;
            let m = &state2.metrics.tunnels;
            let to = m
                .bytes
                .get_or_create(&DirectionLabel {
                    direction: "to_peer",
                })
                .clone();
            let from = m
                .bytes
                .get_or_create(&DirectionLabel {
                    direction: "from_peer",
                })
                .clone();
            let (cr, cw) = tokio::io::split(caller.into_inner());
            let mut cr = FrameReader::new(cr);
            let mut cw = FrameWriter::new(cw);
            let reset = upstream.reset_handle();
            let (mut tr, mut tw) = tokio::io::split(upstream);
            let up = async {
                let n = pump_counted(&mut cr, &mut tw, &counters.tunnel_bytes_to_peer, &to).await;
                n.map_err(|e| {
                    // The agent's service must not see a clean end.
                    reset.reset();
                    format!("the caller's side failed: {e}")
                })
            };
            let down = async {
                match pump_counted(&mut tr, &mut cw, &counters.tunnel_bytes_from_peer, &from).await
                {
                    Ok(n) => Ok(n),
                    Err(e) => {
                        let reason = format!("{label}: {e}");
                        cw.abort(&reason).await;
                        Err(reason)
                    }
                }
            };
            match tokio::try_join!(up, down) {
                Ok((a, b)) => debug!(to_peer = a, from_peer = b, "tunnel ended"),
                Err(e) => debug!(error = %e, "tunnel failed"),
            }
            counters.tunnels_open.fetch_sub(1, Ordering::Relaxed);
            state2.metrics.tunnels.open.dec();
        }
        .in_current_span(),
    );
}

async fn refuse(
    caller: IncomingTunnel<BoxIo>,
    metrics: &TunnelMetrics,
    kind: RefusalKind,
    result: &'static str,
    reason: String,
) {
    metrics.result(result);
    debug!(%reason, "tunnel refused");
    let _ = caller.refuse(kind, &reason).await;
}

async fn pump_counted<R, W>(
    r: &mut R,
    w: &mut W,
    peer: &std::sync::atomic::AtomicU64,
    hub: &Counter,
) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; super::BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        peer.fetch_add(n as u64, Ordering::Relaxed);
        hub.inc_by(n as u64);
    }
}
