//! The byte stream hyper/tonic run HTTP/2 over.

/// One yamux stream of a backchannel session, usable as a connection by
/// hyper/tonic: `AsyncRead + AsyncWrite`, with `id()` (odd: opened by the
/// client, even: by the server).
///
/// It is [`backchannel_yamux::Stream`], our own yamux implementation. We
/// replaced tokio-yamux (0.3.18–0.3.20), whose write path stalls a task that
/// only writes (window updates queued in a channel that `poll_write` drains
/// without registering a waker) and which copies every frame four times
/// with two channel hops; see `BENCHMARKS.md` for the before and after.
pub type YamuxStream = backchannel_yamux::Stream;
