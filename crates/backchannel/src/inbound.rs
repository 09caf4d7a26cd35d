//! Streams the other side of a session opens, sniffed by their first
//! bytes: a sidechannel (`sidechannel` + ID) goes to its waiter, a tunnel
//! (`bc-tunnel/1` + header) to its service's handler, anything else to the
//! fallback (the client's gRPC server; on the server, a refusal).
//!
//! Sniffing reads at most 11 bytes (and then a bounded header), stops at
//! the first byte no magic starts with, and is bounded in time: a stream
//! that never sends its first bytes is closed.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use backchannel_yamux::Incoming;
use bytes::{Buf, Bytes};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    sync::mpsc,
};
use tracing::{debug, Instrument};

use crate::{
    sidechannel::{Waiters, SIDECHANNEL_MAGIC},
    stream::YamuxStream,
    tunnel::{IncomingTunnel, Tunnels, TUNNEL_MAGIC},
};

/// How the streams the other side opens are dispatched.
#[derive(Clone, Debug)]
pub(crate) struct Dispatch {
    pub(crate) tunnels: Tunnels,
    /// Sidechannel waiters (the client side only).
    pub(crate) sidechannels: Option<Waiters>,
    /// How long a new stream may take to send its first bytes and header.
    pub(crate) sniff_timeout: Duration,
    /// The client's handler for the other streams, instead of its gRPC
    /// server (the client side only).
    pub(crate) raw: Option<crate::RawStreams>,
    /// The other side, as named in tunnel errors.
    pub(crate) side: Arc<str>,
}

/// Where a stream that is neither a sidechannel nor a tunnel goes.
pub(crate) enum Fallback {
    /// To the gRPC server, its first bytes replayed.
    Grpc(mpsc::Sender<Replayed>),
    /// To a raw stream handler, its first bytes replayed.
    Raw(crate::RawStreams),
    /// Nowhere: it is closed.
    Refuse,
}

/// What the first bytes of a stream were.
enum Sniffed {
    Sidechannel(i64, YamuxStream),
    Tunnel(IncomingTunnel),
    Other(Bytes, YamuxStream),
}

/// Serves `inbound` until the session ends: each stream is sniffed in a
/// task of its own.
pub(crate) fn serve(mut inbound: Incoming, dispatch: Arc<Dispatch>, fallback: Fallback) {
    let fallback = Arc::new(fallback);
    tokio::spawn(
        async move {
            while let Some(stream) = inbound.accept().await {
                let dispatch = dispatch.clone();
                let fallback = fallback.clone();
                tokio::spawn(
                    async move { route(stream, &dispatch, &fallback).await }.in_current_span(),
                );
            }
        }
        .in_current_span(),
    );
}

async fn route(stream: YamuxStream, dispatch: &Dispatch, fallback: &Fallback) {
    let id = stream.id();
    let sniffed = tokio::time::timeout(dispatch.sniff_timeout, sniff(stream, dispatch)).await;
    match sniffed {
        Err(_) => debug!(
            stream = id,
            timeout = ?dispatch.sniff_timeout,
            "closing an inbound stream: no first bytes within the sniff timeout"
        ),
        Ok(Err(e)) => debug!(stream = id, error = %e, "closing an inbound stream"),
        Ok(Ok(Sniffed::Sidechannel(sc, stream))) => match &dispatch.sidechannels {
            Some(w) => w.deliver(sc, stream).await,
            None => debug!(
                stream = id,
                "closing a sidechannel stream: not accepted here"
            ),
        },
        Ok(Ok(Sniffed::Tunnel(t))) => dispatch.tunnels.dispatch(t).await,
        Ok(Ok(Sniffed::Other(prefix, stream))) => match fallback {
            // ---- the fallback: one call, the stream with its first bytes ----
            Fallback::Grpc(tx) => {
                let _ = tx.send(Replayed { prefix, stream }).await;
            }
            Fallback::Raw(raw) => raw.handle(InboundStream { prefix, stream }),
            Fallback::Refuse => {
                debug!(
                    stream = id,
                    "closing an inbound stream: neither tunnel nor sidechannel"
                )
            }
        },
    }
}

/// Reads the first bytes of `stream`: a magic and what follows it, or up to
/// the first byte no magic starts with.
async fn sniff(mut stream: YamuxStream, dispatch: &Dispatch) -> io::Result<Sniffed> {
    let sidechannels = dispatch.sidechannels.is_some();
    let mut buf = [0u8; 11];
    let mut have = 0;
    let candidate = |b: &[u8]| {
        // The tunnel magic is always recognised, so that a tunnel to a side
        // without services is refused as such (an HTTP/2 server's first
        // bytes could pass for an acceptance).
        (sidechannels && SIDECHANNEL_MAGIC.starts_with(b)) || TUNNEL_MAGIC.starts_with(b)
    };
    while have < buf.len() {
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            break;
        }
        have += n;
        if !candidate(&buf[..have]) {
            break;
        }
    }
    let seen = &buf[..have];
    if sidechannels && seen == SIDECHANNEL_MAGIC {
        let mut id = [0u8; 8];
        stream.read_exact(&mut id).await?;
        return Ok(Sniffed::Sidechannel(i64::from_be_bytes(id), stream));
    }
    if seen == TUNNEL_MAGIC {
        let id = stream.id();
        let t = IncomingTunnel::read_request(stream, &dispatch.side, dispatch.sniff_timeout)
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        debug!(stream = id, service = t.service(), "inbound tunnel");
        return Ok(Sniffed::Tunnel(t));
    }
    if have == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the stream ended before its first byte",
        ));
    }
    Ok(Sniffed::Other(Bytes::copy_from_slice(seen), stream))
}

/// A stream the other side opened, whose first bytes were read to tell
/// what it is: reading replays them, then reads the yamux stream.
#[derive(Debug)]
pub struct InboundStream {
    prefix: Bytes,
    stream: YamuxStream,
}

pub(crate) type Replayed = InboundStream;

impl InboundStream {
    /// The yamux stream ID.
    pub fn id(&self) -> u32 {
        self.stream.id()
    }
}

impl AsyncRead for InboundStream {
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
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for InboundStream {
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
