//! Error types.

use std::{fmt, io, time::Duration};

use crate::PeerId;

/// A step of establishing a backchannel session, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Connecting the TCP (or Unix) socket.
    Connect,
    /// The TLS handshake.
    Tls,
    /// Writing the 11 magic bytes.
    Magic,
    /// Starting the yamux session and its first stream.
    Yamux,
    /// Setting up the HTTP/2 connection over the first stream.
    Http2,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::Tls => "TLS handshake",
            Step::Magic => "magic",
            Step::Yamux => "yamux session",
            Step::Http2 => "HTTP/2 setup",
        })
    }
}

/// Errors of the backchannel library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connecting the socket failed.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// What was dialled (`host:port` or a socket path).
        target: String,
        /// The socket error.
        source: io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(#[source] io::Error),
    /// Writing the magic bytes failed.
    #[error("writing the backchannel magic: {0}")]
    Magic(#[source] io::Error),
    /// A step did not complete in time.
    #[error("{step} timed out after {after:?}")]
    Timeout {
        /// The step that timed out.
        step: Step,
        /// How long it was given.
        after: Duration,
    },
    /// A yamux stream could not be opened.
    #[error("yamux: {0}")]
    Open(#[from] backchannel_yamux::OpenError),
    /// Setting up the HTTP/2 (gRPC) connection over the session failed.
    #[error("HTTP/2 setup: {0}")]
    Http2(#[source] tonic::transport::Error),
    /// The authority for the forward channel is not a valid URI authority.
    #[error("invalid authority {authority:?}: {source}")]
    InvalidAuthority {
        /// The authority as given.
        authority: String,
        /// Why it does not parse.
        source: http::uri::InvalidUri,
    },
    /// The yamux session ended (or was closed).
    #[error("the backchannel session is closed")]
    SessionClosed,
    /// A reconnecting client has no session at the moment; it is dialling.
    #[error("not connected to the server (reconnecting)")]
    NotConnected,
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

impl Error {
    /// The handshake step this error comes from, if it is a handshake error.
    ///
    /// ```
    /// use backchannel::{Error, Step};
    /// let e = Error::Timeout { step: Step::Tls, after: std::time::Duration::from_secs(1) };
    /// assert_eq!(e.step(), Some(Step::Tls));
    /// assert_eq!(e.to_string(), "TLS handshake timed out after 1s");
    /// ```
    pub fn step(&self) -> Option<Step> {
        match self {
            Error::Connect { .. } => Some(Step::Connect),
            Error::Tls(_) => Some(Step::Tls),
            Error::Magic(_) => Some(Step::Magic),
            Error::Timeout { step, .. } => Some(*step),
            Error::Open(_) => Some(Step::Yamux),
            Error::Http2(_) => Some(Step::Http2),
            _ => None,
        }
    }
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
            Error::InvalidAuthority { .. } => tonic::Status::invalid_argument(e.to_string()),
            other => tonic::Status::unavailable(other.to_string()),
        }
    }
}
