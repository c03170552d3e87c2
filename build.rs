//! Compiles `proto/` with a pure-Rust protobuf compiler (protox), so building needs no system `protoc`,
//! and writes the file descriptor set that gRPC server reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "envoy/service/auth/v3/external_auth.proto",
    "envoy/service/auth/v3/attribute_context.proto",
    "envoy/config/core/v3/address.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/type/v3/http_status.proto",
    "google/rpc/status.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("portcullis_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: tonic decodes from one buffer, so header values become
        // slices of it instead of one copy (and allocation) per header.
        .bytes(".")
        // `google.protobuf.Struct` as its encoded bytes: the decision writes its dynamic metadata
        // straight into protobuf (portcullis_core::check::metadata), with no map of Values to
        // build; incoming Structs (metadata_context), which nothing reads, are kept as bytes.
        .extern_path(".google.protobuf.Struct", "crate::proto::RawStruct")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
