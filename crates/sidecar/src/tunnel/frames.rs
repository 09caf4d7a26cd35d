//! The framing on a caller's connection to the hub once its tunnel is
//! accepted: data frames, a clean end per direction, and an abort that
//! carries a reason, so that a tunnel that failed (the agent died, its
//! service reset the connection) never looks like a clean end to the caller.
//!
//! Each frame starts with a big-endian `u32`: 1 to [`MAX_FRAME`] is a data
//! frame of that many bytes; 0 ends the direction (like a TCP FIN);
//! `0xFFFF_FFFF` aborts the tunnel and is followed by a big-endian `u16`
//! length and a UTF-8 reason (at most 1024 bytes).

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest data frame.
pub const MAX_FRAME: usize = 1 << 20;
const FIN: u32 = 0;
const ABORT: u32 = u32::MAX;
const MAX_REASON: usize = 1024;

/// Reading half: the data of the frames, EOF at the end frame, an error at
/// an abort or when the connection ends without an end frame.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    remaining: usize,
    head: [u8; 4],
    have: usize,
    /// Reading an abort's reason: its length once known, and the bytes.
    abort: Option<(Option<usize>, Vec<u8>)>,
    done: bool,
}

impl<R> FrameReader<R> {
    /// Reads frames from `inner`.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            remaining: 0,
            head: [0; 4],
            have: 0,
            abort: None,
            done: false,
        }
    }
}

fn fill<R: AsyncRead + Unpin>(
    inner: &mut R,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut rb = ReadBuf::new(buf);
    ready!(Pin::new(inner).poll_read(cx, &mut rb))?;
    Poll::Ready(Ok(rb.filled().len()))
}

fn ended(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some((len, reason)) = &mut this.abort {
                match len {
                    None => {
                        let n = ready!(fill(&mut this.inner, cx, &mut this.head[this.have..2]))?;
                        if n == 0 {
                            return Poll::Ready(Err(ended("the tunnel was aborted")));
                        }
                        this.have += n;
                        if this.have == 2 {
                            let l = u16::from_be_bytes([this.head[0], this.head[1]]) as usize;
                            *len = Some(l.min(MAX_REASON));
                            this.have = 0;
                        }
                    }
                    Some(l) if reason.len() < *l => {
                        let mut chunk = [0u8; 256];
                        let want = (*l - reason.len()).min(chunk.len());
                        let n = ready!(fill(&mut this.inner, cx, &mut chunk[..want]))?;
                        if n == 0 {
                            *l = reason.len();
                        }
                        reason.extend_from_slice(&chunk[..n]);
                    }
                    Some(_) => {
                        let msg = String::from_utf8_lossy(reason).into_owned();
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!("the tunnel was aborted: {msg}"),
                        )));
                    }
                }
                continue;
            }
            if this.remaining > 0 {
                let limit = this.remaining.min(buf.remaining());
                let n = ready!(fill(
                    &mut this.inner,
                    cx,
                    &mut buf.initialize_unfilled()[..limit]
                ))?;
                if n == 0 {
                    return Poll::Ready(Err(ended("the connection ended inside a frame")));
                }
                buf.advance(n);
                this.remaining -= n;
                return Poll::Ready(Ok(()));
            }
            let n = ready!(fill(&mut this.inner, cx, &mut this.head[this.have..]))?;
            if n == 0 {
                return Poll::Ready(Err(ended(
                    "the connection ended without the end of the tunnel",
                )));
            }
            this.have += n;
            if this.have < 4 {
                continue;
            }
            this.have = 0;
            match u32::from_be_bytes(this.head) {
                FIN => this.done = true,
                ABORT => this.abort = Some((None, Vec::new())),
                n if n as usize > MAX_FRAME => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a frame of {n} bytes, at most {MAX_FRAME}"),
                    )))
                }
                n => this.remaining = n as usize,
            }
        }
    }
}

/// Writing half: each write is (part of) a data frame; `shutdown` sends the
/// end frame; [`abort`](Self::abort) the abort frame.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    /// Data bytes still due in the current frame.
    left: usize,
    head: [u8; 4],
    head_sent: usize,
    /// Bytes of the end frame sent, once shutting down.
    fin_sent: Option<usize>,
    ended: bool,
}

impl<W> FrameWriter<W> {
    /// Writes frames to `inner`.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            left: 0,
            head: [0; 4],
            head_sent: 4,
            fin_sent: None,
            ended: false,
        }
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Sends the abort frame with `reason` (best effort, within 2 s) and
    /// shuts the connection down.
    pub async fn abort(&mut self, reason: &str) {
        if self.ended {
            return;
        }
        self.ended = true;
        let mut r = reason.as_bytes();
        if r.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            r = &r[..end];
        }
        let mut out = Vec::with_capacity(6 + r.len());
        // Pad a frame cut short, so the abort starts at a frame boundary.
        out.resize(if self.head_sent < 4 { 0 } else { self.left }, 0);
        if self.head_sent < 4 {
            out.extend_from_slice(&self.head[self.head_sent..]);
            out.resize(out.len() + self.left, 0);
        }
        out.extend_from_slice(&ABORT.to_be_bytes());
        out.extend_from_slice(&(r.len() as u16).to_be_bytes());
        out.extend_from_slice(r);
        let inner = &mut self.inner;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            inner.write_all(&out).await?;
            inner.shutdown().await
        })
        .await;
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FrameWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the end of the tunnel",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.left == 0 {
            let n = buf.len().min(MAX_FRAME);
            this.head = (n as u32).to_be_bytes();
            this.head_sent = 0;
            this.left = n;
        }
        while this.head_sent < 4 {
            let data = &buf[..buf.len().min(this.left)];
            let bufs = [
                IoSlice::new(&this.head[this.head_sent..]),
                IoSlice::new(data),
            ];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let head_left = 4 - this.head_sent;
            if n <= head_left {
                this.head_sent += n;
                continue;
            }
            this.head_sent = 4;
            let d = n - head_left;
            this.left -= d;
            return Poll::Ready(Ok(d));
        }
        let data = &buf[..buf.len().min(this.left)];
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        this.left -= n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.ended {
            if this.left > 0 || this.head_sent < 4 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "shutdown inside a frame",
                )));
            }
            let fin = FIN.to_be_bytes();
            let mut sent = this.fin_sent.unwrap_or(0);
            while sent < 4 {
                let r = Pin::new(&mut this.inner).poll_write(cx, &fin[sent..]);
                let n = match r {
                    Poll::Pending => {
                        this.fin_sent = Some(sent);
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => r?,
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                sent += n;
            }
            this.fin_sent = Some(4);
            this.ended = true;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn data_end_and_abort() {
        let (a, b) = tokio::io::duplex(64);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let writer = tokio::spawn(async move {
            w.write_all(&vec![7u8; 3000]).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, vec![7u8; 3000]);
        writer.await.unwrap();

        let (a, b) = tokio::io::duplex(64);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        tokio::spawn(async move {
            w.write_all(b"abc").await.unwrap();
            w.abort("the agent's session ended").await;
        });
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(got, b"abc");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(
            err.to_string().contains("the agent's session ended"),
            "{err}"
        );

        // A connection that just ends is an error, not an EOF.
        let (a, b) = tokio::io::duplex(64);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        w.write_all(b"xy").await.unwrap();
        drop(w);
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
