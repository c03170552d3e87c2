//! The preset's expansion: discovery URL, issuer forms, sovereign endpoints, tenant names, and the
//! rules on Entra-shaped claims.

use serde_json::{Value, json};

use super::*;

const TID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const OTHER_TID: &str = "f8cdef31-a31e-4b4a-93e4-5f571e91255a";
const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
const BACKEND: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

fn provider(v: Value) -> config::IdentityProvider {
    serde_json::from_value(v).unwrap()
}

fn expanded(entra: Value) -> Result<Expanded, Vec<String>> {
    expanded_with(json!({"name": "aad", "entra": entra}))
}

fn expanded_with(cfg: Value) -> Result<Expanded, Vec<String>> {
    let cfg = provider(cfg);
    let mut errs = ConfigErrors::default();
    let e = cfg.entra.as_ref().unwrap();
    match expand(&cfg, e, "identity_providers[0]", &mut errs) {
        Some(x) if errs.is_empty() => Ok(x),
        _ => Err(errs.0.iter().map(ToString::to_string).collect()),
    }
}

fn rules(entra: Value) -> Result<Arc<Rules>, Vec<String>> {
    let e: config::Entra = serde_json::from_value(entra).unwrap();
    let mut errs = ConfigErrors::default();
    match compile_rules(&e, "identity_providers[0].entra", &mut errs) {
        Some(r) if errs.is_empty() => Ok(r),
        _ => Err(errs.0.iter().map(ToString::to_string).collect()),
    }
}

#[track_caller]
fn refused(errs: Vec<String>, path: &str, words: &str) {
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("{path}: ")) && e.contains(words)),
        "no error at {path} with `{words}` in {errs:?}"
    );
}

#[test]
fn public_cloud_expands_to_the_v2_discovery_document_and_both_issuer_forms() {
    let x = expanded(json!({"tenant_id": TID})).unwrap();
    assert_eq!(
        x.discovery_url,
        format!("https://login.microsoftonline.com/{TID}/v2.0/.well-known/openid-configuration")
    );
    assert_eq!(
        x.issuer,
        format!("https://login.microsoftonline.com/{TID}/v2.0")
    );
    let t = &x.tenant;
    assert_eq!(
        t.issuer_form(&format!("https://sts.windows.net/{TID}/")),
        Some(TokenVersion::V1)
    );
    assert_eq!(
        t.issuer_form(&format!("https://login.microsoftonline.com/{TID}/v2.0")),
        Some(TokenVersion::V2)
    );
    for other in [
        format!("https://sts.windows.net/{OTHER_TID}/"),
        format!("https://login.microsoftonline.com/{OTHER_TID}/v2.0"),
        format!("https://sts.windows.net/{TID}"),
        format!("https://login.microsoftonline.com/{TID}/v2.0/"),
        "https://login.microsoftonline.com/{tenantid}/v2.0".to_string(),
        format!("https://login.microsoftonline.us/{TID}/v2.0"),
    ] {
        assert_eq!(t.issuer_form(&other), None, "{other}");
    }
    // The v2.0 discovery document names the v2.0 issuer with the GUID.
    assert!(t.accept_discovery_issuer(&format!("https://login.microsoftonline.com/{TID}/v2.0")));
    assert!(!t.accept_discovery_issuer(&format!(
        "https://login.microsoftonline.com/{OTHER_TID}/v2.0"
    )));
    assert!(!t.accept_discovery_issuer("https://login.microsoftonline.com/{tenantid}/v2.0"));
}

#[test]
fn sovereign_clouds_have_their_own_issuers() {
    let gov = expanded(
        json!({"tenant_id": TID, "authentication_endpoint": "https://login.microsoftonline.us/"}),
    )
    .unwrap();
    assert_eq!(
        gov.discovery_url,
        format!("https://login.microsoftonline.us/{TID}/v2.0/.well-known/openid-configuration")
    );
    assert_eq!(
        gov.tenant
            .issuer_form(&format!("https://login.microsoftonline.us/{TID}/v2.0")),
        Some(TokenVersion::V2)
    );
    assert_eq!(
        gov.tenant
            .issuer_form(&format!("https://sts.windows.net/{TID}/")),
        Some(TokenVersion::V1)
    );
    assert_eq!(
        gov.tenant
            .issuer_form(&format!("https://login.microsoftonline.com/{TID}/v2.0")),
        None
    );

    let china = expanded(json!({"tenant_id": TID, "authentication_endpoint": "https://login.partner.microsoftonline.cn"})).unwrap();
    assert_eq!(
        china
            .tenant
            .issuer_form(&format!("https://sts.chinacloudapi.cn/{TID}/")),
        Some(TokenVersion::V1)
    );
    assert_eq!(
        china
            .tenant
            .issuer_form(&format!("https://sts.windows.net/{TID}/")),
        None
    );

    // An endpoint of unknown cloud: the v2.0 form only, and the explanation says so.
    let private =
        expanded(json!({"tenant_id": TID, "authentication_endpoint": "https://login.example.net"}))
            .unwrap();
    assert_eq!(
        private
            .tenant
            .issuer_form(&format!("https://sts.windows.net/{TID}/")),
        None
    );
    assert!(private.tenant.describe().contains("v2.0 only"));
}

