//! Tunnels: raw duplex byte streams beside the gRPC calls of a session.
//!
//! Either side of a backchannel session opens a tunnel to the other: a new
//! yamux stream that starts with [`TUNNEL_MAGIC`] and a small header naming
//! a service (and optional metadata). The other side's handler for that
//! service answers with accept, or refuse and a reason; from then on the
//! stream carries raw bytes both ways, with half-close (`shutdown`) in
//! each direction.
//!
//! # Wire format
//! * opener: the 11 bytes `bc-tunnel/1`, a big-endian `u16` body length
//!   (at most [`MAX_HEADER`]), then the body: a `u8` service length and the
//!   service name, then any number of metadata entries, each a `u8` key
//!   length, the key, a big-endian `u16` value length and the value.
//! * acceptor: one code byte (0 accept, 1 unknown service, 2 denied,
//!   3 unavailable, 4 failed), a big-endian `u16` reason length (at most
//!   1024) and the UTF-8 reason.
//!
//! The same format runs over any byte stream ([`connect`],
//! [`IncomingTunnel::read_request`]), for relays that carry tunnels on
//! connections of their own.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::{session::SessionHandle, stream::YamuxStream};

/// The 11 bytes that start a tunnel stream: ASCII `bc-tunnel/1`.
pub const TUNNEL_MAGIC: listenmux::Magic = *b"bc-tunnel/1";

/// Largest header body (service name and metadata), in bytes.
pub const MAX_HEADER: usize = 4096;

/// Longest service name, in bytes.
pub const MAX_SERVICE_LEN: usize = 128;

/// Longest refusal reason, in bytes (longer reasons are cut).
pub const MAX_REASON: usize = 1024;

/// How long an opener waits for the answer by default (10 s).
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a tunnel asks for: a service name and metadata.
///
/// Service names are 1 to 128 bytes of ASCII letters, digits and `._-:@/`;
/// metadata keys are 1 to 64 bytes of lower-case ASCII letters, digits,
/// `-` and `_`; values are UTF-8.
///
/// ```
/// let req = backchannel::TunnelRequest::new("ssh")
///     .with_metadata("peer", "box")
///     .with_timeout(std::time::Duration::from_secs(3));
/// assert_eq!(req.service(), "ssh");
/// assert_eq!(req.metadata("peer"), Some("box"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    service: String,
    metadata: Vec<(String, String)>,
    timeout: Duration,
}

/// Whether a metadata key's value is a credential, never to be printed.
fn is_secret_key(key: &str) -> bool {
    key == "authorization"
        || ["token", "secret", "password", "cookie", "key"]
            .iter()
            .any(|w| key.contains(w))
}

