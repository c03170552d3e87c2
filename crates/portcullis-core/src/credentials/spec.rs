//! `credentials[]` and `store` as compiled settings: every value checked, every error reported with
//! its path, nothing left to parse on the request path.

use std::path::PathBuf;
use std::time::Duration;

use crate::digest::Sha256;

use crate::config::{self, ConfigErrors, Secret, Source};

/// Default `refresh_before_expiry` (API Management caches tokens until 3 minutes before expiry).
pub const DEFAULT_REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(180);
/// Default token endpoint timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a credential is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// OAuth 2.0 client credentials (RFC 6749 §4.4).
    ClientCredentials,
    /// Connections holding refresh tokens, obtained by consent (authorization code + PKCE) or configured.
    RefreshToken,
    /// RFC 8693: the caller's validated token is exchanged for one for the backend.
    TokenExchange,
    /// A configured bearer secret.
    Static,
    /// A configured username and password, sent as `Authorization: Basic`.
    Basic,
}

impl GrantKind {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::ClientCredentials => "client_credentials",
            GrantKind::RefreshToken => "refresh_token",
            GrantKind::TokenExchange => "token_exchange",
            GrantKind::Static => "static",
            GrantKind::Basic => "basic",
        }
    }
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded id and secret (RFC 6749 §2.3.1), the default.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
}

/// One compiled credential.
#[derive(Debug, Clone)]
pub struct CredentialSpec {
    /// `name`.
    pub name: String,
    /// `grant`.
    pub grant: GrantKind,
    /// `token_url`.
    pub token_url: Option<String>,
    /// `authorize_url` (consent).
    pub authorize_url: Option<String>,
    /// `redirect_uri` (consent): portcullis' `/admin/callback` as the provider knows it.
    pub redirect_uri: Option<String>,
    /// `client_id`.
    pub client_id: Option<String>,
    /// `client_secret`.
    pub client_secret: Option<Secret>,
    /// `client_auth`.
    pub client_auth: ClientAuth,
    /// `scope`.
    pub scope: Option<String>,
    /// `resource` (RFC 8707).
    pub resource: Option<String>,
    /// `audience`.
    pub audience: Option<String>,
    /// `refresh_before_expiry`.
    pub refresh_before_expiry: Duration,
    /// `timeout` of one token endpoint request.
    pub timeout: Duration,
    /// `static`: the token; `basic`: base64 of `username:password`.
    pub fixed_value: Option<Secret>,
    /// `refresh_token`: the configured refresh token of the `default` connection.
    pub refresh_token: Option<Secret>,
}

impl CredentialSpec {
    /// A digest of every setting (secrets included, only as part of the digest): equal digests mean
    /// a cached token is still the right one after a reload.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |v: Option<&str>| {
            match v {
                Some(s) => {
                    h.update([1u8]);
                    h.update((s.len() as u64).to_be_bytes());
                    h.update(s.as_bytes());
                }
                None => h.update([0u8]),
            };
        };
        field(Some(&self.name));
        field(Some(self.grant.as_str()));
        field(self.token_url.as_deref());
        field(self.authorize_url.as_deref());
        field(self.redirect_uri.as_deref());
        field(self.client_id.as_deref());
        field(self.client_secret.as_ref().map(Secret::expose));
        field(Some(match self.client_auth {
            ClientAuth::Basic => "basic",
            ClientAuth::Post => "post",
        }));
        field(self.scope.as_deref());
        field(self.resource.as_deref());
        field(self.audience.as_deref());
        field(Some(&self.refresh_before_expiry.as_millis().to_string()));
        field(Some(&self.timeout.as_millis().to_string()));
        field(self.fixed_value.as_ref().map(Secret::expose));
        field(self.refresh_token.as_ref().map(Secret::expose));
        h.finalize()
    }
}

/// Compiled `store`.
#[derive(Clone)]
pub struct StoreSpec {
    /// Where the records live.
    pub location: StoreLocation,
    /// The AES-256 key.
    pub key: [u8; 32],
}