#[test]
fn a_tenant_named_by_domain_learns_its_guid_from_the_discovery_document() {
    let x = expanded(json!({"tenant_id": "Contoso.onmicrosoft.com"})).unwrap();
    assert_eq!(
        x.discovery_url,
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration"
    );
    let t = &x.tenant;
    // Before the document: no issuer is the tenant's.
    assert_eq!(
        t.issuer_form(&format!("https://sts.windows.net/{TID}/")),
        None
    );
    assert!(t.describe().contains("learned from the discovery document"));
    // Only the v2.0 form with a GUID is a tenant's issuer.
    assert!(
        !t.accept_discovery_issuer(
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0"
        )
    );
    assert!(!t.accept_discovery_issuer(&format!("https://evil.example/{TID}/v2.0")));
    assert!(t.accept_discovery_issuer(&format!("https://login.microsoftonline.com/{TID}/v2.0")));
    assert_eq!(
        t.issuer_form(&format!("https://sts.windows.net/{TID}/")),
        Some(TokenVersion::V1)
    );
    assert!(t.describe().contains(TID));
}

#[test]
fn tenant_ids_that_name_no_single_tenant_are_refused() {
    for t in ["common", "organizations", "Consumers"] {
        refused(
            expanded(json!({"tenant_id": t})).unwrap_err(),
            "identity_providers[0].entra.tenant_id",
            "multi-tenant",
        );
    }
    for t in [
        "",
        "contoso",
        "contoso..com",
        "72f988bf-86f1-41af-91ab",
        "a b.com",
        "-x.com",
    ] {
        refused(
            expanded(json!({"tenant_id": t})).unwrap_err(),
            "identity_providers[0].entra.tenant_id",
            "neither a GUID nor a domain name",
        );
    }
    // A domain needs the discovery document to learn the GUID that tokens carry.
    refused(
        expanded_with(
            json!({"name": "aad", "entra": {"tenant_id": "contoso.com"}, "jwks_file": "k.json"}),
        )
        .unwrap_err(),
        "identity_providers[0].entra.tenant_id",
        "give the tenant's GUID",
    );
    assert!(
        expanded_with(json!({"name": "aad", "entra": {"tenant_id": "contoso.com"}, "discovery_url": "http://127.0.0.1:1/x"}))
            .is_ok()
    );
    // The preset sets the issuers.
    refused(
        expanded_with(json!({"name": "aad", "issuer": "https://sts.windows.net/x/", "entra": {"tenant_id": TID}}))
            .unwrap_err(),
        "identity_providers[0].issuer",
        "the `entra` preset sets the issuers",
    );
    for e in [
        "http://login.microsoftonline.com",
        "https://login.microsoftonline.com/x",
        "not a url",
    ] {
        refused(
            expanded(json!({"tenant_id": TID, "authentication_endpoint": e})).unwrap_err(),
            "identity_providers[0].entra.authentication_endpoint",
            "is not an https:// origin",
        );
    }
}

#[test]
fn rules_need_a_client_or_an_audience_and_application_ids_are_guids() {
    refused(
        rules(json!({"tenant_id": TID})).unwrap_err(),
        "identity_providers[0].entra",
        "give client_application_ids, or audiences or backend_application_ids",
    );
    refused(
        rules(json!({"tenant_id": TID, "client_application_ids": ["api://x"]})).unwrap_err(),
        "identity_providers[0].entra.client_application_ids[0]",
        "is a GUID",
    );
    refused(
        rules(json!({"tenant_id": TID, "backend_application_ids": ["orders"]})).unwrap_err(),
        "identity_providers[0].entra.backend_application_ids[0]",
        "is a GUID",
    );
    refused(
        rules(json!({"tenant_id": TID, "audiences": ["x"], "required_claims": [{"name": "roles", "match": "some"}]}))
            .unwrap_err(),
        "identity_providers[0].entra.required_claims[0].match",
        "use `all` or `any`",
    );
    assert!(rules(json!({"tenant_id": TID, "audiences": ["api://orders"]})).is_ok());
    assert!(
        rules(json!({"tenant_id": TID, "client_application_ids": [CLIENT.to_uppercase()]})).is_ok()
    );
}

