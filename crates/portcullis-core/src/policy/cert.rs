//! Client certificates: where they come from (Envoy's `source.certificate` or a trusted
//! `x-forwarded-client-cert`), and matching them against configured identities.

use std::time::SystemTime;

use crate::digest::Sha256;
use std::sync::Arc;
use x509_parser::prelude::*;

use crate::check::{CheckInput, Reason};

/// A client certificate, parsed once per request, with everything identities compare.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// SHA-1 of the DER (API Management's "thumbprint").
    pub sha1: [u8; 20],
    /// SHA-256 of the DER.
    pub sha256: [u8; 32],
    /// Subject as a normalised attribute list.
    pub subject: Dn,
    /// Issuer subject, normalised.
    pub issuer: Dn,
    /// Common names of the subject, lower-case.
    pub common_names: Vec<String>,
    /// Serial number as lower-case hex without leading zeros.
    pub serial: String,
    /// DNS subject alternative names, lower-case.
    pub dns_names: Vec<String>,
    /// URI subject alternative names that are well-formed SPIFFE IDs or other absolute URIs
    /// without dot segments, as written (SPIFFE IDs are compared byte for byte).
    pub uris: Vec<String>,
    /// The certificate itself (for chain verification).
    pub der: Vec<u8>,
    /// Validity, seconds since the epoch.
    pub not_before: i64,
    /// Validity, seconds since the epoch.
    pub not_after: i64,
}

impl ClientCert {
    /// The SHA-1 thumbprint in API Management's form: upper-case hex.
    pub fn thumbprint(&self) -> String {
        hex::encode_upper(self.sha1)
    }
}

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    /// Larger than the configured cap.
    #[error("certificate is larger than {0} bytes")]
    TooLarge(usize),
    /// Not PEM, or the PEM holds no certificate.
    #[error("certificate is not PEM")]
    NotPem,
    /// PEM that holds no valid X.509 certificate.
    #[error("certificate is not valid X.509")]
    NotX509,
}

/// Parses the URL-encoded PEM Envoy puts in `source.certificate` (or an XFCC `Cert=`).
pub fn parse_url_encoded_pem(encoded: &str, max_bytes: usize) -> Result<ClientCert, CertError> {
    if encoded.len() > max_bytes {
        return Err(CertError::TooLarge(max_bytes));
    }
    let pem_bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
    parse_pem(&pem_bytes)
}

/// Parses the first certificate of a PEM document.
pub fn parse_pem(pem: &[u8]) -> Result<ClientCert, CertError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|_| CertError::NotPem)?;
    if pem.label != "CERTIFICATE" {
        return Err(CertError::NotPem);
    }
    from_der(&pem.contents)
}

/// Reads a DER certificate.
pub fn from_der(der: &[u8]) -> Result<ClientCert, CertError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|_| CertError::NotX509)?;
    if !rest.is_empty() {
        return Err(CertError::NotX509);
    }
    let tbs = &cert.tbs_certificate;
    let mut dns_names = Vec::new();
    let mut uris = Vec::new();
    if let Ok(Some(san)) = tbs.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns_names.push(d.to_ascii_lowercase()),
                GeneralName::URI(u) if plain_uri(u) => uris.push((*u).to_string()),
                _ => {}
            }
        }
    }
    let common_names = tbs
        .subject
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_lowercase)
        .collect();
    Ok(ClientCert {
        sha1: crate::digest::sha1_thumbprint(der),
        sha256: Sha256::digest(der),
        subject: Dn::from_x509(&tbs.subject),
        issuer: Dn::from_x509(&tbs.issuer),
        common_names,
        serial: normalize_serial(&tbs.raw_serial_as_string()).unwrap_or_default(),
        dns_names,
        uris,
        der: der.to_vec(),
        not_before: tbs.validity.not_before.timestamp(),
        not_after: tbs.validity.not_after.timestamp(),
    })
}

