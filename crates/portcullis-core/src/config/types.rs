//! The configuration file as the user writes it (product contract, section 2).
//!
//! These types describe the YAML and nothing more: no defaults are resolved, no values are validated
//! beyond their shape. `policy::compile` turns them into the runtime policy set. Leaf values
//! whose meaning needs checking (durations, addresses, hashes) stay strings here so that compile can
//! report every bad value at once, each with its path.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Secret;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub telemetry: Telemetry,
    #[serde(default)]
    pub client_ip: ClientIp,
    #[serde(default)]
    pub request: Request,
    #[serde(default)]
    pub forward_auth: ForwardAuth,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub identity_providers: Vec<IdentityProvider>,
    #[serde(default)]
    pub subscriptions: Subscriptions,
    #[serde(default)]
    pub products: Vec<Product>,
    #[serde(default)]
    pub credentials: Vec<Credential>,
    pub store: Option<Store>,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub apis: Vec<Api>,
    pub unmatched: Option<String>,
    /// Send the decision's facts to the proxy as ext_authz `dynamic_metadata` (default true).
    pub dynamic_metadata: Option<bool>,
}

/// `listen`: where the service accepts connections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub grpc: Option<String>,
    pub http: Option<String>,
    pub tls: Option<Tls>,
}

/// `listen.tls`: TLS (and mTLS with `client_ca_file`) on the gRPC listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: Option<String>,
}

/// `telemetry`: logs, traces, metrics, decision log.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub otlp_endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf`.
    pub otlp_protocol: Option<String>,
    pub decision_log: Option<bool>,
    /// Whether decision records carry the client IP (default true).
    pub decision_log_client_ip: Option<bool>,
}

/// `client_ip`: where the caller's address comes from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIp {
    pub from: Option<String>,
    pub trusted_hops: Option<u32>,
}

/// `request`: how request lines are canonicalised (README "Canonical requests").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// `reject` (default) or `keep`: what an encoded `/` (`%2F`) in a path means.
    pub escaped_slashes: Option<String>,
}

/// `forward_auth`: where the HTTP listener's `/authz/` reads the request it decides on.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuth {
    /// `auto` (default), `forwarded_headers` (nginx, Traefik) or `request` (Envoy `http_service`).
    pub source: Option<String>,
}

/// `limits`: caps on untrusted input.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Total bytes of request header names and values a check accepts.
    pub max_header_bytes: Option<usize>,
    /// Largest token accepted before any parsing or crypto.
    pub max_token_bytes: Option<usize>,
    /// Largest client certificate (PEM, URL-encoded) accepted.
    pub max_certificate_bytes: Option<usize>,
    /// Checks evaluated at once; past it, checks are shed with UNAVAILABLE.
    pub max_concurrent_checks: Option<usize>,
    /// Token endpoint requests in flight at once (token exchange and per-user refreshes fetch per
    /// caller); past it, checks needing a new token are denied with 503 at once.
    pub max_concurrent_fetches: Option<usize>,
    /// Connections open at once on each listener; past it, new connections are closed at once.
    pub max_connections: Option<usize>,
    /// Time a client has to send a request's headers (HTTP) or, on a new gRPC connection, its
    /// first request (TLS handshake included).
    pub header_read_timeout: Option<String>,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Option<String>,
    /// Requests in flight at once on one HTTP/2 connection.
    pub max_concurrent_streams: Option<u32>,
    /// How often an HTTP/2 PING checks that the client is still there.
    pub keepalive_interval: Option<String>,
    /// How long the client has to answer that PING before the connection is closed.
    pub keepalive_timeout: Option<String>,
}

/// One `identity_providers[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityProvider {
    pub name: String,
    /// Required unless a preset (`entra`) sets it.
    #[serde(default)]
    pub issuer: String,
    /// Microsoft Entra ID preset (APIM's `validate-azure-ad-token`).
    pub entra: Option<Entra>,
    /// Discovery document URL; default `{issuer}/.well-known/openid-configuration`.
    pub discovery_url: Option<String>,
    pub jwks_uri: Option<String>,
    pub jwks_file: Option<String>,
    pub keys: Option<Vec<serde_json::Value>>,
    pub cache_ttl: Option<String>,
    pub min_refetch_interval: Option<String>,
    pub fetch_timeout: Option<String>,
    pub algorithms: Option<Vec<String>>,
    /// RFC 7662 token introspection for opaque tokens.
    pub introspection: Option<Introspection>,
}

