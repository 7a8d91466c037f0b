//! Compiles the public contract in `proto/backstop/v1` into Rust types and tonic stubs.
//!
//! protoc comes from the `protoc-bin-vendored` crate so a fresh machine needs nothing
//! installed; an explicit `PROTOC` in the environment still wins (distribution builds).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut protos: Vec<PathBuf> = std::fs::read_dir("proto/backstop/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();
    tonic_prost_build::configure()
        // Decode failures become INVALID_ARGUMENT (see src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::StrictCodec")
        .file_descriptor_set_path(out_dir.join("backstop_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto")])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
