//! Raw inbound streams: a client option that hands every yamux stream the
//! server opens to a handler, instead of serving it with the client's tonic
//! server.
//!
//! A sidecar agent uses it to splice the server's HTTP/2 connections
//! straight onto connections to a local service, without terminating
//! HTTP/2 itself.

use std::sync::Arc;

use crate::{inbound::InboundStream, ClientBuilder};

/// A handler for the streams the server opens on a client's session that
/// are neither sidechannels nor tunnels (their first bytes, read to tell,
/// are replayed by the [`InboundStream`]).
///
/// The handler is called once per stream, on the stream's task: it must
/// not block (spawn a task for the stream's work). Dropping the stream
/// resets it. Streams are told apart by their first bytes, so the opener
/// must speak first (HTTP/2 does: its preface): a stream that sends nothing
/// within the session's handshake timeout, or closes before its first
/// byte, is closed without reaching the handler.
///
/// ```
/// let raw = backchannel::RawStreams::new(|stream: backchannel::InboundStream| {
///     tokio::spawn(async move {
///         // e.g. tokio::io::copy_bidirectional(&mut stream, &mut tcp).await
///         drop(stream);
///     });
/// });
/// let builder = backchannel::ClientBuilder::new().raw_streams(raw);
/// # drop(builder);
/// ```
#[derive(Clone)]
pub struct RawStreams {
    handler: Arc<dyn Fn(InboundStream) + Send + Sync>,
}

impl std::fmt::Debug for RawStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawStreams").finish_non_exhaustive()
    }
}

impl RawStreams {
    /// Calls `handler` with every stream the server opens that is not a
    /// sidechannel or a tunnel.
    pub fn new(handler: impl Fn(InboundStream) + Send + Sync + 'static) -> Self {
        RawStreams {
            handler: Arc::new(handler),
        }
    }

    /// Hands `stream` to the handler.
    pub fn handle(&self, stream: InboundStream) {
        (self.handler)(stream)
    }
}

impl ClientBuilder {
    /// Hands every stream the server opens to `raw` instead of serving the
    /// client's routes on it (the routes given to `connect_*` are then
    /// unused). Stream 1, the client's channel to the server, is unchanged.
    ///
    /// ```
    /// let b = backchannel::ClientBuilder::new()
    ///     .raw_streams(backchannel::RawStreams::new(|stream| drop(stream)));
    /// # drop(b);
    /// ```
    pub fn raw_streams(mut self, raw: RawStreams) -> Self {
        self.raw = Some(raw);
        self
    }
}