/// Prints metadata values except credentials (`authorization`, keys naming
/// a token, secret, password, cookie or key), which show as `<redacted>`.
///
/// ```
/// let req = backchannel::TunnelRequest::new("ssh")
///     .with_metadata("peer", "box")
///     .with_metadata("authorization", "Bearer s3cr3t");
/// let s = format!("{req:?}");
/// assert!(s.contains("box") && !s.contains("s3cr3t"));
/// ```
impl std::fmt::Debug for TunnelRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Meta<'a>(&'a [(String, String)]);
        impl std::fmt::Debug for Meta<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut m = f.debug_map();
                for (k, v) in self.0 {
                    if is_secret_key(k) {
                        m.entry(k, &"<redacted>");
                    } else {
                        m.entry(k, v);
                    }
                }
                m.finish()
            }
        }
        f.debug_struct("TunnelRequest")
            .field("service", &self.service)
            .field("metadata", &Meta(&self.metadata))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl TunnelRequest {
    /// A request for `service`, no metadata, [`DEFAULT_ANSWER_TIMEOUT`].
    pub fn new(service: impl Into<String>) -> Self {
        TunnelRequest {
            service: service.into(),
            metadata: Vec::new(),
            timeout: DEFAULT_ANSWER_TIMEOUT,
        }
    }

    /// Adds a metadata entry (a later entry with the same key wins).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.metadata.retain(|(k, _)| *k != key);
        self.metadata.push((key, value.into()));
        self
    }

    /// How long the opener waits for accept or refuse.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The value of metadata `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All metadata entries, in order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The answer timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn validate(&self) -> Result<(), TunnelError> {
        if !valid_service(&self.service) {
            return Err(TunnelError::Invalid(format!(
                "service name {:?}: 1 to {MAX_SERVICE_LEN} bytes of ASCII letters, digits and ._-:@/",
                self.service
            )));
        }
        for (k, v) in &self.metadata {
            if !valid_key(k) {
                return Err(TunnelError::Invalid(format!(
                    "metadata key {k:?}: 1 to 64 bytes of a-z, 0-9, - and _"
                )));
            }
            if v.len() > u16::MAX as usize {
                return Err(TunnelError::Invalid(format!(
                    "metadata {k}: value too long"
                )));
            }
        }
        Ok(())
    }

    /// Magic, length and body.
    fn encode(&self) -> Result<Vec<u8>, TunnelError> {
        self.validate()?;
        let mut body = Vec::with_capacity(64);
        body.push(self.service.len() as u8);
        body.extend_from_slice(self.service.as_bytes());
        for (k, v) in &self.metadata {
            body.push(k.len() as u8);
            body.extend_from_slice(k.as_bytes());
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v.as_bytes());
        }
        if body.len() > MAX_HEADER {
            return Err(TunnelError::Invalid(format!(
                "header of {} bytes, at most {MAX_HEADER}",
                body.len()
            )));
        }
        let mut out = Vec::with_capacity(TUNNEL_MAGIC.len() + 2 + body.len());
        out.extend_from_slice(&TUNNEL_MAGIC);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn decode(body: &[u8]) -> Result<Self, String> {
        let mut rest = body;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if rest.len() < n {
                return Err("truncated header".into());
            }
            let (a, b) = rest.split_at(n);
            rest = b;
            Ok(a)
        };
        let n = take(1)?[0] as usize;
        let service = std::str::from_utf8(take(n)?)
            .map_err(|_| "service name is not UTF-8".to_string())?
            .to_string();
        let mut req = TunnelRequest::new(service);
        while let Ok(k) = take(1) {
            let k = k[0] as usize;
            let key = std::str::from_utf8(take(k)?)
                .map_err(|_| "metadata key is not UTF-8".to_string())?
                .to_string();
            let l = take(2)?;
            let l = u16::from_be_bytes([l[0], l[1]]) as usize;
            let value = std::str::from_utf8(take(l)?)
                .map_err(|_| "metadata value is not UTF-8".to_string())?
                .to_string();
            req = req.with_metadata(key, value);
        }
        req.validate().map_err(|e| e.to_string())?;
        Ok(req)
    }
}

fn valid_service(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SERVICE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@/".contains(&b))
}

fn valid_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Why a tunnel was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalKind {
    /// No handler for the service.
    UnknownService,
    /// The opener may not open it.
    Denied,
    /// The service (or what it relays to) cannot be reached now.
    Unavailable,
    /// Anything else.
    Failed,
}

impl RefusalKind {
    fn code(self) -> u8 {
        match self {
            RefusalKind::UnknownService => 1,
            RefusalKind::Denied => 2,
            RefusalKind::Unavailable => 3,
            RefusalKind::Failed => 4,
        }
    }

    fn from_code(c: u8) -> Self {
        match c {
            1 => RefusalKind::UnknownService,
            2 => RefusalKind::Denied,
            3 => RefusalKind::Unavailable,
            _ => RefusalKind::Failed,
        }
    }
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefusalKind::UnknownService => "unknown service",
            RefusalKind::Denied => "denied",
            RefusalKind::Unavailable => "unavailable",
            RefusalKind::Failed => "failed",
        })
    }
}

