//! portcullis as an Envoy dynamic module: the policy core of `portcullis-core`, decided inside
//! Envoy's own worker threads instead of over an ext_authz round trip.
//!
//! - [`abi`]: Envoy 1.40's dynamic-module ABI, hand-bound; the only place with `unsafe`.
//! - [`engine`]: one filter config: the compiled policy, its key and token caches, the tokio
//!   runtime (its own threads) that fetches them, and the config file watcher.
//! - [`request`]: Envoy's request headers and connection as the policy's `CheckInput`, read the
//!   way the ext_authz path reads a `CheckRequest`.
//! - [`filter`]: one stream: decide at once when everything is cached, else park the stream and
//!   resume it from the runtime through Envoy's scheduler.
//! - [`wire`]: a decision as Envoy effects, the same status, headers and body as the ext_authz
//!   path (`portcullis::server::grpc`).
//! - [`route`]: per-route settings (context extensions).
//! - [`logging`]: `tracing` into Envoy's log.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod abi;
mod engine;
mod filter;
mod logging;
mod request;
mod route;
mod wire;
