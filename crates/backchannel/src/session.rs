//! Runs a yamux session in a task of its own.

use backchannel_yamux::{Control, Incoming, Mode};
use listenmux::Io;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument, Span};

use crate::{config::SessionConfig, stream::YamuxStream, Error};

/// A handle to a running yamux session: opens streams, closes the session,
/// waits for it to end. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    control: Control,
    done: CancellationToken,
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

    /// Whether the session has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.done.is_cancelled()
    }

    /// Completes when the session has ended, for whatever reason.
    pub(crate) async fn closed(&self) {
        self.done.cancelled().await
    }

    pub(crate) fn done_token(&self) -> CancellationToken {
        self.done.clone()
    }
}

/// Closes the session when dropped.
pub(crate) struct CloseOnDrop(pub(crate) SessionHandle);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Starts a session over `io` in a task of its own (instrumented with
/// `span`). Streams the peer opens arrive on the returned [`Incoming`]; when
/// its backlog is full, or it is dropped, they are reset.
pub(crate) fn spawn<T: Io>(
    io: T,
    config: &SessionConfig,
    mode: Mode,
    span: Span,
) -> (SessionHandle, Incoming) {
    let (control, incoming, connection) = backchannel_yamux::session(io, config.yamux(), mode);
    let done = CancellationToken::new();
    let handle = SessionHandle {
        control,
        done: done.clone(),
    };
    tokio::spawn(
        async move {
            let _done = DoneOnDrop(done);
            match connection.await {
                Ok(()) => debug!("yamux session ended"),
                Err(err) => debug!(error = %err, "yamux session failed"),
            }
        }
        .instrument(span),
    );
    (handle, incoming)
}

struct DoneOnDrop(CancellationToken);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
