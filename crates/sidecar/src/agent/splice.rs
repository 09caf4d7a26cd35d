//! The agent's data path: every HTTP/2 connection the hub opens on the
//! session (one yamux stream) is spliced byte for byte onto a connection of
//! its own to the exposed service, so the hub's HTTP/2 client talks to the
//! service directly. Deadlines, cancels (RST_STREAM), trailers and flow
//! control are then end to end; the agent neither terminates HTTP/2 nor
//! buffers more than one read per direction.
//!
//! What stays from the proxying agent ([`PerConnection`]):
//! - the one connection to the service per hub connection (caller
//!   isolation): a splice is exactly that, up to
//!   [`MAX_CONNECTIONS`](crate::agent::isolate::MAX_CONNECTIONS) at once;
//!   further hub connections are proxied over the common connection;
//! - calls in flight, for drain and [`Agent::calls_in_flight`](super::Agent::calls_in_flight):
//!   the splice reads the HTTP/2 frame headers going by (never the
//!   payloads) and counts a call from the hub's HEADERS on a new stream to
//!   the service's END_STREAM or a RST_STREAM either way;
//! - reverse calls with a `:authority` h2 would refuse (Gitaly's Go
//!   server): the stream goes through [`backchannel::AuthorityFix`] first;
//! - an exposed service that cannot be reached: the stream is served by the
//!   proxying agent instead, which answers UNAVAILABLE naming the service
//!   (and reaches it once it is back).
//!
//! The proxying agent is kept for services the agent cannot splice to
//! (anything but plaintext HTTP/2 over TCP or a Unix socket) and with
//! `AgentConfig::splice` off.

