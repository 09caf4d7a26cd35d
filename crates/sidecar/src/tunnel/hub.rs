//! The hub's side of `backchannel tunnel`: a listenmux handshaker for
//! connections that start with the tunnel magic. It reads the request
//! (service, `peer`, optional `authorization`), identifies the caller and
//! asks the policy, opens the tunnel on the agent's session, answers the
//! caller with the agent's answer, and relays in a task of its own.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, OnceLock},
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

use crate::hub::policy::PeerView;
use crate::hub::{
    access::{Access, Permit},
    audit,
    cluster::{
        hop::{HOP_HEADER, HOP_TOKEN_HEADER},
        Cluster,
    },
    identity::AUTHORIZATION,
    routing::CALLER_HEADER,
    state::{HubState, PeerCounters, Unroutable},
};
use backchannel::PeerId;
use backchannel_directory::Entry;

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
    cluster: Arc<OnceLock<Arc<Cluster>>>,
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
            cluster: Arc::default(),
        }
    }

    /// Also routes tunnels to the peers of the other hubs of the cluster
    /// set in `cluster` (once the hub has joined it), and honours the
    /// tunnel hops of those hubs.
    pub fn with_cluster(mut self, cluster: Arc<OnceLock<Arc<Cluster>>>) -> Self {
        self.cluster = cluster;
        self
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
        let cluster = self.cluster.get().cloned();
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
                let ctx = Ctx {
                    state,
                    access,
                    cluster,
                    timeout,
                };
                route(caller, info, ctx, remote).await;
                Ok(Handshaked::Dispatched)
            }
            .instrument(span),
        )
    }
}

/// What routing a tunnel needs of the hub.
struct Ctx {
    state: Arc<HubState>,
    access: Arc<Access>,
    cluster: Option<Arc<Cluster>>,
    timeout: Duration,
}

/// The hop fields of a tunnel request, as the headers a routed call
/// carries them in.
fn hop_headers(request: &TunnelRequest) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for key in [HOP_HEADER, HOP_TOKEN_HEADER, CALLER_HEADER] {
        if let Some(v) = request.metadata(key) {
            // A value that is no header value marks the hop all the same.
            let v = http::HeaderValue::from_str(v)
                .unwrap_or_else(|_| http::HeaderValue::from_static("-"));
            h.insert(key, v);
        }
    }
    h
}

/// Why a tunnel is not opened: what the caller is told, and the metrics
/// result.
struct Refusal {
    kind: RefusalKind,
    result: &'static str,
    reason: String,
}

impl Refusal {
    fn new(kind: RefusalKind, result: &'static str, reason: impl Into<String>) -> Self {
        Refusal {
            kind,
            result,
            reason: reason.into(),
        }
    }

    fn denied(reason: impl Into<String>) -> Self {
        Self::new(RefusalKind::Denied, "denied", reason)
    }

    fn unavailable(reason: impl Into<String>) -> Self {
        Self::new(RefusalKind::Unavailable, "unavailable", reason)
    }

    /// The far side (the agent, or the hub holding it) did not open it.
    fn upstream(label: &str, err: TunnelError) -> Self {
        match err {
            TunnelError::Refused { kind, reason, .. } => {
                Self::new(kind, "refused", format!("{label}: {reason}"))
            }
            e => Self::unavailable(format!("{label}: {e}")),
        }
    }
}

/// The far side's tunnel, opened.
enum Opened {
    /// On a peer of this hub.
    Local {
        upstream: backchannel::Tunnel,
        counters: Arc<PeerCounters>,
    },
    /// Over a hop to the hub holding the peer.
    Hop {
        upstream: backchannel::Tunnel<BoxIo>,
    },
}

/// A tunnel the policy allowed and the far side opened.
struct Route {
    opened: Opened,
    label: String,
    identity: String,
    permit: Option<Permit>,
}

