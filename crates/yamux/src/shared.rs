//! The state every handle of a session shares, and the one way to change
//! it from a handle: [`Shared::update`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    task::Waker,
    time::Duration,
};

use bytes::BytesMut;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, Mode},
    error::{EndReason, StreamError},
    frame::{Header, StreamId, INITIAL_WINDOW},
    stream_state::{Pins, StreamState},
    write::Writer,
};

/// The state every handle of a session shares.
///
/// Lock order: a thread that holds `writer` may take `inner`, never the
/// other way round, except with `try_lock` (a stream writing directly).
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    writer: Mutex<Writer>,
    pub(crate) ended: CancellationToken,
}

impl Shared {
    pub(crate) fn new(inner: Inner, writer: Writer) -> Self {
        Shared {
            inner: Mutex::new(inner),
            writer: Mutex::new(writer),
            ended: CancellationToken::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lock, change state, unlock, wake: runs `f` on the state; if it gave
    /// the connection task work (queued a frame, see [`Inner::notify`]),
    /// that task is woken once the lock is released.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut inner = self.lock();
        let r = f(&mut inner);
        let driver = inner.take_notified();
        drop(inner);
        if let Some(w) = driver {
            w.wake();
        }
        r
    }

    /// A handle is gone; the last one wakes the connection task, which
    /// then closes the session.
    pub(crate) fn release_handle(&self) {
        self.update(|inner| {
            inner.handles -= 1;
            if inner.handles == 0 {
                inner.notify();
            }
        });
    }

    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For a stream's write: the writer, if nobody holds it and nothing is
    /// in flight, so a frame may go to the transport at once.
    pub(crate) fn idle_writer(&self) -> Option<MutexGuard<'_, Writer>> {
        let w = self.writer.try_lock().ok()?;
        w.is_idle().then_some(w)
    }
}

pub(crate) struct Inner {
    pub(crate) mode: Mode,
    /// Receive window of every stream.
    pub(crate) window: u32,
    pub(crate) max_streams: usize,
    pub(crate) streams: HashMap<StreamId, StreamState>,
    pub(crate) next_id: u64,
    /// Highest stream ID the peer has opened.
    pub(crate) max_peer_id: u32,
    /// Memory held for received data of all streams (copies by length,
    /// read buffer allocations that slices keep alive once each); at most
    /// `max_buffered`.
    pub(crate) buffered: usize,
    /// The read buffer allocations unread slices keep alive.
    pub(crate) pins: Pins,
    /// Smoothed round-trip time of our pings.
    pub(crate) rtt: Option<Duration>,
    /// Largest receive window a stream may grow to.
    pub(crate) max_auto_window: u32,
    /// Window growth granted to the streams now (beyond `window` each).
    pub(crate) auto_granted: usize,
    pub(crate) data_sent: u64,
    pub(crate) data_received: u64,
    pub(crate) window_stalls: u64,
    pub(crate) windows_grown: u64,
    /// A window stall was logged (once per session).
    pub(crate) stall_logged: bool,
    pub(crate) max_buffered: usize,
    /// How long a dropped stream waits for the peer's FIN.
    pub(crate) close_timeout: Duration,
    /// Dropped streams waiting for the peer's FIN, by deadline (in order:
    /// one timeout for all).
    pub(crate) close_timers: VecDeque<(Instant, StreamId)>,
    /// Encoded frames waiting for the connection to write them.
    pub(crate) out: BytesMut,
    /// The connection's task, when it waits for work.
    pub(crate) driver: Option<Waker>,
    /// Something changed that the connection task must act on.
    notified: bool,
    /// A stream left bytes in the writer for the connection task.
    pub(crate) kick: bool,
    /// Live handles (`Control`s, the `Incoming`, `Stream`s): when none is
    /// left, nobody can use the session any more and it closes itself.
    pub(crate) handles: usize,
    /// Stream writers waiting for `out` to drain below the high-water mark.
    pub(crate) out_waiters: Vec<Waker>,
    /// `close()` was called (or every handle is gone): GoAway goes out, no
    /// new streams either way, no more data frames.
    pub(crate) close_requested: bool,
    pub(crate) remote_goaway: bool,
    /// The connection has ended (why): no more frames go in or out.
    pub(crate) ended: Option<EndReason>,
}

impl Inner {
    pub(crate) fn new(config: &Config, mode: Mode) -> Self {
        let (window, max_streams) = (config.window(), config.max_streams().max(1));
        Inner {
            mode,
            window,
            max_streams,
            streams: HashMap::new(),
            next_id: match mode {
                Mode::Client => 1,
                Mode::Server => 2,
            },
            max_peer_id: 0,
            buffered: 0,
            pins: Pins::default(),
            rtt: None,
            max_auto_window: config.max_auto_window(),
            auto_granted: 0,
            data_sent: 0,
            data_received: 0,
            window_stalls: 0,
            windows_grown: 0,
            stall_logged: false,
            max_buffered: config.max_buffered(),
            close_timeout: config.stream_close_timeout(),
            close_timers: VecDeque::new(),
            out: BytesMut::new(),
            driver: None,
            notified: false,
            kick: false,
            handles: 2,
            out_waiters: Vec::new(),
            close_requested: false,
            remote_goaway: false,
            ended: None,
        }
    }

