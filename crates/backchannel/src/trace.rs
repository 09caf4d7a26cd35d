//! Tracing spans that carry the peer ID.

use tracing::{info_span, Span};

use crate::PeerId;

/// A span for one gRPC request on a server behind a
/// [`ListenMux`](listenmux::ListenMux): it carries the caller's `peer_id`
/// (or `plain = true`), remote address and method path, so every log line of
/// a handler names the peer it serves. Session-level spans
/// (`backchannel_peer`) carry the same `peer_id`.
///
/// ```
/// let server = tonic::transport::Server::builder().trace_fn(backchannel::request_span);
/// # drop(server);
/// ```
pub fn request_span(request: &http::Request<()>) -> Span {
    let info = request.extensions().get::<listenmux::ConnInfo>();
    let path = request.uri().path();
    match info {
        Some(i) => match i.extensions().get::<PeerId>() {
            Some(id) => {
                info_span!("grpc_request", peer_id = id.get(), remote = ?i.remote_addr(), path)
            }
            None => info_span!("grpc_request", plain = true, remote = ?i.remote_addr(), path),
        },
        None => info_span!("grpc_request", path),
    }
}
