//! Raw tokio-yamux sessions for the transport-only and A/B paths.
//!
//! The `proto-base` / `proto-vec` paths run tonic over a bare session with
//! backchannel's `YamuxStream`, with coalescing of vectored writes off / on,
//! to measure what coalescing gains (it is on by default in the library).

use backchannel::YamuxStream;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_yamux::{session::SessionType, Session, StreamHandle};

/// The yamux settings of `backchannel::SessionConfig::{client,server}()`
/// (4 MiB windows), or `window` bytes.
pub fn config(window: u32, backlog: usize) -> tokio_yamux::Config {
    tokio_yamux::Config {
        accept_backlog: backlog,
        enable_keepalive: false,
        keepalive_interval: std::time::Duration::from_secs(30),
        connection_write_timeout: std::time::Duration::from_secs(10),
        max_stream_count: 1024,
        max_stream_window_size: window.max(tokio_yamux::config::INITIAL_STREAM_WINDOW),
    }
}

/// Runs a session in a task; returns its control and a receiver of the
/// streams the peer opens.
pub fn spawn_session<T>(
    io: T,
    cfg: tokio_yamux::Config,
    ty: SessionType,
) -> (
    tokio_yamux::Control,
    tokio::sync::mpsc::UnboundedReceiver<StreamHandle>,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut session = Session::new(io, cfg, ty);
    let control = session.control();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(stream)) = session.next().await {
            let _ = tx.send(stream);
        }
    });
    (control, rx)
}

/// A client-side stream for the raw paths: backchannel's [`YamuxStream`]
/// (with its stall fix), with coalescing of vectored writes on or off, as a
/// connection tonic can serve.
pub fn raw_stream(inner: StreamHandle, vectored: bool) -> RawStream {
    let mut s = YamuxStream::from(inner);
    s.set_coalesce_writes(vectored);
    s
}

/// The stream type of the raw paths.
pub type RawStream = YamuxStream;