    /// A ping was answered after `sample`: smooths it into `rtt` (weight
    /// 1/8, as TCP's SRTT).
    pub(crate) fn record_rtt(&mut self, sample: Duration) {
        self.rtt = Some(match self.rtt {
            None => sample,
            Some(srtt) => (srtt * 7 + sample) / 8,
        });
    }

    /// How much stream `id`'s receive window may grow now (`None`: auto
    /// tuning is off or the RTT is not known yet).
    pub(crate) fn growth_room(&self) -> Option<(Duration, u32, usize)> {
        if self.max_auto_window <= self.window {
            return None;
        }
        // Unread slices can pin up to about twice their data in read
        // buffers: growth stays within a quarter of the budget.
        let room = (self.max_buffered / 4).saturating_sub(self.auto_granted);
        Some((self.rtt?, self.max_auto_window, room))
    }

    /// Queues a frame for the connection task.
    pub(crate) fn push(&mut self, h: Header) {
        h.put(&mut self.out);
        self.notified = true;
    }

    /// The connection task has work (woken by [`Shared::update`]).
    pub(crate) fn notify(&mut self) {
        self.notified = true;
    }

    /// The connection task's waker, if it has work and waits.
    pub(crate) fn take_notified(&mut self) -> Option<Waker> {
        if std::mem::take(&mut self.notified) {
            self.driver.take()
        } else {
            None
        }
    }

    /// The connection task parks with `w`; it has seen every change so far.
    pub(crate) fn park_driver(&mut self, w: &Waker) {
        self.notified = false;
        match &self.driver {
            Some(old) if old.will_wake(w) => {}
            _ => self.driver = Some(w.clone()),
        }
    }

    /// The writer holds bytes a stream left for the connection task.
    pub(crate) fn kick_driver(&mut self) {
        self.kick = true;
        self.notified = true;
    }

    /// Whether the connection has ended.
    pub(crate) fn dead(&self) -> bool {
        self.ended.is_some()
    }

    /// The error for a stream of a session that has ended.
    pub(crate) fn ended_error(&self) -> StreamError {
        StreamError::SessionEnded(self.ended.unwrap_or(EndReason::Closed))
    }

    /// Registers a stream that gets a handle, and queues its SYN (we open)
    /// or ACK (we accept), announcing the window beyond the initial 256 KiB.
    pub(crate) fn add_stream(&mut self, id: StreamId, ours: bool) {
        let window = self.window;
        self.streams
            .insert(id, StreamState::new(INITIAL_WINDOW, window));
        let delta = window - INITIAL_WINDOW;
        self.push(if ours {
            Header::syn(id, delta)
        } else {
            Header::ack(id, delta)
        });
        self.handles += 1;
    }

    /// Whether `id` has the parity of streams this side opens.
    pub(crate) fn is_ours(&self, id: StreamId) -> bool {
        match self.mode {
            Mode::Client => id.is_client_initiated(),
            Mode::Server => id.is_server_initiated(),
        }
    }

    /// Whether stream `id` was ever opened, by either side.
    pub(crate) fn was_opened(&self, id: StreamId) -> bool {
        !id.is_session()
            && if self.is_ours(id) {
                u64::from(id.get()) < self.next_id
            } else {
                id.get() <= self.max_peer_id
            }
    }

    /// Drops a stream's buffered data.
    pub(crate) fn discard(&mut self, id: StreamId) {
        if let Some(st) = self.streams.get_mut(&id) {
            self.buffered -= st.discard(&mut self.pins);
        }
    }

    /// Forgets a stream (its buffered data too).
    pub(crate) fn remove(&mut self, id: StreamId) {
        if let Some(mut st) = self.streams.remove(&id) {
            self.buffered -= st.discard(&mut self.pins);
            self.auto_granted -= (st.recv_max - self.window) as usize;
        }
    }

    /// Resets stream `id` from our side: RST out, its data dropped, its
    /// reader and writer woken with `why`.
    pub(crate) fn reset_stream(&mut self, id: StreamId, why: StreamError, wake: &mut Vec<Waker>) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        st.set_reset(why, wake);
        self.discard(id);
        self.push(Header::rst(id));
        self.reap(id);
    }

    /// Forgets a stream whose handle is gone once nothing more can happen
    /// on it.
    pub(crate) fn reap(&mut self, id: StreamId) {
        if self.streams.get(&id).is_some_and(|st| st.is_done()) {
            self.remove(id);
        }
    }
}