/// `subscriptions`: subscription keys and where callers send them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscriptions {
    pub header: Option<String>,
    pub query: Option<String>,
    /// Remove the key header and query parameter before the request goes upstream (default true).
    pub remove_key: Option<bool>,
    #[serde(default)]
    pub keys: Vec<SubscriptionKey>,
    /// A file of subscriptions, one per line (`id state scope primary [secondary]`), watched and
    /// reloaded on its own.
    pub keys_file: Option<String>,
}

/// One subscription with its key pair.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionKey {
    pub id: String,
    pub scope: Option<String>,
    pub state: Option<String>,
    pub primary: Option<Secret>,
    pub secondary: Option<Secret>,
}

/// A product groups APIs; product-scoped keys grant access to its APIs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    pub name: String,
    #[serde(default)]
    pub apis: Vec<String>,
    /// An open product (false) lets requests without a key reach its APIs.
    pub subscription_required: Option<bool>,
}

/// One backend credential kept in the token cache.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub name: String,
    pub grant: String,
    pub token_url: Option<String>,
    pub authorize_url: Option<String>,
    pub redirect_uri: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    /// `client_secret_basic` (default) or `client_secret_post`.
    pub client_auth: Option<String>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    pub audience: Option<String>,
    pub refresh_before_expiry: Option<String>,
    pub timeout: Option<String>,
    /// `static`: the bearer secret.
    pub token: Option<Secret>,
    /// `basic`: username and password.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `refresh_token`: an initial refresh token for the default connection.
    pub refresh_token: Option<Secret>,
}

/// `store`: the encrypted persistent store, a file (`path`) or a shared Redis (`redis`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub path: Option<String>,
    pub redis: Option<RedisStore>,
    pub key: Secret,
}

/// `store.redis`: the store shared by every replica.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStore {
    pub url: Secret,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<RedisTls>,
    pub prefix: Option<String>,
    pub timeout: Option<String>,
}

/// `store.redis.tls`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// `admin`: the admin API on the HTTP listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub token: Secret,
}

/// One `apis[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: Match,
    pub subscription_required: Option<bool>,
    pub ip_filter: Option<IpFilter>,
    pub client_certificate: Option<ClientCertificate>,
    pub jwt: Option<Jwt>,
    #[serde(default)]
    pub on_allow: OnAllow,
    pub mode: Option<String>,
}

/// `apis[].match`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub hosts: Option<Vec<String>>,
    pub path_prefix: Option<String>,
    pub methods: Option<Vec<String>>,
    pub context_extensions: Option<BTreeMap<String, String>>,
}

/// `apis[].ip_filter`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpFilter {
    pub action: String,
    pub addresses: Vec<String>,
}

/// `apis[].client_certificate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificate {
    #[serde(default)]
    pub identities: Vec<CertificateIdentity>,
    pub validate_not_before: Option<bool>,
    pub validate_not_after: Option<bool>,
    /// Also read the certificate from `x-forwarded-client-cert` (only behind a proxy that sets it).
    pub trust_forwarded_client_cert: Option<bool>,
    /// The chain must verify to one of these CAs (APIM's `validate-trust`).
    pub trust: Option<CertTrust>,
}

/// `apis[].client_certificate.trust`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertTrust {
    pub ca_files: Vec<String>,
    #[serde(default)]
    pub intermediate_files: Vec<String>,
    #[serde(default)]
    pub crl_files: Vec<String>,
    /// CRLs fetched in the background (https; http only to a loopback host).
    #[serde(default)]
    pub crl_urls: Vec<String>,
    /// Period of CRL fetches (default 1h; earlier when a CRL's `nextUpdate` comes first).
    pub crl_refresh: Option<String>,
    /// Limit of one CRL fetch (default 5s).
    pub crl_fetch_timeout: Option<String>,
    /// Default: true when `crl_files` or `crl_urls` are given (APIM's `validate-revocation`).
    pub validate_revocation: Option<bool>,
    /// `deny` (default) or `allow`: no CRL of an issuer, or a CRL past its next update.
    pub unknown_revocation: Option<String>,
}

