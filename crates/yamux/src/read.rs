//! The connection's read side: reads frames from the transport and
//! dispatches them to the streams.

use std::{
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
/// Read sizes when no larger frame is expected: the size adapts between
/// these, doubling when a read fills the buffer and halving when reads come
/// back small, so bulk transfers make few syscalls and small calls do not
/// allocate large buffers.
const MIN_READ_CHUNK: usize = 16 * 1024;
const MAX_READ_CHUNK: usize = 256 * 1024;
/// Below this much free space the read buffer grows before a read.
const MIN_SPARE: usize = 4 * 1024;
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
    /// A data header whose body is still being read.
    pending: Option<Header>,
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
        ReadSide {
            io,
            shared,
            accept: Some(accept),
            rbuf: BytesMut::new(),
            pending: None,
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
                    return Ok(progress);
                }
                self.paused = false;
            }
            // Room for what the pending frame still lacks (so a large frame
            // lands in one buffer, read straight from the socket), or a chunk.
            let need = self
                .pending
                .map_or(HEADER_LEN, |h| HEADER_LEN + h.length as usize)
                .saturating_sub(self.rbuf.len());
            let spare = self.rbuf.capacity() - self.rbuf.len();
            if spare < need || spare < MIN_SPARE {
                let before = self.rbuf.as_ptr();
                self.rbuf.reserve(need.max(self.read_chunk));
                let now = self.rbuf.len() + self.rbuf.capacity();
                if self.rbuf.as_ptr() == before {
                    self.alloc = self.alloc.max(now);
                } else {
                    self.alloc = now;
                    self.alloc_gen += 1;
                }
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
                    self.process(keepalive, wake)?;
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {
                    if self.rbuf.is_empty() && self.pending.is_none() {
                        // Idle: give the buffer back.
                        self.rbuf = BytesMut::new();
                    }
                    return Ok(progress);
                }
            }
        }
        Ok(progress)
    }

    /// Dispatches every complete frame in the read buffer.
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
            let h = match self.pending {
                Some(h) => h,
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
                            self.pending = Some(h);
                            h
                        }
                    }
                }
            };
            let len = h.length as usize;
            if self.rbuf.len() < HEADER_LEN + len {
                return Ok(());
            }
            self.pending = None;
            self.rbuf.advance(HEADER_LEN);
            let id = h.id();
            match inner.streams.get(&id) {
                Some(st) if st.detached && !st.remote_closed => {
                    // The handle went away while the body was arriving:
                    // nobody will read it.
                    self.rbuf.advance(len);
                    inner.remove(id);
                    inner.push(Header::rst(id));
                    continue;
                }
                Some(st) if st.reset.is_none() => {
                    if !self.deliver(inner, id, len, wake) {
                        continue;
                    }
                }
                _ => self.rbuf.advance(len),
            }
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