/// Whether a URI SAN can be matched as written: an absolute URI of visible ASCII with no
/// percent-encoding, query, fragment, dot segment or empty segment (the SPIFFE ID rules, applied to
/// every URI), so `spiffe://td/ns/a/../admin` or `spiffe://td/ns/a%2F..` never passes for a prefix.
pub fn plain_uri(u: &str) -> bool {
    let Some((scheme, rest)) = u.split_once("://") else {
        return false;
    };
    let Some((authority, path)) = rest.split_once('/').or(Some((rest, ""))) else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+' || b == b'-')
        && !authority.is_empty()
        && u.bytes().all(|b| b.is_ascii_graphic())
        && !u.contains(['%', '?', '#', '\\'])
        && (path.is_empty()
            || path
                .split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != ".."))
}

/// A distinguished name as a sorted list of `(TYPE, lower-case value)`. Compared as a set: `CN=a,O=b`
/// and `O=b, CN=a` name the same subject whichever order the CA encoded it in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dn(Vec<(String, String)>);

impl Dn {
    fn from_x509(name: &X509Name<'_>) -> Dn {
        let mut attrs = Vec::new();
        for rdn in name.iter() {
            for attr in rdn.iter() {
                let oid = attr.attr_type();
                let registry = x509_parser::objects::oid_registry();
                let ty = x509_parser::objects::oid2abbrev(oid, registry)
                    .map(str::to_string)
                    .unwrap_or_else(|_| oid.to_id_string());
                let value = attr
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|_| hex::encode(attr.attr_value().data));
                attrs.push((normalize_attr_type(&ty), value.to_lowercase()));
            }
        }
        attrs.sort();
        Dn(attrs)
    }

    /// Parses a DN as written in the config (RFC 4514 style: `CN=partner, O="Contoso, Inc."`).
    pub fn parse(s: &str) -> Result<Dn, String> {
        let mut attrs = Vec::new();
        for part in split_unquoted(s, &[',', ';', '+']) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (ty, value) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not TYPE=value"))?;
            let ty = ty.trim();
            if ty.is_empty()
                || !ty
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            {
                return Err(format!("`{ty}` is not an attribute type"));
            }
            attrs.push((
                normalize_attr_type(ty),
                unquote(value.trim()).to_lowercase(),
            ));
        }
        if attrs.is_empty() {
            return Err("empty distinguished name".into());
        }
        attrs.sort();
        Ok(Dn(attrs))
    }
}

fn normalize_attr_type(ty: &str) -> String {
    let up = ty.to_ascii_uppercase();
    match up.as_str() {
        "EMAILADDRESS" | "EMAIL" | "1.2.840.113549.1.9.1" => "E".into(),
        "S" | "STATEORPROVINCENAME" | "2.5.4.8" => "ST".into(),
        "COMMONNAME" | "2.5.4.3" => "CN".into(),
        "ORGANIZATIONNAME" | "2.5.4.10" => "O".into(),
        "ORGANIZATIONALUNITNAME" | "2.5.4.11" => "OU".into(),
        "COUNTRYNAME" | "2.5.4.6" => "C".into(),
        "LOCALITYNAME" | "2.5.4.7" => "L".into(),
        _ => up,
    }
}

/// Splits at any of `seps` outside double quotes, honouring backslash escapes.
fn split_unquoted<'a>(s: &'a str, seps: &[char]) -> Vec<&'a str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if !quoted && seps.contains(&c) {
            parts.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&s[start..]);
    parts
}

fn unquote(v: &str) -> String {
    let inner = v
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(v);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `01:AB:cd` -> `1abcd`; `None` if it is not hex.
pub fn normalize_serial(s: &str) -> Option<String> {
    let hex: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = hex.trim_start_matches('0');
    Some(if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    })
}

