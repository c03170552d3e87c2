//! Test helpers shared by the policy tests: generated certificates (never pasted blobs).

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

/// A generated self-signed certificate.
pub struct TestCert {
    /// PEM text.
    pub pem: String,
    /// DER bytes.
    pub der: Vec<u8>,
}

/// A self-signed certificate for `CN=cn, O=org` valid from `not_before_days` to `not_after_days`
/// relative to now, with the given DNS SANs and serial 01:AB:CD.
pub fn make_cert(
    cn: &str,
    org: &str,
    dns: &[&str],
    not_before_days: i64,
    not_after_days: i64,
) -> TestCert {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, org);
    params.distinguished_name = dn;
    params.subject_alt_names = dns
        .iter()
        .map(|d| SanType::DnsName((*d).try_into().unwrap()))
        .collect();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(not_before_days);
    params.not_after = now + time::Duration::days(not_after_days);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0xab, 0xcd]));
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    TestCert {
        pem: cert.pem(),
        der: cert.der().to_vec(),
    }
}