/// Why a tunnel could not be opened or accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// The other side refused the tunnel.
    #[error("tunnel '{service}' refused by {side} ({kind}): {reason}")]
    Refused {
        /// The service asked for.
        service: String,
        /// Who refused (`server …`, `peer N`).
        side: String,
        /// The kind of refusal.
        kind: RefusalKind,
        /// The other side's reason.
        reason: String,
    },
    /// No answer within the request's timeout.
    #[error("tunnel '{service}': {side} did not answer within {after:?}")]
    Timeout {
        /// The service asked for.
        service: String,
        /// Who did not answer.
        side: String,
        /// The timeout.
        after: Duration,
    },
    /// The stream failed or ended before the answer.
    #[error("tunnel '{service}': {side} closed the stream before answering: {source}")]
    NoAnswer {
        /// The service asked for.
        service: String,
        /// Who was asked.
        side: String,
        /// The read error (an unexpected EOF if the stream just closed).
        source: io::Error,
    },
    /// The request is not valid (service name, metadata, size).
    #[error("invalid tunnel request: {0}")]
    Invalid(String),
    /// The other side's answer or header does not follow the format.
    #[error("tunnel protocol error from {side}: {message}")]
    Protocol {
        /// Who sent it.
        side: String,
        /// What is wrong.
        message: String,
    },
    /// Reading a request (on the accepting side) failed.
    #[error("reading a tunnel request from {side}: {source}")]
    Io {
        /// Who sent it.
        side: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The session cannot open a stream (closed, stream limit).
    #[error(transparent)]
    Session(#[from] crate::Error),
}

impl From<TunnelError> for io::Error {
    fn from(e: TunnelError) -> io::Error {
        let kind = match &e {
            TunnelError::Refused { .. } => io::ErrorKind::ConnectionRefused,
            TunnelError::Timeout { .. } => io::ErrorKind::TimedOut,
            TunnelError::NoAnswer { source, .. } | TunnelError::Io { source, .. } => source.kind(),
            TunnelError::Invalid(_) => io::ErrorKind::InvalidInput,
            TunnelError::Protocol { .. } => io::ErrorKind::InvalidData,
            TunnelError::Session(_) => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, e)
    }
}

/// An open tunnel: `AsyncRead + AsyncWrite` over the stream `S` (a yamux
/// stream of the session, by default).
///
/// * Reads return the other side's bytes, then EOF once it shut down its
///   writing; `shutdown` ends ours, and reading goes on.
/// * Errors keep their `io::ErrorKind` and say which tunnel and side they
///   concern, and what happened: reset by the other side, the session
///   ended (and why), write after shutdown. A reset or a lost session is
///   never a clean EOF.
///
/// ```no_run
/// # async fn run(client: backchannel::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// let mut t = client.open_tunnel(backchannel::TunnelRequest::new("echo")).await?;
/// t.write_all(b"hello").await?;
/// t.shutdown().await?;               // half-close: the other side reads EOF
/// let mut back = Vec::new();
/// t.read_to_end(&mut back).await?;   // until the other side shuts down
/// # Ok(()) }
/// ```
pub struct Tunnel<S = YamuxStream> {
    io: S,
    service: Arc<str>,
    side: Arc<str>,
}

impl<S> fmt::Debug for Tunnel<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("service", &self.service)
            .field("side", &self.side)
            .finish_non_exhaustive()
    }
}

impl Tunnel<YamuxStream> {
    /// Resets the tunnel (its yamux stream): the other side's reads and
    /// writes fail instead of seeing a clean end. For a relay whose other
    /// half broke: a plain close would pass a truncated stream off as
    /// complete.
    pub fn reset(&self) {
        self.io.reset();
    }

    /// A handle that resets the tunnel later, after it was split.
    pub fn reset_handle(&self) -> backchannel_yamux::ResetHandle {
        self.io.reset_handle()
    }
}

impl<S> Tunnel<S> {
    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The other side, as named in errors (`server 127.0.0.1:7443`,
    /// `peer 3`).
    pub fn side(&self) -> &str {
        &self.side
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The underlying stream, without the error context.
    pub fn into_inner(self) -> S {
        self.io
    }

    fn annotate(&self, e: io::Error) -> io::Error {
        let what = match backchannel_yamux::StreamError::of(&e) {
            Some(backchannel_yamux::StreamError::ResetByPeer) => {
                format!("{} reset the tunnel", self.side)
            }
            Some(backchannel_yamux::StreamError::SessionEnded(r)) => {
                format!("the session with {} ended ({r})", self.side)
            }
            _ => e.to_string(),
        };
        io::Error::new(
            e.kind(),
            format!("tunnel '{}' with {}: {what}", self.service, self.side),
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tunnel<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.annotate(e))),
            p => p,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tunnel<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.annotate(e))),
            p => p,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.annotate(e))),
            p => p,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.annotate(e))),
            p => p,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_shutdown(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.annotate(e))),
            p => p,
        }
    }
}

