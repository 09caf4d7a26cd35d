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
/// It differs from tonic's `Channel` in one way: when the transport fails
/// (the yamux stream is reset, the session ends, no session is up, the
/// HTTP/2 connection breaks), before or in the middle of a response, tonic
/// reports `UNKNOWN`; this channel reports `UNAVAILABLE`, naming the peer
/// and the cause, as gRPC specifies for a lost transport. The cause is read
/// from the error itself (the I/O error kind of the stream, the yamux open
/// error, the session state), so an `UNKNOWN` sent by the peer's handler
/// stays `UNKNOWN`. Its service error type is therefore [`Status`].
///
/// ```no_run
/// # async fn run(registry: backchannel::Registry, id: backchannel::PeerId) -> Result<(), backchannel::Error> {
/// let channel: backchannel::PeerChannel = registry.backchannel(id)?;
/// // let mut client = MyClientServiceClient::new(channel);
/// // client.call(...).await  // Err(UNAVAILABLE) if the peer is gone
/// # drop(channel); Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PeerChannel {
    inner: Inner,
    label: std::sync::Arc<str>,
}

/// The channel of whichever session is up: a reconnecting client's.
pub(crate) trait CurrentChannel: Send + Sync + std::fmt::Debug + 'static {
    /// The channel of the session that is up, if one is.
    fn current(&self) -> Option<Channel>;
    /// A channel whose calls fail with "not connected" (no session up).
    fn fallback(&self) -> Channel;
}

#[derive(Clone, Debug)]
enum Inner {
    Fixed(Channel),
    Current(std::sync::Arc<dyn CurrentChannel>),
}

impl PeerChannel {
    pub(crate) fn new(inner: Channel, label: String) -> Self {
        PeerChannel {
            inner: Inner::Fixed(inner),
            label: label.into(),
        }
    }

    pub(crate) fn following(current: std::sync::Arc<dyn CurrentChannel>, label: String) -> Self {
        PeerChannel {
            inner: Inner::Current(current),
            label: label.into(),
        }
    }

    /// The underlying tonic channel (without the status mapping). For a
    /// [`ReconnectingClient`](crate::ReconnectingClient)'s channel: the
    /// channel of the session up now.
    pub fn into_inner(self) -> Channel {
        match self.inner {
            Inner::Fixed(c) => c,
            Inner::Current(c) => c.current().unwrap_or_else(|| c.fallback()),
        }
    }
}

/// The transport failure behind `status`, if its cause is one: walks the
/// error's source chain for the stream's I/O error, the yamux open error or
/// our own session errors. A status without a source came from the peer.
fn transport_cause(status: &Status) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut generic = None;
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            let what = match io.kind() {
                ConnectionReset => "stream reset",
                ConnectionAborted => "session ended",
                BrokenPipe => "session closing",
                UnexpectedEof => "connection closed",
                TimedOut => "timed out",
                NotConnected => "not connected",
                ConnectionRefused => "connection refused",
                _ => "i/o error",
            };
            return Some(format!("{what}: {io}"));
        }
        if let Some(open) = err.downcast_ref::<backchannel_yamux::OpenError>() {
            return Some(format!("cannot open a yamux stream: {open}"));
        }
        if let Some(e) = err.downcast_ref::<crate::Error>() {
            return Some(e.to_string());
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if h2.is_io() || h2.is_go_away() || h2.is_reset() {
                return Some(format!("HTTP/2: {h2}"));
            }
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            if hyper.is_closed() || hyper.is_incomplete_message() || hyper.is_canceled() {
                generic = Some(format!("HTTP/2 connection: {hyper}"));
            }
        }
        if err.is::<tonic::transport::Error>() && generic.is_none() {
            generic = Some(format!("transport: {err}"));
        }
        cause = err.source();
    }
    generic
}

fn lost(label: &str, status: Status) -> Status {
    if !matches!(status.code(), Code::Unknown | Code::Unavailable) {
        return status;
    }
    match transport_cause(&status) {
        Some(cause) => Status::unavailable(format!("connection to {label} lost: {cause}")),
        None => status,
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
        match &mut self.inner {
            Inner::Fixed(c) => {
                tower::Service::poll_ready(c, cx).map_err(|e| transport(&self.label, e))
            }
            // Readiness is that of the session's channel, taken in `call`.
            Inner::Current(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let label = self.label.clone();
        let fut: Pin<Box<dyn Future<Output = Result<_, tonic::transport::Error>> + Send>> =
            match &mut self.inner {
                Inner::Fixed(c) => Box::pin(tower::Service::call(c, request)),
                Inner::Current(current) => {
                    let mut c = current.current().unwrap_or_else(|| current.fallback());
                    Box::pin(async move {
                        tower::ServiceExt::ready(&mut c).await?;
                        tower::Service::call(&mut c, request).await
                    })
                }
            };
        Box::pin(async move {
            let response = fut.await.map_err(|e| transport(&label, e))?;
            Ok(response.map(|body| Body::new(body.map_err(move |s| lost(&label, s)))))
        })
    }
}
