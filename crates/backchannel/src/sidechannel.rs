//! Sidechannels, wire-compatible with Gitaly's `internal/grpc/sidechannel`:
//! a raw byte stream beside one gRPC call, for bulk data.
//!
//! 1. The client registers a waiter ([`Client::sidechannel`](crate::Client::sidechannel))
//!    and sends its call with the waiter's ID in the metadata
//!    [`SIDECHANNEL_METADATA`] (`gitaly-sidechannel-id: <decimal>`).
//! 2. The server's handler calls [`Registry::open_sidechannel`]: a new
//!    yamux stream to that client, the 11 bytes `sidechannel` and the ID as
//!    8 bytes big-endian; the client answers `ok` (all within 5 s).
//! 3. Client to server, the bytes travel as pkt-lines (4 hex digits
//!    counting themselves, at most 65,520 bytes a packet); the client's
//!    `shutdown` sends the flush packet `0000`, which the server reads as
//!    EOF. A stream that ends without it is an unexpected-EOF error.
//!    Server to client, the bytes are raw, ended by the server's
//!    `shutdown` (or drop).
//!
//! ```no_run
//! # async fn client_side(client: backchannel::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! let mut waiter = client.sidechannel();
//! let mut request = tonic::Request::new(());
//! waiter.attach(&mut request);
//! // let call = MyApiClient::new(client.channel()).upload_pack(request);
//! let mut side = waiter.accept().await?;  // while the call runs
//! side.write_all(b"want ...").await?;
//! side.shutdown().await?;                 // flush packet: the server reads EOF
//! let mut pack = Vec::new();
//! side.read_to_end(&mut pack).await?;
//! # Ok(()) }
//! # async fn server_side(registry: backchannel::Registry, request: tonic::Request<()>) -> Result<(), tonic::Status> {
//! // In the server's handler:
//! let mut side = registry.open_sidechannel(&request).await?;
//! let mut want = Vec::new();
//! side.read_to_end(&mut want).await?;     // up to the client's flush packet
//! side.write_all(b"PACK...").await?;
//! side.shutdown().await?;
//! # use tokio::io::{AsyncReadExt, AsyncWriteExt}; Ok(()) }
//! ```

use std::{
    collections::HashMap,
    fmt, io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    sync::oneshot,
};

use crate::{stream::YamuxStream, PeerId, Registry};

/// The 11 bytes that start a sidechannel stream: ASCII `sidechannel`.
pub const SIDECHANNEL_MAGIC: listenmux::Magic = *b"sidechannel";

/// The metadata key carrying the sidechannel ID of a call.
pub const SIDECHANNEL_METADATA: &str = "gitaly-sidechannel-id";

/// How long opening a sidechannel may take (magic, ID and `ok`): 5 s.
pub const SIDECHANNEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest pkt-line packet, its 4 length digits included.
pub const MAX_PKT_LEN: usize = 65520;

/// Why a sidechannel could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidechannelError {
    /// The call carries no (valid) `gitaly-sidechannel-id`.
    #[error("sidechannel: the call has no valid {SIDECHANNEL_METADATA} metadata")]
    NoSidechannelId,
    /// The call did not come over a backchannel session.
    #[error("sidechannel: {0}")]
    NotMultiplexed(#[from] crate::NotMultiplexed),
    /// The calling peer's session is gone.
    #[error("sidechannel: peer {0} is gone")]
    PeerGone(PeerId),
    /// The session could not open a stream.
    #[error("sidechannel: opening the stream: {0}")]
    Open(#[source] crate::Error),
    /// The client did not answer within [`SIDECHANNEL_TIMEOUT`].
    #[error("sidechannel: no answer within {0:?}")]
    Timeout(Duration),
    /// The client answered something other than `ok` (or closed the
    /// stream: no waiter has that ID).
    #[error("sidechannel: the client refused it (answered {0:?})")]
    Refused(String),
    /// The stream failed during the handshake.
    #[error("sidechannel: {0}")]
    Io(#[from] io::Error),
    /// The waiter's session ended before the server opened the sidechannel.
    #[error("sidechannel: the session ended before the server opened the sidechannel")]
    SessionEnded,
}

impl From<SidechannelError> for tonic::Status {
    fn from(e: SidechannelError) -> Self {
        match e {
            SidechannelError::NoSidechannelId | SidechannelError::NotMultiplexed(_) => {
                tonic::Status::failed_precondition(e.to_string())
            }
            SidechannelError::Timeout(_) => tonic::Status::deadline_exceeded(e.to_string()),
            _ => tonic::Status::unavailable(e.to_string()),
        }
    }
}

/// The client's registered waiters, by ID. Shared by every session of a
/// client (IDs are never reused in a process's client).
#[derive(Clone, Default)]
pub(crate) struct Waiters {
    inner: Arc<Mutex<WaitersInner>>,
}

#[derive(Default)]
struct WaitersInner {
    next: i64,
    waiting: HashMap<i64, oneshot::Sender<YamuxStream>>,
}

impl fmt::Debug for Waiters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiters")
            .field("waiting", &self.lock().waiting.len())
            .finish()
    }
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, WaitersInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self) -> SidechannelWaiter {
        let (tx, rx) = oneshot::channel();
        let mut w = self.lock();
        w.next += 1;
        let id = w.next;
        w.waiting.insert(id, tx);
        SidechannelWaiter {
            id,
            rx,
            waiters: self.clone(),
        }
    }

    /// A stream the server opened for sidechannel `id` (its magic and ID
    /// read): answer `ok` and hand it to the waiter, or close it.
    pub(crate) async fn deliver(&self, id: i64, mut stream: YamuxStream) {
        let Some(tx) = self.lock().waiting.remove(&id) else {
            tracing::debug!(id, "sidechannel for an unknown ID; closing it");
            return;
        };
        let ok = async {
            stream.write_all(b"ok").await?;
            stream.flush().await
        };
        match tokio::time::timeout(SIDECHANNEL_TIMEOUT, ok).await {
            Ok(Ok(())) => {
                let _ = tx.send(stream);
            }
            Ok(Err(e)) => tracing::debug!(id, error = %e, "sidechannel: answering ok failed"),
            Err(_) => tracing::debug!(id, "sidechannel: answering ok timed out"),
        }
    }
}

