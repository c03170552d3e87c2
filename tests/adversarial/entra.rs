//! Entra ID tokens (the `entra` preset) that try to pass as another client, another tenant or
//! another token version. Entra signs every tenant's tokens with the same keys, so each of these is
//! signed by the tenant's own key: only the claims are hostile.

use serde_json::{Value, json};

use crate::keys;
use crate::support::{compile, decide, request, verdict};

const TID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const OTHER_TID: &str = "f8cdef31-a31e-4b4a-93e4-5f571e91255a";
const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
const OTHER_CLIENT: &str = "99999999-2222-3333-4444-555555555555";
const BACKEND: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

fn v1_iss(tid: &str) -> String {
    format!("https://sts.windows.net/{tid}/")
}

fn v2_iss(tid: &str) -> String {
    format!("https://login.microsoftonline.com/{tid}/v2.0")
}

/// Claims valid for an hour; `null` in `extra` removes a claim.
fn claims(base: Value, extra: Value) -> Value {
    let t = keys::now();
    let mut c = base;
    c["sub"] = "user".into();
    c["nbf"] = (t - 5).into();
    c["exp"] = (t + 3600).into();
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn v1(extra: Value) -> Value {
    claims(
        json!({"iss": v1_iss(TID), "tid": TID, "ver": "1.0", "aud": format!("api://{BACKEND}"), "appid": CLIENT}),
        extra,
    )
}

fn v2(extra: Value) -> Value {
    claims(
        json!({"iss": v2_iss(TID), "tid": TID, "ver": "2.0", "aud": BACKEND, "azp": CLIENT}),
        extra,
    )
}

#[tokio::test]
async fn entra_claims_are_read_by_version_and_tenant() {
    let key = keys::rsa(0, Some("tenant-key"));
    let stranger = keys::rsa(1, Some("tenant-key"));
    let stranger_kid = keys::rsa(1, Some("elsewhere"));
    // The API lists another tenant's issuer too: that must not widen the preset's tenant.
    let p = compile(&format!(
        r#"
identity_providers:
  - name: aad
    keys: [{jwk}]
    entra:
      tenant_id: {TID}
      client_application_ids: ["{CLIENT}"]
      backend_application_ids: ["{BACKEND}"]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [aad], issuers: ["{v1}", "{v2}", "{other}"] }}
    on_allow: {{ set_headers: {{ x-api: "{{api}}" }} }}
"#,
        jwk = key.jwk,
        v1 = v1_iss(TID),
        v2 = v2_iss(TID),
        other = v2_iss(OTHER_TID),
    ));
    let cases: Vec<(&str, String, &str)> = vec![
        ("v1.0 token", key.token(v1(json!({}))), "allow orders"),
        ("v2.0 token", key.token(v2(json!({}))), "allow orders"),
        // A v1.0 token's client is `appid`; an allowed `azp` beside it changes nothing.
        (
            "v1.0, foreign appid, allowed azp",
            key.token(v1(json!({"appid": OTHER_CLIENT, "azp": CLIENT}))),
            "deny 403 TokenClaimValueNotAllowed",
        ),
        (
            "v2.0, foreign azp, allowed appid",
            key.token(v2(json!({"azp": OTHER_CLIENT, "appid": CLIENT}))),
            "deny 403 TokenClaimValueNotAllowed",
        ),
        (
            "v1.0 without appid, allowed azp",
            key.token(v1(json!({"appid": null, "azp": CLIENT}))),
            "deny 403 TokenClaimNotFound",
        ),
        // Without `ver` it is not known which claim names the client: refused, not guessed.
        (
            "no ver, both claims allowed",
            key.token(v1(json!({"ver": null, "azp": CLIENT}))),
            "deny 401 JwtInvalid",
        ),
        (
            "ver of no Entra version",
            key.token(v2(json!({"ver": "3.0"}))),
            "deny 401 JwtInvalid",
        ),
        (
            "ver as a number",
            key.token(v2(json!({"ver": 2.0}))),
            "deny 401 JwtInvalid",
        ),
        // Entra writes v1.0 tokens under the sts issuer and v2.0 under the v2.0 one; never mixed.
        (
            "v1.0 issuer, ver 2.0, azp allowed",
            key.token(v1(
                json!({"ver": "2.0", "azp": CLIENT, "appid": OTHER_CLIENT}),
            )),
            "deny 401 TokenIssuerNotAllowed",
        ),
        (
            "v2.0 issuer, ver 1.0, appid allowed",
            key.token(v2(
                json!({"ver": "1.0", "appid": CLIENT, "azp": OTHER_CLIENT}),
            )),
            "deny 401 TokenIssuerNotAllowed",
        ),
        (
            "another tenant, listed by the API",
            key.token(v2(json!({"iss": v2_iss(OTHER_TID), "tid": OTHER_TID}))),
            "deny 401 TokenIssuerNotAllowed",
        ),
        (
            "another tenant, v1.0 form",
            key.token(v1(json!({"iss": v1_iss(OTHER_TID), "tid": OTHER_TID}))),
            "deny 401 TokenIssuerNotAllowed",
        ),
        (
            "the tenant's issuer, another tid",
            key.token(v2(json!({"tid": OTHER_TID}))),
            "deny 401 TokenIssuerNotAllowed",
        ),
        (
            "the multi-tenant placeholder issuer",
            key.token(v2(
                json!({"iss": "https://login.microsoftonline.com/{tenantid}/v2.0"}),
            )),
            "deny 401 TokenIssuerNotAllowed",
        ),
        (
            "upper-case tenant in the issuer",
            key.token(v2(json!({"iss": v2_iss(&TID.to_uppercase())}))),
            "deny 401 TokenIssuerNotAllowed",
        ),
        (
            "an audience below the backend's URI",
            key.token(v1(json!({"aud": format!("api://{BACKEND}/other")}))),
            "deny 401 TokenAudienceNotAllowed",
        ),
        (
            "another backend",
            key.token(v2(json!({"aud": format!("api://{OTHER_CLIENT}")}))),
            "deny 401 TokenAudienceNotAllowed",
        ),
        // Keys outside the tenant's JWKS: same kid, or a kid of its own.
        (
            "a key not in the JWKS, the tenant's kid",
            stranger.token(v2(json!({}))),
            "deny 401 TokenSignatureInvalid",
        ),
        (
            "a key not in the JWKS, its own kid",
            stranger_kid.token(v2(json!({}))),
            "deny 401 TokenSignatureKeyNotFound",
        ),
    ];
    for (name, token, want) in cases {
        let req = request(
            "GET",
            "api.example.com",
            "/orders/1",
            &[("authorization", &format!("Bearer {token}"))],
        );
        assert_eq!(verdict(&decide(&p, &req).await), want, "{name}");
    }
}