/// `store.path` or `store.redis`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded file, resolved against the config file's directory.
    File(PathBuf),
    /// The Redis every replica shares.
    Redis(RedisSpec),
}

impl StoreLocation {
    /// The file or the URL without credentials, for messages.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::File(p) => p.display().to_string(),
            StoreLocation::Redis(r) => r.display.clone(),
        }
    }
}

/// Compiled `store.redis`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSpec {
    /// `url`, as given (it may carry a password, so it is never shown).
    pub url: Secret,
    /// The URL without user information, for logs and errors.
    pub display: String,
    /// `username` (an ACL user).
    pub username: Option<String>,
    /// `password`.
    pub password: Option<Secret>,
    /// `tls.ca_file`: trust this CA bundle instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// `tls.cert_file` and `tls.key_file`: a client certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `prefix` of every key.
    pub prefix: String,
    /// `timeout`: the bound on every Redis call.
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSpec")
            .field("url", &self.display)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Default `store.redis.prefix`.
pub const DEFAULT_REDIS_PREFIX: &str = "portcullis:";
/// Default `store.redis.timeout`.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(500);

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSpec")
            .field("location", &self.location)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Checks a credential or connection name used in URLs and store keys.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The start of every per-user connection id. Fixed ids are [`valid_name`]s, which never contain
/// `:`, so no fixed id can spell a per-user one and no caller can name a fixed one.
pub const PER_USER_PREFIX: &str = "user:";
/// Domain separation of the per-user id digest (a new scheme gets a new tag).
const PER_USER_TAG: &[u8] = b"portcullis per-user connection v1\0";
/// Characters after [`PER_USER_PREFIX`]: SHA-256 in unpadded base64url.
const PER_USER_DIGEST_LEN: usize = 43;

/// Checks a fixed connection id (configured, or a shared one named in the admin API): the
/// credential-name charset, 1 to 128 letters, digits, `.`, `_` or `-`.
pub fn valid_fixed_connection_id(id: &str) -> bool {
    valid_name(id)
}

/// Whether `id` has the form of a per-user connection id (`user:` and 43 base64url characters).
pub fn is_per_user_connection_id(id: &str) -> bool {
    id.strip_prefix(PER_USER_PREFIX).is_some_and(|d| {
        d.len() == PER_USER_DIGEST_LEN
            && d.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Checks a connection id named in the admin API: a fixed id or a per-user one.
pub fn valid_connection_id(id: &str) -> bool {
    valid_fixed_connection_id(id) || is_per_user_connection_id(id)
}

/// The connection id of the user `subject` of the identity provider `issuer`: `user:` and the
/// SHA-256 of both, each length-prefixed (so no two (issuer, subject) pairs share an input: the
/// ids of two users differ unless SHA-256 collides), in unpadded base64url. Any subject works,
/// whatever its characters or length; the id is always 48 URL-safe characters.
pub fn per_user_connection_id(issuer: &str, subject: &str) -> String {
    use base64::Engine;
    let mut h = Sha256::new();
    h.update(PER_USER_TAG);
    for part in [issuer, subject] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize());
    format!("{PER_USER_PREFIX}{digest}")
}

fn url(value: &Option<String>, path: &str, errs: &mut ConfigErrors) -> Option<String> {
    let v = value.as_ref()?;
    match url::Url::parse(v) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            if u.fragment().is_some() {
                errs.push(path, "a URL here has no #fragment");
            }
            Some(v.clone())
        }
        Ok(_) => {
            errs.push(path, format!("`{v}` must be an http:// or https:// URL"));
            None
        }
        Err(e) => {
            errs.push(path, format!("`{v}` is not a URL ({e})"));
            None
        }
    }
}