/// A registered sidechannel: put its ID on a call with
/// [`attach`](Self::attach), then [`accept`](Self::accept) the stream the
/// server opens for it while the call runs. Dropping it unregisters the ID
/// (a sidechannel the server opens later is closed).
///
/// ```no_run
/// # async fn run(client: backchannel::Client) {
/// let waiter = client.sidechannel();
/// let mut request = tonic::Request::new(());
/// waiter.attach(&mut request);
/// assert_eq!(
///     request.metadata().get("gitaly-sidechannel-id").unwrap().to_str().unwrap(),
///     waiter.id().to_string()
/// );
/// # }
/// ```
pub struct SidechannelWaiter {
    id: i64,
    rx: oneshot::Receiver<YamuxStream>,
    waiters: Waiters,
}

impl fmt::Debug for SidechannelWaiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SidechannelWaiter")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for SidechannelWaiter {
    fn drop(&mut self) {
        self.waiters.lock().waiting.remove(&self.id);
    }
}

impl SidechannelWaiter {
    /// The sidechannel ID.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Sets `gitaly-sidechannel-id` on `request`.
    pub fn attach<T>(&self, request: &mut tonic::Request<T>) {
        request.metadata_mut().insert(
            SIDECHANNEL_METADATA,
            tonic::metadata::MetadataValue::from(self.id),
        );
    }

    /// Waits for the server to open the sidechannel (run it alongside the
    /// call: the server opens it from the call's handler).
    pub async fn accept(&mut self) -> Result<ClientSidechannel, SidechannelError> {
        let stream = (&mut self.rx)
            .await
            .map_err(|_| SidechannelError::SessionEnded)?;
        Ok(ClientSidechannel {
            stream,
            out: Vec::new(),
            sent: 0,
            write_closed: false,
        })
    }
}

/// The client's end of a sidechannel: reads raw bytes from the server until
/// it closes; writes are framed as pkt-lines, and `shutdown` sends the
/// flush packet (the server reads EOF) while reading goes on.
pub struct ClientSidechannel {
    stream: YamuxStream,
    /// The packet being written (header and payload).
    out: Vec<u8>,
    sent: usize,
    write_closed: bool,
}

impl fmt::Debug for ClientSidechannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSidechannel")
            .field("stream", &self.stream)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl ClientSidechannel {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ClientSidechannel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientSidechannel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "sidechannel: write after the flush packet",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.poll_drain(cx))?;
        let n = buf.len().min(MAX_PKT_LEN - 4);
        let this = &mut *self;
        this.out
            .extend_from_slice(format!("{:04x}", n + 4).as_bytes());
        this.out.extend_from_slice(&buf[..n]);
        // Start sending now; what does not fit waits for the next call.
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Sends the flush packet `0000`: the server reads EOF. The stream
    /// stays open for reading.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        if !self.write_closed {
            self.write_closed = true;
            self.out.extend_from_slice(b"0000");
            ready!(self.poll_drain(cx))?;
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }
}