/// Opens a tunnel over an already connected byte stream `io` (a relay's
/// own connection, say): writes the request, waits for the answer.
/// `side` names the other end in errors.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let tcp = tokio::net::TcpStream::connect("127.0.0.1:9000").await?;
/// let t = backchannel::tunnel::connect(tcp, backchannel::TunnelRequest::new("ssh"), "relay").await?;
/// # drop(t); Ok(()) }
/// ```
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    request: TunnelRequest,
    side: &str,
) -> Result<Tunnel<S>, TunnelError> {
    let header = request.encode()?;
    let service = request.service.clone();
    let timeout = request.timeout;
    let side_s = side.to_string();
    let exchange = async {
        io.write_all(&header).await?;
        io.flush().await?;
        let mut head = [0u8; 3];
        io.read_exact(&mut head).await?;
        let len = u16::from_be_bytes([head[1], head[2]]) as usize;
        let mut reason = vec![0u8; len.min(MAX_REASON)];
        io.read_exact(&mut reason).await?;
        Ok::<_, io::Error>((head[0], len, reason))
    };
    let (code, len, reason) = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => {
            return Err(TunnelError::Timeout {
                service,
                side: side_s,
                after: timeout,
            })
        }
        Ok(Err(source)) => {
            return Err(TunnelError::NoAnswer {
                service,
                side: side_s,
                source,
            })
        }
        Ok(Ok(a)) => a,
    };
    if len > MAX_REASON {
        return Err(TunnelError::Protocol {
            side: side_s,
            message: format!("refusal reason of {len} bytes, at most {MAX_REASON}"),
        });
    }
    if code != 0 {
        return Err(TunnelError::Refused {
            service,
            side: side_s,
            kind: RefusalKind::from_code(code),
            reason: String::from_utf8_lossy(&reason).into_owned(),
        });
    }
    Ok(Tunnel {
        io,
        service: service.into(),
        side: side.into(),
    })
}

/// Opens a tunnel on a session: a new yamux stream, then [`connect`].
pub(crate) async fn open_on(
    session: &SessionHandle,
    request: TunnelRequest,
    side: &str,
) -> Result<Tunnel, TunnelError> {
    request.validate()?;
    let stream = session.open_stream()?;
    connect(stream, request, side).await
}

/// A tunnel the other side opened, waiting for an answer. Answer with
/// [`accept`](Self::accept) or [`refuse`](Self::refuse); dropping it
/// unanswered closes the stream (the opener gets
/// [`TunnelError::NoAnswer`]).
///
/// ```no_run
/// # async fn handle(incoming: backchannel::IncomingTunnel) -> std::io::Result<()> {
/// match incoming.request().metadata("user") {
///     Some("root") => incoming.refuse(backchannel::RefusalKind::Denied, "no root").await,
///     _ => {
///         let mut t = incoming.accept().await?;
///         let (mut r, mut w) = tokio::io::split(&mut t);
///         tokio::io::copy(&mut r, &mut w).await?; // echo
///         Ok(())
///     }
/// }
/// # }
/// ```
pub struct IncomingTunnel<S = YamuxStream> {
    request: TunnelRequest,
    io: S,
    side: Arc<str>,
}

