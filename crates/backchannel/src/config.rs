//! yamux session settings.

use std::time::Duration;

/// Settings of one yamux session, for either role.
///
/// The defaults are chosen for gRPC over loopback and LAN links and to stay
/// interoperable with Gitaly's Go peers (hashicorp/yamux):
///
/// | setting | server default | client default | why |
/// |---|---|---|---|
/// | `max_stream_window` | 4 MiB | 4 MiB | a 256 KiB window caps a stream at 256 KiB per round trip; 4 MiB keeps loopback streams at full speed while bounding what one stalled stream can buffer (Gitaly's server uses 16 MiB and saw memory balloon) |
/// | `accept_backlog` | 1 | 256 | the server accepts exactly one client stream; the client accepts one stream per reverse connection |
/// | `keepalive` | 15 s | 15 s | detects a silent peer without gRPC keepalive; hashicorp answers pings even with its own keepalive off |
/// | `keepalive_timeout` | 30 s | 30 s | a ping unanswered this long ends the session |
/// | `write_timeout` | 10 s | 10 s | yamux's safety valve for a connection that stops draining |
/// | `handshake_timeout` | 10 s | 10 s | server: how long a client may take to open stream 1 and send the HTTP/2 preface and SETTINGS on it (only then is it a peer); client: how long the connect and stream 1 may take |
/// | `max_auto_window` | 16 MiB | 16 MiB | a stream whose window is what limits it (half of it read within two round trips) gets a larger one, up to this, within a quarter of the buffer budget: long round trips do not cap a stream at 4 MiB per RTT |
/// | `max_buffered` | 256 MiB | 256 MiB | what a peer may make the session hold for readers: windows are granted per stream, not against this budget, so it must cover the streams a healthy session runs at once (a hundred busy tunnels hold a hundred windows); past it the stream holding the most unread data is reset |
/// | `max_streams` | 1024 | 256 | server: reverse-channel streams it may open; client: each server-opened stream is an HTTP/2 connection with its own buffers, so a server is not allowed thousands |
///
/// ```
/// use std::time::Duration;
/// let config = backchannel::SessionConfig::client()
///     .with_window(16 << 20)
///     .with_keepalive(None)
///     .with_handshake_timeout(Duration::from_secs(3));
/// assert_eq!(config.max_stream_window(), 16 << 20);
/// assert_eq!(config.keepalive(), None);
/// ```
#[derive(Clone, Debug)]
pub struct SessionConfig {
    max_stream_window: u32,
    accept_backlog: usize,
    keepalive: Option<Duration>,
    keepalive_timeout: Duration,
    write_timeout: Duration,
    max_streams: usize,
    handshake_timeout: Duration,
    stream_close_timeout: Duration,
    max_buffered: usize,
    max_auto_window: u32,
}

impl SessionConfig {
    /// Defaults for the server role.
    ///
    /// ```
    /// let c = backchannel::SessionConfig::server();
    /// assert_eq!(c.accept_backlog(), 1);
    /// ```
    pub fn server() -> Self {
        SessionConfig {
            max_stream_window: 4 * 1024 * 1024,
            accept_backlog: 1,
            keepalive: Some(Duration::from_secs(15)),
            keepalive_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            max_streams: 1024,
            handshake_timeout: Duration::from_secs(10),
            stream_close_timeout: backchannel_yamux::Config::default().stream_close_timeout(),
            // Windows are granted per stream, not against the budget: it
            // must cover the windows of the streams a healthy session runs
            // at once (see the table above).
            max_buffered: 256 << 20,
            max_auto_window: 16 << 20,
        }
    }

    /// Defaults for the client role.
    ///
    /// ```
    /// let c = backchannel::SessionConfig::client();
    /// assert_eq!(c.accept_backlog(), 256);
    /// ```
    pub fn client() -> Self {
        SessionConfig {
            accept_backlog: 256,
            max_streams: 256,
            ..Self::server()
        }
    }

    /// Largest receive window per stream, in bytes.
    pub fn max_stream_window(&self) -> u32 {
        self.max_stream_window
    }

