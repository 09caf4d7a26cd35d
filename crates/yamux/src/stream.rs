//! A stream: `AsyncRead + AsyncWrite` over the session's shared state.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    frame::{FrameType, Header, FIN},
    session::{put_prefix, Shared, MAX_DATA_FRAME, OUT_HIGH},
};

/// One yamux stream: a full-duplex byte stream with its own flow control.
///
/// * Reads return data in order, then EOF once the peer has closed its half
///   (FIN); an error if the stream was reset or the session ended first.
/// * Each write (vectored writes too) becomes one data frame of up to the
///   send window (at most 256 KiB), queued for the connection task; a write
///   waits while the window is closed or the session's output is backed up.
/// * `shutdown` sends FIN; reading goes on.
/// * Dropping the stream sends FIN if it was not sent. If the peer then
///   sends more data, the stream is reset, as TCP does for a closed socket.
pub struct Stream {
    shared: Arc<Shared>,
    id: u32,
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>, id: u32) -> Self {
        Stream { shared, id }
    }

    /// The stream ID: odd if the client side opened it, even if the server
    /// side did.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn write_bufs(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        if inner.dead {
            return Poll::Ready(Err(session_ended()));
        }
        if inner.closing() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the yamux session is closing",
            )));
        }
        let Some(st) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(session_ended()));
        };
        if st.reset {
            return Poll::Ready(Err(reset()));
        }
        if st.local_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of the yamux stream",
            )));
        }
        if st.send_window == 0 {
            set_waker(&mut st.write_waker, cx.waker());
            return Poll::Pending;
        }
        if inner.out.len() >= OUT_HIGH {
            if !inner.out_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                inner.out_waiters.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let n = total.min(st.send_window as usize).min(MAX_DATA_FRAME);
        st.send_window -= n as u32;
        let header = Header::new(FrameType::Data, 0, self.id, n as u32);
        if inner.out.is_empty() {
            if let Some(mut writer) = self.shared.idle_writer() {
                // Nothing queued, nothing in flight: straight to the
                // transport, no copy and no hop to the connection task.
                // Frames queued meanwhile wait for the writer lock we hold.
                drop(guard);
                let rest = writer.write_direct(cx, header.encode(), bufs, n);
                drop(writer);
                if rest {
                    let driver = self.shared.lock().kick_driver();
                    if let Some(w) = driver {
                        w.wake();
                    }
                }
                return Poll::Ready(Ok(n));
            }
        }
        let out = &mut inner.out;
        out.reserve(crate::frame::HEADER_LEN + n);
        header.put(out);
        put_prefix(out, bufs, n);
        let driver = inner.take_driver();
        drop(guard);
        if let Some(w) = driver {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }
}

fn set_waker(slot: &mut Option<Waker>, w: &Waker) {
    match slot {
        Some(old) if old.will_wake(w) => {}
        _ => *slot = Some(w.clone()),
    }
}

fn session_ended() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the yamux session ended")
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the yamux stream was reset")
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let window = inner.window;
        let Some(st) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(session_ended()));
        };
        if st.recv_buffered > 0 {
            let mut n = 0;
            while buf.remaining() > 0 {
                let Some(front) = st.recv.front_mut() else {
                    break;
                };
                let k = front.len().min(buf.remaining());
                buf.put_slice(&front[..k]);
                front.advance(k);
                if front.is_empty() {
                    st.recv.pop_front();
                }
                n += k;
            }
            if st.recv.is_empty() && buf.remaining() > 0 {
                let k = st.tail.len().min(buf.remaining());
                buf.put_slice(&st.tail[..k]);
                st.tail.advance(k);
                n += k;
            }
            st.recv_buffered -= n;
            st.recv_consumed += n as u32;
            let mut driver = None;
            if !st.remote_closed && st.recv_consumed >= window / 2 {
                let delta = std::mem::take(&mut st.recv_consumed);
                st.recv_window += delta;
                Header::new(FrameType::WindowUpdate, 0, self.id, delta).put(&mut inner.out);
                driver = inner.take_driver();
            }
            drop(guard);
            if let Some(w) = driver {
                w.wake();
            }
            return Poll::Ready(Ok(()));
        }
        if st.remote_closed {
            return Poll::Ready(Ok(()));
        }
        if st.reset {
            return Poll::Ready(Err(reset()));
        }
        if inner.dead {
            return Poll::Ready(Err(session_ended()));
        }
        set_waker(&mut st.read_waker, cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_bufs(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.write_bufs(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Frames are queued for the connection task, which writes (and
    /// flushes) them as soon as it runs; there is nothing to wait for here.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends FIN (once). Reading goes on until the peer's FIN.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.shared.lock();
        if inner.dead {
            return Poll::Ready(Ok(()));
        }
        let id = self.id;
        let Some(st) = inner.streams.get_mut(&id) else {
            return Poll::Ready(Ok(()));
        };
        if st.local_closed || st.reset {
            return Poll::Ready(Ok(()));
        }
        st.local_closed = true;
        inner.push(Header::new(FrameType::WindowUpdate, FIN, id, 0));
        let driver = inner.take_driver();
        drop(inner);
        if let Some(w) = driver {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.release();
        self.shared.release_handle();
    }
}

impl Stream {
    /// Half of `Drop`: FIN if not sent, and forget the stream once the peer
    /// is done with it too.
    fn release(&mut self) {
        let mut inner = self.shared.lock();
        let id = self.id;
        let dead = inner.dead;
        let Some(st) = inner.streams.get_mut(&id) else {
            return;
        };
        if dead || st.reset {
            inner.streams.remove(&id);
            return;
        }
        st.detached = true;
        st.recv.clear();
        st.tail = bytes::BytesMut::new();
        st.recv_buffered = 0;
        st.read_waker = None;
        st.write_waker = None;
        let send_fin = !st.local_closed;
        st.local_closed = true;
        if send_fin {
            inner.push(Header::new(FrameType::WindowUpdate, FIN, id, 0));
        }
        inner.reap(id);
        let driver = if send_fin { inner.take_driver() } else { None };
        drop(inner);
        if let Some(w) = driver {
            w.wake();
        }
    }
}
