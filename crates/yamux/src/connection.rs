//! The connection task: drives the read side, the write side, keepalive
//! and the close of a session.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::AsyncRead,
    io::AsyncWrite,
    time::{Instant, Interval, MissedTickBehavior, Sleep},
};
use tracing::{debug, info};

use crate::{
    error::{EndReason, ResetReason, SessionError, StreamError},
    frame::{GoAwayCode, Header},
    read::ReadSide,
    shared::Shared,
    write::{WriteSide, BUDGET, KEEP_OUT},
};

/// A ping's opaque value, when it went out, and its answer's deadline.
type PingInFlight = (u32, Instant, Option<Pin<Box<Sleep>>>);

/// Keepalive pings: the interval, and the ping in flight with the
/// deadline for its answer.
pub(crate) struct Keepalive {
    interval: Option<Interval>,
    timeout: Duration,
    /// The ping in flight: its opaque value, when it went out, and the
    /// deadline for its answer (none for the RTT probe of a session
    /// without keepalive: its silence is not an error).
    ping: Option<PingInFlight>,
    ping_id: u32,
    /// The RTT probe is still to be sent.
    probe: bool,
}

impl Keepalive {
    pub(crate) fn new(every: Option<Duration>, timeout: Duration, probe: bool) -> Self {
        let interval = every.map(|every| {
            let mut iv = tokio::time::interval_at(Instant::now() + every, every);
            iv.set_missed_tick_behavior(MissedTickBehavior::Delay);
            iv
        });
        Keepalive {
            interval,
            timeout,
            ping: None,
            ping_id: 0,
            probe,
        }
    }

    /// A pong with `opaque` arrived: the round-trip time if it answers our
    /// ping in flight.
    pub(crate) fn on_pong(&mut self, opaque: u32) -> Option<Duration> {
        match &self.ping {
            Some((p, sent, _)) if *p == opaque => {
                let rtt = sent.elapsed();
                self.ping = None;
                Some(rtt)
            }
            _ => None,
        }
    }

    /// Sends a ping when due (none while one is unanswered); fails once a
    /// ping is unanswered for the timeout, to the timer's precision.
    /// `Ok(true)` if a ping went out.
    fn poll(&mut self, shared: &Shared, cx: &mut Context<'_>) -> Result<bool, SessionError> {
        if let Some((_, _, Some(deadline))) = &mut self.ping {
            if deadline.as_mut().poll(cx).is_ready() {
                return Err(SessionError::KeepaliveTimeout(self.timeout));
            }
        }
        let due = match &mut self.interval {
            Some(iv) => iv.poll_tick(cx).is_ready(),
            None => false,
        };
        if self.ping.is_some() || !(due || self.probe) {
            return Ok(false);
        }
        self.probe = false;
        self.ping_id = self.ping_id.wrapping_add(1);
        let deadline = self.interval.as_ref().map(|_| {
            let mut deadline = Box::pin(tokio::time::sleep(self.timeout));
            // Registers the timer with this task.
            let _ = deadline.as_mut().poll(cx);
            deadline
        });
        self.ping = Some((self.ping_id, Instant::now(), deadline));
        shared.lock().push(Header::ping(self.ping_id));
        Ok(true)
    }
}

/// Streams whose handle was dropped while the peer's half was open: reset
/// and forgotten when the peer does not close it within the timeout.
pub(crate) struct CloseTimers {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl CloseTimers {
    pub(crate) fn new() -> Self {
        CloseTimers { sleep: None }
    }

    /// Resets the streams whose time is up; arms the timer for the next.
    /// `true` if any was reset.
    fn poll(&mut self, shared: &Shared, cx: &mut Context<'_>, wake: &mut Vec<Waker>) -> bool {
        let mut inner = shared.lock();
        let now = Instant::now();
        let mut any = false;
        while let Some(&(at, id)) = inner.close_timers.front() {
            if at > now {
                break;
            }
            inner.close_timers.pop_front();
            if inner.streams.get(&id).is_some_and(|st| st.detached) {
                debug!(stream = %id, "peer kept a closed stream open past the close timeout; resetting it");
                inner.reset_stream(
                    id,
                    StreamError::ResetLocally(ResetReason::CloseTimeout),
                    wake,
                );
                any = true;
            }
        }
        let next = inner.close_timers.front().map(|&(at, _)| at);
        drop(inner);
        match next {
            None => self.sleep = None,
            Some(at) => {
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if sleep.deadline() != at {
                    sleep.as_mut().reset(at);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    // Due meanwhile: handled on the next round.
                    cx.waker().wake_by_ref();
                }
            }
        }
        any
    }
}

/// The session's I/O: a future that reads and dispatches frames and writes
/// the queued ones, until the session ends. Spawn it.
///
/// Resolves to `Ok(())` when the session was closed by either side with a
/// GoAway, or to the [`SessionError`] that ended it.
#[must_use = "the session does nothing unless its Connection is polled (spawn it)"]
pub struct Connection<T> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) read: ReadSide<T>,
    pub(crate) write: WriteSide,
    pub(crate) keepalive: Keepalive,
    pub(crate) close_timers: CloseTimers,
    /// Set when the configuration was invalid: the session ends at once.
    pub(crate) invalid: Option<SessionError>,
    pub(crate) closing: bool,
    pub(crate) finished: bool,
    pub(crate) wake: Vec<Waker>,
}