/// The server's end of a sidechannel: reads the client's bytes (unframed
/// from pkt-lines) until its flush packet, then EOF; writes raw bytes;
/// `shutdown` (or drop) ends them.
pub struct ServerSidechannel {
    stream: YamuxStream,
    /// Payload bytes left in the current packet.
    remaining: usize,
    header: [u8; 4],
    have: usize,
    flushed: bool,
}

impl fmt::Debug for ServerSidechannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSidechannel")
            .field("stream", &self.stream)
            .field("flushed", &self.flushed)
            .finish()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sidechannel: {msg}"))
}

impl AsyncRead for ServerSidechannel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.flushed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.remaining > 0 {
                let limit = this.remaining.min(buf.remaining());
                let mut sub = ReadBuf::new(&mut buf.initialize_unfilled()[..limit]);
                ready!(Pin::new(&mut this.stream).poll_read(cx, &mut sub))?;
                let n = sub.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "sidechannel: the stream ended inside a packet",
                    )));
                }
                buf.advance(n);
                this.remaining -= n;
                return Poll::Ready(Ok(()));
            }
            let mut hb = ReadBuf::new(&mut this.header[this.have..]);
            ready!(Pin::new(&mut this.stream).poll_read(cx, &mut hb))?;
            let n = hb.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "sidechannel: the stream ended without a flush packet",
                )));
            }
            this.have += n;
            if this.have < 4 {
                continue;
            }
            this.have = 0;
            let h = this.header;
            let len = std::str::from_utf8(&h)
                .ok()
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .filter(|_| h.iter().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| {
                    invalid(format!(
                        "invalid packet header {:?}",
                        String::from_utf8_lossy(&h)
                    ))
                })?;
            match len {
                0 => this.flushed = true,
                1..=3 => return Poll::Ready(Err(invalid(format!("invalid header {len:04x}")))),
                l if l > MAX_PKT_LEN => {
                    return Poll::Ready(Err(invalid(format!(
                        "packet of {l} bytes, at most {MAX_PKT_LEN}"
                    ))))
                }
                l => this.remaining = l - 4,
            }
        }
    }
}

impl AsyncWrite for ServerSidechannel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The sidechannel ID of a call, from its metadata (the last value).
fn sidechannel_id(headers: &http::HeaderMap) -> Option<i64> {
    headers
        .get_all(SIDECHANNEL_METADATA)
        .iter()
        .next_back()?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Registry {
    /// Opens the sidechannel of the call `request` (from its handler): a
    /// new stream on the calling peer's session, the `sidechannel` magic
    /// and the call's ID, and the client's `ok`, within 5 s.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let registry = backchannel::Registry::new();
    /// let err = registry.open_sidechannel(&tonic::Request::new(())).await.unwrap_err();
    /// assert!(matches!(err, backchannel::SidechannelError::NoSidechannelId));
    /// # });
    /// ```
    pub async fn open_sidechannel<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<ServerSidechannel, SidechannelError> {
        let id =
            sidechannel_id(request.metadata().as_ref()).ok_or(SidechannelError::NoSidechannelId)?;
        let peer = crate::RequestExt::peer_id(request)?;
        let session = self.session(peer).ok_or(SidechannelError::PeerGone(peer))?;
        let mut stream = session.open_stream().map_err(SidechannelError::Open)?;
        let handshake = async {
            let mut hello = [0u8; 19];
            hello[..11].copy_from_slice(&SIDECHANNEL_MAGIC);
            hello[11..].copy_from_slice(&id.to_be_bytes());
            stream.write_all(&hello).await?;
            stream.flush().await?;
            let mut ok = [0u8; 2];
            let mut got = 0;
            while got < 2 {
                let n = stream.read(&mut ok[got..]).await?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            Ok::<_, io::Error>(ok[..got].to_vec())
        };
        let answer = tokio::time::timeout(SIDECHANNEL_TIMEOUT, handshake)
            .await
            .map_err(|_| SidechannelError::Timeout(SIDECHANNEL_TIMEOUT))??;
        if answer != b"ok" {
            return Err(SidechannelError::Refused(
                String::from_utf8_lossy(&answer).into_owned(),
            ));
        }
        Ok(ServerSidechannel {
            stream,
            remaining: 0,
            header: [0; 4],
            have: 0,
            flushed: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_from_metadata() {
        let mut h = http::HeaderMap::new();
        assert_eq!(sidechannel_id(&h), None);
        h.append(SIDECHANNEL_METADATA, "3".parse().unwrap());
        h.append(SIDECHANNEL_METADATA, "42".parse().unwrap());
        assert_eq!(sidechannel_id(&h), Some(42));
        h.insert(SIDECHANNEL_METADATA, "x".parse().unwrap());
        assert_eq!(sidechannel_id(&h), None);
    }
}
