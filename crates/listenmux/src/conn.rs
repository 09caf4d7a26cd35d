//! Connection types handed to the gRPC server.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Any byte stream the mux can carry.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// The kind of socket a connection arrived on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// A TCP socket.
    Tcp,
    /// A Unix domain socket.
    Unix,
    /// Anything else (in-memory, custom listeners).
    #[default]
    Other,
}

/// What is known about a connection. tonic puts it into every request's
/// extensions, so handlers read it with
/// `request.extensions().get::<ConnInfo>()`.
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    /// The socket type.
    pub transport: Transport,
    /// The remote address (TCP only).
    pub remote_addr: Option<SocketAddr>,
    /// The local address (TCP only).
    pub local_addr: Option<SocketAddr>,
    /// Whether TLS was terminated by the mux.
    pub tls: bool,
    /// The client's certificate chain, when TLS asked for one.
    pub peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The peer ID, set by multiplexing handshakers (backchannel); `None` for
    /// plain connections.
    pub peer_id: Option<u64>,
}

/// A connection for the gRPC server: a byte stream plus its [`ConnInfo`].
pub struct Connection {
    io: BoxIo,
    info: ConnInfo,
}

impl Connection {
    /// Wraps a byte stream.
    ///
    /// ```
    /// let (a, _b) = tokio::io::duplex(64);
    /// let conn = listenmux::Connection::new(Box::new(a), listenmux::ConnInfo::default());
    /// assert!(conn.info().peer_id.is_none());
    /// ```
    pub fn new(io: BoxIo, info: ConnInfo) -> Self {
        Connection { io, info }
    }

    /// The connection's info.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// Splits the connection into its byte stream and info.
    pub fn into_parts(self) -> (BoxIo, ConnInfo) {
        (self.io, self.info)
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A byte stream that replays `prefix` before reading from `inner`: how
/// sniffed bytes are given back to the plain gRPC server.
///
/// ```
/// # tokio_test_block_on(async {
/// use tokio::io::AsyncReadExt;
/// let mut r = listenmux::Rewind::new(bytes::Bytes::from_static(b"PRI"), &b" * HTTP/2.0"[..]);
/// let mut s = String::new();
/// r.read_to_string(&mut s).await.unwrap();
/// assert_eq!(s, "PRI * HTTP/2.0");
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f) }
/// ```
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// Replays `prefix`, then reads `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
