//! The session: shared state, the connection driver, and the handles.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadHalf},
    sync::mpsc,
    time::{Instant, Interval, MissedTickBehavior, Sleep},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

use crate::{
    config::{Config, Mode},
    error::{OpenError, ProtocolViolation, SessionError},
    frame::{FrameType, GoAwayCode, Header, ACK, FIN, HEADER_LEN, INITIAL_WINDOW, RST, SYN},
    stream::Stream,
};

/// A stream writer waits while this much output is queued.
pub(crate) const OUT_HIGH: usize = 512 * 1024;
/// The connection stops reading while this much output is queued: only a
/// peer that makes us answer (pings) faster than it reads gets here.
const OUT_PAUSE: usize = 2 * OUT_HIGH;
/// Largest data frame we send.
pub(crate) const MAX_DATA_FRAME: usize = 256 * 1024;
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
/// and a queue entry per tiny frame would cost more than the frame. So a
/// stream's memory stays within a small factor of its receive window
/// whatever frame sizes the peer picks.
const COPY_BELOW: usize = 16 * 1024;
/// An idle session keeps an output buffer up to this size.
const KEEP_OUT: usize = 4 * 1024;
/// Reads (or writes) per poll before the driver yields to other tasks.
const BUDGET: usize = 32;

/// The state every handle of a session shares.
///
/// Lock order: a thread that holds `writer` may take `inner`, never the
/// other way round, except with `try_lock` (a stream writing directly).
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    writer: Mutex<Writer>,
    ended: CancellationToken,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle is gone; the last one wakes the connection task, which
    /// then closes the session.
    pub(crate) fn release_handle(&self) {
        let mut inner = self.lock();
        inner.handles -= 1;
        let driver = if inner.handles == 0 {
            inner.take_driver()
        } else {
            None
        };
        drop(inner);
        if let Some(w) = driver {
            w.wake();
        }
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For a stream's write: the writer, if nobody holds it and nothing is
    /// in flight, so a frame may go to the transport at once.
    pub(crate) fn idle_writer(&self) -> Option<MutexGuard<'_, Writer>> {
        let w = self.writer.try_lock().ok()?;
        (w.io.is_some() && w.pos == w.buf.len() && !w.need_flush).then_some(w)
    }
}

/// The transport's write half and the bytes being written.
pub(crate) struct Writer {
    io: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    /// Frames being written (swapped with `Inner::out`: two buffers that
    /// keep their capacity, so steady traffic allocates nothing).
    buf: BytesMut,
    /// How much of `buf` is written.
    pos: usize,
    need_flush: bool,
}

