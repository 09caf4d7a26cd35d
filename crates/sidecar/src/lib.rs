//! The backchannel sidecar: reach private gRPC services behind firewalls by
//! name.
//!
//! An [`agent`] runs next to a private gRPC service and dials *out* to a
//! [`hub`]; any gRPC client that can reach the hub then calls the service
//! through it by adding one metadata key, `backchannel-peer: <name>`
//! ([`hub::routing::PEER_HEADER`]). The hub forwards calls as raw HTTP/2
//! gRPC ([`router`]), so it needs none of the service's protos.
//!
//! ```no_run
//! use backchannel_sidecar::hub::{Hub, HubConfig};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let hub = Hub::start(HubConfig::default()).await?;
//! println!("hub on {:?}", hub.addr);
//! # Ok(()) }
//! ```

#![warn(missing_debug_implementations)]

pub mod addr;
pub mod agent;
pub mod hub;
pub mod log_writer;
pub mod peers_cmd;
pub mod router;
pub mod signal;
pub mod tls;
pub mod tunnel;

/// Generated protobuf and gRPC code of the hub's API.
pub mod pb {
    /// `backchannel.hub.v1`: the hub's admin (Peers) and Registration services.
    pub mod hub {
        tonic::include_proto!("backchannel.hub.v1");
        /// Encoded `FileDescriptorSet` of hub.proto and its imports (for reflection).
        pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(
            env!("OUT_DIR"),
            "/backchannel_hub_v1_descriptor.bin"
        ));
    }
}
