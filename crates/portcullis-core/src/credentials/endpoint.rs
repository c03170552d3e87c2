//! Talking to a token endpoint (RFC 6749 §3.2): the request forms of each grant, client
//! authentication, and strict reading of the answer. Errors describe what happened without ever
//! carrying a token, a secret or the provider's free-text description.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::spec::{ClientAuth, CredentialSpec};

/// The largest token endpoint answer read.
const MAX_BODY: usize = 64 * 1024;
/// The largest access token accepted (it becomes a header value).
const MAX_TOKEN: usize = 16 * 1024;
/// Lifetime assumed for a token whose answer gives no `expires_in` and that is not a JWT with `exp`.
pub const ASSUMED_LIFETIME: Duration = Duration::from_secs(60);

/// RFC 8693 grant type.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 token type of an OAuth access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Why no token was obtained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No connection could be made.
    #[error("the token endpoint is unreachable ({0})")]
    Unreachable(String),
    /// No answer within the credential's `timeout`.
    #[error("the token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// An error status; `error` is the OAuth error code when the body had one.
    #[error("the token endpoint answered HTTP {status}{}", error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Status {
        /// HTTP status.
        status: u16,
        /// OAuth `error` code (sanitised).
        error: Option<String>,
    },
    /// A 200 answer that is not a usable token response.
    #[error("the token endpoint's answer is not usable: {0}")]
    InvalidResponse(String),
    /// The refresh token was refused: the connection needs consent again.
    #[error("the refresh token was refused ({0}): consent is needed again")]
    RefreshTokenRejected(String),
    /// The HTTP client could not be set up.
    #[error("cannot make HTTP requests: {0}")]
    Client(String),
    /// A rotated refresh token could not be written to the store: the new access token is not
    /// used (fail closed) and the rotated refresh token is kept in memory until it can be.
    #[error("the rotated refresh token cannot be stored yet: {0}")]
    Store(String),
    /// The shared store (`store.redis`) could not be used: a refresh token is never sent without it.
    #[error("{0}")]
    SharedStore(String),
    /// `limits.max_concurrent_fetches` requests are already in flight; nothing was sent.
    #[error("too many token requests in flight (limits.max_concurrent_fetches)")]
    Busy,
}

impl TokenError {
    /// Worth retrying soon: the endpoint may answer next time. Other errors need a configuration or
    /// consent change, and are retried only slowly.
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::Unreachable(_)
            | TokenError::Timeout(_)
            | TokenError::InvalidResponse(_)
            | TokenError::SharedStore(_) => true,
            TokenError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            // Busy says nothing about the provider: it must not back off every caller.
            TokenError::RefreshTokenRejected(_)
            | TokenError::Client(_)
            | TokenError::Store(_)
            | TokenError::Busy => false,
        }
    }
}

/// A successful token response.
#[derive(Clone)]
pub struct Issued {
    /// The access token.
    pub access_token: String,
    /// When it expires.
    pub expires_at: SystemTime,
    /// A new refresh token, when the provider rotated or issued one.
    pub refresh_token: Option<String>,
    /// When the refresh token expires, if said.
    pub refresh_token_expires_at: Option<SystemTime>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("expires_at", &self.expires_at)
            .field("refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds the shared HTTP client: no redirects (a token endpoint that redirects is misconfigured,
/// and following it could send the client secret elsewhere).
pub fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// The form of a client credentials request.
pub fn client_credentials_form(spec: &CredentialSpec) -> Vec<(&'static str, String)> {
    let mut f = vec![("grant_type", "client_credentials".to_string())];
    push_opt(&mut f, "scope", &spec.scope);
    push_opt(&mut f, "resource", &spec.resource);
    push_opt(&mut f, "audience", &spec.audience);
    f
}

/// The form of a refresh request.
pub fn refresh_form(spec: &CredentialSpec, refresh_token: &str) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("grant_type", "refresh_token".to_string()),
        ("refresh_token", refresh_token.to_string()),
    ];
    push_opt(&mut f, "resource", &spec.resource);
    f
}

/// The form that redeems an authorization code (PKCE).
pub fn code_form(spec: &CredentialSpec, code: &str, verifier: &str) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("grant_type", "authorization_code".to_string()),
        ("code", code.to_string()),
        ("code_verifier", verifier.to_string()),
    ];
    push_opt(&mut f, "redirect_uri", &spec.redirect_uri);
    push_opt(&mut f, "resource", &spec.resource);
    f
}

/// The form of an RFC 8693 exchange of the caller's token.
pub fn exchange_form(spec: &CredentialSpec, subject_token: &str) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("grant_type", TOKEN_EXCHANGE_GRANT.to_string()),
        ("subject_token", subject_token.to_string()),
        ("subject_token_type", ACCESS_TOKEN_TYPE.to_string()),
        ("requested_token_type", ACCESS_TOKEN_TYPE.to_string()),
    ];
    push_opt(&mut f, "audience", &spec.audience);
    push_opt(&mut f, "resource", &spec.resource);
    push_opt(&mut f, "scope", &spec.scope);
    f
}

