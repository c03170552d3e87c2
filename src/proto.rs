//! Generated protobuf types: our wire-compatible subset of Envoy's ext_authz v3 API (see `proto/`).
//!
//! The module tree mirrors the protobuf packages because prost-generated code refers to other packages
//! by relative paths (`super::super::...`).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod envoy {
    pub mod service {
        pub mod auth {
            pub mod v3 {
                tonic::include_proto!("envoy.service.auth.v3");
            }
        }
    }
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use envoy::config::core::v3 as core;
pub use envoy::service::auth::v3 as auth;

/// A `google.protobuf.Struct` held as its protobuf encoding (the fields, without a tag or length
/// of its own). Encoding writes the bytes as they are; decoding keeps each `fields` entry's bytes.
/// [`RawStruct::decode_struct`] gives the `prost_types::Struct` for readers.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RawStruct(pub Vec<u8>);

impl std::fmt::Debug for RawStruct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.decode_struct() {
            Ok(s) => s.fmt(f),
            Err(_) => write!(f, "RawStruct({} bytes, not a Struct)", self.0.len()),
        }
    }
}

impl RawStruct {
    /// The Struct, decoded.
    pub fn decode_struct(&self) -> Result<prost_types::Struct, prost::DecodeError> {
        prost::Message::decode(self.0.as_slice())
    }
}

impl prost::Message for RawStruct {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag != 1 {
            return prost::encoding::skip_field(wire_type, tag, buf, ctx);
        }
        // One `fields` entry: kept as it came, with its key and length written back.
        let mut entry: Vec<u8> = Vec::new();
        prost::encoding::bytes::merge(wire_type, &mut entry, buf, ctx)?;
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut self.0);
        prost::encoding::encode_varint(entry.len() as u64, &mut self.0);
        self.0.extend_from_slice(&entry);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The encoded file descriptor set of every message above, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("portcullis_descriptor");