impl Writer {
    /// Writes one frame (header + the first `n` bytes of `bufs`) straight to
    /// the transport, with the writing task's context. What the transport
    /// does not take now is kept for the connection task, which must then
    /// be woken (returns `true`).
    pub(crate) fn write_direct(
        &mut self,
        cx: &mut Context<'_>,
        header: [u8; HEADER_LEN],
        bufs: &[IoSlice<'_>],
        n: usize,
    ) -> bool {
        let Some(io) = self.io.as_mut() else {
            return false;
        };
        self.buf.clear();
        self.pos = 0;
        let mut slices = [IoSlice::new(&[]); 8];
        slices[0] = IoSlice::new(&header);
        let mut count = 1;
        let mut left = n;
        for b in bufs {
            if left == 0 || count == slices.len() {
                break;
            }
            let k = b.len().min(left);
            slices[count] = IoSlice::new(&b[..k]);
            count += 1;
            left -= k;
        }
        if left > 0 {
            // More slices than one writev takes here (h2 uses two): queue
            // the whole frame instead.
            self.buf.extend_from_slice(&header);
            put_prefix(&mut self.buf, bufs, n);
            return true;
        }
        let mut parts = &mut slices[..count];
        let mut unwritten = HEADER_LEN + n;
        while unwritten > 0 {
            match io.as_mut().poll_write_vectored(cx, parts) {
                Poll::Ready(Ok(k)) if k > 0 => {
                    let k = k.min(unwritten);
                    unwritten -= k;
                    IoSlice::advance_slices(&mut parts, k);
                }
                _ => break,
            }
        }
        if unwritten == 0 {
            self.need_flush = true;
            if let Poll::Ready(Ok(())) = io.as_mut().poll_flush(cx) {
                self.need_flush = false;
                return false;
            }
            return true;
        }
        // Keep the rest of the frame, in order, for the connection task
        // (which also sees any error again).
        for p in parts.iter() {
            self.buf.extend_from_slice(p);
        }
        true
    }
}

/// Appends the first `n` bytes of `bufs` to `buf`.
pub(crate) fn put_prefix(buf: &mut BytesMut, bufs: &[IoSlice<'_>], n: usize) {
    let mut left = n;
    for b in bufs {
        if left == 0 {
            break;
        }
        let k = b.len().min(left);
        buf.extend_from_slice(&b[..k]);
        left -= k;
    }
}

pub(crate) struct Inner {
    mode: Mode,
    /// Receive window of every stream.
    pub(crate) window: u32,
    max_streams: usize,
    pub(crate) streams: HashMap<u32, StreamState>,
    next_id: u64,
    /// Highest stream ID the peer has opened.
    max_peer_id: u32,
    /// Encoded frames waiting for the connection to write them.
    pub(crate) out: BytesMut,
    /// The connection's task, when it waits for work.
    driver: Option<Waker>,
    /// A stream left bytes in the writer for the connection task.
    kick: bool,
    /// Live handles (`Control`s, the `Incoming`, `Stream`s): when none is
    /// left, nobody can use the session any more and it closes itself.
    pub(crate) handles: usize,
    /// Stream writers waiting for `out` to drain below [`OUT_HIGH`].
    pub(crate) out_waiters: Vec<Waker>,
    /// `close()` was called (or every handle is gone): GoAway goes out, no
    /// new streams either way, no more data frames.
    close_requested: bool,
    remote_goaway: bool,
    /// The connection has ended: no more frames go in or out.
    pub(crate) dead: bool,
}

impl Inner {
    pub(crate) fn push(&mut self, h: Header) {
        h.put(&mut self.out);
    }

    /// Tells the connection task that the writer holds bytes for it; returns
    /// its waker, to be woken after unlocking.
    pub(crate) fn kick_driver(&mut self) -> Option<Waker> {
        self.kick = true;
        self.driver.take()
    }

    /// Takes the connection's waker, to be woken (after unlocking) because
    /// there is output.
    pub(crate) fn take_driver(&mut self) -> Option<Waker> {
        self.driver.take()
    }

    /// Registers a stream that gets a handle, and queues its SYN (we open)
    /// or ACK (we accept), announcing the window beyond the initial 256 KiB.
    fn add_stream(&mut self, id: u32, flag: u16) {
        let window = self.window;
        self.streams
            .insert(id, StreamState::new(INITIAL_WINDOW, window));
        self.push(Header::new(
            FrameType::WindowUpdate,
            flag,
            id,
            window - INITIAL_WINDOW,
        ));
        self.handles += 1;
    }

    /// Whether `close()` was called: no more data frames are accepted.
    pub(crate) fn closing(&self) -> bool {
        self.close_requested
    }

    /// Whether stream `id` was ever opened, by either side.
    fn was_opened(&self, id: u32) -> bool {
        let ours = match self.mode {
            Mode::Client => id & 1 == 1,
            Mode::Server => id & 1 == 0,
        };
        id != 0
            && if ours {
                u64::from(id) < self.next_id
            } else {
                id <= self.max_peer_id
            }
    }

    /// Forgets a stream whose handle is gone once nothing more can happen
    /// on it.
    pub(crate) fn reap(&mut self, id: u32) {
        if let Some(st) = self.streams.get(&id) {
            if st.detached && (st.reset || (st.local_closed && st.remote_closed)) {
                self.streams.remove(&id);
            }
        }
    }
}

/// Per-stream state.
#[derive(Default)]
pub(crate) struct StreamState {
    /// Received data not yet read: slices of the connection's read buffer,
    /// then `tail`.
    pub(crate) recv: VecDeque<Bytes>,
    /// Small frames' data, copied (see [`COPY_BELOW`]); newer than `recv`.
    pub(crate) tail: BytesMut,
    pub(crate) recv_buffered: usize,
    /// How much more the peer may send before we credit it.
    pub(crate) recv_window: u32,
    /// Read since the last window update we sent.
    pub(crate) recv_consumed: u32,
    /// How much more we may send.
    pub(crate) send_window: u32,
    /// We sent FIN.
    pub(crate) local_closed: bool,
    /// The peer sent FIN.
    pub(crate) remote_closed: bool,
    /// Reset by either side.
    pub(crate) reset: bool,
    /// The handle was dropped while the peer's half was open.
    pub(crate) detached: bool,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
}

impl StreamState {
    fn new(send_window: u32, recv_window: u32) -> Self {
        StreamState {
            send_window,
            recv_window,
            ..Default::default()
        }
    }
}

/// Starts a session over `io`.
///
/// Returns the [`Control`] (open streams, close the session), the
/// [`Incoming`] streams the peer opens (drop it to refuse them all), and the
/// [`Connection`]: the future that does the work, to be spawned. The
/// connection resolves when the session ends; every stream then fails its
/// pending and later reads and writes (data that arrived before stays
/// readable).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (a, _b) = tokio::io::duplex(1024);
/// let (control, _incoming, connection) =
///     backchannel_yamux::session(a, Default::default(), backchannel_yamux::Mode::Client);
/// tokio::spawn(connection);
/// assert_eq!(control.open_stream().unwrap().id(), 1);
/// # }
/// ```
pub fn session<T>(io: T, config: Config, mode: Mode) -> (Control, Incoming, Connection<T>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (read, write) = tokio::io::split(io);
    let shared = Arc::new(Shared {
        writer: Mutex::new(Writer {
            io: Some(Box::pin(write)),
            buf: BytesMut::new(),
            pos: 0,
            need_flush: false,
        }),
        inner: Mutex::new(Inner {
            mode,
            window: config.window(),
            max_streams: config.max_streams.max(1),
            streams: HashMap::new(),
            next_id: match mode {
                Mode::Client => 1,
                Mode::Server => 2,
            },
            max_peer_id: 0,
            out: BytesMut::new(),
            driver: None,
            kick: false,
            handles: 2,
            out_waiters: Vec::new(),
            close_requested: false,
            remote_goaway: false,
            dead: false,
        }),
        ended: CancellationToken::new(),
    });
    let (tx, rx) = mpsc::channel(config.accept_backlog.max(1));
    let keepalive = config.keepalive.map(|every| {
        let mut iv = tokio::time::interval_at(Instant::now() + every, every);
        iv.set_missed_tick_behavior(MissedTickBehavior::Delay);
        iv
    });
    let connection = Connection {
        io: read,
        shared: shared.clone(),
        accept: Some(tx),
        rbuf: BytesMut::new(),
        pending: None,
        skip: 0,
        paused: false,
        read_chunk: MIN_READ_CHUNK,
        keepalive,
        keepalive_timeout: config.keepalive_timeout,
        ping: None,
        ping_id: 0,
        write_timeout: config.write_timeout,
        write_deadline: None,
        closing: false,
        finished: false,
        wake: Vec::new(),
    };
    (
        Control {
            shared: shared.clone(),
        },
        Incoming { rx, shared },
        connection,
    )
}

/// Opens streams and closes the session. Cheap to clone.
pub struct Control {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Clone for Control {
    fn clone(&self) -> Self {
        self.shared.lock().handles += 1;
        Control {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.shared.release_handle();
    }
}

impl Control {
    /// Opens a stream. It is usable at once: the SYN goes out with the first
    /// write (or before), and up to 256 KiB may be written before the peer
    /// acknowledges it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, _b) = tokio::io::duplex(1024);
    /// let (control, _incoming, connection) =
    ///     backchannel_yamux::session(a, Default::default(), backchannel_yamux::Mode::Server);
    /// tokio::spawn(connection);
    /// let (s2, s4) = (control.open_stream().unwrap(), control.open_stream().unwrap());
    /// assert_eq!((s2.id(), s4.id()), (2, 4));
    /// # }
    /// ```
    pub fn open_stream(&self) -> Result<Stream, OpenError> {
        let mut inner = self.shared.lock();
        if inner.dead || inner.close_requested {
            return Err(OpenError::SessionClosed);
        }
        if inner.remote_goaway {
            return Err(OpenError::RemoteGoAway);
        }
        if inner.streams.len() >= inner.max_streams {
            return Err(OpenError::TooManyStreams(inner.max_streams));
        }
        let id = u32::try_from(inner.next_id).map_err(|_| OpenError::IdsExhausted)?;
        inner.next_id += 2;
        inner.add_stream(id, SYN);
        let waker = inner.take_driver();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
        trace!(stream = id, "opened stream");
        Ok(Stream::new(self.shared.clone(), id))
    }

    /// Ends the session: sends GoAway, writes what is queued, closes the
    /// transport. Idempotent.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, _b) = tokio::io::duplex(1024);
    /// let (control, _incoming, connection) =
    ///     backchannel_yamux::session(a, Default::default(), backchannel_yamux::Mode::Client);
    /// tokio::spawn(connection);
    /// control.close();
    /// control.closed().await;
    /// assert!(control.open_stream().is_err());
    /// # }
    /// ```
    pub fn close(&self) {
        let mut inner = self.shared.lock();
        inner.close_requested = true;
        let waker = inner.take_driver();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.ended.is_cancelled()
    }

    /// Completes when the session has ended (the [`Connection`] finished or
    /// was dropped).
    pub async fn closed(&self) {
        self.shared.ended.cancelled().await
    }

    /// Like [`closed`](Self::closed), as a `'static` future that holds no
    /// handle (so it does not keep the session open).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, _b) = tokio::io::duplex(1024);
    /// let (control, _incoming, connection) =
    ///     backchannel_yamux::session(a, Default::default(), backchannel_yamux::Mode::Client);
    /// tokio::spawn(connection);
    /// let ended = tokio::spawn(control.closed_owned());
    /// control.close();
    /// ended.await.unwrap();
    /// # }
    /// ```
    pub fn closed_owned(&self) -> impl Future<Output = ()> + Send + 'static {
        self.shared.ended.clone().cancelled_owned()
    }

    /// Streams the session tracks now (open, half-closed, or dropped but not
    /// yet closed by the peer).
    pub fn num_streams(&self) -> usize {
        self.shared.lock().streams.len()
    }
}

/// The streams the peer opens, in order. Dropping it makes the session
/// reset every stream the peer opens later.
pub struct Incoming {
    rx: mpsc::Receiver<Stream>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.shared.release_handle();
    }
}

impl Incoming {
    /// The next stream the peer opened; `None` once the session has ended.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.rx.recv().await
    }

    /// Polls for the next stream the peer opened.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<Stream>> {
        self.rx.poll_recv(cx)
    }
}

