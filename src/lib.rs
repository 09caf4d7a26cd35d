//! Shared pieces of the `backchannel` command and the end-to-end tests: the
//! generated protobuf code and the example services.

pub mod agent;
pub mod bench;
pub mod demo;
pub mod hub;
pub mod router;
pub mod services;

/// Generated protobuf and gRPC code.
pub mod pb {
    /// `backchannel.testing.v1`: Echo and Callback, used by the demo and tests.
    pub mod testing {
        tonic::include_proto!("backchannel.testing.v1");
    }
    /// `backchannel.bench.v1`: the benchmark service.
    pub mod bench {
        tonic::include_proto!("backchannel.bench.v1");
    }
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
