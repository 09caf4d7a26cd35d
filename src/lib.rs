//! Shared pieces of the `backchannel` command and the end-to-end tests: the
//! generated protobuf code and the example services.

pub mod demo;
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
}