impl<S> fmt::Debug for IncomingTunnel<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingTunnel")
            .field("request", &self.request)
            .field("side", &self.side)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> IncomingTunnel<S> {
    /// Reads a tunnel request from `io` whose [`TUNNEL_MAGIC`] has already
    /// been read (a listener that sniffed it), within `timeout`. `side`
    /// names the opener in errors and in the accepted [`Tunnel`].
    ///
    /// ```no_run
    /// # async fn run(io: tokio::net::TcpStream) -> Result<(), backchannel::TunnelError> {
    /// let t = backchannel::IncomingTunnel::read_request(io, "caller", std::time::Duration::from_secs(5)).await?;
    /// println!("wants {}", t.request().service());
    /// # Ok(()) }
    /// ```
    pub async fn read_request(
        mut io: S,
        side: &str,
        timeout: Duration,
    ) -> Result<Self, TunnelError> {
        let read = async {
            let mut len = [0u8; 2];
            io.read_exact(&mut len).await?;
            let len = u16::from_be_bytes(len) as usize;
            if len > MAX_HEADER {
                return Ok(Err(format!("header of {len} bytes, at most {MAX_HEADER}")));
            }
            let mut body = vec![0u8; len];
            io.read_exact(&mut body).await?;
            Ok::<_, io::Error>(TunnelRequest::decode(&body))
        };
        let decoded = match tokio::time::timeout(timeout, read).await {
            Err(_) => {
                return Err(TunnelError::Io {
                    side: side.into(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no complete tunnel header within {timeout:?}"),
                    ),
                })
            }
            Ok(Err(source)) => {
                return Err(TunnelError::Io {
                    side: side.into(),
                    source,
                })
            }
            Ok(Ok(d)) => d,
        };
        match decoded {
            Ok(request) => Ok(IncomingTunnel {
                request,
                io,
                side: side.into(),
            }),
            Err(message) => {
                let mut t = IncomingTunnel {
                    request: TunnelRequest::new("-"),
                    io,
                    side: side.into(),
                };
                let _ = t.answer(RefusalKind::Failed.code(), &message).await;
                Err(TunnelError::Protocol {
                    side: side.into(),
                    message,
                })
            }
        }
    }

    /// What the opener asked for.
    pub fn request(&self) -> &TunnelRequest {
        &self.request
    }

    /// The service name asked for.
    pub fn service(&self) -> &str {
        &self.request.service
    }

    /// The opener, as named in errors.
    pub fn side(&self) -> &str {
        &self.side
    }

    async fn answer(&mut self, code: u8, reason: &str) -> io::Result<()> {
        let mut r = reason.as_bytes();
        if r.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            r = &r[..end];
        }
        let mut out = Vec::with_capacity(3 + r.len());
        out.push(code);
        out.extend_from_slice(&(r.len() as u16).to_be_bytes());
        out.extend_from_slice(r);
        let write = async {
            self.io.write_all(&out).await?;
            self.io.flush().await
        };
        tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "writing the tunnel answer"))?
    }

    /// Accepts: the opener's `open_tunnel` returns, and bytes flow.
    pub async fn accept(mut self) -> io::Result<Tunnel<S>> {
        self.answer(0, "").await?;
        Ok(Tunnel {
            io: self.io,
            service: self.request.service.into(),
            side: self.side,
        })
    }

    /// Refuses with a reason the opener sees in
    /// [`TunnelError::Refused`], then closes the stream.
    pub async fn refuse(mut self, kind: RefusalKind, reason: &str) -> io::Result<()> {
        self.answer(kind.code(), reason).await?;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
        Ok(())
    }
}

type Handler =
    Arc<dyn Fn(IncomingTunnel) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The tunnel services one side offers: a handler per service name, and
/// optionally one for every other name. Give it to
/// [`ClientBuilder::tunnels`](crate::ClientBuilder::tunnels) or
/// [`ServerHandshaker::tunnels`](crate::ServerHandshaker::tunnels).
///
/// A handler runs in a task of its own for each tunnel; it answers with
/// [`IncomingTunnel::accept`] or [`IncomingTunnel::refuse`]. A name
/// without a handler is refused as [`RefusalKind::UnknownService`].
///
/// ```
/// use tokio::io::AsyncWriteExt;
/// let tunnels = backchannel::Tunnels::new().handle("hello", |incoming| async move {
///     if let Ok(mut t) = incoming.accept().await {
///         let _ = t.write_all(b"hello\n").await;
///         let _ = t.shutdown().await;
///     }
/// });
/// assert_eq!(tunnels.services(), vec!["hello"]);
/// ```
#[derive(Clone, Default)]
pub struct Tunnels {
    handlers: HashMap<String, Handler>,
    fallback: Option<Handler>,
}

