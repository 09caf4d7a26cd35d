//! Raw tokio-yamux sessions for the transport-only and prototype paths.
//!
//! [`RawStream`] wraps a `tokio_yamux::StreamHandle` with the same stall fix
//! as `backchannel::YamuxStream` (whose constructor is crate-private), plus an
//! opt-in `poll_write_vectored` that coalesces h2's header + payload slices
//! into one yamux frame: the prototype of a core change measured by the
//! `proto-*` paths.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Wake, Waker},
};

use futures::{task::AtomicWaker, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_yamux::{session::SessionType, stream::StreamState, Session, StreamHandle};

/// The yamux settings of `backchannel::SessionConfig::{client,server}()`
/// (4 MiB windows), or `window` bytes.
pub fn config(window: u32, backlog: usize) -> tokio_yamux::Config {
    tokio_yamux::Config {
        accept_backlog: backlog,
        enable_keepalive: false,
        keepalive_interval: std::time::Duration::from_secs(30),
        connection_write_timeout: std::time::Duration::from_secs(10),
        max_stream_count: 1024,
        max_stream_window_size: window.max(tokio_yamux::config::INITIAL_STREAM_WINDOW),
    }
}

/// Runs a session in a task; returns its control and a receiver of the
/// streams the peer opens.
pub fn spawn_session<T>(
    io: T,
    cfg: tokio_yamux::Config,
    ty: SessionType,
) -> (
    tokio_yamux::Control,
    tokio::sync::mpsc::UnboundedReceiver<StreamHandle>,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut session = Session::new(io, cfg, ty);
    let control = session.control();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(stream)) = session.next().await {
            let _ = tx.send(stream);
        }
    });
    (control, rx)
}

#[derive(Default)]
struct BothWakers {
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Wake for BothWakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.read.wake();
        self.write.wake();
    }
}

/// Largest coalesced write (one yamux frame) of the vectored prototype.
const MAX_COALESCE: usize = 1024 * 1024;

/// A yamux stream for hyper/h2 or raw copies (see the module docs).
pub struct RawStream {
    inner: StreamHandle,
    wakers: Arc<BothWakers>,
    waker: Waker,
    vectored: bool,
    scratch: Vec<u8>,
}

impl RawStream {
    /// Wraps `inner`; `vectored` turns on the coalescing prototype.
    pub fn new(inner: StreamHandle, vectored: bool) -> Self {
        let wakers = Arc::new(BothWakers::default());
        let waker = Waker::from(wakers.clone());
        RawStream {
            inner,
            wakers,
            waker,
            vectored,
            scratch: Vec::new(),
        }
    }

    fn write_inner(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut cx = Context::from_waker(&self.waker);
        match Pin::new(&mut self.inner).poll_write(&mut cx, buf) {
            Poll::Pending => {}
            ready => return ready,
        }
        let mut empty = ReadBuf::new(&mut []);
        if let Poll::Ready(Err(e)) = self.inner.poll_peek(&mut cx, &mut empty) {
            return Poll::Ready(Err(e));
        }
        if self.inner.send_window() > 0 {
            return Pin::new(&mut self.inner).poll_write(&mut cx, buf);
        }
        if self.inner.state() == StreamState::RemoteClosing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Poll::Pending
    }
}

impl tonic::transport::server::Connected for RawStream {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for RawStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.wakers.read.register(cx.waker());
        let mut cx = Context::from_waker(&this.waker);
        Pin::new(&mut this.inner).poll_read(&mut cx, buf)
    }
}

impl AsyncWrite for RawStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wakers.write.register(cx.waker());
        this.write_inner(buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wakers.write.register(cx.waker());
        let nonempty = bufs.iter().filter(|b| !b.is_empty()).count();
        if !this.vectored || nonempty <= 1 {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return this.write_inner(first);
        }
        // One yamux frame for all slices (up to the send window): h2 hands
        // us a 9-byte frame header and its payload as separate slices.
        let limit = (this.inner.send_window() as usize).clamp(1, MAX_COALESCE);
        let mut scratch = std::mem::take(&mut this.scratch);
        scratch.clear();
        for b in bufs {
            let n = b.len().min(limit - scratch.len());
            scratch.extend_from_slice(&b[..n]);
            if scratch.len() == limit {
                break;
            }
        }
        let r = this.write_inner(&scratch);
        this.scratch = scratch;
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.wakers.write.register(cx.waker());
        let mut cx = Context::from_waker(&this.waker);
        Pin::new(&mut this.inner).poll_shutdown(&mut cx)
    }
}
