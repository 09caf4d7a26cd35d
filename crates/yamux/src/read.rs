//! The connection's read side: reads frames from the transport and
//! dispatches them to the streams.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, ReadHalf},
    sync::mpsc,
};
use tracing::{debug, trace, warn};

use crate::{
    connection::Keepalive,
    error::{ProtocolViolation, ResetReason, SessionError, StreamError},
    frame::{FrameType, GoAwayCode, Header, StreamId, ACK, FIN, HEADER_LEN, RST, SYN},
    shared::{Inner, Shared},
    stream::Stream,
    write::BUDGET,
};

/// The connection stops reading while this much output is queued: only a
/// peer that makes us answer (pings) faster than it reads gets here.
pub(crate) const OUT_PAUSE: usize = 2 * crate::stream::OUT_HIGH;
/// Read buffer sizes: the size adapts between these, doubling when a read
/// fills the buffer and halving when reads come back small, so bulk
/// transfers make few syscalls and small calls do not allocate large
/// buffers.
const MIN_READ_CHUNK: usize = 16 * 1024;
const MAX_READ_CHUNK: usize = 256 * 1024;
/// Below this much free space the read buffer is replaced before a read.
const MIN_SPARE: usize = 4 * 1024;
/// Read buffer allocations kept for reuse beside the one being filled: a
/// bulk transfer cycles through the same (warm) allocations instead of a
/// fresh one per read, which the allocator would hand back to the kernel
/// and fault in again page by page. Those still holding unread slices are
/// charged to the budget as usual; those nothing holds any more are kept
/// up to the stream window in bytes (see `ReadSide::max_free`).
const MAX_SPARES: usize = 64;
/// A session that read in bulk (larger read buffers than the smallest)
/// keeps its read buffers while reads keep coming; it frees them once a
/// full period passes without any.
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_millis(500);
/// Data frames shorter than this are copied out of the read buffer, into
/// the stream's `tail`, rather than sliced from it: an unread slice keeps
/// the whole buffer it came from alive (up to a read chunk plus the frame),
/// and a queue entry per tiny frame would cost more than the frame.
const COPY_BELOW: usize = 16 * 1024;
/// At most this many other streams are reset to make room for one frame.
const MAX_EVICTIONS: usize = 8;

/// What to do after a header.
enum Next {
    /// Header handled.
    Done,
    /// Discard this many body bytes.
    Skip(usize),
    /// Wait for the data frame's body, then deliver it.
    Body,
}

pub(crate) struct ReadSide<T> {
    io: ReadHalf<T>,
    shared: Arc<Shared>,
    pub(crate) accept: Option<mpsc::Sender<Stream>>,
    rbuf: BytesMut,
    /// Earlier read buffer allocations (emptied handles), reused once no
    /// slice of them is left (see [`MAX_SPARES`]).
    spares: Vec<BytesMut>,
    /// A data frame whose body is still arriving, and how much of it: the
    /// body is delivered as it arrives, so no partial frame is ever copied
    /// into a new read buffer.
    pending: Option<(Header, usize)>,
    /// Frees the read buffers of a bulk reader gone quiet (see
    /// [`IDLE_RELEASE`]).
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes were read since `idle` was last armed.
    active: bool,
    /// Most bytes of spare allocations that nothing holds kept for reuse:
    /// the stream window (a reader that lags by a window and then catches
    /// up frees that much at once), at least two read buffers.
    max_free: usize,
    /// Body bytes of a frame for a stream we no longer have.
    skip: usize,
    paused: bool,
    read_chunk: usize,
    /// Size of the allocation `rbuf` reads into: what slices of it keep
    /// alive, and so what they are charged (once, see `Pins`).
    alloc: usize,
    /// Number of that allocation (a new one each time `rbuf` moves).
    alloc_gen: u64,
}

