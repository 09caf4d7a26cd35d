//! A transparent gRPC proxy over a tonic [`Channel`]: the hub's router and the
//! agent's backchannel service are both built on [`forward`].
//!
//! The request is forwarded as an HTTP/2 request (headers including
//! `grpc-timeout`, body frame by frame) and the response (headers, body,
//! trailers) streamed back, so all four RPC shapes, metadata, trailers, status
//! and details pass untouched and without buffering; h2 flow control gives
//! backpressure end to end. Dropping the response body (a caller's cancel)
//! drops the upstream stream, which resets it. On top of that the proxy
//! enforces the call's deadline itself (tonic's server would answer CANCELLED
//! on expiry) and turns transport failures into statuses that name the target.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use tokio::time::{Instant, Sleep};
use tonic::{body::Body, transport::Channel, Code, Status};
use tower::ServiceExt;

pub mod h2;

/// A boxed response future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Observes one forwarded call: bytes each way and how it ended.
pub trait CallObserver: Send + Sync + 'static {
    /// `n` request bytes (HTTP/2 DATA) were sent toward the target.
    fn bytes_to_target(&self, _n: u64) {}
    /// `n` response bytes were received from the target.
    fn bytes_from_target(&self, _n: u64) {}
    /// The call ended (once), with its gRPC status code when known.
    fn finished(&self, _code: Option<Code>) {}
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;
impl CallObserver for NoObserver {}

/// How much earlier than the caller's `grpc-timeout` the proxy's own timer
/// fires. tonic's server wraps every service in a timer started a moment
/// before ours, and when it fires first the caller gets its CANCELLED
/// "Timeout expired" instead of DEADLINE_EXCEEDED. The timer wheel has 1 ms
/// ticks, so a lead of a few ticks makes ours always fire first.
pub const DEADLINE_LEAD: Duration = Duration::from_millis(3);

/// The deadline a request carries in `grpc-timeout`, counted from now, less
/// [`DEADLINE_LEAD`].
pub fn deadline_of(headers: &HeaderMap) -> Option<Instant> {
    parse_grpc_timeout(headers.get("grpc-timeout")?)
        .map(|d| Instant::now() + d.saturating_sub(DEADLINE_LEAD))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    // ASCII digits only: `u64::from_str` would also take a leading '+'.
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A trailers-only gRPC response carrying `status`.
pub fn status_response(status: Status) -> http::Response<Body> {
    status.into_http()
}

/// Forwards `req` to `channel`. `target` names the destination in error
/// messages ("peer 'db' (id 3)"); `deadline` is usually [`deadline_of`] the
/// request's headers, computed when the call arrived.
pub async fn forward(
    channel: Channel,
    req: http::Request<Body>,
    target: Arc<str>,
    deadline: Option<Instant>,
    observer: Arc<dyn CallObserver>,
) -> http::Response<Body> {
    forward_with(channel, req, target, deadline, observer).await
}

/// [`forward`] to any HTTP/2 upstream: a tonic [`Channel`], an
/// [`h2::H2Upstream`] (hyper's client without a tower buffer)...
///
/// ```no_run
/// # async fn f(req: http::Request<tonic::body::Body>, stream: tokio::net::TcpStream) {
/// use std::sync::{Arc, Mutex};
/// use backchannel_sidecar::router::{forward_with, h2::H2Upstream, NoObserver};
/// let slot = Arc::new(Mutex::new(Some(stream)));
/// let upstream = H2Upstream::new(
///     move || slot.lock().unwrap().take().ok_or_else(|| "used".into()),
///     http::uri::Authority::from_static("service.local"),
///     1,
///     100,
/// );
/// let resp = forward_with(upstream, req, "the service".into(), None, Arc::new(NoObserver)).await;
/// # drop(resp); }
/// ```
pub async fn forward_with<S, B>(
    upstream: S,
    req: http::Request<Body>,
    target: Arc<str>,
    deadline: Option<Instant>,
    observer: Arc<dyn CallObserver>,
) -> http::Response<Body>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>> + Send,
    S::Error: Into<h2::BoxError>,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<h2::BoxError>,
{
    let (mut parts, body) = req.into_parts();
    // The next hop gets the time that is left, not the caller's original
    // budget (gRPC's deadline propagation), in milliseconds, rounded up.
    if let Some(at) = deadline {
        let left = at.saturating_duration_since(Instant::now());
        let ms = left.as_millis().clamp(1, 99_999_999);
        if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
            parts.headers.insert("grpc-timeout", v);
        }
    }
    // Extensions belong to the incoming connection (ConnInfo...), not to the
    // outgoing request.
    parts.extensions = http::Extensions::new();
    let req =
        http::Request::from_parts(parts, Body::new(CountingBody::new(body, observer.clone())));
    let call = upstream.oneshot(req);
    let result = match deadline {
        Some(at) => tokio::select! {
            r = call => Some(r),
            _ = tokio::time::sleep_until(at) => None,
        },
        None => Some(call.await),
    };
    let result = result.map(|r| r.map_err(Into::<h2::BoxError>::into));
    use crate::hub::fate::{self, Fate};
    let finish = |status: Status, fate: Fate| {
        observer.finished(Some(status.code()));
        fate::respond(status, fate)
    };
    match result {
        None => finish(
            Status::deadline_exceeded(format!("deadline exceeded before {target} answered")),
            Fate::Sent,
        ),
        // The channel enforces grpc-timeout too (as CANCELLED "Timeout
        // expired"); either timer firing means the deadline passed.
        Some(Err(err)) if is_timeout(&*err) => finish(
            Status::deadline_exceeded(format!("deadline exceeded before {target} answered")),
            Fate::Sent,
        ),
        Some(Err(err)) => finish(
            Status::unavailable(format!("{target} is unavailable: {}", error_chain(&*err))),
            fate::of_transport_error(&*err),
        ),
        Some(Ok(resp)) if deadline.is_some() && tonic_timeout(resp.headers()) => finish(
            Status::deadline_exceeded(format!("deadline exceeded before {target} answered")),
            Fate::Sent,
        ),
        Some(Ok(resp)) => {
            let (parts, body) = resp.into_parts();
            // A trailers-only response carries its status in the headers.
            let header_status = parts
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<i32>().ok())
                .map(Code::from_i32);
            let body = ResponseBody {
                inner: Some(Body::new(body)),
                deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
                observer,
                target,
                code: header_status,
                finished: false,
            };
            http::Response::from_parts(parts, Body::new(body))
        }
    }
}

