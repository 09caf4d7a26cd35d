//! Generates the protobuf/gRPC code from `proto/` without a system `protoc`:
//! `protox` parses the .proto files in pure Rust and `tonic-prost-build`
//! turns the descriptor set into Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/backchannel/testing/v1/testing.proto",
        "proto/backchannel/bench/v1/bench.proto",
        "proto/backchannel/hub/v1/hub.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".backchannel.bench.v1")
        .compile_fds(fds)?;
    // The hub serves gRPC reflection for its own API: the encoded descriptor
    // set of hub.proto and its imports.
    let hub_fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .open_files(["proto/backchannel/hub/v1/hub.proto"])?
        .encode_file_descriptor_set();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("backchannel_hub_v1_descriptor.bin"), hub_fds)?;
    Ok(())
}