fn push_opt(f: &mut Vec<(&'static str, String)>, name: &'static str, v: &Option<String>) {
    if let Some(v) = v {
        f.push((name, v.clone()));
    }
}

/// Posts `form` to the credential's token endpoint and reads the answer. `refreshing` turns an
/// `invalid_grant` into [`TokenError::RefreshTokenRejected`].
pub async fn request(
    client: &reqwest::Client,
    spec: &CredentialSpec,
    form: Vec<(&'static str, String)>,
    now: SystemTime,
    refreshing: bool,
) -> Result<Issued, TokenError> {
    use tracing::Instrument as _;
    // A child of `authz.check` when a request waits for it; its own trace in background refreshes.
    let span =
        tracing::info_span!("token.fetch", credential = %spec.name, grant = spec.grant.as_str());
    request_inner(client, spec, form, now, refreshing)
        .instrument(span)
        .await
}

async fn request_inner(
    client: &reqwest::Client,
    spec: &CredentialSpec,
    mut form: Vec<(&'static str, String)>,
    now: SystemTime,
    refreshing: bool,
) -> Result<Issued, TokenError> {
    let url = spec
        .token_url
        .as_deref()
        .ok_or_else(|| TokenError::Client("no token_url".into()))?;
    let id = spec.client_id.as_deref().unwrap_or_default();
    let secret = spec
        .client_secret
        .as_ref()
        .map(|s| s.expose())
        .unwrap_or_default();
    let mut req = client
        .post(url)
        .timeout(spec.timeout)
        .header("accept", "application/json");
    match spec.client_auth {
        ClientAuth::Basic => {
            // RFC 6749 §2.3.1: id and secret are form-encoded before the Basic encoding.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            use base64::Engine;
            let basic = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(id),
                enc(secret)
            ));
            req = req.header("authorization", format!("Basic {basic}"));
        }
        ClientAuth::Post => {
            form.push(("client_id", id.to_string()));
            form.push(("client_secret", secret.to_string()));
        }
    }
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
        .finish();
    let resp = req
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| transport_error(e, spec.timeout))?;
    let status = resp.status().as_u16();
    let bytes = read_capped(resp, spec.timeout).await?;
    if status != 200 {
        let error = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(sanitize));
        if refreshing && status == 400 && error.as_deref() == Some("invalid_grant") {
            return Err(TokenError::RefreshTokenRejected("invalid_grant".into()));
        }
        return Err(TokenError::Status { status, error });
    }
    parse(&bytes, now)
}

fn transport_error(e: reqwest::Error, timeout: Duration) -> TokenError {
    if e.is_timeout() {
        TokenError::Timeout(timeout)
    } else if e.is_connect() {
        TokenError::Unreachable("connection failed".into())
    } else {
        // Never the URL: `without_url` keeps query strings out of logs.
        TokenError::Unreachable(e.without_url().to_string())
    }
}

async fn read_capped(
    mut resp: reqwest::Response,
    timeout: Duration,
) -> Result<Vec<u8>, TokenError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| transport_error(e, timeout))?
    {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(TokenError::InvalidResponse(format!(
                "the answer is larger than {MAX_BODY} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Keeps an OAuth error code printable and short (it comes from the network).
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// Reads a 200 token response.
pub fn parse(body: &[u8], now: SystemTime) -> Result<Issued, TokenError> {
    let invalid = |m: &str| TokenError::InvalidResponse(m.to_string());
    let v: Value = serde_json::from_slice(body).map_err(|_| invalid("not JSON"))?;
    let obj = v.as_object().ok_or_else(|| invalid("not a JSON object"))?;
    let token = match obj.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(invalid("`access_token` is empty or not a string")),
        None => return Err(invalid("no `access_token`")),
    };
    if token.len() > MAX_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "`access_token` is too long or has characters a header cannot carry",
        ));
    }
    if let Some(tt) = obj.get("token_type").and_then(Value::as_str) {
        // N_A: RFC 8693 answers for tokens that are not access tokens; we request access tokens.
        if !tt.eq_ignore_ascii_case("bearer") && tt != "N_A" {
            return Err(invalid("`token_type` is not Bearer"));
        }
    }
    let lifetime = match seconds(obj.get("expires_in")) {
        Seconds::Value(0) => {
            return Err(invalid("the token is already expired (`expires_in` is 0)"));
        }
        Seconds::Value(s) => Some(Duration::from_secs(s)),
        Seconds::Absent => None,
        Seconds::Invalid => return Err(invalid("`expires_in` is not a number of seconds")),
    };
    let jwt_exp = jwt_expiry(&token);
    let expires_at = match (lifetime, jwt_exp) {
        (Some(l), Some(e)) => (now + l).min(e),
        (Some(l), None) => now + l,
        (None, Some(e)) => e,
        (None, None) => now + ASSUMED_LIFETIME,
    };
    if expires_at <= now {
        return Err(invalid("the token is already expired"));
    }
    let refresh_token = match obj.get("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_TOKEN => Some(s.clone()),
        None | Some(Value::Null) => None,
        Some(_) => return Err(invalid("`refresh_token` is not a usable string")),
    };
    let rt_lifetime = match seconds(
        obj.get("refresh_token_expires_in")
            .or_else(|| obj.get("refresh_expires_in")),
    ) {
        Seconds::Value(s) if s > 0 => Some(now + Duration::from_secs(s)),
        _ => None,
    };
    Ok(Issued {
        access_token: token,
        expires_at,
        refresh_token,
        refresh_token_expires_at: rt_lifetime,
    })
}

