//! Error types.

use crate::PeerId;

/// Errors of the backchannel library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting, reading or writing the underlying connection failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The yamux session ended (or was closed).
    #[error("the backchannel session is closed")]
    SessionClosed,
    /// A yamux stream could not be opened.
    #[error(transparent)]
    Open(#[from] backchannel_yamux::OpenError),
    /// The peer did not complete the handshake in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Setting up the gRPC channel over the session failed.
    #[error("grpc channel: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The registry has no backchannel for this peer.
    #[error("no backchannel for peer {0}")]
    NoBackchannel(PeerId),
    /// The server already has as many peers as it accepts.
    #[error("peer limit of {0} reached")]
    PeerLimit(usize),
    /// The request did not arrive over a multiplexed (backchannel) connection.
    #[error(transparent)]
    NotMultiplexed(#[from] NotMultiplexed),
}

/// A request arrived on a plain (non-multiplexed) connection, so its caller
/// has no backchannel. Maps to `FAILED_PRECONDITION`, as in Gitaly.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("non-multiplexed connection")]
pub struct NotMultiplexed;

impl From<NotMultiplexed> for tonic::Status {
    fn from(e: NotMultiplexed) -> Self {
        tonic::Status::failed_precondition(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::NotMultiplexed(e) => e.into(),
            Error::NoBackchannel(_) => tonic::Status::unavailable(e.to_string()),
            other => tonic::Status::unavailable(other.to_string()),
        }
    }
}