impl futures_core::Stream for Incoming {
    type Item = Stream;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Stream>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

/// What to do after a header.
enum Next {
    /// Header handled.
    Done,
    /// Discard this many body bytes.
    Skip(usize),
    /// Wait for the data frame's body, then deliver it.
    Body,
}

/// The session's I/O: a future that reads and dispatches frames and writes
/// the queued ones, until the session ends. Spawn it.
///
/// Resolves to `Ok(())` when the session was closed by either side with a
/// GoAway, or to the [`SessionError`] that ended it.
#[must_use = "the session does nothing unless its Connection is polled (spawn it)"]
pub struct Connection<T> {
    io: ReadHalf<T>,
    shared: Arc<Shared>,
    accept: Option<mpsc::Sender<Stream>>,
    rbuf: BytesMut,
    /// A data header whose body is still being read.
    pending: Option<Header>,
    /// Body bytes of a frame for a stream we no longer have.
    skip: usize,
    paused: bool,
    read_chunk: usize,
    keepalive: Option<Interval>,
    keepalive_timeout: Duration,
    ping: Option<(u32, Instant)>,
    ping_id: u32,
    write_timeout: Duration,
    write_deadline: Option<Pin<Box<Sleep>>>,
    closing: bool,
    finished: bool,
    wake: Vec<Waker>,
}

impl<T> std::fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closing", &self.closing)
            .field("finished", &self.finished)
            .finish()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Future for Connection<T> {
    type Output = Result<(), SessionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(Ok(()));
        }
        let result = match this.drive(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(SessionError::ClosedByPeer)) if this.shared.lock().remote_goaway => {
                Ok(())
            }
            Poll::Ready(r) => r,
        };
        match &result {
            Ok(()) => debug!("yamux session ended"),
            Err(e) => debug!(error = %e, "yamux session failed"),
        }
        this.finish();
        Poll::Ready(result)
    }
}