enum Seconds {
    Absent,
    Value(u64),
    Invalid,
}

/// `expires_in` is a number, but some providers send it as a string.
fn seconds(v: Option<&Value>) -> Seconds {
    // Capped at ten years: a larger lifetime is a provider bug, and the cap keeps time arithmetic safe.
    const CAP: u64 = 10 * 365 * 24 * 3600;
    match v {
        None | Some(Value::Null) => Seconds::Absent,
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(s), _, _) => Seconds::Value(s.min(CAP)),
            (None, Some(_), _) => Seconds::Value(0),
            (None, None, Some(f)) if f.is_finite() && f >= 0.0 => {
                Seconds::Value((f as u64).min(CAP))
            }
            _ => Seconds::Invalid,
        },
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map_or(Seconds::Invalid, |s| Seconds::Value(s.min(CAP))),
        Some(_) => Seconds::Invalid,
    }
}

/// The `exp` of a JWT access token, read without verification: only to avoid caching a token past
/// its own expiry. Opaque tokens give `None`.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_h, payload, _s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    claim_time(v.get("exp")?)
}

/// A NumericDate claim as a time.
pub fn claim_time(v: &Value) -> Option<SystemTime> {
    let secs = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn reads_a_token_response() {
        let i = parse(br#"{"access_token":"abc","token_type":"Bearer","expires_in":3600,"refresh_token":"r1"}"#, t0()).unwrap();
        assert_eq!(i.access_token, "abc");
        assert_eq!(i.expires_at, t0() + Duration::from_secs(3600));
        assert_eq!(i.refresh_token.as_deref(), Some("r1"));
        let s = parse(br#"{"access_token":"abc","expires_in":"120"}"#, t0()).unwrap();
        assert_eq!(s.expires_at, t0() + Duration::from_secs(120));
        let none = parse(br#"{"access_token":"abc"}"#, t0()).unwrap();
        assert_eq!(none.expires_at, t0() + ASSUMED_LIFETIME);
    }

    #[test]
    fn refuses_unusable_answers() {
        for (body, want) in [
            (&b"<html>"[..], "not JSON"),
            (br#"[1]"#, "not a JSON object"),
            (
                br#"{"token_type":"Bearer","expires_in":60}"#,
                "no `access_token`",
            ),
            (br#"{"access_token":"","expires_in":60}"#, "empty"),
            (br#"{"access_token":"a b","expires_in":60}"#, "characters"),
            (br#"{"access_token":"a","expires_in":0}"#, "already expired"),
            (
                br#"{"access_token":"a","expires_in":-5}"#,
                "already expired",
            ),
            (br#"{"access_token":"a","expires_in":"soon"}"#, "expires_in"),
            (br#"{"access_token":"a","token_type":"DPoP"}"#, "Bearer"),
        ] {
            let e = parse(body, t0()).unwrap_err();
            assert!(e.to_string().contains(want), "{e} should mention {want}");
            assert!(e.is_transient());
        }
    }

    #[test]
    fn a_jwt_never_outlives_its_exp() {
        use base64::Engine;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"exp":{}}}"#, 1_700_000_100));
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig");
        let body = format!(r#"{{"access_token":"{jwt}","expires_in":3600}}"#);
        let i = parse(body.as_bytes(), t0()).unwrap();
        assert_eq!(i.expires_at, t0() + Duration::from_secs(100));
    }

    #[test]
    fn errors_say_what_without_secrets() {
        let e = TokenError::Status {
            status: 401,
            error: Some("invalid_client".into()),
        };
        assert_eq!(
            e.to_string(),
            "the token endpoint answered HTTP 401 (invalid_client)"
        );
        assert!(!e.is_transient());
        assert!(
            TokenError::Status {
                status: 503,
                error: None
            }
            .is_transient()
        );
        assert_eq!(sanitize("bad\r\nerror<script>"), "baderror<script>");
    }
}
