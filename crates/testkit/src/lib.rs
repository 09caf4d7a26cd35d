//! Helpers shared by the backchannel workspace's tests and benchmarks (not
//! published, linked into nothing that ships).
//!
//! - [`Rng`]: the one deterministic PRNG (xorshift64*), so failures replay;
//! - [`pattern`](mod@pattern): the byte pattern bulk transfers check, and
//!   [`BenchService`], the gRPC service that sends and verifies it;
//! - [`tcp_pair`]: a connected loopback TCP pair;
//! - [`pki`]: a CA with server and client certificates, rustls configs;
//! - [`tokio_yamux`](mod@tokio_yamux): tokio-yamux sessions and a stream wrapper, the
//!   independent yamux that benchmarks compare against and tests interoperate with.
#![warn(missing_docs, missing_debug_implementations)]

pub mod pattern;
pub mod pki;
mod rng;
pub mod tokio_yamux;

pub use pattern::{check_pattern, fill_pattern, pattern, pattern_byte, BenchService};
pub use rng::Rng;

use tokio::net::{TcpListener, TcpStream};

/// Generated protobuf and gRPC code.
pub mod pb {
    /// `backchannel.bench.v1`: the benchmark service.
    #[allow(missing_docs)]
    pub mod bench {
        tonic::include_proto!("backchannel.bench.v1");
    }
}

/// A connected TCP socket pair on loopback with `TCP_NODELAY`: (client end,
/// server end).
pub async fn tcp_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (c, (s, _)) = (c?, s?);
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}
