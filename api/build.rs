//! Compiles `proto/gantry.proto` with the protoc that `protoc-bin-vendored` ships, so no build
//! machine needs a system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // prost-build reads PROTOC; a build script is single-threaded, so setting it here is sound.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/gantry.proto");
    tonic_prost_build::configure().compile_protos(&["proto/gantry.proto"], &["proto"])?;
    Ok(())
}
