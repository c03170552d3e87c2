//! Why a request was denied: the reason codes of the product contract (section 3), each with its gRPC
//! code, HTTP status and default message. One enum, so no handler invents a reason string.

use std::fmt;

/// gRPC status codes used in `CheckResponse.status`.
pub mod grpc_code {
    /// The request may pass.
    pub const OK: i32 = 0;
    /// The CheckRequest itself is unusable.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// Authenticated (or no authentication needed) but not allowed.
    pub const PERMISSION_DENIED: i32 = 7;
    /// A dependency of the decision is unavailable.
    pub const UNAVAILABLE: i32 = 14;
    /// portcullis itself failed.
    pub const INTERNAL: i32 = 13;
    /// Credentials missing or invalid.
    pub const UNAUTHENTICATED: i32 = 16;
}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident = ($text:literal, $grpc:ident, $http:literal, $msg:literal), )*) => {
        /// A reason code: why a check failed.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $( $(#[$doc])* $name, )*
        }

        impl Reason {
            /// Every reason, for documentation and exhaustive tests.
            pub const ALL: &'static [Reason] = &[$(Reason::$name),*];

            /// The code as it appears in responses, logs and metrics.
            pub const fn as_str(self) -> &'static str {
                match self { $(Reason::$name => $text,)* }
            }

            /// The gRPC code of the `CheckResponse.status`.
            pub const fn grpc_code(self) -> i32 {
                match self { $(Reason::$name => grpc_code::$grpc,)* }
            }

            /// The HTTP status the client receives (JWT failures may override it with `failed_status`).
            pub const fn http_status(self) -> u16 {
                match self { $(Reason::$name => $http,)* }
            }

            /// The default message in the deny body.
            pub const fn default_message(self) -> &'static str {
                match self { $(Reason::$name => $msg,)* }
            }
        }
    };
}

