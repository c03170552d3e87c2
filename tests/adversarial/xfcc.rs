//! XFCC smuggling: hostile `x-forwarded-client-cert` headers through the real decision path.
//!
//! The API trusts the header (`trust_forwarded_client_cert: true`) and admits certificates with
//! `CN=partner`. The caller's TLS certificate, the one the proxy really saw, is `CN=stranger`; the
//! caller also holds a self-made `CN=partner` certificate and writes it into the header it sends.
//! Under Envoy's `APPEND_FORWARD` the proxy appends `,<its element>` to that header, so every row
//! below is `<what the caller sent>,<what the proxy appended>` (or a whole header where noted).
//! The caller wins if its own certificate is the one checked.

use std::time::SystemTime;

use portcullis::policy::{
    self, CheckInput, Decision, EvalOptions, Headers, Outcome, PolicySet, Reason, Runtime,
    StepResult,
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

const CONFIG: &str = r#"
limits: { max_certificate_bytes: 8192 }
apis:
  - name: partner
    match: { path_prefix: /partner }
    client_certificate:
      trust_forwarded_client_cert: true
      identities: [{ common_name: partner }]
"#;

fn policy() -> PolicySet {
    let src = portcullis::config::parse(CONFIG, std::path::Path::new("."))
        .unwrap_or_else(|e| panic!("{e}"));
    policy::compile(&src, &Runtime::offline())
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

/// A self-signed certificate for `CN={cn}`, as Envoy writes it in XFCC: URL-encoded PEM.
fn url_encoded_cert(cn: &str) -> String {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let key = KeyPair::generate().expect("key");
    let pem = params.self_signed(&key).expect("certificate").pem();
    // Envoy leaves `-` and alphanumerics as they are, like this set does; nothing it writes is a
    // separator or a quote.
    percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC).to_string()
}

async fn decide(policy: &PolicySet, xfcc: &[u8]) -> Decision {
    let headers: Headers = [("x-forwarded-client-cert".to_string(), xfcc.to_vec().into())].into();
    let input = CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/partner/orders",
        scheme: "",
        headers: &headers,
        peer: Some("10.0.0.1".parse().expect("literal")),
        peer_certificate: "",
        context_extensions: None,
    };
    let opts = EvalOptions {
        now: SystemTime::now(),
        explain: true,
    };
    policy.decide(&input, opts).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Allow,
    Deny(Reason),
}

/// What a user sees: the decision, the status and the reason.
fn outcome(d: &Decision) -> (Want, Option<u16>) {
    match &d.outcome {
        Outcome::Allow => (Want::Allow, None),
        Outcome::Deny(den) => (Want::Deny(den.reason), Some(den.status)),
    }
}

