//! The policy core of portcullis: a configuration compiled into a policy set, and the decision it
//! gives on one request. No listener, no gRPC, no telemetry export: the service
//! (`portcullis::server`) and the in-process Envoy module both build on this crate.
//!
//! The modules form layers, each using only those below it (`docs/architecture.md`; a test in
//! `tests/architecture.rs` of the service keeps it so):
//!
//! - [`check`]: the vocabulary (the request, the decision, reasons, templates, query parameters);
//! - [`config`]: the file as written, its limits, and the process settings compiled from it;
//! - [`identity`] and [`credentials`]: who the caller is (JWTs and their keys), and the tokens
//!   portcullis holds for backends; neither knows the other or the policy;
//! - [`policy`]: composes them into a policy set and evaluates requests against it.
//!
//! ```
//! use portcullis_core::{config, policy};
//! let src = config::parse(
//!     "apis: [{ name: public, match: { path_prefix: /public } }]",
//!     std::path::Path::new("."),
//! )
//! .unwrap();
//! let runtime = policy::Runtime::offline();
//! let (set, _settings) = policy::compile(&src, &runtime).unwrap();
//! let headers = policy::Headers::new();
//! let input = policy::CheckInput {
//!     method: "GET",
//!     host: "api.example.com",
//!     path: "/public/x",
//!     scheme: "",
//!     headers: &headers,
//!     peer: None,
//!     peer_certificate: "",
//!     context_extensions: None,
//! };
//! // Nothing to fetch: decided on this thread, without an async runtime.
//! let decision = set.decide_now(&input, Default::default()).expect("needs no I/O");
//! assert!(decision.is_allow());
//! ```
#![forbid(unsafe_code)]

pub mod check;
pub mod config;
pub mod credentials;
pub mod digest;
pub mod identity;
pub mod policy;
