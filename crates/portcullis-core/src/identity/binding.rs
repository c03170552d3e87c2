//! RFC 8705 certificate-bound access tokens: a token whose `cnf` claim carries `x5t#S256` (the
//! base64url SHA-256 of a client certificate) is accepted only from a client presenting that
//! certificate, so a stolen token is useless without the certificate's private key.
//!
//! The certificate is the one the client-certificate step read (Envoy's verified peer certificate, or
//! XFCC where the API trusts it); an API without a `client_certificate` section uses Envoy's peer
//! certificate only. A bound token is always checked, whatever the setting; `certificate_bound:
//! required` also refuses tokens that are not bound.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use super::{JwtPolicy, ValidToken};
use crate::check::{Failure, Reason};

/// How a token that passed relates to the client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateBinding {
    /// The token carries no `cnf.x5t#S256` (and the API does not require one).
    Unbound,
    /// The token is bound to the presented certificate.
    Bound,
}

impl CertificateBinding {
    /// For explanations and the decision log.
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateBinding::Unbound => "unbound",
            CertificateBinding::Bound => "bound to the client certificate",
        }
    }
}

impl JwtPolicy {
    /// Whether checking `token` needs the client certificate: it carries a `cnf` claim, or the
    /// API requires bound tokens.
    pub fn wants_certificate(&self, token: &ValidToken) -> bool {
        self.certificate_bound_required || token.claims().contains_key("cnf")
    }

    /// Checks `token`'s certificate binding against the SHA-256 of the certificate the client
    /// presented (`None`: none).
    pub fn check_certificate_binding(
        &self,
        token: &ValidToken,
        cert_sha256: Option<&[u8; 32]>,
        api: &str,
    ) -> Result<CertificateBinding, Failure> {
        let refuse = |detail: &str| {
            self.failure(
                Reason::TokenCertificateBindingMismatch,
                detail.to_string(),
                api,
            )
        };
        let thumbprint = match token.claims().get("cnf") {
            None => None,
            Some(Value::Object(cnf)) => match cnf.get("x5t#S256") {
                None => None,
                Some(Value::String(t)) => Some(t.as_str()),
                Some(_) => return Err(refuse("`cnf.x5t#S256` is not a string")),
            },
            Some(_) => return Err(refuse("`cnf` is not an object")),
        };
        let Some(thumbprint) = thumbprint else {
            if self.certificate_bound_required {
                return Err(refuse(
                    "the token is not bound to a certificate (no `cnf.x5t#S256`), and the API requires it",
                ));
            }
            return Ok(CertificateBinding::Unbound);
        };
        let Some(cert) = cert_sha256 else {
            return Err(refuse(
                "the token is bound to a certificate, and the client presented none",
            ));
        };
        // Exact comparison with the one encoding RFC 8705 allows: unpadded base64url.
        if URL_SAFE_NO_PAD.encode(cert) == thumbprint {
            Ok(CertificateBinding::Bound)
        } else {
            Err(refuse(
                "the token is bound to another certificate (`cnf.x5t#S256` differs)",
            ))
        }
    }
}
