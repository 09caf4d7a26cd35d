//! Runs a yamux session in a task of its own.

use std::time::Duration;

use futures::StreamExt;
use listenmux::Io;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_yamux::{session::SessionType, Session};
use tracing::{debug, Instrument, Span};

use crate::{config::SessionConfig, stream::YamuxStream, Error};

/// A handle to a running yamux session: opens streams, closes the session,
/// waits for it to end. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    control: tokio_yamux::Control,
    close: CancellationToken,
    done: CancellationToken,
    open_timeout: Duration,
}

impl SessionHandle {
    /// Opens a new stream to the peer.
    pub(crate) async fn open_stream(&self) -> Result<YamuxStream, Error> {
        if self.done.is_cancelled() || self.close.is_cancelled() {
            return Err(Error::SessionClosed);
        }
        let mut control = self.control.clone();
        tokio::select! {
            r = control.open_stream() => Ok(YamuxStream::new(r?)),
            _ = self.done.cancelled() => Err(Error::SessionClosed),
            _ = tokio::time::sleep(self.open_timeout) => Err(Error::HandshakeTimeout),
        }
    }

    /// Asks the session to end (GoAway, then the connection is dropped).
    /// Idempotent.
    pub(crate) fn close(&self) {
        self.close.cancel();
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

/// Starts a session over `io`. Streams the peer opens arrive on the returned
/// receiver; when it is full or dropped, they are reset.
pub(crate) fn spawn<T: Io>(
    io: T,
    config: &SessionConfig,
    ty: SessionType,
    span: Span,
) -> (SessionHandle, mpsc::Receiver<YamuxStream>) {
    let session = Session::new(io, config.yamux(), ty);
    let handle = SessionHandle {
        control: session.control(),
        close: CancellationToken::new(),
        done: CancellationToken::new(),
        open_timeout: config.handshake_timeout,
    };
    let (tx, rx) = mpsc::channel(config.accept_backlog.max(1));
    tokio::spawn(drive(session, tx, handle.close.clone(), handle.done.clone()).instrument(span));
    (handle, rx)
}

async fn drive<T: Io>(
    mut session: Session<T>,
    inbound: mpsc::Sender<YamuxStream>,
    close: CancellationToken,
    done: CancellationToken,
) {
    let _done = DoneOnDrop(done);
    loop {
        tokio::select! {
            _ = close.cancelled() => {
                debug!("closing yamux session");
                // Best effort GoAway; the connection is dropped right after, so
                // the peer sees the end either way.
                futures::future::poll_fn(|cx| {
                    let _ = session.shutdown(cx);
                    std::task::Poll::Ready(())
                })
                .await;
                break;
            }
            item = session.next() => match item {
                Some(Ok(stream)) => {
                    let stream = YamuxStream::new(stream);
                    let id = stream.id();
                    if inbound.try_send(stream).is_err() {
                        debug!(stream = id, "peer-opened stream refused (not accepted here or backlog full)");
                    }
                }
                Some(Err(err)) => {
                    debug!(error = %err, "yamux session failed");
                    break;
                }
                None => {
                    debug!("yamux session ended");
                    break;
                }
            }
        }
    }
}

struct DoneOnDrop(CancellationToken);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