reasons! {
    /// No API matched and `unmatched: deny`.
    NoMatchingApi = ("NoMatchingApi", PERMISSION_DENIED, 403, "Unable to match incoming request to an API. Access denied."),
    /// `ip_filter` with `action: allow` and the caller is not listed.
    CallerIpNotAllowed = ("CallerIpNotAllowed", PERMISSION_DENIED, 403, "Caller IP address is not allowed. Access denied."),
    /// `ip_filter` with `action: forbid` and the caller is listed.
    CallerIpBlocked = ("CallerIpBlocked", PERMISSION_DENIED, 403, "Caller IP address is blocked. Access denied."),
    /// The caller's address could not be established.
    FailedToParseCallerIp = ("FailedToParseCallerIP", PERMISSION_DENIED, 403, "Failed to establish IP address for the caller. Access denied."),
    /// A subscription key is required and none was sent.
    SubscriptionKeyNotFound = ("SubscriptionKeyNotFound", UNAUTHENTICATED, 401, "Access denied due to missing subscription key. Make sure to include subscription key when making requests to this API."),
    /// The key is unknown, inactive or out of scope.
    SubscriptionKeyInvalid = ("SubscriptionKeyInvalid", UNAUTHENTICATED, 401, "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."),
    /// A client certificate is required and none was presented.
    ClientCertificateMissing = ("ClientCertificateMissing", UNAUTHENTICATED, 401, "Client certificate is missing."),
    /// The presented certificate could not be parsed.
    ClientCertificateInvalid = ("ClientCertificateInvalid", UNAUTHENTICATED, 401, "Client certificate could not be read."),
    /// The certificate matches none of the identities.
    ClientCertificateIdentityNotMatched = ("ClientCertificateIdentityNotMatched", PERMISSION_DENIED, 403, "Certificate does not match any of allowed identities."),
    /// The certificate's not-after lies in the past.
    ClientCertificateExpired = ("ClientCertificateExpired", PERMISSION_DENIED, 403, "Client certificate has expired."),
    /// RFC 8705: the token is bound to another certificate, to one the client did not present, or
    /// is unbound where the API requires binding.
    TokenCertificateBindingMismatch = ("TokenCertificateBindingMismatch", UNAUTHENTICATED, 401, "Token is not bound to the client certificate."),
    /// No chain from the certificate to a configured CA verifies (`client_certificate.trust`).
    ClientCertificateNotTrusted = ("ClientCertificateNotTrusted", PERMISSION_DENIED, 403, "Client certificate is not trusted."),
    /// A certificate of the chain is revoked by a configured CRL.
    ClientCertificateRevoked = ("ClientCertificateRevoked", PERMISSION_DENIED, 403, "Client certificate has been revoked."),
    /// The certificate's not-before lies in the future.
    ClientCertificateNotYetValid = ("ClientCertificateNotYetValid", PERMISSION_DENIED, 403, "Client certificate is not yet valid."),
    /// No token where the API expects one.
    TokenNotPresent = ("TokenNotPresent", UNAUTHENTICATED, 401, "JWT not present."),
    /// The token is malformed or fails a structural rule.
    JwtInvalid = ("JwtInvalid", UNAUTHENTICATED, 401, "Invalid JWT."),
    /// No key verifies the signature.
    TokenSignatureInvalid = ("TokenSignatureInvalid", UNAUTHENTICATED, 401, "Invalid JWT."),
    /// The token's `kid` names no known key.
    TokenSignatureKeyNotFound = ("TokenSignatureKeyNotFound", UNAUTHENTICATED, 401, "Invalid JWT."),
    /// `exp` has passed.
    TokenExpired = ("TokenExpired", UNAUTHENTICATED, 401, "Invalid JWT."),
    /// `nbf` lies in the future.
    TokenNotYetValid = ("TokenNotYetValid", UNAUTHENTICATED, 401, "Invalid JWT."),
    /// No `aud` value is allowed.
    TokenAudienceNotAllowed = ("TokenAudienceNotAllowed", UNAUTHENTICATED, 401, "Invalid JWT."),
    /// The issuer is not allowed.
    TokenIssuerNotAllowed = ("TokenIssuerNotAllowed", UNAUTHENTICATED, 401, "Invalid JWT."),
    /// Token introspection (RFC 7662) answered `active: false`: revoked, expired or unknown.
    TokenNotActive = ("TokenNotActive", UNAUTHENTICATED, 401, "Token is not active."),
    /// The RFC 9449 DPoP proof is missing, malformed, replayed or does not describe this request.
    DpopProofInvalid = ("DpopProofInvalid", UNAUTHENTICATED, 401, "Invalid DPoP proof."),
    /// A sender-constrained token presented without its binding: a DPoP-bound token (`cnf.jkt`) sent
    /// as `Bearer` or with another key's proof, or an unbound token where binding is required.
    TokenBindingMismatch = ("TokenBindingMismatch", UNAUTHENTICATED, 401, "Invalid JWT."),
    /// A required claim is absent.
    TokenClaimNotFound = ("TokenClaimNotFound", PERMISSION_DENIED, 403, "JWT token is missing a required claim. Access denied."),
    /// A required claim has no allowed value.
    TokenClaimValueNotAllowed = ("TokenClaimValueNotAllowed", PERMISSION_DENIED, 403, "Claim value is not allowed. Access denied."),
    /// Required scopes are missing.
    InsufficientScope = ("InsufficientScope", PERMISSION_DENIED, 403, "The token does not carry the required scopes."),
    /// A header value built from the request would contain control characters.
    HeaderValueNotAllowed = ("HeaderValueNotAllowed", PERMISSION_DENIED, 403, "A value for an upstream header contains characters that are not allowed."),
    /// The backend credential could not be obtained.
    BackendCredentialUnavailable = ("BackendCredentialUnavailable", UNAVAILABLE, 503, "The credential for the backend is unavailable."),
    /// The caller has no connection for a per-user backend credential: consent is needed first.
    BackendCredentialConsentRequired = ("BackendCredentialConsentRequired", PERMISSION_DENIED, 403, "No connection to the backend exists for this caller: consent is required."),
    /// The identity provider's keys have never been obtained.
    IdentityProviderUnavailable = ("IdentityProviderUnavailable", UNAVAILABLE, 503, "The identity provider is unavailable."),
    /// DPoP replays across replicas cannot be ruled out: the shared store (`store.redis`) did not answer.
    ReplayProtectionUnavailable = ("ReplayProtectionUnavailable", UNAVAILABLE, 503, "Replay protection is unavailable."),
    /// The CheckRequest lacks the attributes a decision needs.
    InvalidRequest = ("InvalidRequest", INVALID_ARGUMENT, 400, "The authorization request is incomplete."),
    /// The request path has no canonical form: readers could disagree on what it names.
    RequestPathNotCanonical = ("RequestPathNotCanonical", INVALID_ARGUMENT, 400, "The request path is ambiguous."),
    /// The request host is not a host name or IP literal.
    RequestHostNotCanonical = ("RequestHostNotCanonical", INVALID_ARGUMENT, 400, "The request host is not valid."),
    /// The request's headers exceed the configured size.
    RequestHeadersTooLarge = ("RequestHeadersTooLarge", INVALID_ARGUMENT, 431, "Request headers are too large."),
    /// portcullis itself failed; never an allow.
    Internal = ("Internal", INTERNAL, 500, "Internal error in the authorization service."),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_codes_and_statuses() {
        assert_eq!(Reason::NoMatchingApi.grpc_code(), 7);
        assert_eq!(Reason::SubscriptionKeyNotFound.http_status(), 401);
        assert_eq!(Reason::SubscriptionKeyNotFound.grpc_code(), 16);
        assert_eq!(Reason::ClientCertificateIdentityNotMatched.grpc_code(), 7);
        assert_eq!(Reason::TokenExpired.grpc_code(), 16);
        assert_eq!(Reason::InsufficientScope.http_status(), 403);
        assert_eq!(Reason::BackendCredentialUnavailable.grpc_code(), 14);
        assert_eq!(Reason::BackendCredentialUnavailable.http_status(), 503);
        assert_eq!(Reason::IdentityProviderUnavailable.http_status(), 503);
        assert_eq!(Reason::Internal.http_status(), 500);
        assert_eq!(
            Reason::FailedToParseCallerIp.as_str(),
            "FailedToParseCallerIP"
        );
    }

    #[test]
    fn no_reason_is_ok() {
        assert!(Reason::ALL.iter().all(|r| r.grpc_code() != grpc_code::OK));
    }
}