impl<T> Drop for Connection<T> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<T> Connection<T> {
    /// Marks the session dead and wakes every handle.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut wake = std::mem::take(&mut self.wake);
        {
            let mut inner = self.shared.lock();
            inner.dead = true;
            inner.out = BytesMut::new();
            wake.append(&mut inner.out_waiters);
            for st in inner.streams.values_mut() {
                wake.extend(st.read_waker.take());
                wake.extend(st.write_waker.take());
            }
            inner.streams.retain(|_, st| !st.detached);
        }
        // Closes the transport (with the read half, dropped with `self`).
        self.shared.lock_writer().io = None;
        // Outside the lock: dropping the sender may drop queued streams,
        // whose Drop takes the lock.
        self.accept = None;
        self.shared.ended.cancel();
        for w in wake {
            w.wake();
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection<T> {
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SessionError>> {
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > BUDGET {
                // Let the streams' tasks run; come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !self.closing {
                let mut inner = self.shared.lock();
                if inner.close_requested {
                    inner.push(Header::new(
                        FrameType::GoAway,
                        0,
                        0,
                        GoAwayCode::Normal as u32,
                    ));
                    self.closing = true;
                    debug!("yamux session closing (GoAway sent)");
                }
            }
            let mut progress = false;
            if let Some(iv) = &mut self.keepalive {
                if iv.poll_tick(cx).is_ready() {
                    self.keepalive_tick()?;
                    progress = true;
                }
            }
            let (wrote, idle) = self.poll_write_side(cx)?;
            progress |= wrote;
            if self.closing {
                if idle {
                    // Best effort: the peer sees the end either way.
                    let mut w = self.shared.lock_writer();
                    if let Some(io) = w.io.as_mut() {
                        let _ = std::task::ready!(io.as_mut().poll_shutdown(cx));
                    }
                    return Poll::Ready(Ok(()));
                }
            } else {
                progress |= self.poll_read_side(cx)?;
            }
            if progress {
                continue;
            }
            let mut inner = self.shared.lock();
            if inner.handles == 0 && !inner.close_requested {
                debug!("every handle of the yamux session is gone; closing it");
                inner.close_requested = true;
            }
            let more = (idle && !inner.out.is_empty())
                || std::mem::take(&mut inner.kick)
                || (inner.close_requested && !self.closing);
            if more {
                continue;
            }
            match &inner.driver {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => inner.driver = Some(cx.waker().clone()),
            }
            if inner.out.is_empty() && inner.out.capacity() > KEEP_OUT {
                inner.out = BytesMut::new();
            }
            return Poll::Pending;
        }
    }

    fn keepalive_tick(&mut self) -> Result<(), SessionError> {
        match self.ping {
            Some((_, sent)) if sent.elapsed() >= self.keepalive_timeout => {
                Err(SessionError::KeepaliveTimeout(self.keepalive_timeout))
            }
            Some(_) => Ok(()),
            None => {
                self.ping_id = self.ping_id.wrapping_add(1);
                self.ping = Some((self.ping_id, Instant::now()));
                self.shared
                    .lock()
                    .push(Header::new(FrameType::Ping, SYN, 0, self.ping_id));
                Ok(())
            }
        }
    }

    /// Writes queued output. Returns whether anything was written, and
    /// whether everything is written and flushed.
    fn poll_write_side(&mut self, cx: &mut Context<'_>) -> Result<(bool, bool), SessionError> {
        let mut progress = false;
        let mut guard = self.shared.lock_writer();
        let w = &mut *guard;
        let Some(io) = w.io.as_mut() else {
            return Ok((false, true));
        };
        for _ in 0..BUDGET {
            if w.pos == w.buf.len() {
                w.buf.clear();
                w.pos = 0;
                let mut inner = self.shared.lock();
                if inner.out.is_empty() {
                    break;
                }
                std::mem::swap(&mut inner.out, &mut w.buf);
                self.wake.append(&mut inner.out_waiters);
                drop(inner);
                for waker in self.wake.drain(..) {
                    waker.wake();
                }
            }
            match io.as_mut().poll_write(cx, &w.buf[w.pos..]) {
                Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(n)) => {
                    w.pos += n;
                    w.need_flush = true;
                    self.write_deadline = None;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {
                    drop(guard);
                    self.poll_write_deadline(cx)?;
                    return Ok((progress, false));
                }
            }
        }
        let written = w.pos == w.buf.len();
        if written && w.need_flush {
            match io.as_mut().poll_flush(cx) {
                Poll::Ready(Ok(())) => w.need_flush = false,
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {
                    drop(guard);
                    self.poll_write_deadline(cx)?;
                    return Ok((progress, false));
                }
            }
        }
        if written && w.buf.capacity() > KEEP_OUT && !progress {
            // Idle: give the buffer back.
            w.buf = BytesMut::new();
            w.pos = 0;
        }
        Ok((progress, written))
    }

    fn poll_write_deadline(&mut self, cx: &mut Context<'_>) -> Result<(), SessionError> {
        let timeout = self.write_timeout;
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Err(SessionError::WriteTimeout(timeout));
        }
        Ok(())
    }

