//! portcullis: an external authorization decision service for Envoy's ext_authz v3 API.
//!
//! The pipeline reads top to bottom: [`config`] (what the user wrote) compiles into a [`policy`] set
//! (what a request is evaluated against), which [`server`] adapters expose over gRPC and HTTP.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod credentials;
pub mod identity;
pub mod policy;
pub mod proto;
pub mod server;
pub mod telemetry;
