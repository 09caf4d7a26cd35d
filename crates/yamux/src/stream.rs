//! A stream: `AsyncRead + AsyncWrite` over the session's shared state.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, trace};

use crate::{
    error::StreamError,
    frame::{Header, StreamId},
    shared::Shared,
    write::put_prefix,
};

/// A stream writer waits while this much output is queued.
pub(crate) const OUT_HIGH: usize = 512 * 1024;
/// Largest data frame we send.
pub(crate) const MAX_DATA_FRAME: usize = 256 * 1024;

/// One yamux stream: a full-duplex byte stream with its own flow control.
///
/// * Reads return data in order, then EOF once the peer has closed its half
///   (FIN); an error if the stream was reset (even after FIN: a reset
///   stream never ends in a clean EOF) or the session ended first.
/// * Each write (vectored writes too) becomes one data frame of up to the
///   send window (at most 256 KiB), queued for the connection task; a write
///   waits while the window is closed or the session's output is backed up.
/// * `shutdown` sends FIN; reading goes on.
/// * Dropping the stream sends FIN if it was not sent. If the peer then
///   sends more data, or keeps its half open past the stream close timeout,
///   the stream is reset, as TCP does for a closed socket.
///
/// Errors are `io::Error`s whose inner error is a [`StreamError`].
pub struct Stream {
    shared: Arc<Shared>,
    id: StreamId,
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>, id: StreamId) -> Self {
        Stream { shared, id }
    }

    /// The stream ID: odd if the client side opened it, even if the server
    /// side did.
    pub fn id(&self) -> u32 {
        self.id.get()
    }

    /// The stream ID as a [`StreamId`].
    pub fn stream_id(&self) -> StreamId {
        self.id
    }

    fn write_bufs(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        if inner.dead() {
            return Poll::Ready(Err(inner.ended_error().into()));
        }
        if inner.close_requested {
            return Poll::Ready(Err(StreamError::SessionClosing.into()));
        }
        let Some(st) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(inner.ended_error().into()));
        };
        if let Some(e) = st.reset {
            return Poll::Ready(Err(e.into()));
        }
        if st.local_closed {
            return Poll::Ready(Err(StreamError::WriteAfterShutdown.into()));
        }
        if st.send_window == 0 {
            st.wait_write(cx);
            let peak = st.send_peak;
            inner.window_stalls += 1;
            if !inner.stall_logged {
                if let Some(rtt) = inner.rtt {
                    inner.stall_logged = true;
                    let cap = crate::session::ceiling(peak, rtt).unwrap_or(0);
                    let msg = "stream waits for the peer's window: window / RTT caps one stream";
                    if rtt >= std::time::Duration::from_millis(1) {
                        info!(stream = %self.id, window = peak, rtt_us = rtt.as_micros() as u64, ceiling_bytes_per_sec = cap, "{msg}");
                    } else {
                        debug!(stream = %self.id, window = peak, rtt_us = rtt.as_micros() as u64, ceiling_bytes_per_sec = cap, "{msg}");
                    }
                }
            }
            return Poll::Pending;
        }
        if inner.out.len() >= OUT_HIGH {
            if !inner.out_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                inner.out_waiters.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let n = total.min(st.send_window as usize).min(MAX_DATA_FRAME);
        st.take_send_window(n as u32);
        inner.data_sent += n as u64;
        let header = Header::data(self.id, n as u32);
        if inner.out.is_empty() {
            if let Some(mut writer) = self.shared.idle_writer() {
                // Nothing queued, nothing in flight: straight to the
                // transport, no copy and no hop to the connection task.
                // Frames queued meanwhile wait for the writer lock we hold.
                drop(guard);
                let rest = writer.write_direct(cx, header.encode(), bufs, n);
                drop(writer);
                if rest {
                    self.shared.update(|inner| inner.kick_driver());
                }
                return Poll::Ready(Ok(n));
            }
        }
        let out = &mut inner.out;
        out.reserve(crate::frame::HEADER_LEN + n);
        header.put(out);
        put_prefix(out, bufs, n);
        inner.notify();
        let driver = inner.take_notified();
        drop(guard);
        if let Some(w) = driver {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }
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
        let id = self.id;
        self.shared.update(|inner| {
            let grow = inner.growth_room();
            let dead = inner.dead();
            let ended = inner.ended_error();
            let Some(st) = inner.streams.get_mut(&id) else {
                return Poll::Ready(Err(ended.into()));
            };
            // Reset wins over buffered data and FIN (as in hashicorp/yamux):
            // a reset stream never ends in a clean EOF.
            if let Some(e) = st.reset {
                return Poll::Ready(Err(e.into()));
            }
            if st.recv_buffered > 0 {
                let (_, freed) = st.read_into(buf, &mut inner.pins);
                let credit = st.take_credit(grow);
                inner.buffered -= freed;
                if let Some((delta, extra)) = credit {
                    if extra > 0 {
                        inner.auto_granted += extra as usize;
                        inner.windows_grown += 1;
                        trace!(stream = %id, window = st.recv_max, "stream receive window grew");
                    }
                    inner.push(Header::window_update(id, delta));
                }
                return Poll::Ready(Ok(()));
            }
            if st.remote_closed {
                return Poll::Ready(Ok(()));
            }
            if dead {
                return Poll::Ready(Err(ended.into()));
            }
            st.wait_read(cx);
            Poll::Pending
        })
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
        let id = self.id;
        self.shared.update(|inner| {
            if inner.dead() {
                return;
            }
            let Some(st) = inner.streams.get_mut(&id) else {
                return;
            };
            if st.local_closed || st.reset.is_some() {
                return;
            }
            st.local_closed = true;
            inner.push(Header::fin(id));
        });
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
        let id = self.id;
        self.shared.update(|inner| {
            let dead = inner.dead();
            let Some(st) = inner.streams.get_mut(&id) else {
                return;
            };
            if dead || st.reset.is_some() {
                inner.remove(id);
                return;
            }
            let freed = st.detach(&mut inner.pins);
            let send_fin = !st.local_closed;
            st.local_closed = true;
            inner.buffered -= freed;
            if send_fin {
                inner.push(Header::fin(id));
            }
            inner.reap(id);
            if inner.streams.contains_key(&id) {
                // The peer's half is open: it has the close timeout to
                // close it.
                let at = tokio::time::Instant::now() + inner.close_timeout;
                inner.close_timers.push_back((at, id));
                inner.notify();
            }
        });
    }
}
