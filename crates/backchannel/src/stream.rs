//! A yamux stream as a byte stream for hyper/h2, with a fix for a
//! tokio-yamux stall.
//!
//! # The stall (tokio-yamux 0.3.18 to 0.3.20)
//!
//! `StreamHandle::poll_write` drains the stream's frame channel with
//! `try_recv`, which registers no waker. When the send window is zero it
//! parks the writer's waker, which is only woken when a window update is
//! *processed* — and that happens only while somebody polls the stream for
//! reading. h2 stops reading while it has a PONG it cannot write, so: the
//! writer consumes the channel's wake-up, finds no window, parks; the window
//! update arrives in the channel, wakes nobody; the connection stalls forever.
//!
//! [`YamuxStream`] fixes this from the outside:
//! * every call into the handle runs with a waker that wakes both the last
//!   reader and the last writer, so whichever side the handle decides to wake,
//!   both make progress;
//! * when a write is pending, it also polls `poll_peek` with an empty buffer,
//!   which processes queued frames (crediting window updates) and registers on
//!   the frame channel; if that opened the window, the write is retried.
//!
//! Upstream should let the session credit the send window directly (shared
//! state), or register the waker in `poll_write`'s frame drain.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Wake, Waker},
};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_yamux::{stream::StreamState, StreamHandle};

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
pub struct YamuxStream {
    inner: StreamHandle,
    wakers: Arc<BothWakers>,
    waker: Waker,
}

impl YamuxStream {
    pub(crate) fn new(inner: StreamHandle) -> Self {
        let wakers = Arc::new(BothWakers::default());
        let waker = Waker::from(wakers.clone());
        YamuxStream {
            inner,
            wakers,
            waker,
        }
    }

    /// The yamux stream ID (odd: opened by the client; even: by the server).
    pub fn id(&self) -> u32 {
        self.inner.id()
    }
}

/// Wraps a stream from a tokio-yamux session you run yourself, to get the
/// stall fix.
///
/// ```no_run
/// # async fn f(handle: tokio_yamux::StreamHandle) {
/// use tokio::io::AsyncWriteExt;
/// let mut stream = backchannel::YamuxStream::from(handle);
/// stream.write_all(b"no stall").await.unwrap();
/// # }
/// ```
impl From<StreamHandle> for YamuxStream {
    fn from(inner: StreamHandle) -> Self {
        Self::new(inner)
    }
}

impl std::fmt::Debug for YamuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("YamuxStream")
            .field("id", &self.inner.id())
            .finish()
    }
}

impl AsyncRead for YamuxStream {
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

impl AsyncWrite for YamuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wakers.write.register(cx.waker());
        let mut cx = Context::from_waker(&this.waker);
        match Pin::new(&mut this.inner).poll_write(&mut cx, buf) {
            Poll::Pending => {}
            ready => return ready,
        }
        // Window exhausted: process queued frames and register on the frame
        // channel, so a window update that arrives later wakes us.
        let mut empty = ReadBuf::new(&mut []);
        if let Poll::Ready(Err(e)) = this.inner.poll_peek(&mut cx, &mut empty) {
            return Poll::Ready(Err(e));
        }
        if this.inner.send_window() > 0 {
            return Pin::new(&mut this.inner).poll_write(&mut cx, buf);
        }
        if this.inner.state() == StreamState::RemoteClosing {
            // tokio-yamux stops processing window updates once the peer has
            // half-closed; waiting would hang forever.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "peer half-closed the yamux stream and the send window is exhausted",
            )));
        }
        Poll::Pending
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
