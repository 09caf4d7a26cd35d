//! Accept sources.

use std::{future::Future, io};

use crate::{ConnInfo, Io, Transport};

/// Something that accepts connections: implemented for tokio's
/// [`TcpListener`](tokio::net::TcpListener) and
/// [`UnixListener`](tokio::net::UnixListener). TLS is layered on by
/// [`ListenMuxBuilder::tls`](crate::ListenMuxBuilder::tls), per connection, off
/// the accept loop.
pub trait Listener: Send + 'static {
    /// The accepted byte stream.
    type Io: Io;

    /// Waits for the next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, ConnInfo)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, ConnInfo)> {
        let (stream, remote) = tokio::net::TcpListener::accept(self).await?;
        // gRPC is latency sensitive and frames are already batched above us.
        let _ = stream.set_nodelay(true);
        let info = ConnInfo::new(Transport::Tcp)
            .with_remote_addr(Some(remote))
            .with_local_addr(stream.local_addr().ok());
        Ok((stream, info))
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, ConnInfo)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        let info = ConnInfo::new(Transport::Unix);
        Ok((stream, info))
    }
}
