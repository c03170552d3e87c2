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

/// The encoded file descriptor set of every message above, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("portcullis_descriptor");