impl<T: AsyncRead> ReadSide<T> {
    pub(crate) fn new(io: ReadHalf<T>, shared: Arc<Shared>, accept: mpsc::Sender<Stream>) -> Self {
        let window = shared.lock().window as usize;
        ReadSide {
            max_free: window.max(2 * MAX_READ_CHUNK),
            io,
            shared,
            accept: Some(accept),
            rbuf: BytesMut::new(),
            spares: Vec::new(),
            pending: None,
            idle: None,
            active: false,
            skip: 0,
            paused: false,
            read_chunk: MIN_READ_CHUNK,
            alloc: 0,
            alloc_gen: 0,
        }
    }

    /// Reads and dispatches frames; `Ok(true)` if anything was read. On a
    /// protocol error a GoAway is queued before the error returns.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        keepalive: &mut Keepalive,
        wake: &mut Vec<Waker>,
    ) -> Result<bool, SessionError> {
        let mut progress = false;
        for _ in 0..BUDGET {
            if self.paused {
                if self.shared.lock().out.len() >= OUT_PAUSE {
                    // Spares whose slices were read meanwhile: keep up to
                    // `max_free` while the peer keeps us paused.
                    let _ = self.take_spare(None);
                    return Ok(progress);
                }
                self.paused = false;
            }
            if self.rbuf.capacity() - self.rbuf.len() < MIN_SPARE {
                self.refill();
            }
            let spare = self.rbuf.capacity() - self.rbuf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) => return Err(SessionError::ClosedByPeer),
                Poll::Ready(Ok(n)) => {
                    if n == spare {
                        self.read_chunk = (self.read_chunk * 2).min(MAX_READ_CHUNK);
                    } else if n < self.read_chunk / 8 {
                        self.read_chunk = (self.read_chunk / 2).max(MIN_READ_CHUNK);
                    }
                    progress = true;
                    self.active = true;
                    self.process(keepalive, wake)?;
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {
                    self.poll_idle(cx);
                    return Ok(progress);
                }
            }
        }
        Ok(progress)
    }

    /// Makes room in `rbuf` (which holds at most part of a header now) for a
    /// read of `read_chunk` bytes: in its own allocation if no slice of it
    /// is left, else in a spare no slice of which is left, else in a new
    /// allocation. The allocation given up becomes a spare.
    fn refill(&mut self) {
        let want = self.read_chunk;
        if self.rbuf.try_reclaim(want) {
            // Spares whose slices were read meanwhile: keep up to `max_free`
            // (a reader that always reuses its own allocation would never
            // trim them otherwise).
            let _ = self.take_spare(None);
        } else {
            let fresh = match self.take_spare(Some(want)) {
                Some(b) => b,
                None => BytesMut::with_capacity(want),
            };
            let mut old = std::mem::replace(&mut self.rbuf, fresh);
            self.rbuf.extend_from_slice(&old);
            // Only a tail smaller than MIN_READ_CHUNK may become a spare:
            // `take_spare` tells a spare nothing holds any more by its
            // reclaiming MIN_READ_CHUNK, which a larger tail would do
            // without the rest of the allocation being free. (Dropping a
            // tail is always safe: its slices keep the allocation alive,
            // and charged, until they are read.)
            if self.alloc >= MIN_READ_CHUNK && old.capacity() < MIN_READ_CHUNK {
                old.clear();
                self.spares.push(old);
                if self.spares.len() > MAX_SPARES {
                    // Its slices keep it alive until they are read.
                    self.spares.remove(0);
                }
            }
        }
        // A new allocation, or one nothing else holds any more: charged
        // anew when slices of it are kept.
        self.alloc = self.rbuf.capacity();
        self.alloc_gen += 1;
    }

    /// With `want`, a spare allocation of at least that many bytes that no
    /// slice holds any more (the oldest), reclaimed for reading (smaller
    /// ones nothing holds are dropped). Other spares nothing holds are kept
    /// up to `max_free` bytes.
    fn take_spare(&mut self, want: Option<usize>) -> Option<BytesMut> {
        let mut found = None;
        let mut free = 0;
        let mut i = 0;
        while i < self.spares.len() {
            // Every spare has room for this much once nothing holds it.
            if self.spares[i].try_reclaim(MIN_READ_CHUNK) {
                if let Some(want) = want {
                    if self.spares[i].capacity() < want {
                        self.spares.remove(i);
                        continue;
                    }
                }
                if found.is_none() && want.is_some() {
                    found = Some(self.spares.remove(i));
                    continue;
                }
                let size = self.spares[i].capacity();
                if free + size > self.max_free {
                    self.spares.remove(i);
                    continue;
                }
                free += size;
            }
            i += 1;
        }
        found
    }

    /// The transport has nothing to read: frees the read buffers unless
    /// this is a bulk reader that read within the last [`IDLE_RELEASE`].
    fn poll_idle(&mut self, cx: &mut Context<'_>) {
        if self.read_chunk == MIN_READ_CHUNK {
            self.release_buffers();
            return;
        }
        // Spares whose slices were read meanwhile: keep up to `max_free`.
        let _ = self.take_spare(None);
        let fired = match &mut self.idle {
            None => {
                let mut sleep = Box::pin(tokio::time::sleep(IDLE_RELEASE));
                // Registers the timer with this task.
                let _ = sleep.as_mut().poll(cx);
                self.idle = Some(sleep);
                self.active = false;
                return;
            }
            Some(sleep) => sleep.as_mut().poll(cx).is_ready(),
        };
        if !fired {
            return;
        }
        if std::mem::take(&mut self.active) {
            if let Some(sleep) = &mut self.idle {
                sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + IDLE_RELEASE);
                let _ = sleep.as_mut().poll(cx);
            }
        } else {
            self.read_chunk = MIN_READ_CHUNK;
            self.release_buffers();
        }
    }

    /// Gives the read buffers back (a partial header is kept in a copy).
    fn release_buffers(&mut self) {
        self.idle = None;
        self.spares = Vec::new();
        if self.alloc > 0 {
            self.rbuf = BytesMut::from(&self.rbuf[..]);
            self.alloc = 0;
            // A new allocation: never mistaken for the one given up.
            self.alloc_gen += 1;
        }
    }

    /// Dispatches every complete frame in the read buffer, and the part of
    /// a data frame's body that has arrived.
    fn process(
        &mut self,
        keepalive: &mut Keepalive,
        wake: &mut Vec<Waker>,
    ) -> Result<(), SessionError> {
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        let result = self.process_locked(&mut inner, keepalive, wake);
        if let Err(SessionError::Protocol(v)) = &result {
            warn!(violation = %v, "yamux protocol error from peer; sending GoAway");
            inner.push(Header::go_away(GoAwayCode::ProtocolError));
        }
        self.paused = inner.out.len() >= OUT_PAUSE;
        drop(inner);
        for w in wake.drain(..) {
            w.wake();
        }
        result
    }

    fn process_locked(
        &mut self,
        inner: &mut Inner,
        keepalive: &mut Keepalive,
        wake: &mut Vec<Waker>,
    ) -> Result<(), SessionError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.rbuf.len());
                self.rbuf.advance(n);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(());
                }
            }
            let (h, left) = match self.pending {
                Some(p) => p,
                None => {
                    let Some(head) = self.rbuf.first_chunk::<HEADER_LEN>() else {
                        return Ok(());
                    };
                    let h = Header::decode(head)
                        .map_err(|e| SessionError::Protocol(ProtocolViolation::Header(e)))?;
                    trace!(?h, "frame in");
                    match self.on_header(inner, h, keepalive, wake)? {
                        Next::Done => {
                            self.rbuf.advance(HEADER_LEN);
                            continue;
                        }
                        Next::Skip(n) => {
                            self.rbuf.advance(HEADER_LEN);
                            self.skip = n;
                            continue;
                        }
                        Next::Body => {
                            self.rbuf.advance(HEADER_LEN);
                            (h, h.length as usize)
                        }
                    }
                }
            };
            let n = left.min(self.rbuf.len());
            let rest = left - n;
            self.pending = Some((h, rest));
            if n == 0 {
                return Ok(());
            }
            let id = h.id();
            match inner.streams.get(&id) {
                Some(st) if st.detached && !st.remote_closed => {
                    // The handle went away while the body was arriving:
                    // nobody will read it.
                    self.rbuf.advance(n);
                    inner.remove(id);
                    inner.push(Header::rst(id));
                    self.pending = None;
                    self.skip = rest;
                    continue;
                }
                Some(st) if st.reset.is_none() => {
                    if !self.deliver(inner, id, n, wake) {
                        self.pending = None;
                        self.skip = rest;
                        continue;
                    }
                }
                _ => self.rbuf.advance(n),
            }
            if rest > 0 {
                return Ok(());
            }
            self.pending = None;
            apply_flags(inner, id, h.flags, wake);
        }
    }

    /// Buffers the `len`-byte body at the front of `rbuf` for stream `id`
    /// within the session's budget; `false` if the stream was reset instead.
    ///
    /// Larger frames stay slices of the read buffer (its allocation charged
    /// once, whoever holds slices of it); when that does not fit they are
    /// copied (charged exactly). When even that does not fit, the stream
    /// holding the most unread data is reset until it does: a stream that
    /// is not being read loses, not whichever stream's frame came next.
    fn deliver(
        &mut self,
        inner: &mut Inner,
        id: StreamId,
        len: usize,
        wake: &mut Vec<Waker>,
    ) -> bool {
        for _ in 0..MAX_EVICTIONS {
            let budget = inner.max_buffered - inner.buffered;
            let Some(st) = inner.streams.get_mut(&id) else {
                break;
            };
            if len >= COPY_BELOW && inner.pins.cost(self.alloc_gen, self.alloc) <= budget {
                inner.buffered += inner.pins.pin(self.alloc_gen, self.alloc);
                st.push_slice(self.rbuf.split_to(len).freeze(), self.alloc_gen, wake);
                return true;
            }
            if len <= budget {
                st.push_copy(&self.rbuf[..len], wake);
                self.rbuf.advance(len);
                inner.buffered += len;
                return true;
            }
            let own = st.recv_buffered;
            let victim = inner
                .streams
                .iter()
                .filter(|(_, s)| s.reset.is_none())
                .max_by_key(|(_, s)| s.recv_buffered)
                .map(|(v, s)| (*v, s.recv_buffered));
            match victim {
                Some((v, held)) if v != id && held > own => {
                    warn!(
                        stream = %v,
                        unread = held,
                        buffered = inner.buffered,
                        "yamux receive buffer budget exhausted; resetting the stream with the most unread data"
                    );
                    let before = inner.buffered;
                    inner.reset_stream(
                        v,
                        StreamError::ResetLocally(ResetReason::BufferBudget),
                        wake,
                    );
                    if inner.buffered == before {
                        // Its slices share read buffers that others keep
                        // alive: resetting more streams would free as little.
                        break;
                    }
                }
                _ => break,
            }
        }
        self.rbuf.advance(len);
        warn!(
            stream = %id,
            buffered = inner.buffered,
            "yamux receive buffer budget exhausted; resetting the stream"
        );
        inner.reset_stream(
            id,
            StreamError::ResetLocally(ResetReason::BufferBudget),
            wake,
        );
        false
    }

    fn on_header(
        &mut self,
        inner: &mut Inner,
        h: Header,
        keepalive: &mut Keepalive,
        wake: &mut Vec<Waker>,
    ) -> Result<Next, SessionError> {
        let id = h.id();
        match h.ty {
            FrameType::Ping => {
                if h.flags & SYN != 0 {
                    inner.push(Header::pong(h.length));
                } else if h.flags & ACK != 0 {
                    if let Some(rtt) = keepalive.on_pong(h.length) {
                        inner.record_rtt(rtt);
                    }
                }
                return Ok(Next::Done);
            }
            FrameType::GoAway => {
                if !inner.remote_goaway {
                    if h.length == GoAwayCode::Normal as u32 {
                        debug!("peer sent GoAway");
                    } else {
                        warn!(code = h.length, "peer sent GoAway with an error code");
                    }
                }
                inner.remote_goaway = true;
                if h.length != GoAwayCode::Normal as u32 {
                    // As hashicorp/yamux: a protocol or internal error
                    // from the peer ends the session.
                    return Err(SessionError::GoAwayError(h.length));
                }
                return Ok(Next::Done);
            }
            FrameType::Data | FrameType::WindowUpdate => {}
        }
        if h.flags & SYN != 0 {
            self.incoming(inner, id)?;
        }
        let Some(st) = inner.streams.get_mut(&id) else {
            if !inner.was_opened(id) {
                return Err(SessionError::Protocol(ProtocolViolation::NeverOpened(
                    id.get(),
                )));
            }
            // A stream that was closed or reset; its frames may still be in
            // flight, so they are dropped (as hashicorp/yamux does).
            return Ok(match h.ty {
                FrameType::Data => Next::Skip(h.length as usize),
                _ => Next::Done,
            });
        };
        if h.ty == FrameType::WindowUpdate {
            st.credit_send(h.length, h.flags & (SYN | ACK) != 0, wake)
                .map_err(|()| {
                    SessionError::Protocol(ProtocolViolation::WindowOverflow(id.get()))
                })?;
            apply_flags(inner, id, h.flags, wake);
            return Ok(Next::Done);
        }
        if st.detached && !st.remote_closed && h.length > 0 {
            // Nobody will read it: reset, as TCP does for a closed socket.
            inner.remove(id);
            inner.push(Header::rst(id));
            return Ok(Next::Skip(h.length as usize));
        }
        if let Err(window) = st.take_recv_window(h.length) {
            return Err(SessionError::Protocol(ProtocolViolation::WindowExceeded {
                stream: id.get(),
                len: h.length,
                window,
            }));
        }
        inner.data_received += u64::from(h.length);
        if h.length == 0 {
            apply_flags(inner, id, h.flags, wake);
            return Ok(Next::Done);
        }
        Ok(Next::Body)
    }

    /// A SYN: a stream the peer opens.
    fn incoming(&mut self, inner: &mut Inner, id: StreamId) -> Result<(), SessionError> {
        if id.is_session() || inner.is_ours(id) {
            return Err(SessionError::Protocol(ProtocolViolation::BadStreamId(
                id.get(),
            )));
        }
        if inner.streams.contains_key(&id) {
            return Err(SessionError::Protocol(ProtocolViolation::DuplicateStream(
                id.get(),
            )));
        }
        // Not required to grow: hashicorp/yamux takes IDs in order but its
        // goroutines may send the SYNs out of order.
        inner.max_peer_id = inner.max_peer_id.max(id.get());
        let refuse = inner.close_requested || inner.streams.len() >= inner.max_streams;
        let permit = match (&self.accept, refuse) {
            (Some(tx), false) => tx.try_reserve().ok(),
            _ => None,
        };
        let Some(permit) = permit else {
            debug!(
                stream = %id,
                "refusing peer-opened stream (not accepted, backlog full or too many streams)"
            );
            inner.push(Header::rst(id));
            return Ok(());
        };
        inner.add_stream(id, false);
        trace!(stream = %id, "accepted stream");
        permit.send(Stream::new(self.shared.clone(), id));
        Ok(())
    }
}

/// FIN and RST, after the frame's data.
fn apply_flags(inner: &mut Inner, id: StreamId, flags: u16, wake: &mut Vec<Waker>) {
    if flags & (FIN | RST) == 0 {
        return;
    }
    let Some(st) = inner.streams.get_mut(&id) else {
        return;
    };
    if flags & FIN != 0 {
        st.remote_closed = true;
        st.wake_reader(wake);
    }
    if flags & RST != 0 {
        st.set_reset(StreamError::ResetByPeer, wake);
        inner.discard(id);
    }
    inner.reap(id);
}
