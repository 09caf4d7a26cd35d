//! Errors.

use std::io;

use crate::frame::HeaderError;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
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
    /// The peer closed the transport without a GoAway.
    #[error("yamux: the peer closed the connection")]
    ClosedByPeer,
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
