//! An upstream for [`forward_with`](super::forward_with) on hyper's HTTP/2
//! client directly: no tower `Buffer` (whose worker task adds a hop to
//! every request of a tonic `Channel`), one or more HTTP/2 connections, each
//! on a stream that `open` returns (for the hub: a new yamux stream to the
//! peer).
//!
//! Connections open on first use, without a round trip (the request goes
//! right behind the preface), and again after one fails. Calls go to the
//! connection with the fewest in flight, opening another (up to
//! `max_connections`) when every open one already carries `per_connection`
//! calls, so concurrent calls do not queue on one connection's task.
//!
//! A connection's small writes are held until it flushes, and a flush of
//! them waits one turn of the scheduler first ([`Corked`]): hyper writes a
//! request's HEADERS as soon as it has them and its DATA only once the
//! stream is open, and the request's end (gRPC clients send an empty DATA
//! frame with END_STREAM) after that, so without the wait a unary call goes
//! out as two or three writes to the session (as many reads and wake-ups
//! for the agent and the service).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::body::Body;

/// Errors of the upstream (boxed, as tonic's are).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Opener = dyn Fn() -> Result<Box<dyn Io>, BoxError> + Send + Sync;

/// A byte stream an HTTP/2 connection runs on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

struct Conn {
    tx: SendRequest<Body>,
    in_flight: Arc<AtomicUsize>,
}

struct Inner {
    open: Box<Opener>,
    origin: http::uri::Authority,
    conns: Mutex<Vec<Conn>>,
    connecting: tokio::sync::Mutex<()>,
    max_connections: usize,
    per_connection: usize,
}

/// HTTP/2 connections to one upstream. Cheap to clone (clones share the
/// connections); the connections close when the last clone is dropped and
/// their calls have ended.
#[derive(Clone)]
pub struct H2Upstream {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for H2Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Upstream")
            .field("origin", &self.inner.origin)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl H2Upstream {
    /// Connections on the streams `open` returns; requests carry `origin`
    /// as their authority. One connection (`max_connections` 1) keeps every
    /// call of the upstream on one HTTP/2 connection.
    pub fn new<F, T>(
        open: F,
        origin: http::uri::Authority,
        max_connections: usize,
        per_connection: usize,
    ) -> Self
    where
        F: Fn() -> Result<T, BoxError> + Send + Sync + 'static,
        T: Io,
    {
        H2Upstream {
            inner: Arc::new(Inner {
                open: Box::new(move || open().map(|io| Box::new(io) as Box<dyn Io>)),
                origin,
                conns: Mutex::new(Vec::new()),
                connecting: tokio::sync::Mutex::new(()),
                max_connections: max_connections.max(1),
                per_connection: per_connection.max(1),
            }),
        }
    }

    /// HTTP/2 connections open now.
    pub fn connections(&self) -> usize {
        let mut c = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|c| !c.tx.is_closed());
        c.len()
    }

    /// An open connection for the next call, if one has room (or no more
    /// may open), with the call counted on it.
    fn pick_open(&self) -> Option<(SendRequest<Body>, InFlight)> {
        let mut conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.tx.is_closed());
        let (c, n) = conns
            .iter()
            .map(|c| (c, c.in_flight.load(Ordering::Relaxed)))
            .min_by_key(|(_, n)| *n)?;
        if n < self.inner.per_connection || conns.len() >= self.inner.max_connections {
            return Some((c.tx.clone(), InFlight::start(c.in_flight.clone())));
        }
        None
    }

    /// The connection for the next call, opening one if needed.
    async fn pick(&self) -> Result<(SendRequest<Body>, InFlight), BoxError> {
        if let Some(p) = self.pick_open() {
            return Ok(p);
        }
        let _one_at_a_time = self.inner.connecting.lock().await;
        if let Some(p) = self.pick_open() {
            return Ok(p);
        }
        let io = (self.inner.open)()?;
        let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(backchannel::H2_STREAM_WINDOW)
            .initial_connection_window_size(backchannel::H2_CONNECTION_WINDOW)
            .handshake(TokioIo::new(Corked::<Box<dyn Io>>::new(io)))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        let in_flight = Arc::new(AtomicUsize::new(0));
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Conn {
                tx: tx.clone(),
                in_flight: in_flight.clone(),
            });
        Ok((tx, InFlight::start(in_flight)))
    }
}

