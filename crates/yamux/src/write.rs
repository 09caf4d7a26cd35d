//! The connection's write side: the transport's write half, the frames
//! being written, and the write deadline.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{io::AsyncWrite, time::Sleep};

use crate::{error::SessionError, frame::HEADER_LEN, shared::Shared};

/// Writes (or reads) per poll before the driver yields to other tasks.
pub(crate) const BUDGET: usize = 32;
/// An idle session keeps an output buffer up to this size.
pub(crate) const KEEP_OUT: usize = 4 * 1024;

/// The transport's write half and the bytes being written.
pub(crate) struct Writer {
    pub(crate) io: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    /// Frames being written (swapped with `Inner::out`: two buffers that
    /// keep their capacity, so steady traffic allocates nothing).
    buf: BytesMut,
    /// How much of `buf` is written.
    pos: usize,
    need_flush: bool,
    /// A stream's direct write moved bytes (or a flush) since the
    /// connection task last looked: any stall it timed is over.
    progressed: bool,
}

impl Writer {
    pub(crate) fn new(io: Pin<Box<dyn AsyncWrite + Send>>) -> Self {
        Writer {
            io: Some(io),
            buf: BytesMut::new(),
            pos: 0,
            need_flush: false,
            progressed: false,
        }
    }

    /// Nothing in flight: a frame may go straight to the transport.
    pub(crate) fn is_idle(&self) -> bool {
        self.io.is_some() && self.pos == self.buf.len() && !self.need_flush
    }

    /// Writes one frame (header + the first `n` bytes of `bufs`) straight to
    /// the transport, with the writing task's context. What the transport
    /// does not take now is kept for the connection task, which must then
    /// be woken (returns `true`).
    pub(crate) fn write_direct(
        &mut self,
        cx: &mut Context<'_>,
        header: [u8; HEADER_LEN],
        bufs: &[IoSlice<'_>],
        n: usize,
    ) -> bool {
        let Some(io) = self.io.as_mut() else {
            return false;
        };
        self.buf.clear();
        self.pos = 0;
        let mut slices = [IoSlice::new(&[]); 8];
        slices[0] = IoSlice::new(&header);
        let mut count = 1;
        let mut left = n;
        for b in bufs {
            if left == 0 || count == slices.len() {
                break;
            }
            let k = b.len().min(left);
            slices[count] = IoSlice::new(&b[..k]);
            count += 1;
            left -= k;
        }
        if left > 0 {
            // More slices than one writev takes here (h2 uses two): queue
            // the whole frame instead.
            self.buf.extend_from_slice(&header);
            put_prefix(&mut self.buf, bufs, n);
            return true;
        }
        let mut parts = &mut slices[..count];
        let mut unwritten = HEADER_LEN + n;
        while unwritten > 0 {
            match io.as_mut().poll_write_vectored(cx, parts) {
                Poll::Ready(Ok(k)) if k > 0 => {
                    self.progressed = true;
                    let k = k.min(unwritten);
                    unwritten -= k;
                    IoSlice::advance_slices(&mut parts, k);
                }
                _ => break,
            }
        }
        if unwritten == 0 {
            self.need_flush = true;
            if let Poll::Ready(Ok(())) = io.as_mut().poll_flush(cx) {
                self.need_flush = false;
                return false;
            }
            return true;
        }
        // Keep the rest of the frame, in order, for the connection task
        // (which also sees any error again).
        for p in parts.iter() {
            self.buf.extend_from_slice(p);
        }
        true
    }
}

/// Appends the first `n` bytes of `bufs` to `buf`.
pub(crate) fn put_prefix(buf: &mut BytesMut, bufs: &[IoSlice<'_>], n: usize) {
    let mut left = n;
    for b in bufs {
        if left == 0 {
            break;
        }
        let k = b.len().min(left);
        buf.extend_from_slice(&b[..k]);
        left -= k;
    }
}

/// The connection task's part of writing: moves queued frames to the
/// transport and bounds how long the transport may stall.
///
/// The deadline measures one continuous stall: it starts when a write or
/// flush is Pending and is dropped as soon as any write or flush (the
/// connection's or a stream's direct one) completes, or nothing is left
/// to write.
pub(crate) struct WriteSide {
    timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bounds the transport's shutdown after GoAway.
    shutdown_deadline: Option<Pin<Box<Sleep>>>,
}

impl WriteSide {
    pub(crate) fn new(timeout: Duration) -> Self {
        WriteSide {
            timeout,
            deadline: None,
            shutdown_deadline: None,
        }
    }

    /// Writes queued output. Returns whether anything was written, and
    /// whether everything is written and flushed.
    pub(crate) fn poll(
        &mut self,
        shared: &Shared,
        cx: &mut Context<'_>,
        wake: &mut Vec<Waker>,
    ) -> Result<(bool, bool), SessionError> {
        let mut progress = false;
        let mut guard = shared.lock_writer();
        let w = &mut *guard;
        let Some(io) = w.io.as_mut() else {
            return Ok((false, true));
        };
        if std::mem::take(&mut w.progressed) {
            self.deadline = None;
        }
        for _ in 0..BUDGET {
            if w.pos == w.buf.len() {
                w.buf.clear();
                w.pos = 0;
                let mut inner = shared.lock();
                if inner.out.is_empty() {
                    break;
                }
                std::mem::swap(&mut inner.out, &mut w.buf);
                wake.append(&mut inner.out_waiters);
                drop(inner);
                for waker in wake.drain(..) {
                    waker.wake();
                }
            }
            match io.as_mut().poll_write(cx, &w.buf[w.pos..]) {
                Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(n)) => {
                    w.pos += n;
                    w.need_flush = true;
                    self.deadline = None;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {
                    drop(guard);
                    self.poll_deadline(cx)?;
                    return Ok((progress, false));
                }
            }
        }
        let written = w.pos == w.buf.len();
        if written && w.need_flush {
            match io.as_mut().poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    w.need_flush = false;
                    self.deadline = None;
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {
                    drop(guard);
                    self.poll_deadline(cx)?;
                    return Ok((progress, false));
                }
            }
        }
        if written && !w.need_flush {
            // Nothing in flight: no stall to time.
            self.deadline = None;
        }
        if written && w.buf.capacity() > KEEP_OUT && !progress {
            // Idle: give the buffer back.
            w.buf = BytesMut::new();
            w.pos = 0;
        }
        Ok((progress, written))
    }

    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Result<(), SessionError> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Err(SessionError::WriteTimeout(timeout));
        }
        Ok(())
    }

    /// Shuts the transport's write half down (after the GoAway), for at
    /// most the write timeout: a shutdown that cannot complete (a TLS
    /// close_notify the peer never reads) does not keep the session alive.
    pub(crate) fn poll_shutdown(&mut self, shared: &Shared, cx: &mut Context<'_>) -> Poll<()> {
        let mut w = shared.lock_writer();
        if let Some(io) = w.io.as_mut() {
            // Best effort: the peer sees the end either way.
            if io.as_mut().poll_shutdown(cx).is_pending() {
                let timeout = self.timeout;
                let deadline = self
                    .shutdown_deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                tracing::debug!("yamux transport shutdown timed out; dropping it");
            }
        }
        Poll::Ready(())
    }
}
