//! The byte stream hyper/tonic run HTTP/2 over.

/// One yamux stream of a backchannel session, usable as a connection by
/// hyper/tonic: `AsyncRead + AsyncWrite`, with `id()` (odd: opened by the
/// client, even: by the server).
///
/// It is [`backchannel_yamux::Stream`]: one task per session, shared-state
/// flow control, one copy per direction.
pub type YamuxStream = backchannel_yamux::Stream;
