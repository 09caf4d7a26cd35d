//! Tunnels through the hub: raw TCP services behind agents, reached by
//! name like `ssh -W`.
//!
//! * `backchannel agent --expose-tcp NAME=HOST:PORT` offers a TCP service
//!   as tunnel service `NAME` ([`agent`]).
//! * `backchannel tunnel --hub HUB --peer AGENT --service NAME` connects to
//!   the hub with the tunnel magic, asks for `NAME` on `AGENT` and relays
//!   stdin/stdout (`--stdio`) or each connection accepted on `--listen`
//!   ([`cli`]).
//! * The hub checks the caller against its policy (`tunnels` in
//!   `[[callers]]` rules), opens a tunnel on the agent's session, and
//!   relays ([`hub`]). Between caller and hub the bytes travel in
//!   [`frames`], so that a tunnel that failed ends with an error and its
//!   reason, never a clean end.

pub mod agent;
pub mod cli;
pub mod frames;
pub mod hub;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Copy buffer per direction.
const BUF: usize = 256 * 1024;

/// Copies `r` to `w` until EOF, then shuts `w` down (half-close); counts
/// the bytes in `counter`. Returns the bytes copied.
pub(crate) async fn pump<R, W>(r: &mut R, w: &mut W, counter: &[&AtomicU64]) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        // Stdout is line-buffered: a tunnel's bytes must not wait for a
        // newline (sockets and streams flush at no cost).
        w.flush().await?;
        total += n as u64;
        for c in counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
