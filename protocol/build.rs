//! Compiles the .proto files with protox (pure Rust), so a fresh machine needs
//! no system `protoc`.
fn main() {
    let protos = [
        "proto/ramster/v1/client.proto",
        "proto/ramster/v1/peer.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["proto"]).expect("compile .proto files");
    prost_build::Config::new()
        // Page payloads as `bytes::Bytes`: decoding from a `Bytes` frame slices
        // it instead of copying 4 KiB per page.
        .bytes(["."])
        .compile_fds(descriptors)
        .expect("generate Rust from .proto descriptors");
}