/// One configured identity: every field given must match.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// SHA-1 (20 bytes) or SHA-256 (32 bytes) of the DER.
    pub thumbprint: Option<Vec<u8>>,
    /// Normalised subject.
    pub subject: Option<Dn>,
    /// Normalised issuer subject.
    pub issuer_subject: Option<Dn>,
    /// Lower-case common name.
    pub common_name: Option<String>,
    /// Normalised serial.
    pub serial_number: Option<String>,
    /// Lower-case DNS SAN.
    pub dns_name: Option<String>,
    /// SHA-1 (20 bytes) or SHA-256 (32 bytes) of the issuing certificate (needs `trust`).
    pub issuer_thumbprint: Option<Vec<u8>>,
    /// A URI SAN, exactly (a SPIFFE ID: `spiffe://td/ns/x/sa/y`).
    pub uri: Option<String>,
    /// A URI SAN starting with this, which ends with `/` (`spiffe://td/ns/x/`).
    pub uri_prefix: Option<String>,
}

impl Identity {
    /// Parses a configured thumbprint: hex of SHA-1 or SHA-256, separators and case ignored.
    pub fn parse_thumbprint(s: &str) -> Result<Vec<u8>, String> {
        let hex: String = s.chars().filter(|c| !matches!(c, ':' | ' ')).collect();
        let bytes = hex::decode(&hex).map_err(|_| format!("`{s}` is not hex"))?;
        match bytes.len() {
            20 | 32 => Ok(bytes),
            n => Err(format!(
                "a thumbprint is 20 (SHA-1) or 32 (SHA-256) bytes, this one is {n}"
            )),
        }
    }

    /// Whether the certificate has every field this identity names; `issuer` is what chain
    /// verification established (none without `trust`: then an issuer thumbprint never matches).
    pub fn matches(&self, c: &ClientCert, issuer: Option<&trust::Verified>) -> bool {
        self.issuer_thumbprint.as_deref().is_none_or(|t| {
            issuer.is_some_and(|i| t == i.issuer_sha1.as_slice() || t == i.issuer_sha256.as_slice())
        }) && self.uri.as_ref().is_none_or(|u| c.uris.contains(u))
            && self
                .uri_prefix
                .as_ref()
                .is_none_or(|p| c.uris.iter().any(|u| u.starts_with(p.as_str())))
            && self
                .thumbprint
                .as_deref()
                .is_none_or(|t| t == c.sha1.as_slice() || t == c.sha256.as_slice())
            && self.subject.as_ref().is_none_or(|s| *s == c.subject)
            && self.issuer_subject.as_ref().is_none_or(|s| *s == c.issuer)
            && self
                .common_name
                .as_ref()
                .is_none_or(|cn| c.common_names.contains(cn))
            && self.serial_number.as_ref().is_none_or(|s| *s == c.serial)
            && self
                .dns_name
                .as_ref()
                .is_none_or(|d| c.dns_names.contains(d))
    }
}

/// The client-certificate policy of an API.
#[derive(Debug, Clone)]
pub struct CertPolicy {
    /// Any one must match; empty = any certificate passes the identity step.
    pub identities: Vec<Identity>,
    /// Refuse certificates whose not-before lies ahead.
    pub validate_not_before: bool,
    /// Refuse expired certificates.
    pub validate_not_after: bool,
    /// Read `x-forwarded-client-cert` when Envoy sent no peer certificate.
    pub trust_xfcc: bool,
    /// `trust`: the chain must verify to one of these CAs.
    pub trust: Option<Arc<trust::Trust>>,
}

/// The failure of the certificate step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertFailure {
    /// No identity matches.
    NotMatched,
    /// Past not-after.
    Expired,
    /// Before not-before.
    NotYetValid,
    /// No chain to a configured CA verifies.
    NotTrusted(String),
    /// A certificate of the chain is revoked.
    Revoked,
}

