//! `client_certificate.trust` (APIM's validate-trust and validate-revocation) and the identities that
//! need it: chains from certificates generated here (a root, an intermediate, leaves good, revoked,
//! for servers only, under an expired intermediate, and forged under another root with the same
//! names), through the real server over gRPC (Envoy's peer certificate, and XFCC with `Chain=`).

mod cert_common;
mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use cert_common::{Ca, allowed, ca, crl, denied, enc, leaf, sha1_hex, verdict};
use common::{TestServer, get};
use rcgen::ExtendedKeyUsagePurpose;
use time::OffsetDateTime;

struct Pki {
    root: Ca,
    inter: Ca,
    good: rcgen::Certificate,
    revoked: rcgen::Certificate,
    server_only: rcgen::Certificate,
    other_team: rcgen::Certificate,
    by_root: rcgen::Certificate,
    under_expired: rcgen::Certificate,
    forged: rcgen::Certificate,
    forged_inter: Ca,
}

fn pki(dir: &Path) -> Pki {
    let far = OffsetDateTime::now_utc() + time::Duration::days(3650);
    let root = ca("Contoso Root", None, far);
    let inter = ca("Contoso Issuing", Some(&root), far);
    let expired_inter = ca(
        "Contoso Old Issuing",
        Some(&root),
        OffsetDateTime::now_utc() - time::Duration::days(1),
    );
    let other_root = ca("Contoso Root", None, far);
    let forged_inter = ca("Contoso Issuing", Some(&other_root), far);
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    let payments = Some("spiffe://example.org/ns/payments/sa/api");
    let p = Pki {
        good: leaf("partner", &inter, 1001, client.clone(), payments),
        revoked: leaf("partner", &inter, 1002, client.clone(), payments),
        server_only: leaf(
            "partner",
            &inter,
            1003,
            ExtendedKeyUsagePurpose::ServerAuth,
            payments,
        ),
        other_team: leaf(
            "partner",
            &inter,
            1004,
            client.clone(),
            Some("spiffe://example.org/ns/paymentsx/sa/api"),
        ),
        by_root: leaf("partner", &root, 1005, client.clone(), payments),
        under_expired: leaf("partner", &expired_inter, 1006, client.clone(), payments),
        forged: leaf("partner", &forged_inter, 1001, client, payments),
        root,
        inter,
        forged_inter,
    };
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("root.pem", &p.root.cert.pem());
    write(
        "inter.pem",
        &format!("{}{}", p.inter.cert.pem(), expired_inter.cert.pem()),
    );
    // One CRL per CA of the chain: the intermediate's own status is checked against the root's.
    write(
        "crl.pem",
        &format!("{}{}", crl(&p.inter, &[1002], far), crl(&p.root, &[], far)),
    );
    write(
        "stale-crl.pem",
        &format!(
            "{}{}",
            crl(
                &p.inter,
                &[],
                OffsetDateTime::now_utc() - time::Duration::hours(1),
            ),
            crl(&p.root, &[], far)
        ),
    );
    write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
    p
}

fn config(p: &Pki, dir: &Path) -> String {
    format!(
        r#"
apis:
  - name: peer
    match: {{ path_prefix: /peer }}
    client_certificate:
      trust: {{ ca_files: [root.pem], intermediate_files: [inter.pem], crl_files: [crl.pem] }}
  - name: xfcc
    match: {{ path_prefix: /xfcc }}
    client_certificate:
      trust_forwarded_client_cert: true
      trust: {{ ca_files: [root.pem] }}
  - name: spiffe
    match: {{ path_prefix: /spiffe }}
    client_certificate:
      trust: {{ ca_files: [root.pem], intermediate_files: [inter.pem] }}
      identities: [{{ uri_prefix: "spiffe://example.org/ns/payments/" }}]
  - name: issuer
    match: {{ path_prefix: /issuer }}
    client_certificate:
      trust: {{ ca_files: [root.pem], intermediate_files: [inter.pem] }}
      identities: [{{ issuer_thumbprint: "{issuer}" }}]
  - name: stale
    match: {{ path_prefix: /stale }}
    client_certificate:
      trust: {{ ca_files: [root.pem], intermediate_files: [inter.pem], crl_files: [stale-crl.pem] }}
  - name: stale-allowed
    match: {{ path_prefix: /lenient }}
    client_certificate:
      trust:
        ca_files: [root.pem]
        intermediate_files: [inter.pem]
        crl_files: [stale-crl.pem]
        unknown_revocation: allow
"#,
        issuer = sha1_hex(p.inter.cert.der())
    )
    // Absolute paths: the test server writes its config file into a directory of its own.
    .replace("root.pem", &format!("{}/root.pem", dir.display()))
    .replace("inter.pem", &format!("{}/inter.pem", dir.display()))
    .replace("[crl.pem]", &format!("[{}/crl.pem]", dir.display()))
    .replace("stale-crl.pem", &format!("{}/stale-crl.pem", dir.display()))
}

