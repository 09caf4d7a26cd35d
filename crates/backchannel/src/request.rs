//! What a handler can ask about the connection its request came on.

use listenmux::ConnInfo;

use crate::{NotMultiplexed, PeerId};

/// Connection facts for a request served behind a
/// [`ListenMux`](listenmux::ListenMux): implemented for [`tonic::Request`]
/// (in handlers) and [`http::Request`] (in tower layers).
///
/// ```
/// use backchannel::RequestExt;
/// let request = tonic::Request::new(());
/// // Not served through a ListenMux: no connection info, no peer.
/// assert!(request.conn_info().is_none());
/// let status = tonic::Status::from(request.peer_id().unwrap_err());
/// assert_eq!(status.code(), tonic::Code::FailedPrecondition);
/// ```
pub trait RequestExt {
    /// The connection's [`ConnInfo`] (addresses, TLS, extensions), if the
    /// request came through a `ListenMux`.
    fn conn_info(&self) -> Option<&ConnInfo>;

    /// The ID of the backchannel peer that sent the request, or
    /// [`NotMultiplexed`] (`FAILED_PRECONDITION`) for a plain connection.
    fn peer_id(&self) -> Result<PeerId, NotMultiplexed> {
        self.conn_info()
            .and_then(|i| i.extensions().get::<PeerId>().copied())
            .ok_or(NotMultiplexed)
    }
}

impl<T> RequestExt for tonic::Request<T> {
    fn conn_info(&self) -> Option<&ConnInfo> {
        self.extensions().get::<ConnInfo>()
    }
}

impl<B> RequestExt for http::Request<B> {
    fn conn_info(&self) -> Option<&ConnInfo> {
        self.extensions().get::<ConnInfo>()
    }
}
