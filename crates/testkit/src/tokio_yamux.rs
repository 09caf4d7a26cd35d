//! tokio-yamux, an independent yamux implementation: the reference that
//! benchmarks compare `backchannel-yamux` against and tests interoperate
//! with. Sessions, and a stream wrapper for tonic. The wrapper works around
//! tokio-yamux's write stall (a waker that wakes reader and writer, and
//! `poll_peek` to process window updates) and coalesces h2's vectored writes
//! into one frame; see `crates/backchannel/tests/yamux_stall.rs` for the
//! stall itself.
//!
//! Paths: `tokio-yamux` (tonic over a bare tokio-yamux session) and
//! `raw-tokio-yamux` (the `copy` workload through one tokio-yamux stream).

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll, Wake, Waker},
};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_yamux::{stream::StreamState, StreamHandle};

use futures::StreamExt;
use tokio_yamux::{session::SessionType, Session};

/// tokio-yamux settings equal to `backchannel::SessionConfig`'s (keepalive
/// off), with `window` bytes of stream window.
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

/// Runs a tokio-yamux session in a task; returns its control and a receiver
/// of the streams the peer opens.
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

/// One yamux stream, usable as a connection by hyper/tonic (see the module
/// docs for the stall it avoids).
pub struct TokioYamuxStream {
    inner: StreamHandle,
    wakers: Arc<BothWakers>,
    waker: Waker,
    coalesce: bool,
    scratch: Vec<u8>,
}

/// Largest coalesced write (one yamux frame).
const MAX_COALESCE: usize = 1024 * 1024;
/// Scratch capacity kept between writes; larger buffers are freed, so idle
/// streams do not hold on to memory.
const KEEP_SCRATCH: usize = 64 * 1024;

impl TokioYamuxStream {
    /// Wraps a tokio-yamux stream.
    pub fn new(inner: StreamHandle) -> Self {
        let wakers = Arc::new(BothWakers::default());
        let waker = Waker::from(wakers.clone());
        TokioYamuxStream {
            inner,
            wakers,
            waker,
            coalesce: true,
            scratch: Vec::new(),
        }
    }

    /// Turns coalescing of vectored writes on (the default) or off; off is
    /// only useful to measure what it gains.
    pub fn set_coalesce_writes(&mut self, on: bool) {
        self.coalesce = on;
    }

    /// Ready when the stream has send window. When it has none, processes
    /// queued frames (crediting window updates) and registers on the frame
    /// channel, so a window update that arrives later wakes us: the part
    /// tokio-yamux's own `poll_write` misses.
    fn poll_send_window(&mut self) -> Poll<io::Result<()>> {
        if self.inner.send_window() > 0 {
            return Poll::Ready(Ok(()));
        }
        let mut cx = Context::from_waker(&self.waker);
        let mut empty = ReadBuf::new(&mut []);
        if let Poll::Ready(Err(e)) = self.inner.poll_peek(&mut cx, &mut empty) {
            return Poll::Ready(Err(e));
        }
        if self.inner.send_window() > 0 {
            return Poll::Ready(Ok(()));
        }
        if self.inner.state() == StreamState::RemoteClosing {
            // tokio-yamux stops processing window updates once the peer has
            // half-closed; waiting would hang forever.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "peer half-closed the yamux stream and the send window is exhausted",
            )));
        }
        Poll::Pending
    }

    /// Writes `buf` (or a prefix of it, up to the send window) as one yamux
    /// data frame.
    fn write_frame(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_send_window())?;
        let mut cx = Context::from_waker(&self.waker);
        Pin::new(&mut self.inner).poll_write(&mut cx, buf)
    }

    /// The yamux stream ID (odd: opened by the client; even: by the server).
    pub fn id(&self) -> u32 {
        self.inner.id()
    }
}

impl std::fmt::Debug for TokioYamuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokioYamuxStream")
            .field("id", &self.inner.id())
            .finish()
    }
}

impl AsyncRead for TokioYamuxStream {
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

impl AsyncWrite for TokioYamuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wakers.write.register(cx.waker());
        this.write_frame(buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wakers.write.register(cx.waker());
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        let first = nonempty.next().map_or(&[][..], |b| &b[..]);
        if !this.coalesce || nonempty.next().is_none() {
            return this.write_frame(first);
        }
        // One yamux frame for as many slices as the send window takes (only
        // copied once there is window to send them).
        ready!(this.poll_send_window())?;
        let limit = (this.inner.send_window() as usize).min(MAX_COALESCE);
        let mut scratch = std::mem::take(&mut this.scratch);
        scratch.clear();
        for b in bufs {
            let n = b.len().min(limit - scratch.len());
            scratch.extend_from_slice(&b[..n]);
            if scratch.len() == limit {
                break;
            }
        }
        let r = this.write_frame(&scratch);
        if scratch.capacity() <= KEEP_SCRATCH {
            this.scratch = scratch;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.coalesce
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
