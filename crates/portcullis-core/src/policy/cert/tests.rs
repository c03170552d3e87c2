use super::*;
use crate::policy::testutil::make_cert;
use sha1::{Digest as _, Sha1};

fn now() -> SystemTime {
    SystemTime::now()
}

#[test]
fn parses_url_encoded_pem_like_envoy_sends_it() {
    let c = make_cert("partner", "Contoso, Inc.", &["partner.example.com"], -1, 30);
    let encoded = percent_encoding::utf8_percent_encode(&c.pem, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    let cert = parse_url_encoded_pem(&encoded, 64 * 1024).unwrap();
    assert_eq!(
        cert.sha256.as_slice(),
        sha2::Sha256::digest(&c.der).as_slice()
    );
    assert_eq!(cert.thumbprint(), hex::encode_upper(Sha1::digest(&c.der)));
    assert_eq!(cert.dns_names, vec!["partner.example.com"]);
    assert_eq!(cert.common_names, vec!["partner"]);
    assert_eq!(cert.serial, "1abcd");
    assert_eq!(
        cert.subject,
        Dn::parse(r#"O="Contoso, Inc.", CN=partner"#).unwrap()
    );
    assert_eq!(
        cert.subject,
        Dn::parse(r"cn=PARTNER;o=Contoso\, Inc.").unwrap()
    );
}

#[test]
fn garbage_and_truncated_certificates_are_errors() {
    let c = make_cert("x", "y", &[], -1, 1);
    assert_eq!(
        parse_url_encoded_pem("garbage", 1024).unwrap_err(),
        CertError::NotPem
    );
    let truncated = &c.pem[..c.pem.len() / 2];
    assert!(parse_pem(truncated.as_bytes()).is_err());
    let mut der = c.der.clone();
    der.truncate(der.len() - 10);
    assert_eq!(from_der(&der).unwrap_err(), CertError::NotX509);
    assert_eq!(
        parse_url_encoded_pem(&"a".repeat(100), 10).unwrap_err(),
        CertError::TooLarge(10)
    );
    let not_cert = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert!(parse_pem(not_cert.as_bytes()).is_err());
}

#[test]
fn identities_need_every_given_field() {
    let c = make_cert("partner", "Contoso", &["p.example.com"], -1, 30);
    let cert = parse_pem(c.pem.as_bytes()).unwrap();
    let sha1_hex = hex::encode(cert.sha1);
    let by_thumb = Identity {
        thumbprint: Some(Identity::parse_thumbprint(&sha1_hex.to_uppercase()).unwrap()),
        ..Default::default()
    };
    assert!(by_thumb.matches(&cert, None));
    let by_sha256 = Identity {
        thumbprint: Some(cert.sha256.to_vec()),
        ..Default::default()
    };
    assert!(by_sha256.matches(&cert, None));
    let both_ok = Identity {
        subject: Some(Dn::parse("CN=partner,O=Contoso").unwrap()),
        dns_name: Some("p.example.com".into()),
        ..Default::default()
    };
    assert!(both_ok.matches(&cert, None));
    let one_wrong = Identity {
        subject: Some(Dn::parse("CN=partner,O=Contoso").unwrap()),
        dns_name: Some("other.example.com".into()),
        ..Default::default()
    };
    assert!(!one_wrong.matches(&cert, None));
    let issuer = Identity {
        issuer_subject: Some(Dn::parse("CN=partner, O=Contoso").unwrap()),
        serial_number: normalize_serial("00:01:AB:CD"),
        ..Default::default()
    };
    assert!(issuer.matches(&cert, None), "self-signed: issuer = subject");

    let policy = CertPolicy {
        identities: vec![one_wrong.clone(), both_ok],
        validate_not_before: true,
        validate_not_after: true,
        trust_xfcc: false,
        trust: None,
    };
    assert_eq!(policy.check(&cert, None, now()), Ok(()));
    let policy = CertPolicy {
        identities: vec![one_wrong],
        validate_not_before: true,
        validate_not_after: true,
        trust_xfcc: false,
        trust: None,
    };
    assert_eq!(
        policy.check(&cert, None, now()),
        Err(CertFailure::NotMatched)
    );
}

#[test]
fn validity_window() {
    let expired = parse_pem(make_cert("a", "b", &[], -10, -1).pem.as_bytes()).unwrap();
    let future = parse_pem(make_cert("a", "b", &[], 1, 10).pem.as_bytes()).unwrap();
    let p = CertPolicy {
        identities: vec![],
        validate_not_before: true,
        validate_not_after: true,
        trust_xfcc: false,
        trust: None,
    };
    assert_eq!(p.check(&expired, None, now()), Err(CertFailure::Expired));
    assert_eq!(p.check(&future, None, now()), Err(CertFailure::NotYetValid));
    let lax = CertPolicy {
        validate_not_before: false,
        validate_not_after: false,
        ..p
    };
    assert_eq!(lax.check(&expired, None, now()), Ok(()));
    assert_eq!(lax.check(&future, None, now()), Ok(()));
}

#[test]
fn thumbprint_and_dn_config_errors() {
    assert!(Identity::parse_thumbprint("zz").is_err());
    assert!(
        Identity::parse_thumbprint("abcd")
            .unwrap_err()
            .contains("20 (SHA-1) or 32")
    );
    assert!(Identity::parse_thumbprint(&"AB:".repeat(19).to_string().add_str("CD")).is_ok());
    assert!(Dn::parse("").is_err());
    assert!(Dn::parse("novalue").is_err());
}

trait AddStr {
    fn add_str(self, s: &str) -> String;
}
impl AddStr for String {
    fn add_str(mut self, s: &str) -> String {
        self.push_str(s);
        self
    }
}
