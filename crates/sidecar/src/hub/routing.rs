//! The hub's router: a tower layer in front of the hub's own services that
//! diverts every request carrying `backchannel-peer` to that peer.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use backchannel::PeerId;
use tonic::{body::Body, Status};
use tower::{Layer, Service, ServiceExt};

/// The metadata key that selects the peer a call is routed to: a peer's
/// announced name, or its numeric peer ID. The hub removes it before the call
/// reaches the peer.
pub const PEER_HEADER: &str = "backchannel-peer";

use crate::{
    hub::{
        access::Access,
        audit,
        cluster::{
            hop::{HOP_HEADER, HOP_TOKEN_HEADER},
            Cluster,
        },
        fate::{respond, Fate},
        identity::AUTHORIZATION,
        isolation::CallerInfo,
        state::{HubState, Unroutable},
    },
    router::{deadline_of, forward, BoxFuture},
};

/// The metadata key the hub sets on every routed call to the caller's
/// identity (any value the caller sent is removed first).
pub const CALLER_HEADER: &str = "backchannel-caller";

/// The hub's own services that stay open under a policy (health,
/// reflection of the hub's API, and Registration, which checks the policy
/// itself). Every other call to the hub itself (`Peers`, anything unknown)
/// needs an admin identity.
const OPEN_PREFIXES: [&str; 4] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/backchannel.hub.v1.Registration/",
];

fn needs_admin(path: &str) -> bool {
    !OPEN_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// Wraps the hub's services with the router.
#[derive(Clone)]
pub struct RouterLayer {
    state: Arc<HubState>,
    access: Arc<Access>,
    cluster: Option<Arc<Cluster>>,
}

impl std::fmt::Debug for RouterLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterLayer").finish_non_exhaustive()
    }
}

impl RouterLayer {
    /// Routes by the peers in `state`, as `access` allows.
    pub fn new(state: Arc<HubState>, access: Arc<Access>) -> Self {
        RouterLayer {
            state,
            access,
            cluster: None,
        }
    }

    /// Also routes to the peers of the other hubs of `cluster`.
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }
}

impl<S> Layer<S> for RouterLayer {
    type Service = RouterService<S>;
    fn layer(&self, inner: S) -> RouterService<S> {
        RouterService {
            inner,
            state: self.state.clone(),
            access: self.access.clone(),
            cluster: self.cluster.clone(),
        }
    }
}

/// See [`RouterLayer`].
#[derive(Clone)]
pub struct RouterService<S> {
    inner: S,
    state: Arc<HubState>,
    access: Arc<Access>,
    cluster: Option<Arc<Cluster>>,
}

impl<S> std::fmt::Debug for RouterService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterService").finish_non_exhaustive()
    }
}

impl<S> Service<http::Request<Body>> for RouterService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The services behind the router see the connection's plain ConnInfo.
        let caller_conn = req.extensions_mut().remove::<CallerInfo>();
        if let Some(c) = &caller_conn {
            req.extensions_mut().insert(c.info.clone());
        }
        let info = req.extensions().get::<listenmux::ConnInfo>();
        let Some(target) = req.headers().get(PEER_HEADER) else {
            if self.access.enforcing() && needs_admin(req.uri().path()) {
                let refusal = match self.access.identify(info, req.headers()) {
                    Err(d) => Some((d, None)),
                    Ok(id) => self
                        .access
                        .authorize_admin(&id)
                        .err()
                        .map(|d| (d, Some(id))),
                };
                if let Some((d, id)) = refusal {
                    let path = req.uri().path();
                    audit::refused(&self.state.metrics, &d, id.as_deref(), path, "");
                    return Box::pin(async move { Ok(respond(d.status, Fate::NotSent)) });
                }
            }
            let inner = self.inner.clone();
            return Box::pin(inner.oneshot(req));
        };
        // The deadline counts from now: before tonic's own timeout layer
        // starts its timer, so ours fires first and answers DEADLINE_EXCEEDED.
        let deadline = deadline_of(req.headers());
        let state = self.state.clone();
        let reject = |status: Status| -> Self::Future {
            state.metrics.call_finished(Some(status.code()));
            Box::pin(async move { Ok(respond(status, Fate::NotSent)) })
        };
        let Ok(target) = target.to_str() else {
            return reject(Status::invalid_argument(format!(
                "{PEER_HEADER} must be a peer name or ID in ASCII"
            )));
        };
        if state.is_draining() {
            return reject(Status::unavailable(format!(
                "the hub is shutting down; not routing to '{target}'"
            )));
        }
        let method = req.uri().path().to_string();
        // A hop from another hub of the cluster: its caller was checked
        // there; it is routed to this hub's own peers only (never further).
        let hop = match &self.cluster {
            Some(c) => c.check_hop(info, req.headers()),
            None => crate::hub::cluster::refuse_hop_without_cluster(req.headers()).map(Err),
        };
        let trusted = hop.is_some();
        let caller = match hop {
            Some(Ok(c)) => c,
            Some(Err(status)) => return reject(status),
            None => match self.access.identify(info, req.headers()) {
                Ok(c) => c,
                Err(d) => {
                    audit::refused(&state.metrics, &d, None, &method, target);
                    return reject(d.status);
                }
            },
        };
        let target = target.to_string();
        // A name this hub does not hold may be on another hub.
        if let Some(cluster) = self.cluster.clone().filter(|_| !trusted) {
            if state.peer_named(&target).is_none() && target.trim().parse::<PeerId>().is_err() {
                let (this, t, c, m) = (
                    self.clone_parts(),
                    target.clone(),
                    caller.clone(),
                    method.clone(),
                );
                let local = move |req| this.local(req, caller_conn, &t, c, m, deadline, false);
                return cluster.route(
                    req,
                    target,
                    caller,
                    method,
                    deadline,
                    self.access.clone(),
                    local,
                );
            }
        }
        self.clone_parts()
            .local(req, caller_conn, &target, caller, method, deadline, trusted)
            .map_ok()
    }
}

