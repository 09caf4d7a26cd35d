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
    hub::{isolation::CallerInfo, state::HubState},
    router::{deadline_of, forward, status_response, BoxFuture},
};

/// Wraps the hub's services with the router.
#[derive(Clone)]
pub struct RouterLayer {
    state: Arc<HubState>,
}

impl RouterLayer {
    /// Routes by the peers in `state`.
    pub fn new(state: Arc<HubState>) -> Self {
        RouterLayer { state }
    }
}

impl<S> Layer<S> for RouterLayer {
    type Service = RouterService<S>;
    fn layer(&self, inner: S) -> RouterService<S> {
        RouterService {
            inner,
            state: self.state.clone(),
        }
    }
}

/// See [`RouterLayer`].
#[derive(Clone)]
pub struct RouterService<S> {
    inner: S,
    state: Arc<HubState>,
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
        let caller = req.extensions_mut().remove::<CallerInfo>();
        if let Some(c) = &caller {
            req.extensions_mut().insert(c.info.clone());
        }
        let Some(target) = req.headers().get(PEER_HEADER) else {
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
        let mut route = match state.resolve(target) {
            Ok(r) => r,
            Err(status) => return reject(status),
        };
        // This caller's own connection to the peer, when it may have one.
        if let Some(own) = caller.and_then(|c| c.scope.channel(state.registry(), route.peer)) {
            route.channel = own;
        }
        let mut req = req;
        req.headers_mut().remove(PEER_HEADER);
        Box::pin(async move {
            Ok(forward(
                route.channel,
                req,
                route.label.into(),
                deadline,
                route.observer,
            )
            .await)
        })
    }
}
