//! Session settings.

use std::time::Duration;

use crate::{error::ConfigError, frame::INITIAL_WINDOW};

/// Which end of the connection this session is: clients open odd stream
/// IDs, servers even ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The dialing side (odd stream IDs, starting at 1).
    Client,
    /// The accepting side (even stream IDs, starting at 2).
    Server,
}

/// Settings of one session, built from [`Config::default`] with setters.
///
/// [`session`](crate::session) checks them with [`Config::validate`]; a
/// session with invalid settings ends at once with
/// [`SessionError::Config`](crate::SessionError::Config).
///
/// ```
/// use std::time::Duration;
/// let c = backchannel_yamux::Config::default()
///     .with_accept_backlog(1)
///     .with_keepalive(Some(Duration::from_secs(15)));
/// assert_eq!(c.max_stream_window(), 256 * 1024);
/// assert!(c.validate().is_ok());
/// assert!(c.with_keepalive(Some(Duration::ZERO)).validate().is_err());
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    max_stream_window: u32,
    accept_backlog: usize,
    max_streams: usize,
    keepalive: Option<Duration>,
    keepalive_timeout: Duration,
    write_timeout: Duration,
    stream_close_timeout: Duration,
    max_buffered: usize,
    max_auto_window: u32,
    rtt_probe: bool,
}

impl Default for Config {
    /// hashicorp/yamux's defaults: 256 KiB windows, backlog 256, keepalive
    /// every 30 s, 10 s write timeout, 5 min stream close timeout; at most
    /// 8192 streams and 32 MiB of received data buffered per session.
    fn default() -> Self {
        Config {
            max_stream_window: INITIAL_WINDOW,
            accept_backlog: 256,
            max_streams: 8192,
            keepalive: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            stream_close_timeout: Duration::from_secs(300),
            max_buffered: 32 * 1024 * 1024,
            max_auto_window: 0,
            rtt_probe: true,
        }
    }
}

impl Config {
    /// The longest duration a setting may have (one year): longer ones
    /// would overflow the clock.
    pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

    /// Receive window of each stream, in bytes; at least 256 KiB (the
    /// initial window of the protocol: smaller values count as 256 KiB).
    /// The extra is announced with the stream's SYN or ACK.
    pub fn with_max_stream_window(mut self, bytes: u32) -> Self {
        self.max_stream_window = bytes;
        self
    }

    /// Peer-opened streams that may wait to be accepted; more are reset
    /// (at least 1).
    pub fn with_accept_backlog(mut self, streams: usize) -> Self {
        self.accept_backlog = streams;
        self
    }

    /// Most streams open at once (both directions, including streams whose
    /// handle was dropped while the peer still had its half open); at
    /// least 1.
    pub fn with_max_streams(mut self, streams: usize) -> Self {
        self.max_streams = streams;
        self
    }

    /// Interval of keepalive pings; `None`: no pings of our own (pings from
    /// the peer are always answered).
    pub fn with_keepalive(mut self, interval: Option<Duration>) -> Self {
        self.keepalive = interval;
        self
    }

    /// A ping unanswered for this long ends the session.
    pub fn with_keepalive_timeout(mut self, timeout: Duration) -> Self {
        self.keepalive_timeout = timeout;
        self
    }

    /// Writing to the transport stalled (no byte accepted, or a flush not
    /// completing) for this long without a break ends the session. Closing
    /// the transport after a GoAway is bounded by it too.
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// After a stream's handle is dropped (FIN sent), the peer has this long
    /// to close its half; then the stream is reset and forgotten
    /// (hashicorp/yamux's `StreamCloseTimeout`).
    pub fn with_stream_close_timeout(mut self, timeout: Duration) -> Self {
        self.stream_close_timeout = timeout;
        self
    }

    /// Most bytes of received data the session holds for its streams (the
    /// memory it pins for them, see the crate docs). Data that would go
    /// beyond it resets its stream. At least the stream window.
    pub fn with_max_buffered(mut self, bytes: usize) -> Self {
        self.max_buffered = bytes;
        self
    }

    /// Lets a stream's receive window grow past the stream window, up to
    /// `bytes`, while the window is what limits it: when half the window is
    /// read in less than two round trips, the window doubles (announced in
    /// the window update, as the protocol allows). All the growth of a
    /// session's streams together stays within a quarter of the buffer budget. At
    /// most the stream window (the default): no growth.
    pub fn with_max_auto_window(mut self, bytes: u32) -> Self {
        self.max_auto_window = bytes;
        self
    }

    /// Sends one ping as soon as the session starts, so the round-trip time
    /// is known before the first keepalive (on by default; keepalive pings
    /// measure it after that). See [`Control::stats`](crate::Control::stats).
    pub fn with_rtt_probe(mut self, on: bool) -> Self {
        self.rtt_probe = on;
        self
    }

    /// See [`with_max_auto_window`](Self::with_max_auto_window).
    pub fn max_auto_window(&self) -> u32 {
        self.max_auto_window.max(self.window())
    }

    /// See [`with_rtt_probe`](Self::with_rtt_probe).
    pub fn rtt_probe(&self) -> bool {
        self.rtt_probe
    }

    /// See [`with_max_stream_window`](Self::with_max_stream_window).
    pub fn max_stream_window(&self) -> u32 {
        self.max_stream_window
    }

    /// See [`with_accept_backlog`](Self::with_accept_backlog).
    pub fn accept_backlog(&self) -> usize {
        self.accept_backlog
    }

    /// See [`with_max_streams`](Self::with_max_streams).
    pub fn max_streams(&self) -> usize {
        self.max_streams
    }

    /// See [`with_keepalive`](Self::with_keepalive).
    pub fn keepalive(&self) -> Option<Duration> {
        self.keepalive
    }

    /// See [`with_keepalive_timeout`](Self::with_keepalive_timeout).
    pub fn keepalive_timeout(&self) -> Duration {
        self.keepalive_timeout
    }

    /// See [`with_write_timeout`](Self::with_write_timeout).
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// See [`with_stream_close_timeout`](Self::with_stream_close_timeout).
    pub fn stream_close_timeout(&self) -> Duration {
        self.stream_close_timeout
    }

    /// See [`with_max_buffered`](Self::with_max_buffered).
    pub fn max_buffered(&self) -> usize {
        self.max_buffered
    }

    /// Checks the settings: every duration positive and at most
    /// [`MAX_DURATION`](Self::MAX_DURATION), the buffer budget at least the
    /// stream window.
    ///
    /// ```
    /// use std::time::Duration;
    /// use backchannel_yamux::{Config, ConfigError};
    /// let c = Config::default().with_write_timeout(Duration::MAX);
    /// assert!(matches!(c.validate(), Err(ConfigError::TooLong { name: "write_timeout", .. })));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut durations = vec![
            ("keepalive_timeout", self.keepalive_timeout),
            ("write_timeout", self.write_timeout),
            ("stream_close_timeout", self.stream_close_timeout),
        ];
        if let Some(k) = self.keepalive {
            durations.push(("keepalive", k));
        }
        for (name, value) in durations {
            if value.is_zero() {
                return Err(ConfigError::Zero(name));
            }
            if value > Self::MAX_DURATION {
                return Err(ConfigError::TooLong {
                    name,
                    value,
                    max: Self::MAX_DURATION,
                });
            }
        }
        if self.max_buffered < self.window() as usize {
            return Err(ConfigError::BudgetBelowWindow {
                budget: self.max_buffered,
                window: self.window(),
            });
        }
        Ok(())
    }

    pub(crate) fn window(&self) -> u32 {
        self.max_stream_window.max(INITIAL_WINDOW)
    }
}
