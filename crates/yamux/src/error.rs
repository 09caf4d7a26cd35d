//! Errors.

use std::io;

use crate::frame::HeaderError;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// Reading or writing the transport failed.
    #[error("yamux transport: {0}")]
    Io(#[from] io::Error),
    /// The peer sent a frame that breaks the protocol; a GoAway with the
    /// protocol-error code was sent.
    #[error("yamux protocol error: {0}")]
    Protocol(ProtocolViolation),
    /// The peer did not answer a ping in time.
    #[error("yamux keepalive: no pong within {0:?}")]
    KeepaliveTimeout(std::time::Duration),
    /// The transport accepted no bytes for too long.
    #[error("yamux write timed out after {0:?}")]
    WriteTimeout(std::time::Duration),
    /// The peer closed the transport without a GoAway. This is how a
    /// hashicorp/yamux peer ends a session normally (its `Close()` sends no
    /// GoAway): see [`is_normal_end`](Self::is_normal_end).
    #[error("yamux: the peer closed the connection")]
    ClosedByPeer,
    /// The peer sent GoAway with an error code (1: protocol error, 2:
    /// internal error), which ends the session at once.
    #[error("yamux: the peer went away with error code {0}")]
    GoAwayError(u32),
    /// The [`Config`](crate::Config) was invalid; the session never started.
    #[error("yamux configuration: {0}")]
    Config(#[from] ConfigError),
}

impl SessionError {
    /// Whether this is how a healthy peer ends a session: it closed the
    /// connection without a GoAway, as hashicorp/yamux's `Close()` does.
    ///
    /// ```
    /// use backchannel_yamux::SessionError;
    /// assert!(SessionError::ClosedByPeer.is_normal_end());
    /// assert!(!SessionError::GoAwayError(1).is_normal_end());
    /// ```
    pub fn is_normal_end(&self) -> bool {
        matches!(self, SessionError::ClosedByPeer)
    }

    /// What streams of a session that ended this way report.
    pub(crate) fn end_reason(&self) -> EndReason {
        match self {
            SessionError::Io(_) => EndReason::Transport,
            SessionError::Protocol(_) => EndReason::ProtocolError,
            SessionError::KeepaliveTimeout(_) => EndReason::KeepaliveTimeout,
            SessionError::WriteTimeout(_) => EndReason::WriteTimeout,
            SessionError::ClosedByPeer => EndReason::ClosedByPeer,
            SessionError::GoAwayError(c) => EndReason::GoAwayError(*c),
            SessionError::Config(_) => EndReason::Config,
        }
    }
}

/// How a session ended, as its streams see it (see [`StreamError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndReason {
    /// Closed by us (`Control::close`, or every handle dropped), or by the
    /// peer with a normal GoAway.
    #[error("the session was closed")]
    Closed,
    /// The peer closed the transport without a GoAway.
    #[error("the peer closed the connection")]
    ClosedByPeer,
    /// The peer sent GoAway with this error code.
    #[error("the peer went away with error code {0}")]
    GoAwayError(u32),
    /// The transport failed.
    #[error("the transport failed")]
    Transport,
    /// A protocol error (ours to report: we sent GoAway).
    #[error("protocol error")]
    ProtocolError,
    /// The transport accepted no bytes for the write timeout.
    #[error("write timeout")]
    WriteTimeout,
    /// A ping went unanswered.
    #[error("keepalive timeout")]
    KeepaliveTimeout,
    /// The configuration was invalid.
    #[error("invalid configuration")]
    Config,
}