/// One identity: passes when every field given matches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateIdentity {
    pub thumbprint: Option<String>,
    pub subject: Option<String>,
    pub issuer_subject: Option<String>,
    pub common_name: Option<String>,
    pub serial_number: Option<String>,
    pub dns_name: Option<String>,
    pub issuer_thumbprint: Option<String>,
    pub uri: Option<String>,
    pub uri_prefix: Option<String>,
}

/// `apis[].jwt`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    pub providers: Vec<String>,
    pub from: Option<TokenSource>,
    pub audiences: Option<Vec<String>>,
    pub issuers: Option<Vec<String>>,
    pub scopes: Option<Scopes>,
    #[serde(default)]
    pub required_claims: Vec<RequiredClaim>,
    pub clock_skew: Option<String>,
    pub require_expiration_time: Option<bool>,
    pub failed_status: Option<u16>,
    pub failed_message: Option<String>,
    /// RFC 8705: `if_present` (default: a token bound with `cnf.x5t#S256` needs its certificate)
    /// or `required` (unbound tokens are refused too).
    pub certificate_bound: Option<String>,
    /// RFC 9449: `required` or `allowed`; absent: DPoP is not accepted.
    pub dpop: Option<String>,
    pub dpop_max_age: Option<String>,
    pub dpop_algorithms: Option<Vec<String>>,
}

/// Where the token is read from: exactly one of the fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSource {
    pub header: Option<String>,
    pub scheme: Option<String>,
    pub query: Option<String>,
    pub cookie: Option<String>,
}

/// `scopes: {all: [...]}` or `{any: [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scopes {
    pub all: Option<Vec<String>>,
    pub any: Option<Vec<String>>,
}

/// One `required_claims[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequiredClaim {
    pub name: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(rename = "match")]
    pub match_: Option<String>,
    pub separator: Option<String>,
}

/// `apis[].on_allow`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnAllow {
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub remove_headers: Vec<String>,
    pub backend_credential: Option<BackendCredential>,
    /// Entries added to the decision's `dynamic_metadata`: name -> template.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `apis[].on_allow.backend_credential`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendCredential {
    pub name: String,
    pub header: Option<String>,
    pub format: Option<String>,
    /// Per-user connection, e.g. `{jwt.sub}`; default: the credential's shared connection.
    pub connection: Option<String>,
}

/// `identity_providers[].entra`: APIM's `validate-azure-ad-token` as a provider preset.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entra {
    /// The tenant's GUID or one of its domain names.
    pub tenant_id: String,
    /// Default `https://login.microsoftonline.com` (sovereign clouds have their own).
    pub authentication_endpoint: Option<String>,
    /// Matched against `azp` (v2.0 tokens) or `appid` (v1.0 tokens).
    #[serde(default)]
    pub client_application_ids: Vec<String>,
    /// Matched against `aud` (also in the `api://{id}` form).
    #[serde(default)]
    pub backend_application_ids: Vec<String>,
    /// Matched against `aud` as written.
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub required_claims: Vec<RequiredClaim>,
}

/// `identity_providers[].introspection`: RFC 7662 token introspection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Introspection {
    /// The introspection endpoint; default: the discovery document's `introspection_endpoint`.
    pub url: Option<String>,
    pub client_id: String,
    /// Only from `${env:...}` or `${file:...}`.
    pub client_secret: Secret,
    /// `client_secret_basic` (default) or `client_secret_post`.
    pub client_auth: Option<String>,
    /// `opaque` (default: tokens that are not JWS compact) or `all`.
    pub tokens: Option<String>,
    /// Longest time an active answer is reused (default 5m; never past the token's `exp`).
    pub cache_ttl: Option<String>,
    /// How long an inactive answer is reused (default 10s).
    pub negative_cache_ttl: Option<String>,
}