/// Whether `headers` (a trailers-only response, or trailers) carry tonic's
/// answer to an expired `grpc-timeout`: CANCELLED "Timeout expired" (gRPC
/// says DEADLINE_EXCEEDED). A service behind a splicing agent receives the
/// deadline and its timer fires about when ours does.
fn tonic_timeout(headers: &HeaderMap) -> bool {
    // grpc-message is percent-encoded on the wire.
    headers.get("grpc-status").map(|v| v.as_bytes()) == Some(b"1")
        && matches!(
            headers.get("grpc-message").map(|v| v.as_bytes()),
            Some(b"Timeout%20expired" | b"Timeout expired")
        )
}

fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = Some(err);
    while let Some(x) = e {
        if x.is::<tonic::TimeoutExpired>() {
            return true;
        }
        e = x.source();
    }
    false
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = e.source();
    }
    s
}

/// The request body on its way to the target: counts DATA bytes, and
/// looks one frame ahead so that the end of the body travels with its last
/// DATA frame.
///
/// gRPC clients end a request with an empty DATA frame carrying
/// END_STREAM. Forwarded as such, the upstream connection writes it as a
/// frame of its own after the payload, so a unary call costs the next hop
/// (and every process behind it) one more read and wake-up. Having seen a
/// DATA frame, the body polls once more: an empty DATA frame is dropped, the
/// end of the body is then reported by [`is_end_stream`](http_body::Body::is_end_stream)
/// (which hyper checks right after each DATA frame, setting END_STREAM on
/// it), and anything else is kept for the next poll.
struct CountingBody {
    inner: Body,
    observer: Arc<dyn CallObserver>,
    /// A frame (or error) read ahead.
    peeked: Option<Result<Frame<Bytes>, Status>>,
    /// The inner body has ended (seen while reading ahead).
    ended: bool,
}

impl CountingBody {
    fn new(inner: Body, observer: Arc<dyn CallObserver>) -> Self {
        CountingBody {
            inner,
            observer,
            peeked: None,
            ended: false,
        }
    }