/// Compiles `store`.
pub fn compile_store(src: &Source, errs: &mut ConfigErrors) -> Option<StoreSpec> {
    let s = src.file.store.as_ref()?;
    let location = match (&s.path, &s.redis) {
        (Some(_), Some(_)) => {
            errs.push(
                "store",
                "give `path` (one replica, an embedded file) or `redis` (replicas sharing one store), not both",
            );
            None
        }
        (None, None) => {
            errs.push(
                "store",
                "needs `path` (an embedded file) or `redis` (a store shared by every replica)",
            );
            None
        }
        (Some(p), None) if p.trim().is_empty() => {
            errs.push("store.path", "must not be empty");
            None
        }
        (Some(p), None) => Some(StoreLocation::File(src.resolve(p))),
        (None, Some(r)) => compile_redis(src, r, errs).map(StoreLocation::Redis),
    };
    if !src.substituted.contains("store.key") {
        errs.push(
            "store.key",
            "the key must not be written in the file: read it with ${env:NAME} or ${file:PATH}",
        );
        return None;
    }
    match super::store::decode_key(s.key.expose()) {
        Ok(key) => location.map(|location| StoreSpec { location, key }),
        Err(e) => {
            errs.push("store.key", e);
            None
        }
    }
}

fn compile_redis(
    src: &Source,
    r: &config::RedisStore,
    errs: &mut ConfigErrors,
) -> Option<RedisSpec> {
    let raw = r.url.expose();
    let parsed = match url::Url::parse(raw) {
        Ok(u) => u,
        Err(e) => {
            errs.push("store.redis.url", format!("is not a URL ({e})"));
            return None;
        }
    };
    let tls = match parsed.scheme() {
        "redis" => false,
        "rediss" => true,
        "redis+sentinel" | "rediss+sentinel" => {
            errs.push(
                "store.redis.url",
                "Redis Sentinel is not supported: give the primary's address (a managed service's primary endpoint, or a proxy in front of Sentinel)",
            );
            return None;
        }
        "redis+unix" | "unix" => {
            errs.push(
                "store.redis.url",
                "a Unix socket is not supported: use redis://host:port/db",
            );
            return None;
        }
        other => {
            errs.push(
                "store.redis.url",
                format!(
                    "`{other}://` is not a Redis URL: use redis://host:port/db or rediss:// (TLS)"
                ),
            );
            return None;
        }
    };
    let mut ok = true;
    if parsed.host_str().is_none_or(str::is_empty) {
        errs.push("store.redis.url", "names no host");
        ok = false;
    }
    let db = parsed.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        errs.push(
            "store.redis.url",
            format!("the path is the database number (e.g. /0), not `/{db}`"),
        );
        ok = false;
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        errs.push(
            "store.redis.url",
            "takes no ?query or #fragment: give the settings as fields of `store.redis`",
        );
        ok = false;
    }
    if parsed.password().is_some() && !src.substituted.contains("store.redis.url") {
        errs.push(
            "store.redis.url",
            "a password must not be written in the file: use `password: ${env:NAME}` (or substitute the whole URL)",
        );
        ok = false;
    }
    if r.password.is_some() && !src.substituted.contains("store.redis.password") {
        errs.push(
            "store.redis.password",
            "the password must not be written in the file: read it with ${env:NAME} or ${file:PATH}",
        );
        ok = false;
    }
    if r.username.as_deref().is_some_and(|u| u.is_empty()) {
        errs.push("store.redis.username", "must not be empty");
        ok = false;
    }
    let mut display = parsed.clone();
    let _ = display.set_username("");
    let _ = display.set_password(None);
    let prefix = r
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_REDIS_PREFIX.into());
    if prefix.len() > 128 || prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
        errs.push(
            "store.redis.prefix",
            "at most 128 characters, with no spaces or control characters",
        );
        ok = false;
    }
    let timeout = match &r.timeout {
        None => DEFAULT_REDIS_TIMEOUT,
        Some(t) => match config::duration(t, "store.redis.timeout", errs) {
            Some(d) if d.is_zero() || d > Duration::from_secs(60) => {
                errs.push("store.redis.timeout", "must be more than 0 and at most 60s");
                ok = false;
                DEFAULT_REDIS_TIMEOUT
            }
            Some(d) => d,
            None => {
                ok = false;
                DEFAULT_REDIS_TIMEOUT
            }
        },
    };
    let mut ca_file = None;
    let mut client_cert = None;
    if let Some(t) = &r.tls {
        if !tls {
            errs.push(
                "store.redis.tls",
                "applies to rediss:// URLs only: use rediss:// to connect with TLS",
            );
            ok = false;
        }
        ca_file = t.ca_file.as_deref().map(|f| src.resolve(f));
        match (&t.cert_file, &t.key_file) {
            (Some(c), Some(k)) => client_cert = Some((src.resolve(c), src.resolve(k))),
            (None, None) => {}
            _ => {
                errs.push(
                    "store.redis.tls",
                    "`cert_file` and `key_file` go together (a client certificate and its key)",
                );
                ok = false;
            }
        }
    }
    ok.then(|| RedisSpec {
        url: r.url.clone(),
        display: display.to_string(),
        username: r.username.clone(),
        password: r.password.clone(),
        ca_file,
        client_cert,
        prefix,
        timeout,
    })
}

