//! The vocabulary every other part speaks: the request to decide on ([`CheckInput`]), the answer
//! ([`Decision`], [`Denial`], [`Reason`]), why one step refused ([`Failure`]), header value
//! templates and query parameters.
//!
//! This module depends on nothing else in the crate, so identity, credentials, the policy engine,
//! telemetry and the transports can all use it without depending on each other.

pub mod decision;
pub mod metadata;
pub mod query;
pub mod reason;
pub mod request;
pub mod template;

pub use decision::{
    DECISION_ID_HEADER, Decision, Denial, Facts, Header, Outcome, Step, StepResult,
};
pub use metadata::Metadata;
pub use reason::Reason;
pub use request::{BadHeaders, CheckInput, Headers, RequestHeader};

/// Why one check refused a request: the answer the client sees, and a detail for explanations and
/// logs (never a token, key or secret).
#[derive(Debug)]
pub struct Failure {
    /// The response.
    pub denial: Denial,
    /// Detail for `portcullis check` and logs.
    pub detail: String,
}

/// Whether a check may wait for the network: to fetch signing keys, or a backend token that is
/// not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Fetch what is missing and wait for it (the service, on its async runtime).
    Wait,
    /// Use only what is cached; a step that would have to fetch says so instead
    /// (`policy::PolicySet::decide_now`, for callers without an async runtime on their thread).
    Never,
}
