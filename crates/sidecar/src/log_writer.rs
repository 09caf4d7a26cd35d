//! Log lines written off the calling thread: a call's audit line is
//! appended to a buffer in memory instead of being written to stderr by the
//! task that finishes the call, and a thread of its own writes the buffer
//! out, a batch at a time, [`BATCH`] after the first line of the batch came.
//! A busy hub then pays no system call per line: not the write, and not a
//! wake-up of the writer thread either (it is woken once per batch).
//!
//! Lines are never dropped: when the writer falls behind (stderr is a slow
//! pipe) by [`MAX_PENDING`] bytes, whoever logs waits for it. [`Guard`]
//! writes what is pending when dropped: keep it until the process ends.
//!
//! ```
//! use std::io::Write;
//! let (logs, guard) = backchannel_sidecar::log_writer::stderr();
//! writeln!(logs.writer(), "hello").unwrap();
//! drop(guard); // written
//! ```

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

/// How long the writer gathers lines before it writes them.
pub const BATCH: Duration = Duration::from_millis(20);

/// Bytes pending before loggers wait for the writer.
pub const MAX_PENDING: usize = 4 << 20;

/// How long [`Guard`]'s drop waits for the pending lines to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The writer waits for a first line (and must be woken for it).
    idle: bool,
    /// Bytes queued so far.
    queued: u64,
    /// Bytes written so far.
    written: u64,
    /// A flush wants the pending lines written without waiting for the batch.
    flush: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer.
    work: Condvar,
    /// Wakes loggers and flushers waiting for a batch to be written.
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hands lines to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct NonBlocking {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NonBlocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonBlocking").finish_non_exhaustive()
    }
}

impl NonBlocking {
    /// A writer for one log event: what is written to it is queued as one
    /// piece when it is dropped (tracing-subscriber's `fmt` makes one per
    /// event).
    pub fn writer(&self) -> LineWriter {
        LineWriter {
            logs: self.clone(),
            buf: Vec::new(),
        }
    }

    fn push(&self, line: &[u8]) {
        let mut st = self.shared.lock();
        while st.pending.len() >= MAX_PENDING {
            self.shared.work.notify_one();
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.pending.extend_from_slice(line);
        st.queued += line.len() as u64;
        if st.idle {
            st.idle = false;
            self.shared.work.notify_one();
        }
    }

    /// Waits until every line queued so far is written (bounded by a few
    /// seconds).
    pub fn flush(&self) {
        let mut st = self.shared.lock();
        let target = st.queued;
        if st.written >= target {
            return;
        }
        st.flush = true;
        self.shared.work.notify_one();
        let deadline = std::time::Instant::now() + FLUSH_TIMEOUT;
        while st.written < target {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            st = self
                .shared
                .done
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// See [`NonBlocking::writer`].
pub struct LineWriter {
    logs: NonBlocking,
    buf: Vec<u8>,
}

impl std::fmt::Debug for LineWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineWriter").finish_non_exhaustive()
    }
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.logs.push(&self.buf);
        }
    }
}

/// Writes the pending lines when dropped.
#[derive(Debug)]
pub struct Guard {
    logs: NonBlocking,
    _thread: Option<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.logs.flush();
    }
}

/// Lines to `out`, written by a thread of their own.
pub fn spawn<W: Write + Send + 'static>(mut out: W) -> (NonBlocking, Guard) {
    let shared = Arc::new(Shared::default());
    let sh = shared.clone();
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            let mut batch = Vec::new();
            loop {
                {
                    let mut st = sh.lock();
                    while st.pending.is_empty() {
                        st.idle = true;
                        st = sh.work.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    st.idle = false;
                    // Gather the lines that follow the first, unless flushed.
                    if !st.flush && st.pending.len() < MAX_PENDING {
                        st = sh
                            .work
                            .wait_timeout(st, BATCH)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    st.flush = false;
                    std::mem::swap(&mut batch, &mut st.pending);
                }
                // Errors (stderr closed) are ignored: the loggers must not
                // wait for a writer that cannot write.
                let _ = out.write_all(&batch);
                let _ = out.flush();
                let n = batch.len() as u64;
                batch.clear();
                if batch.capacity() > MAX_PENDING {
                    batch = Vec::new();
                }
                sh.lock().written += n;
                sh.done.notify_all();
            }
        })
        .ok();
    let logs = NonBlocking { shared };
    (
        logs.clone(),
        Guard {
            logs,
            _thread: thread,
        },
    )
}

/// [`spawn`] on stderr.
pub fn stderr() -> (NonBlocking, Guard) {
    spawn(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_is_dropped() {
        let out = Shared::default();
        let (logs, guard) = spawn(out.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let logs = logs.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        let mut w = logs.writer();
                        write!(w, "t{t} ").unwrap();
                        writeln!(w, "line {i}").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            assert_eq!(mine.len(), 5000);
            for (i, l) in mine.iter().enumerate() {
                assert_eq!(*l, format!("t{t} line {i}"));
            }
        }
    }
}