async fn route(
    caller: IncomingTunnel<BoxIo>,
    info: ConnInfo,
    ctx: Ctx,
    remote: Option<SocketAddr>,
) {
    let metrics = &ctx.state.metrics.tunnels;
    let route = match open(caller.request(), &info, &ctx).await {
        Ok(r) => r,
        Err(r) => {
            metrics.result(r.result);
            debug!(reason = %r.reason, "tunnel refused");
            let _ = caller.refuse(r.kind, &r.reason).await;
            return;
        }
    };
    let Ok(caller) = caller.accept().await else {
        metrics.result("caller_gone");
        return;
    };
    metrics.result("accepted");
    let Route {
        opened,
        label,
        identity,
        permit,
    } = route;
    let service = caller.service();
    info!(target: "audit", caller = %identity, peer = %label, service = %service, remote = ?remote, "tunnel opened");
    let state = ctx.state.clone();
    match opened {
        Opened::Local { upstream, counters } => {
            counters.tunnels.fetch_add(1, Ordering::Relaxed);
            counters.tunnels_open.fetch_add(1, Ordering::Relaxed);
            let reset = upstream.reset_handle();
            let (tr, tw) = tokio::io::split(upstream);
            let up = ResetOnFail { inner: tw, reset };
            spawn_relay(caller, tr, up, state, label, Some(counters), permit);
        }
        Opened::Hop { upstream } => {
            // Between hubs the bytes travel in frames too: the other hub's
            // failure arrives as an abort with its reason.
            let (tr, tw) = tokio::io::split(upstream.into_inner());
            let (tr, tw) = (FrameReader::new(tr), FrameWriter::new(tw));
            spawn_relay(caller, tr, tw, state, label, None, permit);
        }
    }
}

/// Identifies the caller, asks the policy and opens the far side's tunnel:
/// on a peer of this hub, or over one hop to the hub holding it.
async fn open(request: &TunnelRequest, info: &ConnInfo, ctx: &Ctx) -> Result<Route, Refusal> {
    let Ctx {
        state,
        access,
        cluster,
        timeout,
    } = ctx;
    let service = request.service();
    let Some(target) = request.metadata(PEER_KEY) else {
        return Err(Refusal::new(
            RefusalKind::Failed,
            "bad_request",
            "the tunnel request names no peer (metadata 'peer')",
        ));
    };
    if state.is_draining() {
        return Err(Refusal::unavailable("the hub is shutting down"));
    }
    let what = format!("tunnel {service}");
    // A hop from another hub of the cluster: its caller was checked there;
    // it goes to this hub's own peers only (never further).
    let hop_fields = hop_headers(request);
    let hop = match cluster {
        Some(c) => c.check_hop(Some(info), &hop_fields),
        None => crate::hub::cluster::refuse_hop_without_cluster(&hop_fields).map(Err),
    };
    let trusted = hop.is_some();
    let identity = match hop {
        Some(Ok(c)) => c,
        Some(Err(status)) => return Err(Refusal::denied(status.message())),
        None => {
            let mut headers = http::HeaderMap::new();
            if let Some(v) = request.metadata(AUTHORIZATION) {
                let v = http::HeaderValue::from_str(v)
                    .map_err(|_| Refusal::denied("malformed authorization"))?;
                headers.insert(AUTHORIZATION, v);
            }
            access.identify(Some(info), &headers).map_err(|d| {
                audit::refused(&state.metrics, &d, None, &what, target);
                Refusal::denied(d.status.message())
            })?
        }
    };
    // A name this hub does not hold may be on another hub.
    if let Some(cluster) = cluster.as_ref().filter(|_| !trusted) {
        if state.peer_named(target).is_none() && target.trim().parse::<PeerId>().is_err() {
            if let Some(entry) = cluster
                .locate(target)
                .await
                .map_err(|s| Refusal::unavailable(s.message()))?
            {
                return open_hop(cluster, entry, identity, service, ctx).await;
            }
        }
    }
    let resolved = state.resolve_tunnel(target, |peer| match (trusted, peer) {
        (true, Some(_)) => Ok(None),
        _ => access.authorize_tunnel(&identity, target, peer, service),
    });
    let (peer_id, label, counters, permit) = match resolved {
        Ok(r) => r,
        Err(Unroutable::Denied(d)) => {
            audit::refused(&state.metrics, &d, Some(&identity), &what, target);
            return Err(Refusal::denied(d.status.message()));
        }
        Err(Unroutable::Status(s)) => return Err(Refusal::unavailable(s.message())),
    };
    let request = TunnelRequest::new(service)
        .with_metadata(CALLER_KEY, identity.clone())
        .with_timeout(*timeout);
    let upstream = state
        .registry()
        .open_tunnel(peer_id, request)
        .await
        .map_err(|e| Refusal::upstream(&label, e))?;
    Ok(Route {
        opened: Opened::Local { upstream, counters },
        label,
        identity,
        permit,
    })
}