#[tokio::test]
async fn hostile_forwarded_client_cert_headers() {
    use Reason::*;
    use Want::{Allow, Deny};

    let p = policy();
    let mine = url_encoded_cert("partner"); // the caller's own, forged for the identity
    let real = url_encoded_cert("stranger"); // the one the proxy saw on the TLS connection
    let real_partner = url_encoded_cert("partner"); // a genuine partner, for the allowed rows
    let hash = "a".repeat(64);
    // What Envoy (APPEND_FORWARD, set_current_client_cert_details: cert, subject, uri, dns) appends.
    let proxy = format!(
        r#"By=spiffe://cluster.local/ns/edge/sa/envoy;Hash={hash};Cert="{real}";Subject="CN=stranger";URI="#
    );
    let proxy_partner = format!(
        r#"By=spiffe://cluster.local/ns/edge/sa/envoy;Hash={hash};Cert="{real_partner}";Subject="CN=partner";URI="#
    );

    let rows: Vec<(&str, String, Want)> = vec![
        // The hole: an unbalanced quote swallows the proxy's comma.
        (
            "smuggle: own Cert, then an unknown key opening a quote",
            format!(r#"Cert={mine};X=",{proxy}"#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "smuggle: own quoted Cert, then Subject opening a quote",
            format!(r#"Cert="{mine}";Subject=",{proxy}"#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "smuggle: own Cert after an element of its own, then a quote",
            format!(r#"By=spiffe://fake,Cert="{mine}";URI=",{proxy}"#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "smuggle: the open value ends in an escaped quote",
            format!(r#"Cert="{mine}";Subject="CN=x\",{proxy}"#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "smuggle: the open value ends in a lone backslash",
            format!(r#"Cert="{mine}";Subject="CN=x\,{proxy}"#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "smuggle: a backslash outside quotes, as an escape of the proxy's comma",
            format!(r#"Cert="{mine}";URI=x\,{proxy}"#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "smuggle: a quote opened inside the caller's unquoted Cert",
            format!(r#"Cert={mine}",{proxy}"#),
            Deny(ClientCertificateInvalid),
        ),
        // Escaped quotes that are well-formed: inside the value they stay.
        (
            "escaped quotes in the proxy's Subject, real cert is the partner's",
            format!(
                r#"{},Subject="CN=\"a,b\"";Cert="{real_partner}""#,
                "By=spiffe://x"
            ),
            Allow,
        ),
        (
            "an earlier element quoting the caller's cert with escapes stays earlier",
            format!(r#"Subject="\",Cert=\"{mine}\"",{proxy}"#),
            Deny(ClientCertificateIdentityNotMatched),
        ),
        // Duplicated keys in one element.
        (
            "duplicate Cert in the nearest element, forged one first",
            format!(r#"By=spiffe://x;Cert="{mine}";Cert="{real}""#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "duplicate Cert in the nearest element, forged one last",
            format!(r#"By=spiffe://x;Cert="{real}";Cert="{mine}""#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "duplicate Chain in the nearest element",
            format!(r#"Cert="{real_partner}";Chain="{mine}";Chain="{real}""#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "duplicate Cert in an earlier element",
            format!(r#"Cert="{mine}";Cert="{mine}",{proxy_partner}"#),
            Deny(ClientCertificateInvalid),
        ),
        // Empty elements and trailing commas.
        (
            "leading comma",
            format!(r#",Cert="{mine}""#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "empty element before the forged one",
            format!(r#"Cert="{real}",,Cert="{mine}""#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "trailing comma (whole header)",
            format!(r#"Cert="{real_partner}","#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "trailing comma and space (whole header)",
            format!(r#"Cert="{real_partner}", "#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "trailing semicolon (whole header)",
            format!(r#"Cert="{real_partner}";"#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "caller sends only a comma",
            format!(",{proxy_partner}"),
            Deny(ClientCertificateInvalid),
        ),
        // Whitespace.
        (
            "space after separators, as proxies joining headers write it",
            format!(r#"Cert="{mine}", By=spiffe://x; Cert="{real_partner}""#),
            Allow,
        ),
        (
            "tabs around the nearest element",
            format!("Cert=\"{mine}\",\tCert=\"{real_partner}\"\t"),
            Allow,
        ),
        (
            "space around = is not Envoy's and is refused",
            format!(r#"By=spiffe://x;Cert = "{mine}""#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "space between = and the quote",
            format!(r#"By=spiffe://x;Cert= "{mine}""#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "space inside an unquoted value",
            format!(r#"By=spiffe://x y;Cert="{real_partner}""#),
            Deny(ClientCertificateInvalid),
        ),
        // Case of keys.
        (
            "lower-case keys",
            format!(r#"by=spiffe://x;hash={hash};cert="{real_partner}";uri="#),
            Allow,
        ),
        (
            "upper-case keys",
            format!(r#"BY=spiffe://x;HASH={hash};CERT="{real_partner}";URI="#),
            Allow,
        ),
        (
            "mixed-case duplicate Cert",
            format!(r#"Cert="{real}";cERT="{mine}""#),
            Deny(ClientCertificateInvalid),
        ),
        // Unknown keys and bytes.
        (
            "unknown key in the nearest element",
            format!(r#"By=spiffe://x;Foo=bar;Cert="{real_partner}""#),
            Deny(ClientCertificateInvalid),
        ),
        (
            "a newline inside the header",
            format!("Cert=\"{mine}\"\n,{proxy_partner}"),
            Deny(ClientCertificateInvalid),
        ),
        (
            "a character after a closing quote",
            format!(r#"Cert="{real_partner}"x"#),
            Deny(ClientCertificateInvalid),
        ),
        // Well-formed headers: the nearest element decides.
        (
            "two elements, the proxy's cert is the partner's",
            format!(r#"Cert="{real}",{proxy_partner}"#),
            Allow,
        ),
        (
            "two elements, the forged partner cert is only in the caller's element",
            format!(r#"Cert="{mine}",{proxy}"#),
            Deny(ClientCertificateIdentityNotMatched),
        ),
        (
            "one element from the proxy, partner",
            proxy_partner.clone(),
            Allow,
        ),
        (
            "the nearest element carries no Cert",
            format!(r#"Cert="{mine}",By=spiffe://x;Hash={hash}"#),
            Deny(ClientCertificateMissing),
        ),
        (
            "larger than twice max_certificate_bytes",
            format!(r#"By={},{proxy_partner}"#, "x".repeat(2 * 8192)),
            Deny(ClientCertificateInvalid),
        ),
    ];

    let mut wrong = Vec::new();
    for (name, header, want) in &rows {
        let d = decide(&p, header.as_bytes()).await;
        let (got, status) = outcome(&d);
        let want_status = match want {
            Allow => None,
            Deny(r) => Some(r.http_status()),
        };
        if (got, status) != (*want, want_status) {
            wrong.push(format!(
                "{name}: want {want:?} {want_status:?}, got {got:?} {status:?}"
            ));
            continue;
        }
        // The detail a deny leaves in explanations and logs never echoes certificate text.
        if let Some(step) = d
            .steps
            .iter()
            .find(|s| s.check == "client_certificate" && matches!(s.result, StepResult::Fail(_)))
        {
            // A slice of each certificate's body, past the common `-----BEGIN` prefix.
            for forbidden in [&mine[100..140], &real[100..140], "BEGIN", "spiffe"] {
                if step.detail.contains(forbidden) {
                    wrong.push(format!(
                        "{name}: the detail echoes the header: {}",
                        step.detail
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} rows wrong:\n{}",
        wrong.len(),
        rows.len(),
        wrong.join("\n")
    );
}