    /// Reads and dispatches frames; `Ok(true)` if anything was read.
    fn poll_read_side(&mut self, cx: &mut Context<'_>) -> Result<bool, SessionError> {
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
                self.rbuf.reserve(need.max(self.read_chunk));
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
                    self.process()?;
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
    fn process(&mut self) -> Result<(), SessionError> {
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        let result = self.process_locked(&mut inner);
        if let Err(SessionError::Protocol(v)) = &result {
            warn!(violation = %v, "yamux protocol error from peer; sending GoAway");
            inner.push(Header::new(
                FrameType::GoAway,
                0,
                0,
                GoAwayCode::ProtocolError as u32,
            ));
        }
        self.paused = inner.out.len() >= OUT_PAUSE;
        drop(inner);
        for w in self.wake.drain(..) {
            w.wake();
        }
        if result.is_err() {
            // Best effort, without waiting: the connection is torn down
            // right after.
            let mut cx = Context::from_waker(Waker::noop());
            let _ = self.poll_write_side(&mut cx);
        }
        result
    }

    fn process_locked(&mut self, inner: &mut Inner) -> Result<(), SessionError> {
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
                    match self.on_header(inner, h)? {
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
            match inner.streams.get_mut(&h.stream_id) {
                Some(st) if !st.reset => {
                    // Larger frames stay slices of the read buffer. With one
                    // busy stream its slices share and release buffers in
                    // order; a stalled stream among busy ones can pin up to
                    // ~17 times its window (256 KiB buffers behind 16 KiB
                    // frames). Copying earlier cost 10-25% of throughput,
                    // because a busy reader is often far behind.
                    if len < COPY_BELOW {
                        st.tail.extend_from_slice(&self.rbuf[..len]);
                        self.rbuf.advance(len);
                    } else {
                        if !st.tail.is_empty() {
                            st.recv.push_back(st.tail.split().freeze());
                        }
                        st.recv.push_back(self.rbuf.split_to(len).freeze());
                    }
                    st.recv_buffered += len;
                    self.wake.extend(st.read_waker.take());
                }
                _ => self.rbuf.advance(len),
            }
            self.apply_flags(inner, h.stream_id, h.flags);
        }
    }

    fn on_header(&mut self, inner: &mut Inner, h: Header) -> Result<Next, SessionError> {
        let id = h.stream_id;
        match h.ty {
            FrameType::Ping => {
                if h.flags & SYN != 0 {
                    inner.push(Header::new(FrameType::Ping, ACK, 0, h.length));
                } else if h.flags & ACK != 0 && matches!(self.ping, Some((p, _)) if p == h.length) {
                    self.ping = None;
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
                return Ok(Next::Done);
            }
            FrameType::Data | FrameType::WindowUpdate => {}
        }
        if h.flags & SYN != 0 {
            self.incoming(inner, id)?;
        }
        let Some(st) = inner.streams.get_mut(&id) else {
            if !inner.was_opened(id) {
                return Err(SessionError::Protocol(ProtocolViolation::NeverOpened(id)));
            }
            // A stream that was closed or reset; its frames may still be in
            // flight, so they are dropped (as hashicorp/yamux does).
            return Ok(match h.ty {
                FrameType::Data => Next::Skip(h.length as usize),
                _ => Next::Done,
            });
        };
        if h.ty == FrameType::WindowUpdate {
            st.send_window = st
                .send_window
                .checked_add(h.length)
                .ok_or(SessionError::Protocol(ProtocolViolation::WindowOverflow(
                    id,
                )))?;
            if h.length > 0 {
                self.wake.extend(st.write_waker.take());
            }
            self.apply_flags(inner, id, h.flags);
            return Ok(Next::Done);
        }
        if st.detached && !st.remote_closed && h.length > 0 {
            // Nobody will read it: reset, as TCP does for a closed socket.
            inner.streams.remove(&id);
            inner.push(Header::new(FrameType::WindowUpdate, RST, id, 0));
            return Ok(Next::Skip(h.length as usize));
        }
        if h.length > st.recv_window {
            return Err(SessionError::Protocol(ProtocolViolation::WindowExceeded {
                stream: id,
                len: h.length,
                window: st.recv_window,
            }));
        }
        st.recv_window -= h.length;
        if h.length == 0 {
            self.apply_flags(inner, id, h.flags);
            return Ok(Next::Done);
        }
        Ok(Next::Body)
    }

    /// FIN and RST, after the frame's data.
    fn apply_flags(&mut self, inner: &mut Inner, id: u32, flags: u16) {
        if flags & (FIN | RST) == 0 {
            return;
        }
        let Some(st) = inner.streams.get_mut(&id) else {
            return;
        };
        if flags & FIN != 0 {
            st.remote_closed = true;
        }
        if flags & RST != 0 {
            st.reset = true;
            st.recv.clear();
            st.tail = BytesMut::new();
            st.recv_buffered = 0;
            self.wake.extend(st.write_waker.take());
        }
        self.wake.extend(st.read_waker.take());
        inner.reap(id);
    }

    /// A SYN: a stream the peer opens.
    fn incoming(&mut self, inner: &mut Inner, id: u32) -> Result<(), SessionError> {
        let theirs = match inner.mode {
            Mode::Client => id & 1 == 0,
            Mode::Server => id & 1 == 1,
        };
        if id == 0 || !theirs {
            return Err(SessionError::Protocol(ProtocolViolation::BadStreamId(id)));
        }
        if inner.streams.contains_key(&id) {
            return Err(SessionError::Protocol(ProtocolViolation::DuplicateStream(
                id,
            )));
        }
        // Not required to grow: hashicorp/yamux takes IDs in order but its
        // goroutines may send the SYNs out of order.
        inner.max_peer_id = inner.max_peer_id.max(id);
        let refuse = inner.close_requested || inner.streams.len() >= inner.max_streams;
        let permit = match (&self.accept, refuse) {
            (Some(tx), false) => tx.try_reserve().ok(),
            _ => None,
        };
        let Some(permit) = permit else {
            debug!(
                stream = id,
                "refusing peer-opened stream (not accepted, backlog full or too many streams)"
            );
            inner.push(Header::new(FrameType::WindowUpdate, RST, id, 0));
            return Ok(());
        };
        inner.add_stream(id, ACK);
        trace!(stream = id, "accepted stream");
        permit.send(Stream::new(self.shared.clone(), id));
        Ok(())
    }
}