#[tokio::test]
async fn chains_revocation_and_identities_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let srv = TestServer::start(&config(&p, dir.path())).await;
    let mut client = srv.client().await;

    let peer = |path: &str, cert: &rcgen::Certificate| {
        let mut h = get(path);
        h.certificate = enc(&cert.pem());
        h.request()
    };
    let cases = [
        ("a good certificate", peer("/peer/1", &p.good), allowed()),
        (
            "revoked by the intermediate's CRL",
            peer("/peer/1", &p.revoked),
            denied("ClientCertificateRevoked"),
        ),
        (
            "for servers only (extended key usage)",
            peer("/peer/1", &p.server_only),
            denied("ClientCertificateNotTrusted"),
        ),
        (
            "the same names under another root",
            peer("/peer/1", &p.forged),
            denied("ClientCertificateNotTrusted"),
        ),
        (
            "issued by an intermediate that has expired",
            peer("/peer/1", &p.under_expired),
            denied("ClientCertificateExpired"),
        ),
        (
            "a SPIFFE ID under the prefix",
            peer("/spiffe/1", &p.good),
            allowed(),
        ),
        (
            "a SPIFFE ID that only shares the prefix's characters",
            peer("/spiffe/1", &p.other_team),
            denied("ClientCertificateIdentityNotMatched"),
        ),
        (
            "issued by the named intermediate",
            peer("/issuer/1", &p.good),
            allowed(),
        ),
        (
            "issued by the root, not the named intermediate",
            peer("/issuer/1", &p.by_root),
            denied("ClientCertificateIdentityNotMatched"),
        ),
        (
            "a CRL past its next update: revocation status unknown",
            peer("/stale/1", &p.good),
            denied("ClientCertificateNotTrusted"),
        ),
        (
            "a CRL past its next update with unknown_revocation: allow",
            peer("/lenient/1", &p.good),
            allowed(),
        ),
    ];
    for (what, req, want) in cases {
        let got = verdict(&client.check(req).await.unwrap().into_inner());
        assert_eq!(got, want, "{what}");
    }

    // XFCC: the chain comes from the proxy's `Chain=`; no intermediates are configured.
    let xfcc = |cert: &rcgen::Certificate, chain: Option<&str>| {
        let mut value = format!("Hash=00;Cert=\"{}\"", enc(&cert.pem()));
        if let Some(c) = chain {
            value.push_str(&format!(";Chain=\"{}\"", enc(c)));
        }
        get("/xfcc/1")
            .header("x-forwarded-client-cert", &value)
            .request()
    };
    let full_chain = format!("{}{}", p.good.pem(), p.inter.cert.pem());
    let forged_chain = format!("{}{}", p.forged.pem(), p.forged_inter.cert.pem());
    let cases = [
        (
            "leaf and intermediate in Chain=",
            xfcc(&p.good, Some(&full_chain)),
            allowed(),
        ),
        (
            "no Chain=, no configured intermediate",
            xfcc(&p.good, None),
            denied("ClientCertificateNotTrusted"),
        ),
        (
            "a forged leaf with its forged intermediate",
            xfcc(&p.forged, Some(&forged_chain)),
            denied("ClientCertificateNotTrusted"),
        ),
        (
            "a forged leaf beside the genuine intermediate",
            xfcc(&p.forged, Some(&full_chain)),
            denied("ClientCertificateNotTrusted"),
        ),
        (
            "a Chain= that is not PEM",
            xfcc(&p.good, Some("garbage")),
            denied("ClientCertificateNotTrusted"),
        ),
    ];
    for (what, req, want) in cases {
        let got = verdict(&client.check(req).await.unwrap().into_inner());
        assert_eq!(got, want, "XFCC: {what}");
    }

    // Forward-auth (Envoy http_service, nginx auth_request) reads XFCC and its chain the same way.
    let base = format!("http://{}/authz/xfcc/1", srv.running.addrs.http.unwrap());
    let http = reqwest::Client::new();
    for (what, cert, chain, status, reason) in [
        ("leaf and intermediate", &p.good, &full_chain, 200, None),
        (
            "a forged leaf beside the genuine intermediate",
            &p.forged,
            &full_chain,
            403,
            Some("ClientCertificateNotTrusted"),
        ),
    ] {
        let r = http
            .get(&base)
            .header(
                "x-forwarded-client-cert",
                format!(
                    "Hash=00;Cert=\"{}\";Chain=\"{}\"",
                    enc(&cert.pem()),
                    enc(chain)
                ),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "forward-auth: {what}");
        if let Some(reason) = reason {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["reason"], reason, "forward-auth: {what}");
        }
    }
    srv.running.shutdown().await.unwrap();
}

