//! Starting a session, and its handles: [`Control`] and [`Incoming`].

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tracing::trace;

use crate::{
    config::{Config, Mode},
    connection::{CloseTimers, Connection, Keepalive},
    error::OpenError,
    frame::StreamId,
    read::ReadSide,
    shared::{Inner, Shared},
    stream::Stream,
    write::{WriteSide, Writer},
};

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
    let invalid = config.validate().err().map(Into::into);
    let (read, write) = tokio::io::split(io);
    let shared = Arc::new(Shared::new(
        Inner::new(&config, mode),
        Writer::new(Box::pin(write)),
    ));
    let (tx, rx) = mpsc::channel(config.accept_backlog().max(1));
    let keepalive = match invalid {
        None => Keepalive::new(
            config.keepalive(),
            config.keepalive_timeout(),
            config.rtt_probe(),
        ),
        Some(_) => Keepalive::new(None, config.keepalive_timeout(), false),
    };
    let connection = Connection {
        shared: shared.clone(),
        read: ReadSide::new(read, shared.clone(), tx),
        write: WriteSide::new(config.write_timeout()),
        keepalive,
        close_timers: CloseTimers::new(),
        invalid,
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
        let id = self.shared.update(|inner| {
            if inner.dead() || inner.close_requested {
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
            let id = StreamId::new(id);
            inner.add_stream(id, true);
            Ok(id)
        })?;
        trace!(stream = %id, "opened stream");
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
        self.shared.update(|inner| {
            inner.close_requested = true;
            inner.notify();
        });
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

    /// Bytes of received data the session holds for its streams, not yet
    /// read (for metrics); never more than
    /// [`Config::with_max_buffered`](crate::Config::with_max_buffered).
    pub fn buffered_bytes(&self) -> usize {
        self.shared.lock().buffered
    }

    /// A snapshot of the session's flow: round-trip time, windows, bytes in
    /// flight and totals (for metrics and diagnosis).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, _b) = tokio::io::duplex(1024);
    /// let (control, _incoming, connection) =
    ///     backchannel_yamux::session(a, Default::default(), backchannel_yamux::Mode::Client);
    /// tokio::spawn(connection);
    /// let stats = control.stats();
    /// assert_eq!(stats.streams, 0);
    /// assert_eq!(stats.recv_window, 256 * 1024);
    /// assert!(stats.rtt.is_none()); // no pong yet
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        let inner = self.shared.lock();
        let mut stats = Stats {
            rtt: inner.rtt,
            streams: inner.streams.len(),
            buffered: inner.buffered,
            max_buffered: inner.max_buffered,
            recv_window: inner.window,
            send_window: 0,
            in_flight: 0,
            data_sent: inner.data_sent,
            data_received: inner.data_received,
            window_stalls: inner.window_stalls,
            windows_grown: inner.windows_grown,
        };
        for st in inner.streams.values() {
            stats.recv_window = stats.recv_window.max(st.recv_max);
            stats.send_window = stats.send_window.max(st.send_peak);
            stats.in_flight += u64::from(st.send_peak - st.send_window);
        }
        stats
    }
}

/// A snapshot of a session's flow, from [`Control::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Smoothed round-trip time of the session's pings (`None` before the
    /// first answer).
    pub rtt: Option<Duration>,
    /// Streams tracked now.
    pub streams: usize,
    /// Bytes held for readers (see [`Control::buffered_bytes`]).
    pub buffered: usize,
    /// The buffer budget.
    pub max_buffered: usize,
    /// The largest receive window a stream has now (the configured stream
    /// window, or more where it grew).
    pub recv_window: u32,
    /// The largest window the peer has granted one of the open streams (0
    /// with no stream open).
    pub send_window: u32,
    /// Bytes sent on open streams that the peer has not credited back yet.
    pub in_flight: u64,
    /// Data bytes sent, all streams, since the session started.
    pub data_sent: u64,
    /// Data bytes received, all streams, since the session started.
    pub data_received: u64,
    /// Times a writer found its stream's send window closed.
    pub window_stalls: u64,
    /// Times a stream's receive window grew.
    pub windows_grown: u64,
}

impl Stats {
    /// The most one stream can carry toward the peer, in bytes per second:
    /// the peer's window per round trip (`None` until both are known).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # let (a, _b) = tokio::io::duplex(1024);
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    /// # let _g = rt.enter();
    /// # let (control, _i, _c) = backchannel_yamux::session(a, Default::default(), backchannel_yamux::Mode::Client);
    /// let stats = control.stats();
    /// assert_eq!(stats.send_ceiling(), None); // no RTT, no stream yet
    /// ```
    pub fn send_ceiling(&self) -> Option<u64> {
        ceiling(self.send_window, self.rtt?)
    }

    /// The most one stream can carry from the peer, in bytes per second:
    /// our receive window per round trip.
    pub fn recv_ceiling(&self) -> Option<u64> {
        ceiling(self.recv_window, self.rtt?)
    }
}

/// `window` bytes per `rtt`, in bytes per second.
pub(crate) fn ceiling(window: u32, rtt: Duration) -> Option<u64> {
    if window == 0 {
        return None;
    }
    let nanos = rtt.as_nanos().max(1);
    u64::try_from(u128::from(window) * 1_000_000_000 / nanos).ok()
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
