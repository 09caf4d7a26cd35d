//! Refusing a session with a reason the client can read: the hub serves the
//! client's HTTP/2 connection just long enough to answer its first call
//! (usually the announce) with a gRPC status, then closes the session.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use listenmux::Rewind;
use tokio::sync::Notify;
use tonic::Status;

use crate::stream::YamuxStream;

/// Answers every request on `stream` (whose first `prefix` bytes were already
/// read) with `status`, for at most `limit`; closes the connection after the
/// first answer.
pub(crate) async fn serve_refusal(
    stream: YamuxStream,
    prefix: Bytes,
    status: Status,
    limit: Duration,
) {
    let answered = Arc::new(Notify::new());
    let svc = {
        let answered = answered.clone();
        hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
            let resp = status.clone().into_http::<tonic::body::Body>();
            answered.notify_one();
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    let io = TokioIo::new(Rewind::new(prefix, stream));
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(4)
        .serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    let _ = tokio::time::timeout(limit, async {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = answered.notified() => {}
        }
        // GOAWAY, let the answer go out, then close.
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    })
    .await;
}