/// A verified chain is cached, but only while every certificate in it is valid: at a time past the
/// intermediate's not-after (the leaf still valid), the cached verification does not pass.
#[tokio::test]
async fn a_cached_chain_ends_with_its_shortest_lived_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let far = OffsetDateTime::now_utc() + time::Duration::days(3650);
    let root = ca("Root", None, far);
    let inter = ca(
        "Short-lived Issuing",
        Some(&root),
        OffsetDateTime::now_utc() + time::Duration::days(10),
    );
    let good = leaf(
        "partner",
        &inter,
        7,
        ExtendedKeyUsagePurpose::ClientAuth,
        None,
    );
    std::fs::write(dir.path().join("root.pem"), root.cert.pem()).unwrap();
    std::fs::write(dir.path().join("inter.pem"), inter.cert.pem()).unwrap();
    let yaml = format!(
        "apis:\n  - name: a\n    match: {{ path_prefix: / }}\n    client_certificate:\n      trust: {{ ca_files: [{d}/root.pem], intermediate_files: [{d}/inter.pem] }}\n",
        d = dir.path().display()
    );
    let src = portcullis::config::parse(&yaml, Path::new(".")).unwrap();
    let (policy, _) =
        portcullis::policy::compile(&src, &portcullis::policy::Runtime::offline()).unwrap();
    let mut req = get("/x");
    req.certificate = enc(&good.pem());
    let req = req.request();
    let decide_at = |now: SystemTime| {
        let policy = &policy;
        let req = &req;
        async move {
            let input = portcullis::server::grpc::decide_at(policy, req, now).await;
            verdict(&input)
        }
    };
    let now = SystemTime::now();
    assert_eq!(decide_at(now).await, allowed());
    assert_eq!(
        decide_at(now + Duration::from_secs(20 * 86_400)).await,
        denied("ClientCertificateExpired"),
        "the intermediate expired; the leaf has not"
    );
    assert_eq!(decide_at(now).await, allowed());
}

#[test]
fn trust_settings_are_checked_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let d = dir.path().display();
    let cases = [
        (
            format!("client_certificate: {{ identities: [{{ issuer_thumbprint: \"{}\" }}] }}", sha1_hex(p.inter.cert.der())),
            "apis[0].client_certificate.identities[0].issuer_thumbprint",
            "needs `client_certificate.trust`",
        ),
        (
            "client_certificate: { identities: [{ uri_prefix: \"spiffe://example.org/ns/payments\" }] }".to_string(),
            "apis[0].client_certificate.identities[0].uri_prefix",
            "ending with `/`",
        ),
        (
            "client_certificate: { identities: [{ uri: \"spiffe://example.org/ns/a/../b\" }] }".to_string(),
            "apis[0].client_certificate.identities[0].uri",
            "dot or empty segments",
        ),
        (
            format!("client_certificate: {{ trust: {{ ca_files: [{d}/garbage.pem] }} }}"),
            "apis[0].client_certificate.trust.ca_files[0]",
            "not PEM",
        ),
        (
            format!("client_certificate: {{ trust: {{ ca_files: [{d}/root.pem], crl_files: [{d}/root.pem] }} }}"),
            "apis[0].client_certificate.trust.crl_files[0]",
            "no CRL",
        ),
        (
            format!("client_certificate: {{ trust: {{ ca_files: [{d}/root.pem], validate_revocation: true }} }}"),
            "apis[0].client_certificate.trust.validate_revocation",
            "needs `crl_files`",
        ),
        (
            format!("client_certificate: {{ trust: {{ ca_files: [{d}/root.pem], crl_urls: [\"crl.example.com/ca.crl\"] }} }}"),
            "apis[0].client_certificate.trust.crl_urls[0]",
            "is not a URL",
        ),
        (
            format!("client_certificate: {{ trust: {{ ca_files: [{d}/root.pem], crl_urls: [\"ldap://crl.example.com/ca\"] }} }}"),
            "apis[0].client_certificate.trust.crl_urls[0]",
            "is not an http:// or https:// URL",
        ),
        (
            format!("client_certificate: {{ trust: {{ ca_files: [{d}/root.pem], crl_urls: [\"https://crl.example.com/ca.crl\"], crl_refresh: 0s }} }}"),
            "apis[0].client_certificate.trust.crl_refresh",
            "must be greater than 0",
        ),
        (
            format!("client_certificate: {{ trust: {{ ca_files: [{d}/root.pem], crl_urls: [\"https://crl.example.com/ca.crl\"], crl_fetch_timeout: soon }} }}"),
            "apis[0].client_certificate.trust.crl_fetch_timeout",
            "is not a duration",
        ),
        (
            format!("client_certificate: {{ trust: {{ ca_files: [{d}/missing.pem] }} }}"),
            "apis[0].client_certificate.trust.ca_files[0]",
            "cannot read",
        ),
    ];
    for (i, (section, path, why)) in cases.iter().enumerate() {
        let stderr = common::validate_refuses(&format!(
            "apis:\n  - name: a\n    match: {{ path_prefix: / }}\n    {section}\n"
        ));
        assert!(
            stderr.contains(&format!("{path}: ")) && stderr.contains(why),
            "case {i}: expected `{path}` ({why}) in:\n{stderr}"
        );
    }

    // Forwarded certificates without a trust section: valid, with a loud warning.
    let file = dir.path().join("xfcc.yaml");
    std::fs::write(
        &file,
        "apis:\n  - name: a\n    match: { path_prefix: / }\n    client_certificate: { trust_forwarded_client_cert: true }\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["validate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "warning: apis[0].client_certificate trusts x-forwarded-client-cert without `trust`"
        ),
        "{stdout}"
    );
}