    /// Reads ahead after a DATA frame, without waiting.
    fn peek(&mut self, cx: &mut Context<'_>) {
        while self.peeked.is_none() && !self.ended {
            match http_body::Body::poll_frame(Pin::new(&mut self.inner), cx) {
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| d.is_empty()) => {}
                Poll::Ready(Some(r)) => self.peeked = Some(r),
                // The waker is registered with the inner body: the caller is
                // woken when the next frame comes.
                Poll::Pending => return,
            }
        }
    }
}

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let r = match this.peeked.take() {
            Some(r) => r,
            None if this.ended => return Poll::Ready(None),
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(r)) => r,
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        if let Ok(frame) = &r {
            if let Some(d) = frame.data_ref() {
                this.observer.bytes_to_target(d.len() as u64);
                this.peek(cx);
            }
        }
        Poll::Ready(Some(r))
    }

    fn is_end_stream(&self) -> bool {
        self.peeked.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.peeked.is_some() {
            return http_body::SizeHint::default();
        }
        if self.ended {
            return http_body::SizeHint::with_exact(0);
        }
        self.inner.size_hint()
    }
}

/// The response body on its way back: counts bytes, records the status,
/// enforces the deadline, and turns a broken upstream into UNAVAILABLE
/// trailers naming the target.
struct ResponseBody {
    inner: Option<Body>,
    deadline: Option<Pin<Box<Sleep>>>,
    observer: Arc<dyn CallObserver>,
    target: Arc<str>,
    code: Option<Code>,
    finished: bool,
}

impl ResponseBody {
    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.inner = None;
            self.deadline = None;
            self.observer.finished(self.code);
        }
    }

    fn end_with(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.code = Some(status.code());
        self.finish();
        let mut trailers = HeaderMap::new();
        let _ = status.add_header(&mut trailers);
        crate::hub::fate::Fate::Sent.mark(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if !self.finished {
            // The caller went away before the end: a cancel.
            if self.code.is_none() {
                self.code = Some(Code::Cancelled);
            }
            self.finish();
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        if let Some(sleep) = this.deadline.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                let msg = format!("deadline exceeded while {} was answering", this.target);
                return this.end_with(Status::deadline_exceeded(msg));
            }
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.observer.bytes_from_target(d.len() as u64);
                } else if this.deadline.is_some() && frame.trailers_ref().is_some_and(tonic_timeout)
                {
                    let msg = format!("deadline exceeded while {} was answering", this.target);
                    return this.end_with(Status::deadline_exceeded(msg));
                } else if let Some(t) = frame.trailers_ref() {
                    if let Some(code) = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.parse::<i32>().ok())
                    {
                        this.code = Some(Code::from_i32(code));
                    }
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => {
                let msg = format!("{} went away mid-call: {}", this.target, status.message());
                this.end_with(Status::unavailable(msg))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            None => true,
            Some(b) => b.is_end_stream(),
        }
    }
}

/// A tower service that forwards every request to one channel: the agent's
/// backchannel service (a catch-all in front of `--expose`).
#[derive(Clone)]
pub struct ForwardAll {
    channel: Channel,
    target: Arc<str>,
}

impl std::fmt::Debug for ForwardAll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardAll")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl ForwardAll {
    /// Forwards to `channel`; `target` names it in error messages.
    pub fn new(channel: Channel, target: impl Into<Arc<str>>) -> Self {
        ForwardAll {
            channel,
            target: target.into(),
        }
    }

    /// A catch-all [`tonic::service::Routes`] (every service, every method).
    pub fn into_routes(self) -> tonic::service::Routes {
        let svc = self;
        let router = axum::Router::new().fallback_service(tower::service_fn(
            move |req: http::Request<axum::body::Body>| {
                let mut svc = svc.clone();
                let req = req.map(Body::new);
                async move { tower::Service::call(&mut svc, req).await }
            },
        ));
        tonic::service::Routes::from(router)
    }
}

