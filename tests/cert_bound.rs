//! RFC 8705 certificate-bound access tokens (`cnf.x5t#S256`) through the real server over gRPC: a
//! bound token passes only with its certificate (Envoy's peer certificate, or XFCC where the API
//! trusts it), and `certificate_bound: required` refuses unbound tokens.

mod common;
#[path = "jwt_common/mod.rs"]
mod keys;

use base64::Engine as _;
use common::{TestServer, get, seen};
use serde_json::json;

const ISS: &str = "https://idp.test/corp";
const AUD: &str = "api://orders";

fn cert(cn: &str) -> rcgen::Certificate {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap()
}

fn x5t_s256(c: &rcgen::Certificate) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, c.der());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

fn enc(c: &rcgen::Certificate) -> String {
    percent_encoding::utf8_percent_encode(&c.pem(), percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn a_bound_token_passes_only_with_its_certificate() {
    let key = keys::rsa(0, Some("k1"));
    let srv = TestServer::start(&format!(
        r#"
identity_providers:
  - {{ name: corp, issuer: "{ISS}", keys: [{jwk}] }}
apis:
  - name: bound
    match: {{ path_prefix: /bound }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"] }}
  - name: required
    match: {{ path_prefix: /required }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"], certificate_bound: required }}
  - name: xfcc
    match: {{ path_prefix: /xfcc }}
    client_certificate: {{ trust_forwarded_client_cert: true }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"] }}
"#,
        jwk = key.jwk
    ))
    .await;
    let mut client = srv.client().await;
    let mine = cert("partner");
    let other = cert("partner");
    let token = |cnf: serde_json::Value| {
        let mut c = keys::claims(ISS, AUD, "alice");
        if !cnf.is_null() {
            c["cnf"] = cnf;
        }
        format!("Bearer {}", key.token(c))
    };
    let bound = token(json!({"x5t#S256": x5t_s256(&mine)}));
    let padded = token(json!({"x5t#S256": format!("{}=", x5t_s256(&mine))}));
    let unbound = token(serde_json::Value::Null);
    let not_object = token(json!("x"));

    let peer = |path: &str, auth: &str, c: Option<&rcgen::Certificate>| {
        let mut h = get(path).header("authorization", auth);
        if let Some(c) = c {
            h.certificate = enc(c);
        }
        h.request()
    };
    let via_xfcc = |path: &str, auth: &str, c: &rcgen::Certificate| {
        get(path)
            .header("authorization", auth)
            .header(
                "x-forwarded-client-cert",
                &format!("Hash=00;Cert=\"{}\"", enc(c)),
            )
            .request()
    };
    let mismatch = Some("TokenCertificateBindingMismatch");
    let cases = [
        (
            "its certificate",
            peer("/bound/1", &bound, Some(&mine)),
            None,
        ),
        (
            "another certificate with the same names",
            peer("/bound/1", &bound, Some(&other)),
            mismatch,
        ),
        ("no certificate", peer("/bound/1", &bound, None), mismatch),
        (
            "a padded thumbprint",
            peer("/bound/1", &padded, Some(&mine)),
            mismatch,
        ),
        (
            "`cnf` that is not an object",
            peer("/bound/1", &not_object, Some(&mine)),
            mismatch,
        ),
        (
            "an unbound token where binding is optional",
            peer("/bound/1", &unbound, Some(&mine)),
            None,
        ),
        (
            "an unbound token where binding is required",
            peer("/required/1", &unbound, Some(&mine)),
            mismatch,
        ),
        (
            "a bound token where binding is required",
            peer("/required/1", &bound, Some(&mine)),
            None,
        ),
        (
            "its certificate in a trusted XFCC",
            via_xfcc("/xfcc/1", &bound, &mine),
            None,
        ),
        (
            "another certificate in a trusted XFCC",
            via_xfcc("/xfcc/1", &bound, &other),
            mismatch,
        ),
        (
            "its certificate in XFCC where the API does not trust XFCC",
            via_xfcc("/bound/1", &bound, &mine),
            mismatch,
        ),
    ];
    for (what, req, want) in cases {
        let r = client.check(req).await.unwrap().into_inner();
        let s = seen(&r);
        match want {
            None => {
                assert_eq!(s.code, 0, "{what}: {s:?}");
                let binding = s.metadata.get("token_binding").and_then(|v| v.as_str());
                let bound_token = what.contains("its certificate") || what.starts_with("a bound");
                assert_eq!(binding, bound_token.then_some("certificate"), "{what}");
            }
            Some(reason) => {
                assert_eq!((s.code, s.status), (16, Some(401)), "{what}: {s:?}");
                assert_eq!(s.body.as_ref().unwrap()["reason"], reason, "{what}");
                assert_eq!(
                    s.headers["www-authenticate"].0,
                    format!(
                        "Bearer realm=\"{}\", error=\"invalid_token\"",
                        if what.contains("required") {
                            "required"
                        } else if what.contains("trusted XFCC") {
                            "xfcc"
                        } else {
                            "bound"
                        }
                    ),
                    "{what}"
                );
            }
        }
    }
    srv.running.shutdown().await.unwrap();
}

#[test]
fn the_setting_is_checked_with_its_path() {
    let key = keys::rsa(0, Some("k1"));
    let stderr = common::validate_refuses(&format!(
        "identity_providers:\n  - {{ name: corp, issuer: \"{ISS}\", keys: [{}] }}\napis:\n  - name: a\n    match: {{ path_prefix: / }}\n    jwt: {{ providers: [corp], certificate_bound: always }}\n",
        key.jwk
    ));
    assert!(
        stderr.contains("apis[0].jwt.certificate_bound: `always`: use `if_present` or `required`"),
        "{stderr}"
    );
}