/// What the local route needs of the router.
struct Local {
    state: Arc<HubState>,
    access: Arc<Access>,
}

impl<S> RouterService<S> {
    fn clone_parts(&self) -> Local {
        Local {
            state: self.state.clone(),
            access: self.access.clone(),
        }
    }
}

trait MapOk {
    fn map_ok(self) -> BoxFuture<Result<http::Response<Body>, Infallible>>;
}

impl MapOk for BoxFuture<http::Response<Body>> {
    fn map_ok(self) -> BoxFuture<Result<http::Response<Body>, Infallible>> {
        Box::pin(async move { Ok(self.await) })
    }
}

impl Local {
    /// Routes to a peer of this hub. `trusted`: a hop from another hub,
    /// whose caller was authorized there.
    #[allow(clippy::too_many_arguments)]
    fn local(
        self,
        mut req: http::Request<Body>,
        caller_conn: Option<CallerInfo>,
        target: &str,
        caller: String,
        method: String,
        deadline: Option<tokio::time::Instant>,
        trusted: bool,
    ) -> BoxFuture<http::Response<Body>> {
        let state = self.state.clone();
        let reject = |status: Status| -> BoxFuture<http::Response<Body>> {
            state.metrics.call_finished(Some(status.code()));
            Box::pin(async move { respond(status, Fate::NotSent) })
        };
        let access = self.access.clone();
        let (mut route, permit) = match state.resolve(target, |peer| match (trusted, peer) {
            (true, Some(_)) => Ok(None),
            _ => access.authorize_call(&caller, target, peer, &method),
        }) {
            Ok(r) => r,
            Err(Unroutable::Denied(d)) => {
                audit::refused(&state.metrics, &d, Some(&caller), &method, target);
                return reject(d.status);
            }
            Err(Unroutable::Status(status)) => return reject(status),
        };
        // This caller connection's own HTTP/2 connection to the peer, when it
        // may have one.
        if let Some(own) =
            caller_conn.and_then(|c| c.scope.channel(state.registry(), route.peer_id))
        {
            route.channel = own;
        }
        // The private service learns who calls from the hub, never from the
        // caller: drop any value the caller set, and the hub's own credential.
        let headers = req.headers_mut();
        headers.remove(PEER_HEADER);
        headers.remove(CALLER_HEADER);
        headers.remove(HOP_HEADER);
        headers.remove(HOP_TOKEN_HEADER);
        if self.access.enforcing() {
            headers.remove(AUTHORIZATION);
        }
        if let Ok(v) = http::HeaderValue::from_str(&caller) {
            headers.insert(CALLER_HEADER, v);
        }
        let observer = Arc::new(audit::CallAudit::new(
            route.observer,
            caller,
            route.peer_name,
            route.peer_id.get(),
            method,
            permit,
        ));
        Box::pin(async move {
            forward(route.channel, req, route.label.into(), deadline, observer).await
        })
    }
}
