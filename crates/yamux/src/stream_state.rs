//! Per-stream state and flow control.

use std::{
    collections::{HashMap, VecDeque},
    task::{Context, Waker},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::ReadBuf;

use crate::error::StreamError;

/// An empty copy buffer keeps at most this much capacity.
const KEEP_TAIL: usize = 16 * 1024;

/// What an entry of a stream's receive queue is charged to the session's
/// buffer budget.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// Copied data: its length.
    Copy(usize),
    /// A slice of read buffer allocation number `.0`: the allocation is
    /// charged once, whoever holds slices of it (see [`Pins`]).
    Pin(u64),
}

/// The connection's read buffer allocations that unread slices keep alive.
/// Each is charged to the budget once, for its whole size, from the first
/// slice kept until the last one is read or dropped: what is charged is the
/// memory really held, not a multiple of it.
#[derive(Debug, Default)]
pub(crate) struct Pins {
    /// Allocation number -> (its size, live slices of it).
    live: HashMap<u64, (usize, u32)>,
}

impl Pins {
    /// What keeping one more slice of allocation `gen` (of `size` bytes)
    /// would add to the charge.
    pub(crate) fn cost(&self, gen: u64, size: usize) -> usize {
        if self.live.contains_key(&gen) {
            0
        } else {
            size
        }
    }

    /// One more slice of `gen` is kept; returns what that charged.
    pub(crate) fn pin(&mut self, gen: u64, size: usize) -> usize {
        let e = self.live.entry(gen).or_insert((size, 0));
        e.1 += 1;
        if e.1 == 1 {
            e.0
        } else {
            0
        }
    }

    /// One slice of `gen` is gone; returns the charge that released.
    fn unpin(&mut self, gen: u64) -> usize {
        match self.live.get_mut(&gen) {
            Some((_, n)) if *n > 1 => {
                *n -= 1;
                0
            }
            Some(_) => self.live.remove(&gen).map_or(0, |(size, _)| size),
            None => 0,
        }
    }

    fn release(&mut self, held: Held) -> usize {
        match held {
            Held::Copy(n) => n,
            Held::Pin(gen) => self.unpin(gen),
        }
    }
}

/// Per-stream state, kept in the session's table while either side may
/// still act on the stream.
#[derive(Default)]
pub(crate) struct StreamState {
    /// Received data not yet read: slices of the connection's read buffer
    /// and older copies (each with what it is charged), then `tail`.
    recv: VecDeque<(Bytes, Held)>,
    /// Small frames' data, copied; newer than `recv`.
    tail: BytesMut,
    /// Bytes in `recv` and `tail`.
    pub(crate) recv_buffered: usize,
    /// How much more the peer may send before we credit it.
    pub(crate) recv_window: u32,
    /// The stream's receive window: the session's, or more once grown.
    pub(crate) recv_max: u32,
    /// When we last credited the peer (set only while auto tuning).
    last_credit: Option<std::time::Instant>,
    /// The peer's receive window for the stream, as far as we can tell:
    /// what its SYN or ACK granted, or the largest send window since.
    pub(crate) send_peak: u32,
    /// Data bytes sent on the stream.
    sent: u64,
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
            send_peak: send_window,
            recv_window,
            recv_max: recv_window,
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

    /// Takes `n` bytes of the send window for a data frame.
    pub(crate) fn take_send_window(&mut self, n: u32) {
        self.send_window -= n;
        self.sent += u64::from(n);
    }

    /// Adds a window update from the peer (`opening`: it carries the
    /// stream's SYN or ACK, so it grants the window before any credit for
    /// data); `Err` on overflow.
    pub(crate) fn credit_send(
        &mut self,
        delta: u32,
        opening: bool,
        wake: &mut Vec<Waker>,
    ) -> Result<(), ()> {
        self.send_window = self.send_window.checked_add(delta).ok_or(())?;
        let granted = if opening {
            u32::try_from(u64::from(self.send_window) + self.sent).unwrap_or(u32::MAX)
        } else {
            self.send_window
        };
        self.send_peak = self.send_peak.max(granted);
        if delta > 0 {
            wake.extend(self.write_waker.take());
        }
        Ok(())
    }

    /// Buffers a frame's data by copying it (small frames).
    pub(crate) fn push_copy(&mut self, data: &[u8], wake: &mut Vec<Waker>) {
        self.tail.extend_from_slice(data);
        self.recv_buffered += data.len();
        wake.extend(self.read_waker.take());
    }

    /// Buffers a frame's data as a slice of read buffer allocation `gen`
    /// (the caller has pinned it in the session's [`Pins`]).
    pub(crate) fn push_slice(&mut self, data: Bytes, gen: u64, wake: &mut Vec<Waker>) {
        if !self.tail.is_empty() {
            let t = self.tail.split().freeze();
            let n = t.len();
            self.recv.push_back((t, Held::Copy(n)));
        }
        self.recv_buffered += data.len();
        self.recv.push_back((data, Held::Pin(gen)));
        wake.extend(self.read_waker.take());
    }

    /// Copies buffered data into `buf`; returns how many bytes, and how
    /// much of the charge that released.
    pub(crate) fn read_into(&mut self, buf: &mut ReadBuf<'_>, pins: &mut Pins) -> (usize, usize) {
        let mut n = 0;
        let mut freed = 0;
        while buf.remaining() > 0 {
            let Some((front, held)) = self.recv.front_mut() else {
                break;
            };
            let k = front.len().min(buf.remaining());
            buf.put_slice(&front[..k]);
            front.advance(k);
            if front.is_empty() {
                freed += pins.release(*held);
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
        (n, freed)
    }

    /// The window credit to send back after a read, once half the window
    /// was read (none once the peer's half is closed), and how much of it
    /// is growth of the window. `grow` is `(rtt, largest window, room)`
    /// when the window may grow: it doubles (within the largest window and
    /// the room) when half of it was read within two round trips.
    pub(crate) fn take_credit(
        &mut self,
        grow: Option<(std::time::Duration, u32, usize)>,
    ) -> Option<(u32, u32)> {
        if self.remote_closed || self.recv_consumed < self.recv_max / 2 {
            return None;
        }
        let mut extra = 0;
        if let Some((rtt, largest, room)) = grow {
            let now = std::time::Instant::now();
            if let Some(last) = self.last_credit {
                if now.duration_since(last) < rtt * 2 {
                    let room = u32::try_from(room).unwrap_or(u32::MAX);
                    extra = self
                        .recv_max
                        .min(largest.saturating_sub(self.recv_max))
                        .min(room);
                }
            }
            self.last_credit = Some(now);
        }
        let delta = std::mem::take(&mut self.recv_consumed) + extra;
        self.recv_window += delta;
        self.recv_max += extra;
        Some((delta, extra))
    }

    /// Drops every buffered byte; returns the charge that released.
    pub(crate) fn discard(&mut self, pins: &mut Pins) -> usize {
        let mut freed = self.tail.len();
        for (_, held) in self.recv.drain(..) {
            freed += pins.release(held);
        }
        self.tail = BytesMut::new();
        self.recv_buffered = 0;
        freed
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
    pub(crate) fn detach(&mut self, pins: &mut Pins) -> usize {
        self.detached = true;
        self.read_waker = None;
        self.write_waker = None;
        self.discard(pins)
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
