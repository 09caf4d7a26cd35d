//! The `backchannel demo`: a server and a client on loopback showing forward
//! and reverse calls and a plain gRPC client on the same port, then the
//! sidecar (a hub, an agent and callers reaching a private service by name).
//!
//! Its example services, [`services::EchoService`] and
//! [`services::CallbackService`], are also what the end-to-end tests serve.

mod demo;
pub mod services;

pub use demo::run;

/// Generated protobuf and gRPC code.
pub mod pb {
    /// `backchannel.testing.v1`: Echo and Callback, used by the demo and tests.
    pub mod testing {
        tonic::include_proto!("backchannel.testing.v1");
    }
}
