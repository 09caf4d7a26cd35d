//! Per-stream state and flow control.

use std::{
    collections::VecDeque,
    task::{Context, Waker},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::ReadBuf;

use crate::error::StreamError;

/// An empty copy buffer keeps at most this much capacity.
const KEEP_TAIL: usize = 16 * 1024;

/// Per-stream state, kept in the session's table while either side may
/// still act on the stream.
#[derive(Default)]
pub(crate) struct StreamState {
    /// Received data not yet read: slices of the connection's read buffer
    /// (each with the memory it is charged for: the whole buffer it may
    /// keep alive), then `tail`.
    recv: VecDeque<(Bytes, usize)>,
    /// Memory charged to the session's budget for `recv` and `tail`.
    charged: usize,
    /// Small frames' data, copied; newer than `recv`.
    tail: BytesMut,
    /// Bytes in `recv` and `tail`.
    pub(crate) recv_buffered: usize,
    /// How much more the peer may send before we credit it.
    pub(crate) recv_window: u32,
    /// Read since the last window update we sent.
    recv_consumed: u32,
    /// How much more we may send.
    pub(crate) send_window: u32,
    /// We sent FIN.
    pub(crate) local_closed: bool,
    /// The peer sent FIN.
    pub(crate) remote_closed: bool,
    /// Reset by either side: what reads and writes report from now on.
    pub(crate) reset: Option<StreamError>,
    /// The handle was dropped while the peer's half was open.
    pub(crate) detached: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl StreamState {
    pub(crate) fn new(send_window: u32, recv_window: u32) -> Self {
        StreamState {
            send_window,
            recv_window,
            ..Default::default()
        }
    }

    /// Whether nothing more can happen on it: it can be forgotten.
    pub(crate) fn is_done(&self) -> bool {
        self.detached && (self.reset.is_some() || (self.local_closed && self.remote_closed))
    }

    /// Takes `len` bytes of the receive window for an arriving data frame;
    /// `Err(window)` if the frame is larger than what is left.
    pub(crate) fn take_recv_window(&mut self, len: u32) -> Result<(), u32> {
        if len > self.recv_window {
            return Err(self.recv_window);
        }
        self.recv_window -= len;
        Ok(())
    }

    /// Adds a window update from the peer; `Err` on overflow.
    pub(crate) fn credit_send(&mut self, delta: u32, wake: &mut Vec<Waker>) -> Result<(), ()> {
        self.send_window = self.send_window.checked_add(delta).ok_or(())?;
        if delta > 0 {
            wake.extend(self.write_waker.take());
        }
        Ok(())
    }

    /// Buffers a frame's data by copying it (small frames).
    pub(crate) fn push_copy(&mut self, data: &[u8], wake: &mut Vec<Waker>) {
        self.tail.extend_from_slice(data);
        self.recv_buffered += data.len();
        self.charged += data.len();
        wake.extend(self.read_waker.take());
    }

    /// Buffers a frame's data as a slice of the read buffer, charged
    /// `charge` bytes (at least its length).
    pub(crate) fn push_slice(&mut self, data: Bytes, charge: usize, wake: &mut Vec<Waker>) {
        if !self.tail.is_empty() {
            let t = self.tail.split().freeze();
            let n = t.len();
            self.recv.push_back((t, n));
        }
        self.recv_buffered += data.len();
        self.charged += charge;
        self.recv.push_back((data, charge));
        wake.extend(self.read_waker.take());
    }

    /// Copies buffered data into `buf`; returns how many bytes, and how
    /// much of the charge that released.
    pub(crate) fn read_into(&mut self, buf: &mut ReadBuf<'_>) -> (usize, usize) {
        let mut n = 0;
        let mut freed = 0;
        while buf.remaining() > 0 {
            let Some((front, charge)) = self.recv.front_mut() else {
                break;
            };
            let k = front.len().min(buf.remaining());
            buf.put_slice(&front[..k]);
            front.advance(k);
            if front.is_empty() {
                freed += *charge;
                self.recv.pop_front();
            }
            n += k;
        }
        if self.recv.is_empty() && buf.remaining() > 0 {
            let k = self.tail.len().min(buf.remaining());
            buf.put_slice(&self.tail[..k]);
            self.tail.advance(k);
            freed += k;
            n += k;
            if self.tail.is_empty() && self.tail.capacity() > KEEP_TAIL {
                // Read up: give the memory back (it is no longer charged).
                self.tail = BytesMut::new();
            }
        }
        self.recv_buffered -= n;
        self.recv_consumed += n as u32;
        self.charged -= freed;
        (n, freed)
    }

    /// The window credit to send back after a read, once half the window
    /// was read (none once the peer's half is closed).
    pub(crate) fn take_credit(&mut self, window: u32) -> Option<u32> {
        if self.remote_closed || self.recv_consumed < window / 2 {
            return None;
        }
        let delta = std::mem::take(&mut self.recv_consumed);
        self.recv_window += delta;
        Some(delta)
    }

    /// Drops every buffered byte; returns the charge that released.
    pub(crate) fn discard(&mut self) -> usize {
        self.recv.clear();
        self.tail = BytesMut::new();
        self.recv_buffered = 0;
        std::mem::take(&mut self.charged)
    }

    /// Marks the stream reset and wakes its reader and writer.
    pub(crate) fn set_reset(&mut self, why: StreamError, wake: &mut Vec<Waker>) {
        self.reset = Some(why);
        self.wake_all(wake);
    }

    /// Collects the reader's and writer's wakers.
    pub(crate) fn wake_all(&mut self, wake: &mut Vec<Waker>) {
        wake.extend(self.read_waker.take());
        wake.extend(self.write_waker.take());
    }

    /// Collects the reader's waker.
    pub(crate) fn wake_reader(&mut self, wake: &mut Vec<Waker>) {
        wake.extend(self.read_waker.take());
    }

    /// The handle is gone: nobody reads or writes any more.
    pub(crate) fn detach(&mut self) -> usize {
        self.detached = true;
        self.read_waker = None;
        self.write_waker = None;
        self.discard()
    }

    pub(crate) fn wait_read(&mut self, cx: &Context<'_>) {
        set_waker(&mut self.read_waker, cx.waker());
    }

    pub(crate) fn wait_write(&mut self, cx: &Context<'_>) {
        set_waker(&mut self.write_waker, cx.waker());
    }
}

fn set_waker(slot: &mut Option<Waker>, w: &Waker) {
    match slot {
        Some(old) if old.will_wake(w) => {}
        _ => *slot = Some(w.clone()),
    }
}