    /// Sets the per-stream receive window (at least 256 KiB, the protocol's
    /// initial window).
    ///
    /// ```
    /// let c = backchannel::SessionConfig::client().with_window(256 * 1024);
    /// assert_eq!(c.max_stream_window(), 256 * 1024);
    /// ```
    pub fn with_window(mut self, bytes: u32) -> Self {
        self.max_stream_window = bytes.max(backchannel_yamux::frame::INITIAL_WINDOW);
        self
    }

    /// How many peer-opened streams may wait to be accepted.
    pub fn accept_backlog(&self) -> usize {
        self.accept_backlog
    }

    /// Sets [`accept_backlog`](Self::accept_backlog) (at least 1).
    pub fn with_accept_backlog(mut self, n: usize) -> Self {
        self.accept_backlog = n.max(1);
        self
    }

    /// Interval of yamux pings; `None`: keepalive off (the peer's pings are
    /// still answered).
    pub fn keepalive(&self) -> Option<Duration> {
        self.keepalive
    }

    /// Sets [`keepalive`](Self::keepalive).
    pub fn with_keepalive(mut self, interval: Option<Duration>) -> Self {
        self.keepalive = interval;
        self
    }

    /// A ping unanswered for this long ends the session.
    pub fn keepalive_timeout(&self) -> Duration {
        self.keepalive_timeout
    }

    /// Sets [`keepalive_timeout`](Self::keepalive_timeout).
    pub fn with_keepalive_timeout(mut self, timeout: Duration) -> Self {
        self.keepalive_timeout = timeout;
        self
    }

    /// How long a write to the connection may block before the session is
    /// considered dead.
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// Sets [`write_timeout`](Self::write_timeout).
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// After we closed our half of a stream, how long the peer may keep its
    /// half open before the stream is reset and freed (hashicorp's
    /// `StreamCloseTimeout`; 5 min, as Gitaly).
    pub fn stream_close_timeout(&self) -> Duration {
        self.stream_close_timeout
    }

    /// Sets [`stream_close_timeout`](Self::stream_close_timeout).
    pub fn with_stream_close_timeout(mut self, timeout: Duration) -> Self {
        self.stream_close_timeout = timeout;
        self
    }

    /// Most bytes the session holds for its streams' readers, whatever the
    /// peer sends (256 MiB); past it, the stream holding the most unread data
    /// is reset.
    pub fn max_buffered(&self) -> usize {
        self.max_buffered
    }

    /// Sets [`max_buffered`](Self::max_buffered).
    pub fn with_max_buffered(mut self, bytes: usize) -> Self {
        self.max_buffered = bytes;
        self
    }

    /// Largest receive window a stream's window may grow to while it limits
    /// the stream (16 MiB; at most the stream window: no growth).
    pub fn max_auto_window(&self) -> u32 {
        self.max_auto_window
    }

    /// Sets [`max_auto_window`](Self::max_auto_window).
    ///
    /// ```
    /// let c = backchannel::SessionConfig::server().with_max_auto_window(0);
    /// assert_eq!(c.max_auto_window(), 0);
    /// ```
    pub fn with_max_auto_window(mut self, bytes: u32) -> Self {
        self.max_auto_window = bytes;
        self
    }

    /// Most streams open at once in the session.
    pub fn max_streams(&self) -> usize {
        self.max_streams
    }

    /// Sets [`max_streams`](Self::max_streams) (at least 1).
    pub fn with_max_streams(mut self, n: usize) -> Self {
        self.max_streams = n.max(1);
        self
    }

    /// Server: how long the client may take to open stream 1 after the
    /// magic. Client: the bound on each handshake step after the socket is
    /// connected (TLS, magic, HTTP/2 setup), each reported on its own.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    pub(crate) fn yamux(&self) -> backchannel_yamux::Config {
        backchannel_yamux::Config::default()
            .with_max_stream_window(self.max_stream_window)
            .with_accept_backlog(self.accept_backlog.max(1))
            .with_max_streams(self.max_streams.max(1))
            .with_keepalive(self.keepalive)
            .with_keepalive_timeout(self.keepalive_timeout)
            .with_write_timeout(self.write_timeout)
            .with_stream_close_timeout(self.stream_close_timeout)
            .with_max_buffered(self.max_buffered)
            .with_max_auto_window(self.max_auto_window)
    }
}
