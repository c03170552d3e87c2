//! The outcome of one evaluation, independent of the wire: the server adapters turn it into a gRPC
//! `CheckResponse` or an HTTP response, each in exactly one place.

use std::net::IpAddr;
use std::sync::Arc;

use super::metadata::Metadata;
use super::reason::Reason;

/// A subscription's id: up to 23 bytes inline (no allocation in a key table, none when a check
/// copies it into its decision), a longer one shared.
pub type SubscriptionId = smol_str::SmolStr;

/// The header that carries the decision id, upstream on allow and to the client on deny.
pub const DECISION_ID_HEADER: &str = "x-portcullis-decision-id";

/// One decision.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Random id shared by the response, the decision log and the trace.
    pub id: String,
    /// The API that matched, if any.
    pub api: Option<Arc<str>>,
    /// Allow, or deny with its response.
    pub outcome: Outcome,
    /// In shadow mode, the deny that was evaluated but not enforced.
    pub waived: Option<Reason>,
    /// Headers to set on the upstream request (allow only). Always overwrite.
    pub upstream_headers: Vec<Header>,
    /// Headers to remove from the upstream request (allow only).
    pub remove_headers: Vec<String>,
    /// Query parameters to remove from the upstream request (allow only).
    pub remove_query: Vec<String>,
    /// Facts for the decision log.
    pub facts: Facts,
    /// The facts for the proxy: ext_authz `dynamic_metadata` (empty: none).
    pub metadata: Metadata,
    /// Each check on the way, when the caller asked for an explanation (`portcullis check`).
    pub steps: Vec<Step>,
}

/// Allow or deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The request may pass.
    Allow,
    /// The request is refused.
    Deny(Denial),
}

/// What the client receives when refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Why.
    pub reason: Reason,
    /// HTTP status for the client.
    pub status: u16,
    /// The `message` of the JSON body.
    pub message: String,
    /// An RFC 6750 (or subscription-key) challenge.
    pub www_authenticate: Option<String>,
}

impl Denial {
    /// A denial with the reason's default status and message.
    pub fn new(reason: Reason) -> Self {
        Denial {
            reason,
            status: reason.http_status(),
            message: reason.default_message().to_string(),
            www_authenticate: None,
        }
    }

    /// Replaces the message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Adds a challenge.
    pub fn with_challenge(mut self, challenge: String) -> Self {
        self.www_authenticate = Some(challenge);
        self
    }

    /// The JSON body: `{"statusCode": 401, "message": "...", "reason": "...", "decisionId": "..."}`.
    pub fn body(&self, decision_id: &str) -> String {
        serde_json::json!({
            "statusCode": self.status,
            "message": self.message,
            "reason": self.reason.as_str(),
            "decisionId": decision_id,
        })
        .to_string()
    }
}

/// A header to set upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Lower-case name.
    pub name: String,
    /// Value (free of control characters).
    pub value: String,
    /// A credential: shown as `<redacted>` by `portcullis check` and never logged.
    pub sensitive: bool,
}

/// What the decision log records besides the outcome.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The caller's address.
    pub client_ip: Option<IpAddr>,
    /// The subscription whose key was used.
    pub subscription_id: Option<SubscriptionId>,
    /// The token's `sub`.
    pub subject: Option<String>,
    /// How the token was bound to its sender: `certificate` (RFC 8705, checked against the
    /// client certificate), `dpop` (RFC 9449, a valid proof), `none`, or `refused`; never the
    /// proof, the token or the certificate.
    pub token_binding: Option<&'static str>,
}

/// One check's result, for explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `match`, `ip_filter`, `subscription`, `client_certificate`, `jwt`, `backend_credential`, ...
    pub check: &'static str,
    /// Passed, failed or skipped.
    pub result: StepResult,
    /// Human-readable detail. Never a secret.
    pub detail: String,
}

/// The result of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepResult {
    /// Passed.
    Pass,
    /// Failed with this reason.
    Fail(Reason),
    /// Not configured for the API.
    Skip,
}

impl Decision {
    /// An empty decision with a fresh id.
    pub fn new() -> Self {
        Decision {
            id: new_decision_id(),
            api: None,
            outcome: Outcome::Allow,
            waived: None,
            upstream_headers: Vec::new(),
            remove_headers: Vec::new(),
            remove_query: Vec::new(),
            facts: Facts::default(),
            metadata: Metadata::new(),
            steps: Vec::new(),
        }
    }

    /// The deny for an internal failure: never an allow.
    pub fn internal(id: Option<String>) -> Self {
        let mut d = Decision::new();
        if let Some(id) = id {
            d.id = id;
        }
        d.outcome = Outcome::Deny(Denial::new(Reason::Internal));
        d
    }

    /// The reason of a deny (or of the waived deny in shadow mode).
    pub fn reason(&self) -> Option<Reason> {
        match &self.outcome {
            Outcome::Deny(d) => Some(d.reason),
            Outcome::Allow => self.waived,
        }
    }

    /// Whether the request may pass.
    pub fn is_allow(&self) -> bool {
        matches!(self.outcome, Outcome::Allow)
    }
}

impl Default for Decision {
    fn default() -> Self {
        Decision::new()
    }
}

/// 128 random bits as 32 lower-case hex digits.
pub fn new_decision_id() -> String {
    hex::encode(rand::random::<u128>().to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_contract_json() {
        let d = Denial::new(Reason::TokenExpired).with_message("Unauthorized \"quoted\"");
        let v: serde_json::Value = serde_json::from_str(&d.body("abc")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"statusCode": 401, "message": "Unauthorized \"quoted\"", "reason": "TokenExpired", "decisionId": "abc"})
        );
    }

    #[test]
    fn ids_are_unique_hex() {
        let a = new_decision_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_decision_id());
    }
}