impl tower::Service<http::Request<Body>> for ForwardAll {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let deadline = deadline_of(req.headers());
        let fut = forward(
            self.channel.clone(),
            req,
            self.target.clone(),
            deadline,
            Arc::new(NoObserver),
        );
        Box::pin(async move { Ok(fut.await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonic_timeout_answer_as_sent_on_the_wire() {
        // What tonic's server sends when a grpc-timeout expires, exactly.
        let mut h = Status::cancelled("Timeout expired").into_http::<Body>();
        assert!(tonic_timeout(h.headers()), "{:?}", h.headers());
        h.headers_mut()
            .insert("grpc-message", HeaderValue::from_static("other"));
        assert!(!tonic_timeout(h.headers()));
        let h = Status::deadline_exceeded("Timeout expired").into_http::<Body>();
        assert!(!tonic_timeout(h.headers()));
    }

    /// What a body's `poll_frame` answers when ready.
    type Polled = Option<Result<Frame<Bytes>, Status>>;

    /// A request body from a script of poll answers (`None`: pending).
    struct Script(std::collections::VecDeque<Polled>);

    impl http_body::Body for Script {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled> {
            match self.0.pop_front() {
                Some(Some(f)) => Poll::Ready(Some(f)),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }
    }

    fn data(b: &'static [u8]) -> Polled {
        Some(Ok(Frame::data(Bytes::from_static(b))))
    }

    fn counting(script: Vec<Polled>) -> CountingBody {
        CountingBody::new(Body::new(Script(script.into())), Arc::new(NoObserver))
    }

    fn poll(b: &mut CountingBody) -> Poll<Polled> {
        let w = std::task::Waker::noop();
        http_body::Body::poll_frame(Pin::new(b), &mut Context::from_waker(w))
    }

    fn data_of(p: Poll<Polled>) -> Bytes {
        match p {
            Poll::Ready(Some(Ok(f))) => f.into_data().expect("a DATA frame"),
            other => panic!("expected DATA, got {other:?}"),
        }
    }

    #[test]
    fn the_end_of_a_request_travels_with_its_last_data_frame() {
        use http_body::Body as _;
        // A unary request as gRPC clients send it: the message, then an
        // empty DATA frame with END_STREAM.
        let mut b = counting(vec![data(b"msg"), data(b"")]);
        assert_eq!(data_of(poll(&mut b)), "msg");
        assert!(b.is_end_stream(), "the end is known with the message");
        assert!(matches!(poll(&mut b), Poll::Ready(None)));
    }

    #[test]
    fn reading_ahead_keeps_every_frame_error_and_pause_in_order() {
        use http_body::Body as _;
        let mut trailers = HeaderMap::new();
        trailers.insert("x", HeaderValue::from_static("y"));
        let mut b = counting(vec![
            data(b"a"),
            None,
            data(b"b"),
            data(b"c"),
            data(b""),
            data(b"d"),
            Some(Ok(Frame::trailers(trailers))),
        ]);
        assert_eq!(data_of(poll(&mut b)), "a");
        // The frame after "a" was not there yet: nothing is ended.
        assert!(!b.is_end_stream());
        assert_eq!(data_of(poll(&mut b)), "b");
        assert!(
            !b.is_end_stream(),
            "'c' was read ahead and is still to come"
        );
        assert_eq!(data_of(poll(&mut b)), "c");
        // The empty frame between "c" and "d" is dropped, "d" kept.
        assert_eq!(data_of(poll(&mut b)), "d");
        assert!(!b.is_end_stream(), "trailers are still to come");
        match poll(&mut b) {
            Poll::Ready(Some(Ok(f))) => assert_eq!(f.into_trailers().unwrap()["x"], "y"),
            other => panic!("expected trailers, got {other:?}"),
        }
        assert!(matches!(poll(&mut b), Poll::Ready(None)));
        assert!(b.is_end_stream());

        // An error read ahead comes out after the frame before it.
        let mut b = counting(vec![data(b"a"), Some(Err(Status::cancelled("gone")))]);
        assert_eq!(data_of(poll(&mut b)), "a");
        assert!(!b.is_end_stream());
        match poll(&mut b) {
            Poll::Ready(Some(Err(s))) => assert_eq!(s.message(), "gone"),
            other => panic!("expected the error, got {other:?}"),
        }
    }

    #[test]
    fn grpc_timeout_units() {
        let p = |s: &'static str| parse_grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(p("100m"), Some(Duration::from_millis(100)));
        assert_eq!(p("2S"), Some(Duration::from_secs(2)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("5u"), Some(Duration::from_micros(5)));
        assert_eq!(p("x"), None);
        assert_eq!(p("123456789S"), None);
        assert_eq!(p("10q"), None);
        // Digits only, as the spec says: `u64::from_str` alone would take "+5".
        assert_eq!(p("+5S"), None);
        assert_eq!(p("S"), None);
    }
}
