//! Generates the protobuf/gRPC code from `proto/` without a system `protoc`:
//! `protox` parses the .proto files in pure Rust and `tonic-prost-build`
//! turns the descriptor set into Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/backchannel/testing/v1/testing.proto",
        "proto/backchannel/bench/v1/bench.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".backchannel.bench.v1")
        .compile_fds(fds)?;
    Ok(())
}
