//! The hub's router: a tower layer in front of the hub's own services that
//! diverts every request carrying `backchannel-peer` to that peer.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

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
        identity::AUTHORIZATION,
        isolation::CallerInfo,
        state::{HubState, Unroutable},
    },
    router::{deadline_of, forward, forward_with, status_response, BoxFuture},
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
}

impl std::fmt::Debug for RouterLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterLayer").finish_non_exhaustive()
    }
}

impl RouterLayer {
    /// Routes by the peers in `state`, as `access` allows.
    pub fn new(state: Arc<HubState>, access: Arc<Access>) -> Self {
        RouterLayer { state, access }
    }
}

impl<S> Layer<S> for RouterLayer {
    type Service = RouterService<S>;
    fn layer(&self, inner: S) -> RouterService<S> {
        RouterService {
            inner,
            state: self.state.clone(),
            access: self.access.clone(),
        }
    }
}

/// See [`RouterLayer`].
#[derive(Clone)]
pub struct RouterService<S> {
    inner: S,
    state: Arc<HubState>,
    access: Arc<Access>,
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
                    return Box::pin(async move { Ok(status_response(d.status)) });
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
            Box::pin(async move { Ok(status_response(status)) })
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
        let caller = match self.access.identify(info, req.headers()) {
            Ok(c) => c,
            Err(d) => {
                audit::refused(&state.metrics, &d, None, &method, target);
                return reject(d.status);
            }
        };
        let access = self.access.clone();
        let (route, permit) = match state.resolve(target, |peer| {
            access.authorize_call(&caller, target, peer, &method)
        }) {
            Ok(r) => r,
            Err(Unroutable::Denied(d)) => {
                audit::refused(&state.metrics, &d, Some(&caller), &method, target);
                return reject(d.status);
            }
            Err(Unroutable::Status(status)) => return reject(status),
        };
        // This caller connection's own HTTP/2 connections to the peer, when
        // it may have them.
        let own = caller_conn.and_then(|c| c.scope.channel(state.registry(), route.peer_id));
        // The private service learns who calls from the hub, never from the
        // caller: drop any value the caller set, and the hub's own credential.
        let headers = req.headers_mut();
        headers.remove(PEER_HEADER);
        headers.remove(CALLER_HEADER);
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
        let label: Arc<str> = route.label.into();
        match own {
            Some(up) => {
                Box::pin(async move { Ok(forward_with(up, req, label, deadline, observer).await) })
            }
            None => {
                Box::pin(
                    async move { Ok(forward(route.channel, req, label, deadline, observer).await) },
                )
            }
        }
    }
}
