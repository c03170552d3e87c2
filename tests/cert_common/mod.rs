//! Certificates, CRLs and verdicts for the `client_certificate.trust` tests: a CA (root or
//! intermediate), leaves, CRLs, and the (code, status, reason) of a check.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::common::seen;

pub struct Ca {
    pub cert: rcgen::Certificate,
    pub issuer: Issuer<'static, KeyPair>,
}

pub fn ca(cn: &str, parent: Option<&Ca>, not_after: OffsetDateTime) -> Ca {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Contoso");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = OffsetDateTime::now_utc() - time::Duration::days(30);
    p.not_after = not_after;
    let key = KeyPair::generate().unwrap();
    let cert = match parent {
        Some(parent) => p.signed_by(&key, &parent.issuer).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    Ca {
        cert,
        issuer: Issuer::new(p, key),
    }
}

pub fn leaf(
    cn: &str,
    by: &Ca,
    serial: u64,
    eku: ExtendedKeyUsagePurpose,
    uri: Option<&str>,
) -> rcgen::Certificate {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Contoso");
    p.serial_number = Some(SerialNumber::from(serial));
    p.extended_key_usages = vec![eku];
    p.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
    p.not_after = OffsetDateTime::now_utc() + time::Duration::days(365);
    if let Some(u) = uri {
        p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
    }
    p.signed_by(&KeyPair::generate().unwrap(), &by.issuer)
        .unwrap()
}

pub fn crl(by: &Ca, revoked: &[u64], next_update: OffsetDateTime) -> String {
    signed_crl(by, revoked, next_update).pem().unwrap()
}

/// A CRL of `by` listing `revoked`, as rcgen made it (`.pem()` or `.der()`).
pub fn signed_crl(
    by: &Ca,
    revoked: &[u64],
    next_update: OffsetDateTime,
) -> rcgen::CertificateRevocationList {
    CertificateRevocationListParams {
        this_update: next_update - time::Duration::days(8),
        next_update,
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(*s),
                revocation_time: OffsetDateTime::now_utc() - time::Duration::days(2),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&by.issuer)
    .unwrap()
}

pub fn enc(pem: &str) -> String {
    percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn sha1_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref())
}

/// (code, HTTP status or none, reason or none)
pub fn verdict(r: &portcullis::proto::auth::CheckResponse) -> (i32, Option<i32>, Option<String>) {
    let s = seen(r);
    let reason = s
        .body
        .as_ref()
        .map(|b| b["reason"].as_str().unwrap().to_string());
    (s.code, s.status, reason)
}

pub fn allowed() -> (i32, Option<i32>, Option<String>) {
    (0, None, None)
}

pub fn denied(reason: &str) -> (i32, Option<i32>, Option<String>) {
    (7, Some(403), Some(reason.to_string()))
}
