//! Generates the demo services' protobuf/gRPC code with `protox` (no system
//! `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/backchannel/testing/v1/testing.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
