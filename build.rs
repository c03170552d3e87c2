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

/// The map entry type protobuf declares for `AttributeContext.HttpRequest.headers`.
const HEADERS_ENTRY: &str = ".envoy.service.auth.v3.AttributeContext.HttpRequest.HeadersEntry";

/// The descriptors the Rust code is generated from: as compiled, except that the request's
/// `map<string, bytes> headers` becomes what it is on the wire, a repeated message of `bytes key
/// = 1; bytes value = 2;`. Decoded into `portcullis_core::check::RequestHeader`s (slices of the
/// received buffer), a request's headers cost no `String` per name, no hashing and no table; and
/// a repeated name stays visible, to be refused, where a map would keep the last one silently.
fn headers_as_list(
    mut fds: prost_types::FileDescriptorSet,
) -> Result<prost_types::FileDescriptorSet, Box<dyn std::error::Error>> {
    use prost_types::field_descriptor_proto::Type;
    let entry = fds
        .file
        .iter_mut()
        .filter(|f| f.package() == "envoy.service.auth.v3")
        .flat_map(|f| f.message_type.iter_mut())
        .filter(|m| m.name() == "AttributeContext")
        .flat_map(|m| m.nested_type.iter_mut())
        .filter(|m| m.name() == "HttpRequest")
        .flat_map(|m| m.nested_type.iter_mut())
        .find(|m| m.name() == "HeadersEntry")
        .ok_or("no AttributeContext.HttpRequest.HeadersEntry in proto/")?;
    let options = entry.options.get_or_insert_with(Default::default);
    if options.map_entry != Some(true) {
        return Err("AttributeContext.HttpRequest.headers is no longer a map".into());
    }
    options.map_entry = Some(false);
    let names: Vec<(&str, i32)> = entry.field.iter().map(|f| (f.name(), f.number())).collect();
    if names != [("key", 1), ("value", 2)] {
        return Err(format!("unexpected HeadersEntry fields {names:?}").into());
    }
    for f in &mut entry.field {
        f.set_type(Type::Bytes);
    }
    Ok(fds)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("portcullis_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // The request's `headers` map as a list of `portcullis_core::check::RequestHeader` (see
        // `headers_as_list`); reflection above serves the map as declared.
        .extern_path(HEADERS_ENTRY, "::portcullis_core::check::RequestHeader")
        // `bytes` fields as `bytes::Bytes`: tonic decodes from one buffer, so header values become
        // slices of it instead of one copy (and allocation) per header.
        .bytes(".")
        // `google.protobuf.Struct` as its encoded bytes: the decision writes its dynamic metadata
        // straight into protobuf (portcullis_core::check::metadata), with no map of Values to
        // build; incoming Structs (metadata_context), which nothing reads, are kept as bytes.
        .extern_path(".google.protobuf.Struct", "crate::proto::RawStruct")
        .build_client(true)
        .build_server(true)
        .compile_fds(headers_as_list(fds)?)?;
    Ok(())
}
