//! The channel type handed out for both directions.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http_body_util::BodyExt;
use tonic::{body::Body, transport::Channel, Code, Status};

/// A gRPC channel over a backchannel session: to the server on the client
/// side ([`Client::channel`](crate::Client::channel)), to a peer on the server
/// side ([`Registry::backchannel`](crate::Registry::backchannel)). Use it like
/// a tonic `Channel`: `MyServiceClient::new(channel)`.
///
/// It differs from tonic's `Channel` in one way: when the connection dies
/// (before or in the middle of a response), tonic reports `UNKNOWN`; this
/// channel reports `UNAVAILABLE`, naming the peer, as gRPC specifies for a
/// lost transport. Its service error type is therefore [`Status`].
#[derive(Clone, Debug)]
pub struct PeerChannel {
    inner: Channel,
    label: std::sync::Arc<str>,
}

impl PeerChannel {
    pub(crate) fn new(inner: Channel, label: String) -> Self {
        PeerChannel {
            inner,
            label: label.into(),
        }
    }

    /// The underlying tonic channel (without the status mapping).
    pub fn into_inner(self) -> Channel {
        self.inner
    }
}

fn lost(label: &str, status: Status) -> Status {
    if status.code() == Code::Unknown {
        Status::unavailable(format!("connection to {label} lost: {}", status.message()))
    } else {
        status
    }
}

fn transport(label: &str, err: tonic::transport::Error) -> Status {
    lost(label, Status::from_error(Box::new(err)))
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Status>> + Send + 'static>>;

impl tower::Service<http::Request<Body>> for PeerChannel {
    type Response = http::Response<Body>;
    type Error = Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx).map_err(|e| transport(&self.label, e))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let fut = tower::Service::call(&mut self.inner, request);
        let label = self.label.clone();
        Box::pin(async move {
            let response = fut.await.map_err(|e| transport(&label, e))?;
            Ok(response.map(|body| Body::new(body.map_err(move |s| lost(&label, s)))))
        })
    }
}