/// Writes smaller than this are held until a flush; a flush holding fewer
/// bytes first waits one turn of the scheduler.
const CORK_MAX: usize = 16 << 10;

/// An HTTP/2 connection's byte stream that holds small writes until a
/// flush, and answers the first flush of a small batch by yielding (waking
/// itself): the tasks that feed the connection (hyper's request body pipe)
/// run first, and what they add goes out in the same write. A write of
/// [`CORK_MAX`] bytes or more (bulk DATA) goes straight through, after what
/// is held: no copy, and at most [`CORK_MAX`] held.
pub(crate) struct Corked<T> {
    io: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
    yielded: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Corked<T> {
    pub(crate) fn new(io: T) -> Self {
        Corked {
            io,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }

    /// Writes out what is held.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.buf.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Holds `bufs` (or, when large and nothing is held, writes them
    /// through).
    fn write(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        if self.buf.len() + n > CORK_MAX {
            std::task::ready!(self.drain(cx))?;
        }
        if n >= CORK_MAX {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(n))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write(cx, &[std::io::IoSlice::new(b)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.write(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.buf.is_empty() && !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(self.drain(cx))?;
        self.yielded = false;
        // A quiet connection keeps no buffer (a hub holds thousands).
        self.buf = Vec::new();
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts a call on its connection until the response body is dropped.
#[derive(Debug)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(n: Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its call counted on its connection.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: hyper::body::Incoming,
    _in_flight: InFlight,
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl tower::Service<http::Request<Body>> for H2Upstream {
    type Response = http::Response<UpstreamBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let me = self.clone();
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.inner.origin.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        Box::pin(async move {
            let (mut tx, in_flight) = me.pick().await?;
            std::future::poll_fn(|cx| tx.poll_ready(cx)).await?;
            let resp = tx.send_request(req).await?;
            Ok(resp.map(|inner| UpstreamBody {
                inner,
                _in_flight: in_flight,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small and large writes, flushed and not, arrive whole and in order
    /// over a real socket; the flush of a small batch yields once.
    #[tokio::test]
    async fn corked_writes_arrive_whole_and_in_order() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let mut w = Corked::new(a.unwrap());
        let (mut r, _) = b.unwrap();
        let mut want = Vec::new();
        let mut n = 0u8;
        let mut piece = |len: usize| {
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    n = n.wrapping_add(1);
                    n
                })
                .collect();
            want.extend_from_slice(&v);
            v
        };
        let pieces: Vec<Vec<u8>> = [9, 100, CORK_MAX, 3, CORK_MAX - 1, 2, 5 * CORK_MAX, 1]
            .into_iter()
            .map(&mut piece)
            .collect();
        let total = want.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; total];
            r.read_exact(&mut got).await.unwrap();
            got
        });
        for (i, p) in pieces.iter().enumerate() {
            w.write_all(p).await.unwrap();
            if i % 3 == 0 {
                w.flush().await.unwrap();
            }
        }
        // A flush of a small batch first yields (one Pending), then writes.
        w.write_all(b"").await.unwrap();
        assert!(w.buf.len() <= CORK_MAX);
        w.flush().await.unwrap();
        assert!(w.buf.is_empty());
        assert_eq!(w.buf.capacity(), 0, "a quiet connection keeps no buffer");
        assert_eq!(reader.await.unwrap(), want);

        let mut small = Corked::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        small.write_all(b"x").await.unwrap();
        let mut first = true;
        std::future::poll_fn(|cx| {
            let p = Pin::new(&mut small).poll_flush(cx);
            if first {
                assert!(p.is_pending(), "the first flush of a small batch yields");
                first = false;
                return Poll::Pending;
            }
            p
        })
        .await
        .unwrap();
        assert!(small.buf.is_empty());
    }
}