impl<T> std::fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closing", &self.closing)
            .field("finished", &self.finished)
            .finish()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Future for Connection<T> {
    type Output = Result<(), SessionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(Ok(()));
        }
        let result = match this.invalid.take() {
            Some(e) => Err(e),
            None => match this.drive(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(SessionError::ClosedByPeer))
                    if this.shared.lock().remote_goaway =>
                {
                    Ok(())
                }
                Poll::Ready(r) => r,
            },
        };
        let reason = match &result {
            Ok(()) => {
                debug!("yamux session ended");
                EndReason::Closed
            }
            Err(e) if e.is_normal_end() => {
                debug!("yamux session ended: the peer closed the connection");
                e.end_reason()
            }
            Err(e) => {
                info!(error = %e, "yamux session failed");
                e.end_reason()
            }
        };
        this.finish(reason);
        Poll::Ready(result)
    }
}

impl<T> Drop for Connection<T> {
    fn drop(&mut self) {
        self.finish(EndReason::Closed);
    }
}

impl<T> Connection<T> {
    /// Marks the session dead and wakes every handle.
    fn finish(&mut self, reason: EndReason) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut wake = std::mem::take(&mut self.wake);
        {
            let mut inner = self.shared.lock();
            inner.ended = Some(reason);
            inner.out = BytesMut::new();
            wake.append(&mut inner.out_waiters);
            for st in inner.streams.values_mut() {
                st.wake_all(&mut wake);
            }
            let detached: Vec<_> = inner
                .streams
                .iter()
                .filter(|(_, st)| st.detached)
                .map(|(id, _)| *id)
                .collect();
            for id in detached {
                inner.remove(id);
            }
        }
        // Closes the transport (with the read half, dropped with `self`).
        self.shared.lock_writer().io = None;
        // Outside the lock: dropping the sender may drop queued streams,
        // whose Drop takes the lock.
        self.read.accept = None;
        self.shared.ended.cancel();
        for w in wake {
            w.wake();
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection<T> {
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SessionError>> {
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > BUDGET {
                // Let the streams' tasks run; come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !self.closing {
                let mut inner = self.shared.lock();
                if inner.close_requested {
                    inner.push(Header::go_away(GoAwayCode::Normal));
                    self.closing = true;
                    debug!("yamux session closing (GoAway sent)");
                }
            }
            let mut progress = self.keepalive.poll(&self.shared, cx)?;
            progress |= self.close_timers.poll(&self.shared, cx, &mut self.wake);
            for w in self.wake.drain(..) {
                w.wake();
            }
            let (wrote, idle) = self.write.poll(&self.shared, cx, &mut self.wake)?;
            progress |= wrote;
            if self.closing && idle {
                std::task::ready!(self.write.poll_shutdown(&self.shared, cx));
                return Poll::Ready(Ok(()));
            }
            {
                // Reading goes on while closing, so that a peer blocked on
                // writing to us can drain what we write.
                match self.read.poll(cx, &mut self.keepalive, &mut self.wake) {
                    Ok(read) => progress |= read,
                    Err(SessionError::ClosedByPeer) if self.closing => {
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) => {
                        // Best effort, without waiting (a GoAway may be
                        // queued): the connection is torn down right after.
                        let mut cx = Context::from_waker(Waker::noop());
                        let _ = self.write.poll(&self.shared, &mut cx, &mut self.wake);
                        return Poll::Ready(Err(e));
                    }
                }
            }
            if progress {
                continue;
            }
            let mut inner = self.shared.lock();
            if inner.handles == 0 && !inner.close_requested {
                debug!("every handle of the yamux session is gone; closing it");
                inner.close_requested = true;
            }
            let more = (idle && !inner.out.is_empty())
                || std::mem::take(&mut inner.kick)
                || (inner.close_requested && !self.closing);
            if more {
                continue;
            }
            inner.park_driver(cx.waker());
            if inner.out.is_empty() && inner.out.capacity() > KEEP_OUT {
                inner.out = BytesMut::new();
            }
            return Poll::Pending;
        }
    }
}
