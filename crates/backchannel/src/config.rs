//! yamux session settings.

use std::time::Duration;

/// Settings of one yamux session, for either role.
///
/// The defaults are chosen for gRPC over loopback and LAN links and to stay
/// interoperable with Gitaly's Go peers (hashicorp/yamux):
///
/// | field | server default | client default | why |
/// |---|---|---|---|
/// | `max_stream_window` | 4 MiB | 4 MiB | a 256 KiB window caps a stream at 256 KiB per round trip; 4 MiB keeps loopback streams at full speed while bounding what one stalled stream can buffer (Gitaly's server uses 16 MiB and saw memory balloon) |
/// | `accept_backlog` | 1 | 256 | the server accepts exactly one client stream; the client accepts one stream per reverse connection |
/// | `keepalive` | 15 s | 15 s | detects a silent peer without gRPC keepalive; hashicorp answers pings even with its own keepalive off |
/// | `keepalive_timeout` | 30 s | 30 s | a ping unanswered this long ends the session |
/// | `write_timeout` | 10 s | 10 s | yamux's safety valve for a connection that stops draining |
/// | `handshake_timeout` | 10 s | 10 s | server: how long a client may take to open stream 1 and send the HTTP/2 preface and SETTINGS on it (only then is it a peer); client: how long the connect and stream 1 may take |
/// | `max_streams` | 1024 | 256 | server: reverse-channel streams it may open; client: each server-opened stream is an HTTP/2 connection with its own buffers, so a server is not allowed thousands |
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Largest receive window per stream, in bytes (at least 256 KiB, the
    /// protocol's initial window).
    pub max_stream_window: u32,
    /// How many peer-opened streams may wait to be accepted.
    pub accept_backlog: usize,
    /// Interval of yamux pings; `None` turns keepalive off (the peer's pings
    /// are still answered).
    pub keepalive: Option<Duration>,
    /// A ping unanswered for this long ends the session.
    pub keepalive_timeout: Duration,
    /// How long a write to the connection may block before the session is
    /// considered dead.
    pub write_timeout: Duration,
    /// Most streams open at once in the session.
    pub max_streams: usize,
    /// Server: how long the client may take, after the magic, to open stream 1
    /// and send the HTTP/2 preface and SETTINGS on it.
    /// Client: how long the connect and stream 1 may take.
    pub handshake_timeout: Duration,
}

impl SessionConfig {
    /// Defaults for the server role.
    ///
    /// ```
    /// let c = backchannel::SessionConfig::server();
    /// assert_eq!(c.accept_backlog, 1);
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
        }
    }

    /// Defaults for the client role.
    ///
    /// ```
    /// let c = backchannel::SessionConfig::client();
    /// assert_eq!(c.accept_backlog, 256);
    /// ```
    pub fn client() -> Self {
        SessionConfig {
            accept_backlog: 256,
            max_streams: 256,
            ..Self::server()
        }
    }

    /// Sets the per-stream receive window.
    ///
    /// ```
    /// let c = backchannel::SessionConfig::client().with_window(256 * 1024);
    /// assert_eq!(c.max_stream_window, 256 * 1024);
    /// ```
    pub fn with_window(mut self, bytes: u32) -> Self {
        self.max_stream_window = bytes.max(backchannel_yamux::frame::INITIAL_WINDOW);
        self
    }

    pub(crate) fn yamux(&self) -> backchannel_yamux::Config {
        backchannel_yamux::Config {
            max_stream_window: self.max_stream_window,
            accept_backlog: self.accept_backlog.max(1),
            max_streams: self.max_streams.max(1),
            keepalive: self.keepalive,
            keepalive_timeout: self.keepalive_timeout,
            write_timeout: self.write_timeout,
        }
    }
}
