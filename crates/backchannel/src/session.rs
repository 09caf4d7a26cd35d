//! Runs a yamux session in a task of its own.

use backchannel_yamux::{Control, Incoming, Mode, SessionError};
use listenmux::Io;
use tracing::{Instrument, Span};

use crate::{config::SessionConfig, stream::YamuxStream, Error};

/// A handle to a running yamux session: opens streams, closes the session,
/// waits for it to end. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    control: Control,
}

impl SessionHandle {
    /// Opens a new stream to the peer (at once: yamux needs no round trip).
    pub(crate) fn open_stream(&self) -> Result<YamuxStream, Error> {
        Ok(self.control.open_stream()?)
    }

    /// Asks the session to end (GoAway, then the connection is closed).
    /// Idempotent.
    pub(crate) fn close(&self) {
        self.control.close();
    }

    /// The session's flow statistics.
    pub(crate) fn stats(&self) -> crate::SessionStats {
        self.control.stats()
    }

    /// Whether the session has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.control.is_closed()
    }

    /// Completes when the session has ended, for whatever reason.
    pub(crate) async fn closed(&self) {
        self.control.closed().await
    }

    /// [`closed`](Self::closed) as a `'static` future that does not keep
    /// the session open.
    pub(crate) fn closed_owned(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.control.closed_owned()
    }
}

/// Closes the session when dropped.
#[derive(Debug)]
pub(crate) struct CloseOnDrop(pub(crate) SessionHandle);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// How a session ended: `Ok` after a GoAway from either side, or the error
/// that ended it.
pub(crate) type SessionEnd = tokio::sync::oneshot::Receiver<Result<(), SessionError>>;

/// Starts a session over `io` in a task of its own (instrumented with
/// `span`). Streams the peer opens arrive on the returned [`Incoming`]; when
/// its backlog is full, or it is dropped, they are reset.
pub(crate) fn spawn<T: Io>(
    io: T,
    config: &SessionConfig,
    mode: Mode,
    span: Span,
) -> (SessionHandle, Incoming, SessionEnd) {
    let (control, incoming, connection) = backchannel_yamux::session(io, config.yamux(), mode);
    let (tx, rx) = tokio::sync::oneshot::channel();
    // The connection logs how the session ended, inside `span`.
    tokio::spawn(
        async move {
            let _ = tx.send(connection.await);
        }
        .instrument(span),
    );
    (SessionHandle { control }, incoming, rx)
}