/// Compiles one `credentials[i]`.
pub fn compile_credential(
    i: usize,
    c: &config::Credential,
    has_store: bool,
    errs: &mut ConfigErrors,
) -> Option<CredentialSpec> {
    let path = format!("credentials[{i}]");
    let before = errs.0.len();
    if !valid_name(&c.name) {
        errs.push(
            format!("{path}.name"),
            format!(
                "`{}`: use 1 to 128 letters, digits, `.`, `_` or `-`",
                c.name
            ),
        );
    }
    let grant = match c.grant.as_str() {
        "client_credentials" => GrantKind::ClientCredentials,
        "refresh_token" => GrantKind::RefreshToken,
        "token_exchange" => GrantKind::TokenExchange,
        "static" => GrantKind::Static,
        "basic" => GrantKind::Basic,
        other => {
            errs.push(format!("{path}.grant"), format!("`{other}`: use client_credentials, refresh_token, token_exchange, static or basic"));
            return None;
        }
    };
    let g = grant.as_str();

    // Which fields each grant takes: a field that does nothing is a mistake worth reporting.
    let oauth = matches!(
        grant,
        GrantKind::ClientCredentials | GrantKind::RefreshToken | GrantKind::TokenExchange
    );
    let given: [(&str, bool, bool); 16] = [
        ("token_url", c.token_url.is_some(), oauth),
        (
            "authorize_url",
            c.authorize_url.is_some(),
            grant == GrantKind::RefreshToken,
        ),
        (
            "redirect_uri",
            c.redirect_uri.is_some(),
            grant == GrantKind::RefreshToken,
        ),
        ("client_id", c.client_id.is_some(), oauth),
        ("client_secret", c.client_secret.is_some(), oauth),
        ("client_auth", c.client_auth.is_some(), oauth),
        ("scope", c.scope.is_some(), oauth),
        ("resource", c.resource.is_some(), oauth),
        (
            "audience",
            c.audience.is_some(),
            matches!(
                grant,
                GrantKind::ClientCredentials | GrantKind::TokenExchange
            ),
        ),
        (
            "refresh_before_expiry",
            c.refresh_before_expiry.is_some(),
            oauth,
        ),
        ("timeout", c.timeout.is_some(), oauth),
        ("token", c.token.is_some(), grant == GrantKind::Static),
        ("username", c.username.is_some(), grant == GrantKind::Basic),
        ("password", c.password.is_some(), grant == GrantKind::Basic),
        (
            "refresh_token",
            c.refresh_token.is_some(),
            grant == GrantKind::RefreshToken,
        ),
        ("grant", true, true),
    ];
    for (field, present, allowed) in given {
        if present && !allowed {
            errs.push(
                format!("{path}.{field}"),
                format!("is not used by grant `{g}`"),
            );
        }
    }
    let required = |field: &str, present: bool, errs: &mut ConfigErrors| {
        if !present {
            errs.push(
                format!("{path}.{field}"),
                format!("is required for grant `{g}`"),
            );
        }
    };
    if oauth {
        required("token_url", c.token_url.is_some(), errs);
        required("client_id", c.client_id.is_some(), errs);
        required("client_secret", c.client_secret.is_some(), errs);
    }
    let token_url = url(&c.token_url, &format!("{path}.token_url"), errs);
    let authorize_url = url(&c.authorize_url, &format!("{path}.authorize_url"), errs);
    let redirect_uri = url(&c.redirect_uri, &format!("{path}.redirect_uri"), errs);
    if c.authorize_url.is_some() != c.redirect_uri.is_some() && grant == GrantKind::RefreshToken {
        errs.push(&path, "consent needs both `authorize_url` and `redirect_uri` (portcullis' /admin/callback as the provider knows it)");
    }
    if grant == GrantKind::RefreshToken && !has_store {
        errs.push(
            format!("{path}.grant"),
            "`refresh_token` needs a `store` to keep rotated refresh tokens across restarts",
        );
    }
    if grant == GrantKind::TokenExchange && c.audience.is_none() && c.resource.is_none() {
        errs.push(
            &path,
            "token exchange needs an `audience` or a `resource` for the new token",
        );
    }
    let client_auth = match c.client_auth.as_deref() {
        None | Some("client_secret_basic") => ClientAuth::Basic,
        Some("client_secret_post") => ClientAuth::Post,
        Some(o) => {
            errs.push(
                format!("{path}.client_auth"),
                format!("`{o}`: use client_secret_basic or client_secret_post"),
            );
            ClientAuth::Basic
        }
    };
    if let Some(id) = &c.client_id
        && (id.is_empty() || id.chars().any(char::is_control))
    {
        errs.push(
            format!("{path}.client_id"),
            "must be non-empty text without control characters",
        );
    }
    let duration =
        |field: &str, v: &Option<String>, default: Duration, errs: &mut ConfigErrors| match v {
            None => default,
            Some(s) => match humantime::parse_duration(s.trim()) {
                Ok(d) => d,
                Err(e) => {
                    errs.push(
                        format!("{path}.{field}"),
                        format!("`{s}` is not a duration ({e}); write e.g. 250ms, 30s, 5m, 1h"),
                    );
                    default
                }
            },
        };
    let refresh_before_expiry = duration(
        "refresh_before_expiry",
        &c.refresh_before_expiry,
        DEFAULT_REFRESH_BEFORE_EXPIRY,
        errs,
    );
    let timeout = duration("timeout", &c.timeout, DEFAULT_TIMEOUT, errs);
    if timeout.is_zero() || timeout > Duration::from_secs(300) {
        errs.push(format!("{path}.timeout"), "must be between 1ms and 5m");
    }

    let fixed_value = match grant {
        GrantKind::Static => {
            required("token", c.token.is_some(), errs);
            c.token.as_ref().and_then(|t| {
                if t.expose().is_empty() || !t.expose().bytes().all(|b| (0x20..0x7f).contains(&b)) {
                    errs.push(
                        format!("{path}.token"),
                        "must be non-empty printable ASCII (it becomes a header value)",
                    );
                    None
                } else {
                    Some(t.clone())
                }
            })
        }
        GrantKind::Basic => {
            required("username", c.username.is_some(), errs);
            required("password", c.password.is_some(), errs);
            match (&c.username, &c.password) {
                (Some(u), Some(p)) => {
                    if u.contains(':') {
                        errs.push(
                            format!("{path}.username"),
                            "must not contain `:` (RFC 7617)",
                        );
                    }
                    if u.chars().chain(p.expose().chars()).any(char::is_control) {
                        errs.push(
                            &path,
                            "username and password must not contain control characters",
                        );
                    }
                    use base64::Engine;
                    Some(Secret::new(
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{u}:{}", p.expose())),
                    ))
                }
                _ => None,
            }
        }
        _ => None,
    };
    if errs.0.len() > before {
        return None;
    }
    Some(CredentialSpec {
        name: c.name.clone(),
        grant,
        token_url,
        authorize_url,
        redirect_uri,
        client_id: c.client_id.clone(),
        client_secret: c.client_secret.clone(),
        client_auth,
        scope: c.scope.clone(),
        resource: c.resource.clone(),
        audience: c.audience.clone(),
        refresh_before_expiry,
        timeout,
        fixed_value,
        refresh_token: c.refresh_token.clone(),
    })
}