/// Why a stream read or write failed: the inner error of the `io::Error`
/// that [`Stream`](crate::Stream) returns (get it with
/// [`StreamError::of`]), so callers can tell transport loss by cause.
///
/// ```
/// use backchannel_yamux::StreamError;
/// let e: std::io::Error = StreamError::ResetByPeer.into();
/// assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
/// assert_eq!(StreamError::of(&e), Some(&StreamError::ResetByPeer));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer reset the stream (RST). `ConnectionReset`.
    #[error("the yamux stream was reset by the peer")]
    ResetByPeer,
    /// We reset the stream: its close timeout passed, or the session's
    /// buffer budget was exhausted. `ConnectionReset`.
    #[error("the yamux stream was reset: {0}")]
    ResetLocally(ResetReason),
    /// Write after `shutdown`. `BrokenPipe`.
    #[error("write after shutdown of the yamux stream")]
    WriteAfterShutdown,
    /// The session is closing (GoAway sent): no more data. `BrokenPipe`.
    #[error("the yamux session is closing")]
    SessionClosing,
    /// The session has ended. `ConnectionAborted`.
    #[error("the yamux session ended: {0}")]
    SessionEnded(EndReason),
}

/// Why we reset a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResetReason {
    /// The peer kept its half open past the stream close timeout.
    #[error("close timeout")]
    CloseTimeout,
    /// Its data did not fit the session's receive buffer budget.
    #[error("receive buffer budget exhausted")]
    BufferBudget,
    /// Our side called [`Stream::reset`](crate::Stream::reset) (its work
    /// failed: the peer must not take the end for a clean one).
    #[error("reset by this side")]
    Requested,
}

impl StreamError {
    /// The `io::ErrorKind` the stream reports this with.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            StreamError::ResetByPeer | StreamError::ResetLocally(_) => {
                io::ErrorKind::ConnectionReset
            }
            StreamError::WriteAfterShutdown | StreamError::SessionClosing => {
                io::ErrorKind::BrokenPipe
            }
            StreamError::SessionEnded(_) => io::ErrorKind::ConnectionAborted,
        }
    }

    /// The `StreamError` inside an `io::Error` from a [`Stream`](crate::Stream),
    /// if it is one.
    pub fn of(e: &io::Error) -> Option<&StreamError> {
        e.get_ref()?.downcast_ref()
    }
}

impl From<StreamError> for io::Error {
    fn from(e: StreamError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// An invalid [`Config`](crate::Config).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A duration beyond [`Config::MAX_DURATION`](crate::Config::MAX_DURATION).
    #[error("{name} of {value:?} exceeds the maximum of {max:?}")]
    TooLong {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: std::time::Duration,
        /// The largest value allowed.
        max: std::time::Duration,
    },
    /// The buffer budget is smaller than one stream's receive window.
    #[error("max_buffered ({budget}) is below the stream window ({window})")]
    BudgetBelowWindow {
        /// The budget.
        budget: usize,
        /// The window.
        window: u32,
    },
}

/// What the peer did wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// An undecodable header.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Data beyond the stream's receive window.
    #[error("stream {stream} sent {len} bytes with a receive window of {window}")]
    WindowExceeded {
        /// The stream.
        stream: u32,
        /// Bytes in the frame.
        len: u32,
        /// What was left of the window.
        window: u32,
    },
    /// A window update that overflows the send window.
    #[error("stream {0}: send window overflow")]
    WindowOverflow(u32),
    /// A SYN for a stream ID that is open.
    #[error("stream {0} opened twice")]
    DuplicateStream(u32),
    /// A frame for a stream that was never opened.
    #[error("frame for stream {0}, which was never opened")]
    NeverOpened(u32),
    /// A SYN with an ID of our parity (or 0).
    #[error("peer opened stream {0}, an ID it may not use")]
    BadStreamId(u32),
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The session has ended or is closing.
    #[error("the yamux session is closed")]
    SessionClosed,
    /// The peer sent GoAway: it accepts no new streams.
    #[error("the peer is going away and accepts no new streams")]
    RemoteGoAway,
    /// `max_streams` streams are open.
    #[error("too many yamux streams ({0})")]
    TooManyStreams(usize),
    /// All stream IDs of this side are used.
    #[error("yamux stream IDs exhausted")]
    IdsExhausted,
}
