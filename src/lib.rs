//! portcullis: an external authorization decision service for Envoy's ext_authz v3 API.
//!
//! The policy core ([`check`], [`config`], [`identity`], [`credentials`], [`policy`]) is the
//! `portcullis-core` crate, re-exported here; this crate adds what runs it as a service:
//! [`telemetry`] (logs, traces, metrics, decision log), [`server`] (the gRPC and HTTP adapters,
//! hot reload, the admin API) and [`cli`]. See `docs/architecture.md` for the layers.
#![forbid(unsafe_code)]

pub use portcullis_core::{check, config, credentials, digest, identity, policy};

pub mod cli;
pub mod envoy_config;
pub mod proto;
pub mod server;
pub mod telemetry;