/// Opens a tunnel over one hop to the hub holding its peer, after the
/// policy allowed it here (the other hub trusts this one's check).
async fn open_hop(
    cluster: &Cluster,
    entry: Entry,
    identity: String,
    service: &str,
    ctx: &Ctx,
) -> Result<Route, Refusal> {
    let target = entry.name.as_str();
    let labels: std::collections::HashMap<String, String> = entry
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let view = PeerView {
        name: target,
        labels: &labels,
    };
    let permit = ctx
        .access
        .authorize_tunnel(&identity, target, Some(view), service)
        .map_err(|d| {
            let what = format!("tunnel {service}");
            audit::refused(&ctx.state.metrics, &d, Some(&identity), &what, target);
            Refusal::denied(d.status.message())
        })?;
    let label = format!(
        "peer '{target}' (id {} on hub '{}')",
        entry.peer_id, entry.hub_id
    );
    let request = TunnelRequest::new(service)
        .with_metadata(PEER_KEY, target)
        .with_metadata(CALLER_HEADER, identity.clone())
        .with_timeout(ctx.timeout);
    let upstream = cluster
        .open_tunnel_hop(&entry, request)
        .await
        .map_err(|e| Refusal::upstream(&label, e))?;
    Ok(Route {
        opened: Opened::Hop { upstream },
        label,
        identity,
        permit,
    })
}

type FailFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// The writing half toward the target, and how to fail it so that the far
/// end never sees a clean end.
trait Upstream: tokio::io::AsyncWrite + Unpin + Send + 'static {
    fn fail<'a>(&'a mut self, reason: &'a str) -> FailFuture<'a>;
}

/// A yamux tunnel to a local peer: failed by a reset.
struct ResetOnFail<W> {
    inner: W,
    reset: backchannel::ResetHandle,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ResetOnFail<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<W: tokio::io::AsyncWrite + Unpin + Send + 'static> Upstream for ResetOnFail<W> {
    fn fail<'a>(&'a mut self, _reason: &'a str) -> FailFuture<'a> {
        self.reset.reset();
        Box::pin(async {})
    }
}

/// A hop to another hub: failed by an abort frame with the reason.
impl<W: tokio::io::AsyncWrite + Unpin + Send + 'static> Upstream for FrameWriter<W> {
    fn fail<'a>(&'a mut self, reason: &'a str) -> FailFuture<'a> {
        Box::pin(self.abort(reason))
    }
}

/// Relays an accepted caller and its target (reading `tr`, writing `tw`)
/// in a task of its own, counting bytes for the hub and, for a local peer,
/// for that peer.
fn spawn_relay<TR, TW>(
    caller: backchannel::Tunnel<BoxIo>,
    mut tr: TR,
    mut tw: TW,
    state: Arc<HubState>,
    label: String,
    counters: Option<Arc<PeerCounters>>,
    permit: Option<Permit>,
) where
    TR: tokio::io::AsyncRead + Unpin + Send + 'static,
    TW: Upstream,
{
    state.metrics.tunnels.open.inc();
    tokio::spawn(
        async move {
            let _permit = permit;
            let m = &state.metrics.tunnels;
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
            let none = std::sync::atomic::AtomicU64::new(0);
            let (peer_to, peer_from) = match &counters {
                Some(c) => (&c.tunnel_bytes_to_peer, &c.tunnel_bytes_from_peer),
                None => (&none, &none),
            };
            let (cr, cw) = tokio::io::split(caller.into_inner());
            let mut cr = FrameReader::new(cr);
            let mut cw = FrameWriter::new(cw);
            let up = async {
                match pump_counted(&mut cr, &mut tw, peer_to, &to).await {
                    Ok(n) => Ok(n),
                    Err(e) => {
                        // The agent's service must not see a clean end.
                        let reason = format!("the caller's side failed: {e}");
                        tw.fail(&reason).await;
                        Err(reason)
                    }
                }
            };
            let down = async {
                match pump_counted(&mut tr, &mut cw, peer_from, &from).await {
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
            if let Some(c) = &counters {
                c.tunnels_open.fetch_sub(1, Ordering::Relaxed);
            }
            state.metrics.tunnels.open.dec();
        }
        .in_current_span(),
    );
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
