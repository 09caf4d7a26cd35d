//! Generates the hub's protobuf/gRPC code from `proto/` without a system
//! `protoc`: `protox` parses the .proto files in pure Rust and
//! `tonic-prost-build` turns the descriptor set into Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/backchannel/hub/v1/hub.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // The hub serves gRPC reflection for its own API: the encoded descriptor
    // set of hub.proto and its imports.
    let hub_fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .open_files([proto])?
        .encode_file_descriptor_set();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("backchannel_hub_v1_descriptor.bin"), hub_fds)?;
    Ok(())
}