use std::{
    collections::HashSet,
    io,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use backchannel::{AuthorityFix, InboundStream};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{addr::Target, agent::isolate::PerConnection};

/// How long connecting to the exposed service may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read per direction at a time.
const CHUNK: usize = 64 << 10;

/// Streams tracked per connection; a connection with more open at once is
/// still spliced, but its calls are no longer counted.
const MAX_TRACKED: usize = 16 << 10;

struct Inner {
    target: Target,
    fallback: PerConnection,
    calls: AtomicUsize,
    connections: AtomicUsize,
    spliced: AtomicU64,
    idle: tokio::sync::Notify,
}

/// Splices the hub's connections onto the exposed service. Cheap to clone.
#[derive(Clone)]
pub struct Splicer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Splicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splicer")
            .field("target", &self.inner.target)
            .field("calls", &self.calls_in_flight())
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Splicer {
    /// Splices onto `target` (TCP or Unix); `fallback` serves the streams
    /// whose service connection fails.
    pub fn new(target: Target, fallback: PerConnection) -> Self {
        Splicer {
            inner: Arc::new(Inner {
                target,
                fallback,
                calls: AtomicUsize::new(0),
                connections: AtomicUsize::new(0),
                spliced: AtomicU64::new(0),
                idle: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Calls in flight on the spliced connections.
    pub fn calls_in_flight(&self) -> usize {
        self.inner.calls.load(Ordering::SeqCst)
    }

    /// Spliced connections open now.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Connections spliced so far.
    pub fn spliced_total(&self) -> u64 {
        self.inner.spliced.load(Ordering::Relaxed)
    }

    /// Completes when no spliced call is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.calls_in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The handler for [`backchannel::ClientBuilder::raw_streams`].
    pub fn raw_streams(&self) -> backchannel::RawStreams {
        let me = self.clone();
        backchannel::RawStreams::new(move |stream| {
            let me = me.clone();
            tokio::spawn(async move { me.serve(stream).await });
        })
    }

    async fn serve(&self, stream: InboundStream) {
        let id = stream.id();
        let stream = AuthorityFix::new(stream);
        // As many service connections as the proxying agent keeps at most;
        // beyond, connections share the proxy's common one.
        if self.connections() >= crate::agent::isolate::MAX_CONNECTIONS {
            return self.fall_back(stream, "too many spliced connections").await;
        }
        let service = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&self.inner.target)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return self.fall_back(stream, &e.to_string()).await,
            Err(_) => return self.fall_back(stream, "connect timed out").await,
        };
        self.inner.spliced.fetch_add(1, Ordering::Relaxed);
        self.inner.connections.fetch_add(1, Ordering::SeqCst);
        let calls = Arc::new(Mutex::new(ConnCalls::default()));
        let (hub_r, hub_w) = tokio::io::split(stream);
        let (svc_r, svc_w) = tokio::io::split(service);
        let up = {
            let calls = calls.clone();
            let inner = self.inner.clone();
            let mut frames = Frames::with_preface();
            pump(hub_r, svc_w, move |b| {
                frames.feed(b, |t, f, s| {
                    on_frame(&inner, &calls, Dir::ToService, t, f, s)
                })
            })
        };
        let down = {
            let calls = calls.clone();
            let inner = self.inner.clone();
            let mut frames = Frames::default();
            pump(svc_r, hub_w, move |b| {
                frames.feed(b, |t, f, s| on_frame(&inner, &calls, Dir::ToHub, t, f, s))
            })
        };
        // Either side failing (a reset, a dead service) ends both; a clean
        // end of one direction is passed on as a half-close and the other
        // keeps going.
        let r = tokio::try_join!(up, down);
        if let Err(e) = r {
            tracing::debug!(stream = id, error = %e, "spliced connection ended");
        }
        let left = {
            let mut c = calls.lock().unwrap_or_else(|e| e.into_inner());
            c.disabled = true;
            std::mem::take(&mut c.open).len()
        };
        self.release(left);
        self.inner.connections.fetch_sub(1, Ordering::SeqCst);
    }

    fn release(&self, n: usize) {
        if n > 0 && self.inner.calls.fetch_sub(n, Ordering::SeqCst) == n {
            self.inner.idle.notify_waiters();
        }
    }

    /// Serves `stream` with the proxying agent (which answers UNAVAILABLE
    /// naming the service while it is down).
    async fn fall_back(&self, stream: AuthorityFix<InboundStream>, why: &str) {
        tracing::debug!(target = %self.inner.target, why, "cannot splice; proxying this connection");
        let fallback = self.inner.fallback.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let mut f = fallback.clone();
            tower::Service::call(&mut f, req.map(tonic::body::Body::new))
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(backchannel::H2_STREAM_WINDOW)
            .initial_connection_window_size(backchannel::H2_CONNECTION_WINDOW)
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    }
}

/// What carries the agent's calls: the proxying agent, and the splicer
/// when the exposed service can be spliced to.
#[derive(Clone, Debug)]
pub struct Forwarders {
    /// The proxying agent (also the splicer's fallback).
    pub proxy: PerConnection,
    /// The splicer, if on.
    pub splice: Option<Splicer>,
}

impl Forwarders {
    /// Calls in flight on both.
    pub fn in_flight(&self) -> usize {
        self.proxy.in_flight() + self.splice.as_ref().map_or(0, Splicer::calls_in_flight)
    }

    /// Completes when neither has a call in flight.
    pub async fn wait_idle(&self) {
        loop {
            self.proxy.wait_idle().await;
            if let Some(s) = &self.splice {
                s.wait_idle().await;
            }
            if self.in_flight() == 0 {
                return;
            }
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

async fn connect(target: &Target) -> io::Result<Box<dyn Io>> {
    match target {
        Target::Unix(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        Target::Tcp { .. } => {
            let addr = target.to_string();
            let addr = addr.strip_prefix("tcp://").unwrap_or(&addr).to_string();
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
    }
}

/// Copies `r` to `w`, showing every chunk to `seen` first; passes EOF on as
/// a half-close.
async fn pump<R, W>(mut r: R, mut w: W, mut seen: impl FnMut(&[u8])) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        seen(&buf[..n]);
        w.write_all(&buf[..n]).await?;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToService,
    ToHub,
}

const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_RST_STREAM: u8 = 0x3;
const FLAG_END_STREAM: u8 = 0x1;

/// The calls open on one spliced connection.
#[derive(Default)]
struct ConnCalls {
    open: HashSet<u32>,
    /// The highest stream the hub opened: a HEADERS frame on a stream at or
    /// below it is trailers, not a new call.
    last: u32,
    disabled: bool,
}

fn on_frame(inner: &Inner, calls: &Mutex<ConnCalls>, dir: Dir, typ: u8, flags: u8, sid: u32) {
    if sid == 0 {
        return;
    }
    let ends = match (dir, typ) {
        (Dir::ToService, TYPE_HEADERS) => false,
        (_, TYPE_RST_STREAM) => true,
        (Dir::ToHub, TYPE_HEADERS | TYPE_DATA) if flags & FLAG_END_STREAM != 0 => true,
        _ => return,
    };
    let mut c = calls.lock().unwrap_or_else(|e| e.into_inner());
    if c.disabled {
        return;
    }
    if !ends {
        if sid <= c.last {
            return;
        }
        c.last = sid;
        if c.open.len() >= MAX_TRACKED {
            // Stop counting this connection rather than grow without bound.
            c.disabled = true;
            let n = std::mem::take(&mut c.open).len();
            drop(c);
            if n > 0 && inner.calls.fetch_sub(n, Ordering::SeqCst) == n {
                inner.idle.notify_waiters();
            }
            return;
        }
        c.open.insert(sid);
        inner.calls.fetch_add(1, Ordering::SeqCst);
    } else if c.open.remove(&sid) {
        drop(c);
        if inner.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            inner.idle.notify_waiters();
        }
    }
}

/// Finds HTTP/2 frame boundaries in a byte stream, by their 9-byte headers.
#[derive(Default)]
struct Frames {
    preface: usize,
    header: [u8; 9],
    have: usize,
    payload_left: usize,
}

impl Frames {
    /// The client's side: skips the 24-byte connection preface first.
    fn with_preface() -> Self {
        Frames {
            preface: 24,
            ..Frames::default()
        }
    }

    /// Feeds bytes; calls `frame(type, flags, stream)` per frame header.
    fn feed(&mut self, mut b: &[u8], mut frame: impl FnMut(u8, u8, u32)) {
        while !b.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(b.len());
                self.preface -= n;
                b = &b[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(b.len());
                self.payload_left -= n;
                b = &b[n..];
            } else {
                let n = (9 - self.have).min(b.len());
                self.header[self.have..self.have + n].copy_from_slice(&b[..n]);
                self.have += n;
                b = &b[n..];
                if self.have == 9 {
                    self.have = 0;
                    let h = self.header;
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    let sid = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    frame(h[3], h[4], sid);
                    self.payload_left = len;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(typ: u8, flags: u8, sid: u32, len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        v.push(typ);
        v.push(flags);
        v.extend_from_slice(&sid.to_be_bytes());
        v.extend(std::iter::repeat_n(0xAB, len));
        v
    }

    #[test]
    fn frames_are_found_across_any_split() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(4, 0, 0, 6));
        bytes.extend(frame(1, 4, 1, 30));
        bytes.extend(frame(0, 1, 1, 1000));
        bytes.extend(frame(3, 0, 3, 4));
        let want = vec![(4, 0, 0), (1, 4, 1), (0, 1, 1), (3, 0, 3)];
        for split in [1, 2, 7, 9, 10, 24, 33, 100, bytes.len()] {
            let mut f = Frames::with_preface();
            let mut got = Vec::new();
            for chunk in bytes.chunks(split) {
                f.feed(chunk, |t, fl, s| got.push((t, fl, s)));
            }
            assert_eq!(got, want, "split {split}");
        }
    }

    #[test]
    fn a_call_counts_from_headers_to_the_end_of_the_response() {
        // A lazy channel needs a runtime to be made in.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let fallback = PerConnection::new(
            || anyhow::bail!("unused"),
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
            "t",
        );
        let s = Splicer::new("127.0.0.1:1".parse().unwrap(), fallback);
        let calls = Mutex::new(ConnCalls::default());
        let f = |d, t, fl, sid| on_frame(&s.inner, &calls, d, t, fl, sid);
        f(Dir::ToService, TYPE_HEADERS, 4, 1);
        f(Dir::ToService, TYPE_HEADERS, 4, 3);
        assert_eq!(s.calls_in_flight(), 2);
        // Response headers, data, then trailers with END_STREAM.
        f(Dir::ToHub, TYPE_HEADERS, 4, 1);
        f(Dir::ToHub, TYPE_DATA, 0, 1);
        assert_eq!(s.calls_in_flight(), 2);
        f(Dir::ToHub, TYPE_HEADERS, 5, 1);
        assert_eq!(s.calls_in_flight(), 1);
        // The hub's trailers on an old stream are not a new call.
        f(Dir::ToService, TYPE_HEADERS, 5, 1);
        assert_eq!(s.calls_in_flight(), 1);
        // A cancel.
        f(Dir::ToService, TYPE_RST_STREAM, 0, 3);
        assert_eq!(s.calls_in_flight(), 0);
        f(Dir::ToHub, TYPE_RST_STREAM, 0, 3);
        assert_eq!(s.calls_in_flight(), 0);
    }
}
