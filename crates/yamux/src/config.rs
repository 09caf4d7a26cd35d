//! Session settings.

use std::time::Duration;

use crate::frame::INITIAL_WINDOW;

/// Which end of the connection this session is: clients open odd stream
/// IDs, servers even ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The dialing side (odd stream IDs, starting at 1).
    Client,
    /// The accepting side (even stream IDs, starting at 2).
    Server,
}

/// Settings of one session.
///
/// ```
/// let c = backchannel_yamux::Config { accept_backlog: 1, ..Default::default() };
/// assert_eq!(c.max_stream_window, 256 * 1024);
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    /// Receive window of each stream, in bytes; at least 256 KiB (the
    /// initial window of the protocol). The extra is announced with the
    /// stream's SYN or ACK.
    pub max_stream_window: u32,
    /// Peer-opened streams that may wait to be accepted; more are reset.
    pub accept_backlog: usize,
    /// Most streams open at once (both directions, including streams whose
    /// handle was dropped while the peer still had its half open).
    pub max_streams: usize,
    /// Interval of keepalive pings; `None`: no pings of our own (pings from
    /// the peer are always answered).
    pub keepalive: Option<Duration>,
    /// A ping unanswered for this long ends the session.
    pub keepalive_timeout: Duration,
    /// A write to the transport blocked for this long ends the session.
    pub write_timeout: Duration,
}

impl Default for Config {
    /// hashicorp/yamux's defaults: 256 KiB windows, backlog 256, keepalive
    /// every 30 s, 10 s write timeout.
    fn default() -> Self {
        Config {
            max_stream_window: INITIAL_WINDOW,
            accept_backlog: 256,
            max_streams: 8192,
            keepalive: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    pub(crate) fn window(&self) -> u32 {
        self.max_stream_window.max(INITIAL_WINDOW)
    }
}
