//! `backchannel`: gRPC calls from a server back into its clients, over the one
//! connection each client opened — through firewalls and NAT.
//!
//! Wire-compatible with GitLab Gitaly's `backchannel` (Go, hashicorp/yamux):
//! the client writes the 11 magic bytes [`MAGIC`], both sides run a yamux
//! session, the client's gRPC channel to the server rides stream 1, and the
//! server opens further streams to call the gRPC service the client serves.
//!
//! # Server
//! A [`ServerHandshaker`] registered with a [`listenmux::ListenMux`] turns
//! every client that sends the magic into a peer of a [`Registry`]; plain
//! gRPC clients share the port. Handlers learn who calls with
//! [`RequestExt::peer_id`] and call back through [`Registry::backchannel`].
//!
//! ```no_run
//! # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
//! use backchannel::{Registry, ServerHandshaker, SessionConfig};
//! let registry = Registry::new();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! let incoming = listenmux::ListenMux::builder()
//!     .handshaker(ServerHandshaker::new(registry.clone(), SessionConfig::server()))
//!     .build()
//!     .incoming(listener);
//! // In a handler: let channel = registry.backchannel_for(&request)?;
//! listenmux::server_builder()
//!     .trace_fn(backchannel::request_span)
//!     .add_routes(routes)
//!     .serve_with_incoming(incoming)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Client
//! A [`Client`] is one session; a [`ReconnectingClient`] keeps one up,
//! dialling again with backoff when it ends.
//!
//! ```no_run
//! # async fn run(routes: tonic::service::Routes) -> Result<(), backchannel::Error> {
//! let client = backchannel::ClientBuilder::new().reconnecting_tcp("127.0.0.1:50051", routes)?;
//! let channel = client.channel(); // forward calls; `routes` answers the reverse calls
//! # drop(channel); Ok(()) }
//! ```

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

mod authority;
mod channel;
mod client;
mod config;
mod error;
mod inbound;
mod preface;
mod raw;
mod reconnect;
mod refuse;
mod registry;
mod request;
mod server;
mod session;
pub mod sidechannel;
mod stream;
mod trace;
pub mod tunnel;

#[doc(hidden)]
pub use authority::rewrite_header_block;
pub use authority::AuthorityFix;
/// A session's flow statistics: round-trip time, windows, bytes in flight
/// (see [`Registry::session_stats`], [`Client::session_stats`]).
pub use backchannel_yamux::ResetHandle;
pub use backchannel_yamux::Stats as SessionStats;
pub use channel::PeerChannel;
pub use client::{Client, ClientBuilder, InboundInfo};
pub use config::SessionConfig;
pub use error::{Error, NotMultiplexed, Step};
pub use inbound::InboundStream;
pub use raw::RawStreams;
pub use reconnect::{Backoff, ConnectionEvent, DisconnectReason, ReconnectingClient};
pub use registry::{PeerEvent, PeerId, PeerInfo, Registry};
pub use request::RequestExt;
pub use server::ServerHandshaker;
pub use sidechannel::{ClientSidechannel, ServerSidechannel, SidechannelError, SidechannelWaiter};
pub use stream::YamuxStream;
pub use trace::request_span;
pub use tunnel::{IncomingTunnel, RefusalKind, Tunnel, TunnelError, TunnelRequest, Tunnels};

/// HTTP/2 stream window used on backchannel channels and servers (2 MiB).
///
/// Both directions multiplex many calls over one HTTP/2 connection; with
/// hyper's defaults (connection window barely above one stream's) a single
/// call whose reader stops can stall every other call. The connection window
/// is therefore [`H2_CONNECTION_WINDOW`], 16 streams' worth.
pub const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// HTTP/2 connection window used on backchannel channels and servers (32 MiB).
pub const H2_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// The 11 bytes a client sends first: ASCII `backchannel`.
pub const MAGIC: listenmux::Magic = *b"backchannel";

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