impl fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnels")
            .field("services", &self.services())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl Tunnels {
    /// No services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles tunnels to `service` with `handler`.
    pub fn handle<F, Fut>(mut self, service: impl Into<String>, handler: F) -> Self
    where
        F: Fn(IncomingTunnel) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers
            .insert(service.into(), Arc::new(move |t| Box::pin(handler(t))));
        self
    }

    /// Handles tunnels to every service without a handler of its own.
    pub fn fallback<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(IncomingTunnel) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.fallback = Some(Arc::new(move |t| Box::pin(handler(t))));
        self
    }

    /// The service names with a handler, sorted.
    pub fn services(&self) -> Vec<&str> {
        let mut v: Vec<_> = self.handlers.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// Whether no service is offered.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty() && self.fallback.is_none()
    }

    /// Runs the handler for `t`, or refuses it.
    pub(crate) async fn dispatch(&self, t: IncomingTunnel) {
        let handler = self
            .handlers
            .get(t.service())
            .or(self.fallback.as_ref())
            .cloned();
        match handler {
            Some(h) => h(t).await,
            None => {
                let reason = format!("no tunnel service '{}' here", t.service());
                let _ = t.refuse(RefusalKind::UnknownService, &reason).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_limits() {
        let req = TunnelRequest::new("db-1")
            .with_metadata("caller", "ops@example")
            .with_metadata("x", "");
        let enc = req.encode().unwrap();
        assert_eq!(&enc[..11], b"bc-tunnel/1");
        let len = u16::from_be_bytes([enc[11], enc[12]]) as usize;
        assert_eq!(len, enc.len() - 13);
        let dec = TunnelRequest::decode(&enc[13..]).unwrap();
        assert_eq!(dec.service(), "db-1");
        assert_eq!(dec.metadata("caller"), Some("ops@example"));
        assert_eq!(dec.metadata("x"), Some(""));
        assert!(TunnelRequest::new("").encode().is_err());
        assert!(TunnelRequest::new("a b").encode().is_err());
        assert!(TunnelRequest::new("x".repeat(129)).encode().is_err());
        assert!(TunnelRequest::new("ok")
            .with_metadata("Upper", "v")
            .encode()
            .is_err());
        assert!(TunnelRequest::new("ok")
            .with_metadata("big", "v".repeat(5000))
            .encode()
            .is_err());
        // Truncated and garbage bodies are errors, never panics.
        for cut in 0..enc.len() - 13 {
            let _ = TunnelRequest::decode(&enc[13..13 + cut]);
        }
        assert!(TunnelRequest::decode(&[5, b'a']).is_err());
        assert!(TunnelRequest::decode(&[2, 0xff, 0xfe]).is_err());
    }

    #[tokio::test]
    async fn refusal_and_acceptance_over_a_pipe() {
        let (a, b) = tokio::io::duplex(1024);
        let opener = tokio::spawn(connect(a, TunnelRequest::new("nope"), "test peer"));
        let mut b = b;
        let mut magic = [0u8; 11];
        b.read_exact(&mut magic).await.unwrap();
        assert_eq!(magic, TUNNEL_MAGIC);
        let t = IncomingTunnel::read_request(b, "opener", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(t.service(), "nope");
        t.refuse(RefusalKind::UnknownService, "no such thing")
            .await
            .unwrap();
        match opener.await.unwrap() {
            Err(TunnelError::Refused {
                kind: RefusalKind::UnknownService,
                reason,
                side,
                ..
            }) => {
                assert_eq!(reason, "no such thing");
                assert_eq!(side, "test peer");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_header_is_refused_without_reading_it() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&(MAX_HEADER as u16 + 1).to_be_bytes())
            .await
            .unwrap();
        let err = IncomingTunnel::read_request(b, "x", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, TunnelError::Protocol { .. }), "{err}");
        let mut answer = [0u8; 1];
        a.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[0], RefusalKind::Failed.code());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_opener_times_out() {
        let (_a, b) = tokio::io::duplex(64);
        let err = IncomingTunnel::read_request(b, "x", Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("no complete tunnel header"),
            "{err}"
        );
    }
}
