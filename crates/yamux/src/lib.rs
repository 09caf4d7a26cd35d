//! A yamux session for tokio, built for throughput and latency and
//! interoperable with hashicorp/yamux (Go) and other implementations of
//! [the yamux spec](https://github.com/hashicorp/yamux/blob/master/spec.md).
//!
//! # Design
//! * **One task per session.** [`Connection`] is a future that owns the
//!   transport: it reads and demultiplexes frames and writes everything the
//!   streams queued. Spawn it (or poll it yourself).
//! * **Shared state instead of channels.** Streams and the connection share
//!   one lock. A stream's write copies its bytes, with their 12-byte header,
//!   straight into the session's output buffer (one copy; vectored writes
//!   become one frame), and the connection writes that buffer with one
//!   syscall. Window updates credit the stream directly and wake it: no
//!   frame channel, no missed wake-ups.
//! * **Zero-copy receive.** The connection reads into one buffer and hands
//!   each data frame's body to its stream, as it arrives, as `Bytes` slices
//!   of it; the stream's `poll_read` copies them into the caller's buffer
//!   (one copy). Pieces under 16 KiB are copied out instead, so that unread
//!   small frames do not keep whole read buffers alive. A bulk transfer
//!   cycles through the same few read buffer allocations, reused once their
//!   slices are read, rather than a fresh one per read.
//! * **Bounded memory, whatever the peer does.**
//!   - Received data: a stream holds at most its receive window (a peer that
//!     sends more breaks the protocol and the session ends with GoAway), and
//!     the whole session at most [`Config::with_max_buffered`] (default
//!     32 MiB). Copied frames are charged their length; a read buffer
//!     allocation that unread slices keep alive is charged once, its whole
//!     size, until the last slice of it is read. When a frame does not fit
//!     as a slice it is copied; when even that does not fit, the stream
//!     holding the most unread data is reset ([`StreamError::ResetLocally`]
//!     with [`ResetReason::BufferBudget`]) until it fits, so a stream nobody
//!     reads pays, not the one whose frame came next. The memory held for
//!     unread data is at most the budget (twice that counting the growth
//!     slack of copy buffers), plus one read buffer (up to 256 KiB) being
//!     filled and 16 KiB per stream of emptied copy buffer; a session that
//!     reads in bulk also keeps read buffers whose slices were read, for
//!     reuse, up to the stream window (at least 512 KiB) in bytes, until it
//!     has read nothing for half a second.
//!     [`Control::buffered_bytes`] reports the charged bytes.
//!   - Streams: at most [`Config::with_max_streams`]; a dropped stream whose
//!     peer never closes its half is reset after
//!     [`Config::with_stream_close_timeout`].
//!   - Output: a stream writer waits while the output buffer is over a
//!     high-water mark (512 KiB); the connection stops reading while a peer
//!     floods it with frames that need answers (pings) faster than it reads
//!     ours; an idle session frees its read and write buffers.
//! * **Bounded time.** A write to the transport that stalls (no progress,
//!   one continuous stall) for [`Config::with_write_timeout`] ends the
//!   session; so does a ping unanswered for the keepalive timeout, to the
//!   timer's precision. Closing (GoAway, flush, transport shutdown) takes at
//!   most the write timeout per step.
//! * **Errors by cause.** A stream's errors are `io::Error`s carrying a
//!   [`StreamError`]: reset by the peer, reset by us (close timeout, budget),
//!   session closing, or the session ended and why ([`EndReason`]). A reset
//!   stream never reads as a clean EOF.
//!
//! # Compatibility with hashicorp/yamux
//! Frames for a stream that was never opened end the session with a
//! protocol error, where hashicorp ignores them: a conforming peer never
//! sends one (a stream's first frame carries SYN, and the IDs we refuse are
//! remembered), so this only stops peers that are already broken. GoAway
//! with code 1 or 2 ends the session, as in hashicorp; a peer that closes
//! the connection without GoAway (hashicorp's `Close()`) ends it with
//! [`SessionError::ClosedByPeer`], a normal end
//! ([`SessionError::is_normal_end`]).
//!
//! # Example
//! ```
//! use backchannel_yamux::{Config, Mode, session};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (a, b) = tokio::io::duplex(64 * 1024);
//! let (client, _client_in, client_conn) = session(a, Config::default(), Mode::Client);
//! let (_server, mut server_in, server_conn) = session(b, Config::default(), Mode::Server);
//! tokio::spawn(client_conn);
//! tokio::spawn(server_conn);
//!
//! let mut out = client.open_stream()?;
//! out.write_all(b"hello").await?;
//! out.shutdown().await?;
//!
//! let mut inc = server_in.accept().await.expect("a stream");
//! let mut got = String::new();
//! inc.read_to_string(&mut got).await?;
//! assert_eq!((inc.id(), got.as_str()), (1, "hello"));
//! # Ok(()) }
//! ```

#![warn(missing_docs, missing_debug_implementations)]

mod config;
mod connection;
mod error;
pub mod frame;
mod read;
mod session;
mod shared;
mod stream;
mod stream_state;
mod write;

pub use config::{Config, Mode};
pub use connection::Connection;
pub use error::{
    ConfigError, EndReason, OpenError, ProtocolViolation, ResetReason, SessionError, StreamError,
};
pub use session::Stats;
pub use session::{session, Control, Incoming};
pub use stream::{ResetHandle, Stream};
