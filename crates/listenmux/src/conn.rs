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
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Any byte stream the mux can carry.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// The kind of socket a connection arrived on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// A TCP socket.
    Tcp,
    /// A Unix domain socket.
    Unix,
    /// Anything else (in-memory, custom listeners).
    #[default]
    Other,
}

/// What is known about a connection: socket type, addresses, TLS, and typed
/// extensions that handshakers add (a multiplexing protocol puts its peer
/// identity there).
///
/// tonic puts it into every request's extensions; handlers read it with
/// `request.extensions().get::<ConnInfo>()`. With [`ConnectInfoLayer`](crate::ConnectInfoLayer)
/// on the server, tonic's own `Request::remote_addr()`, `local_addr()` and
/// `peer_certs()` work too.
///
/// ```
/// use listenmux::{ConnInfo, Transport};
/// #[derive(Clone, Debug, PartialEq)]
/// struct Tenant(&'static str);
///
/// let addr = "127.0.0.1:4000".parse().unwrap();
/// let mut info = ConnInfo::new(Transport::Tcp).with_remote_addr(Some(addr));
/// info.extensions_mut().insert(Tenant("blue"));
/// assert_eq!(info.remote_addr(), Some(addr));
/// assert_eq!(info.extensions().get::<Tenant>(), Some(&Tenant("blue")));
/// ```
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    transport: Transport,
    remote_addr: Option<SocketAddr>,
    local_addr: Option<SocketAddr>,
    tls: Option<TlsConnectInfo<TcpConnectInfo>>,
    extensions: http::Extensions,
}

impl ConnInfo {
    /// Info about a connection of the given transport, with no addresses.
    pub fn new(transport: Transport) -> Self {
        ConnInfo {
            transport,
            ..ConnInfo::default()
        }
    }

    /// Sets the remote address.
    pub fn with_remote_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.remote_addr = addr;
        self
    }

    /// Sets the local address.
    pub fn with_local_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.local_addr = addr;
        self
    }

    /// The socket type.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The remote address (TCP only).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// The local address (TCP only).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Whether TLS was terminated by the mux.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The client's certificate chain, when TLS asked for one and the client
    /// sent it.
    pub fn peer_certs(&self) -> Option<Arc<Vec<CertificateDer<'static>>>> {
        self.tls.as_ref().and_then(|t| t.peer_certs())
    }

    /// The addresses in tonic's form (what `TcpIncoming` gives handlers).
    pub fn tcp_connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.local_addr,
            remote_addr: self.remote_addr,
        }
    }

    /// The TLS session in tonic's form, when the mux terminated TLS.
    pub fn tls_connect_info(&self) -> Option<&TlsConnectInfo<TcpConnectInfo>> {
        self.tls.as_ref()
    }

    pub(crate) fn set_tls(&mut self, tls: TlsConnectInfo<TcpConnectInfo>) {
        self.tls = Some(tls);
    }

    /// Typed data added by handshakers and listeners.
    pub fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    /// Typed data added by handshakers and listeners, to change.
    pub fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.extensions
    }
}

/// A connection for the gRPC server: a byte stream plus its [`ConnInfo`].
pub struct Connection {
    io: BoxIo,
    info: ConnInfo,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Wraps a byte stream.
    ///
    /// ```
    /// let (a, _b) = tokio::io::duplex(64);
    /// let conn = listenmux::Connection::new(Box::new(a), listenmux::ConnInfo::default());
    /// assert!(conn.info().remote_addr().is_none());
    /// ```
    pub fn new(io: BoxIo, info: ConnInfo) -> Self {
        Connection { io, info }
    }

    /// The connection's info.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// The connection's info, to change (a handshaker adds its extensions).
    pub fn info_mut(&mut self) -> &mut ConnInfo {
        &mut self.info
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

/// A byte stream that reports fixed TCP connect info to tonic; TLS is
/// accepted over it so that tonic's TLS connect info wraps the TCP one.
pub(crate) struct WithTcpInfo {
    pub(crate) io: BoxIo,
    pub(crate) info: TcpConnectInfo,
}

impl tonic::transport::server::Connected for WithTcpInfo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for WithTcpInfo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WithTcpInfo {
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
#[derive(Debug)]
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