fn claims(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn v1(extra: Value) -> Map<String, Value> {
    let mut c = claims(
        json!({"iss": format!("https://sts.windows.net/{TID}/"), "ver": "1.0", "tid": TID, "aud": format!("api://{BACKEND}"), "appid": CLIENT}),
    );
    c.extend(claims(extra));
    c
}

fn v2(extra: Value) -> Map<String, Value> {
    let mut c = claims(
        json!({"iss": format!("https://login.microsoftonline.com/{TID}/v2.0"), "ver": "2.0", "tid": TID, "aud": BACKEND, "azp": CLIENT}),
    );
    c.extend(claims(extra));
    c
}

fn outcome(r: &Rules, t: &Tenant, c: &Map<String, Value>) -> Result<(), (&'static str, String)> {
    r.check(c, t, "aad")
        .map_err(|(reason, d)| (reason.as_str(), d))
}

#[test]
fn the_client_is_read_from_the_claim_of_the_tokens_version() {
    let t = expanded(json!({"tenant_id": TID})).unwrap().tenant;
    let r = rules(json!({"tenant_id": TID, "client_application_ids": [CLIENT], "backend_application_ids": [BACKEND]})).unwrap();
    assert_eq!(outcome(&r, &t, &v1(json!({}))), Ok(()));
    assert_eq!(outcome(&r, &t, &v2(json!({}))), Ok(()));
    // A v1.0 token names its client in `appid`: an allowed `azp` beside a foreign `appid` is not it.
    let forged = v1(json!({"appid": OTHER_TID, "azp": CLIENT}));
    let (reason, detail) = outcome(&r, &t, &forged).unwrap_err();
    assert_eq!(reason, "TokenClaimValueNotAllowed");
    assert_eq!(
        detail,
        format!("Claim appid value of {OTHER_TID} is not allowed. Access denied.")
    );
    // And a v2.0 token in `azp`.
    let forged = v2(json!({"azp": OTHER_TID, "appid": CLIENT}));
    assert_eq!(
        outcome(&r, &t, &forged).unwrap_err().0,
        "TokenClaimValueNotAllowed"
    );
    let mut missing = v2(json!({}));
    missing.remove("azp");
    assert_eq!(
        outcome(&r, &t, &missing).unwrap_err(),
        (
            "TokenClaimNotFound",
            "JWT token is missing the following claims: azp. Access denied.".into()
        )
    );
    // No `ver`, or one Entra never writes: refused, not guessed.
    for ver in [None, Some(json!("3.0")), Some(json!(2.0)), Some(json!(""))] {
        let mut c = v1(json!({}));
        match ver {
            Some(v) => c.insert("ver".into(), v),
            None => c.remove("ver"),
        };
        assert_eq!(outcome(&r, &t, &c).unwrap_err().0, "JwtInvalid");
    }
    // `ver` and the issuer form must agree.
    let mixed = v1(json!({"ver": "2.0", "azp": CLIENT}));
    assert_eq!(
        outcome(&r, &t, &mixed).unwrap_err().0,
        "TokenIssuerNotAllowed"
    );
    let mixed = v2(json!({"ver": "1.0", "appid": CLIENT}));
    assert_eq!(
        outcome(&r, &t, &mixed).unwrap_err().0,
        "TokenIssuerNotAllowed"
    );
}

#[test]
fn tenant_audience_and_required_claims() {
    let t = expanded(json!({"tenant_id": TID})).unwrap().tenant;
    let r = rules(json!({"tenant_id": TID, "backend_application_ids": [BACKEND], "audiences": ["https://orders.example"],
        "required_claims": [{"name": "roles", "values": ["Orders.Read"]}]})).unwrap();
    let ok = v2(json!({"roles": ["Orders.Read"]}));
    assert_eq!(outcome(&r, &t, &ok), Ok(()));
    // `aud` as the id, as `api://{id}`, or a listed audience.
    assert_eq!(
        outcome(&r, &t, &v1(json!({"roles": ["Orders.Read"]}))),
        Ok(())
    );
    assert_eq!(
        outcome(
            &r,
            &t,
            &v2(json!({"aud": "https://orders.example", "roles": ["Orders.Read"]}))
        ),
        Ok(())
    );
    for aud in [
        json!(OTHER_TID),
        json!(format!("api://{OTHER_TID}")),
        json!(format!("api://{BACKEND}/x")),
        json!(null),
    ] {
        assert_eq!(
            outcome(&r, &t, &v2(json!({"aud": aud, "roles": ["Orders.Read"]})))
                .unwrap_err()
                .0,
            "TokenAudienceNotAllowed"
        );
    }
    // Another tenant's issuer, or a `tid` that is not the issuer's tenant.
    let other = v2(
        json!({"iss": format!("https://login.microsoftonline.com/{OTHER_TID}/v2.0"), "tid": OTHER_TID, "roles": ["Orders.Read"]}),
    );
    assert_eq!(
        outcome(&r, &t, &other).unwrap_err().0,
        "TokenIssuerNotAllowed"
    );
    let other = v2(json!({"tid": OTHER_TID, "roles": ["Orders.Read"]}));
    assert_eq!(
        outcome(&r, &t, &other).unwrap_err().0,
        "TokenIssuerNotAllowed"
    );
    // required_claims as in validate-jwt.
    assert_eq!(
        outcome(&r, &t, &v2(json!({}))).unwrap_err(),
        (
            "TokenClaimNotFound",
            "JWT token is missing the following claims: roles. Access denied.".into()
        )
    );
    assert_eq!(
        outcome(&r, &t, &v2(json!({"roles": ["Orders.Write"]})))
            .unwrap_err()
            .0,
        "TokenClaimValueNotAllowed"
    );
}