impl CertPolicy {
    /// Checks a parsed certificate, with the intermediates the request sent (`chain`, URL-encoded
    /// PEM), at `now`.
    pub fn check(
        &self,
        cert: &ClientCert,
        chain: Option<&str>,
        now: SystemTime,
    ) -> Result<(), CertFailure> {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if self.validate_not_after && secs > cert.not_after {
            return Err(CertFailure::Expired);
        }
        if self.validate_not_before && secs < cert.not_before {
            return Err(CertFailure::NotYetValid);
        }
        let verified = match &self.trust {
            None => None,
            Some(t) => Some(t.verify(&cert.der, &cert.sha256, chain, now).map_err(
                |f| match f {
                    trust::TrustFailure::NotTrusted(why) => CertFailure::NotTrusted(why),
                    trust::TrustFailure::Revoked => CertFailure::Revoked,
                    trust::TrustFailure::Expired => CertFailure::Expired,
                    trust::TrustFailure::NotYetValid => CertFailure::NotYetValid,
                },
            )?),
        };
        if self.identities.is_empty()
            || self
                .identities
                .iter()
                .any(|i| i.matches(cert, verified.as_deref()))
        {
            Ok(())
        } else {
            Err(CertFailure::NotMatched)
        }
    }
}

pub mod crl;
pub mod trust;

#[cfg(test)]
mod tests;

/// The request's certificate, and the chain XFCC forwarded with it.
type Presented<'i> = (Arc<ClientCert>, Option<std::borrow::Cow<'i, str>>);

/// Reading the request's certificate (peer or `x-forwarded-client-cert`), parsed once per distinct
/// certificate through the policy set's cache.
impl super::PolicySet {
    /// Parses `encoded` (URL-encoded PEM) through the cache. Failures are not cached: they are
    /// cheap to find again (the size cap comes first) and caching them would let junk evict good entries.
    pub(super) fn parse_certificate(&self, encoded: &str) -> Result<Arc<ClientCert>, CertError> {
        if let Some(hit) = self.cert_cache.get(encoded) {
            return Ok(hit);
        }
        let parsed = Arc::new(parse_url_encoded_pem(
            encoded,
            self.limits.max_certificate_bytes,
        )?);
        self.cert_cache.insert(encoded.to_string(), parsed.clone());
        Ok(parsed)
    }

    /// The request's certificate and, from XFCC, the chain the proxy forwarded with it
    /// (`Chain=`, URL-encoded PEM).
    pub(super) fn read_certificate<'i>(
        &self,
        policy: &CertPolicy,
        input: &'i CheckInput<'_>,
    ) -> Result<Presented<'i>, (Reason, String)> {
        let max = self.limits.max_certificate_bytes;
        if !input.peer_certificate.is_empty() {
            return self
                .parse_certificate(input.peer_certificate)
                .map(|c| (c, None))
                .map_err(|e| {
                    (
                        Reason::ClientCertificateInvalid,
                        format!("peer certificate: {e}"),
                    )
                });
        }
        if let Some(xfcc) = input
            .header("x-forwarded-client-cert")
            .filter(|_| policy.trust_xfcc)
        {
            if xfcc.len() > max * 2 {
                return Err((
                    Reason::ClientCertificateInvalid,
                    "x-forwarded-client-cert is too large".into(),
                ));
            }
            // The whole header must parse (see xfcc.rs: a lenient reader lets a caller's unbalanced
            // quote swallow the proxy's comma); only then is the nearest proxy's element read.
            return match super::xfcc::parse(xfcc).map(|h| (h.nearest.cert, h.nearest.chain)) {
                Ok((Some(encoded), chain)) => {
                    if chain.as_ref().is_some_and(|c| c.len() > max * 4) {
                        return Err((
                            Reason::ClientCertificateInvalid,
                            "x-forwarded-client-cert: the chain is too large".into(),
                        ));
                    }
                    self.parse_certificate(&encoded)
                        .map(|c| (c, chain))
                        .map_err(|e| {
                            (
                                Reason::ClientCertificateInvalid,
                                format!("x-forwarded-client-cert: {e}"),
                            )
                        })
                }
                Ok((None, _)) => Err((
                    Reason::ClientCertificateMissing,
                    "x-forwarded-client-cert carries no Cert".into(),
                )),
                Err(e) => Err((Reason::ClientCertificateInvalid, e.to_string())),
            };
        }
        Err((
            Reason::ClientCertificateMissing,
            "no client certificate was presented".into(),
        ))
    }
}
