//! Generates the benchmark service's protobuf/gRPC code with `protox` (no
//! system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/backchannel/bench/v1/bench.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".backchannel.bench.v1")
        .compile_fds(fds)?;
    Ok(())
}
