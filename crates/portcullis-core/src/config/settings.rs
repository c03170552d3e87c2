//! Process settings: what the service listens on, how it logs and exports telemetry, and the
//! limits of its connections. Compiled from the same file as the policy, once per start; changing
//! them needs a restart (a reload warns and keeps the old ones).

use std::net::SocketAddr;
use std::time::Duration;

use crate::digest::Sha256;

use super::{ConfigErrors, Source};

/// Where and how to send OTLP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpTarget {
    /// The collector's base URL, e.g. `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318`
    /// (HTTP, where `/v1/traces` and `/v1/metrics` are appended as `OTEL_EXPORTER_OTLP_ENDPOINT` does).
    pub endpoint: String,
    /// The wire protocol.
    pub protocol: OtlpProtocol,
}

/// `telemetry.otlp_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (default).
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
}

impl OtlpProtocol {
    /// Parses the config value; anything unknown is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "grpc" => Some(OtlpProtocol::Grpc),
            "http/protobuf" => Some(OtlpProtocol::HttpProtobuf),
            _ => None,
        }
    }
}

/// `limits.max_header_bytes` when the file does not set it.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 96 * 1024;

/// Process settings from the same file: listeners and telemetry. Changing them needs a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// gRPC listener.
    pub grpc: SocketAddr,
    /// Optional HTTP listener.
    pub http: Option<SocketAddr>,
    /// Optional TLS on the gRPC listener.
    pub tls: Option<TlsFiles>,
    /// `json` or `text`.
    pub log_format: LogFormat,
    /// A tracing filter directive such as `info`.
    pub log_level: String,
    /// Where spans and metrics are exported, when they are.
    pub otlp: Option<OtlpTarget>,
    /// Write one record per decision.
    pub decision_log: bool,
    /// Include the client IP in decision records.
    pub decision_log_client_ip: bool,
    /// Admin API bearer token digest (SHA-256), when the admin API is on.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Caps and timeouts of both listeners' connections.
    pub connections: ConnectionLimits,
}

/// What a connection may hold and for how long (`limits.max_connections`, the timeouts and the
/// HTTP/2 settings). Applies to both listeners; changing it needs a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once on each listener, before the file descriptor limit is applied.
    pub max_connections: usize,
    /// Time to receive a request's headers (HTTP/1), or a new connection's first request.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
    /// HTTP/2 PING interval.
    pub keepalive_interval: Duration,
    /// Time to answer a PING.
    pub keepalive_timeout: Duration,
    /// Largest request head the HTTP listener reads (request line and headers, raw bytes):
    /// `limits.max_header_bytes` plus room for the request line and framing, so a request a little
    /// over `max_header_bytes` still gets its decision (431 `RequestHeadersTooLarge`).
    pub max_request_head_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_request_head_bytes: DEFAULT_MAX_HEADER_BYTES + REQUEST_HEAD_SLACK,
        }
    }
}

/// Bytes of a request head beyond `limits.max_header_bytes`: the request line (its URI included)
/// and the `: ` and CRLF around each header, which `max_header_bytes` does not count.
const REQUEST_HEAD_SLACK: usize = 16 * 1024;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object a line.
    Json,
    /// Human-readable.
    Text,
}

/// TLS file paths, resolved against the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert_file: std::path::PathBuf,
    /// Server private key (PEM).
    pub key_file: std::path::PathBuf,
    /// CA bundle for client certificates; mTLS when set.
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// Parses a duration such as `250ms`, `30s`, `5m`, `1h`.
pub fn duration(s: &str, path: &str, errs: &mut ConfigErrors) -> Option<Duration> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) => Some(d),
        Err(e) => {
            errs.push(
                path,
                format!("`{s}` is not a duration ({e}); write e.g. 250ms, 30s, 5m, 1h"),
            );
            None
        }
    }
}

pub fn positive(v: Option<usize>, default: usize, path: &str, errs: &mut ConfigErrors) -> usize {
    match v {
        Some(0) => {
            errs.push(path, "must be greater than 0");
            default
        }
        Some(n) => n,
        None => default,
    }
}

pub fn compile_settings(src: &Source, errs: &mut ConfigErrors) -> Option<Settings> {
    let f = &src.file;
    let addr = |s: &str, path: &str, errs: &mut ConfigErrors| -> Option<SocketAddr> {
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(
                    path,
                    format!("`{s}` is not an address like 127.0.0.1:9191 or [::]:9191"),
                );
                None
            }
        }
    };
    let grpc = addr(
        f.listen.grpc.as_deref().unwrap_or("127.0.0.1:9191"),
        "listen.grpc",
        errs,
    );
    let http = f
        .listen
        .http
        .as_deref()
        .map(|h| addr(h, "listen.http", errs));
    let tls = f.listen.tls.as_ref().map(|t| TlsFiles {
        cert_file: src.resolve(&t.cert_file),
        key_file: src.resolve(&t.key_file),
        client_ca_file: t.client_ca_file.as_deref().map(|c| src.resolve(c)),
    });
    if let Some(t) = &tls {
        for (p, file) in [
            ("listen.tls.cert_file", Some(&t.cert_file)),
            ("listen.tls.key_file", Some(&t.key_file)),
            ("listen.tls.client_ca_file", t.client_ca_file.as_ref()),
        ] {
            if let Some(file) = file.filter(|f| !f.is_file()) {
                errs.push(p, format!("{} does not exist", file.display()));
            }
        }
    }
    let log_format = match f.telemetry.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(o) => {
            errs.push(
                "telemetry.log_format",
                format!("`{o}`: use `json` or `text`"),
            );
            LogFormat::Text
        }
    };
    let log_level = f
        .telemetry
        .log_level
        .clone()
        .unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        errs.push(
            "telemetry.log_level",
            format!("`{log_level}` is not a level or filter (error, warn, info, debug, trace)"),
        );
    }
    let otlp_protocol = match f.telemetry.otlp_protocol.as_deref() {
        None => Some(OtlpProtocol::Grpc),
        Some(p) => {
            let parsed = OtlpProtocol::parse(p);
            if parsed.is_none() {
                errs.push(
                    "telemetry.otlp_protocol",
                    format!("`{p}`: use `grpc` or `http/protobuf`"),
                );
            }
            parsed
        }
    };
    if let Some(ep) = f
        .telemetry
        .otlp_endpoint
        .as_ref()
        .filter(|ep| !(ep.starts_with("http://") || ep.starts_with("https://")))
    {
        errs.push(
            "telemetry.otlp_endpoint",
            format!("`{ep}` must be an http:// or https:// URL"),
        );
    }
    let admin_token_sha256 = f.admin.as_ref().map(|a| {
        if a.token.expose().len() < 16 {
            errs.push("admin.token", "must be at least 16 characters");
        }
        Sha256::digest(a.token.expose().as_bytes())
    });
    Some(Settings {
        grpc: grpc?,
        http: match http {
            Some(h) => Some(h?),
            None => None,
        },
        tls,
        log_format,
        log_level,
        otlp: match (&f.telemetry.otlp_endpoint, otlp_protocol) {
            (Some(endpoint), Some(protocol)) => Some(OtlpTarget {
                endpoint: endpoint.clone(),
                protocol,
            }),
            (None, _) => None,
            (Some(_), None) => return None,
        },
        decision_log: f.telemetry.decision_log.unwrap_or(false),
        decision_log_client_ip: f.telemetry.decision_log_client_ip.unwrap_or(true),
        admin_token_sha256,
        connections: compile_connection_limits(&f.limits, errs),
    })
}

fn compile_connection_limits(l: &super::Limits, errs: &mut ConfigErrors) -> ConnectionLimits {
    let d = ConnectionLimits::default();
    let timeout = |v: &Option<String>, default: Duration, name: &str, errs: &mut ConfigErrors| {
        let path = format!("limits.{name}");
        match v.as_deref().map(|s| (s, duration(s, &path, errs))) {
            None => default,
            Some((_, None)) => default,
            Some((s, Some(d))) if d.is_zero() => {
                errs.push(path, format!("`{s}` must be greater than 0"));
                default
            }
            Some((_, Some(d))) => d,
        }
    };
    let max_concurrent_streams = match l.max_concurrent_streams {
        Some(0) => {
            errs.push("limits.max_concurrent_streams", "must be greater than 0");
            d.max_concurrent_streams
        }
        Some(n) => n,
        None => d.max_concurrent_streams,
    };
    let max_header_bytes = l
        .max_header_bytes
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    ConnectionLimits {
        max_connections: positive(
            l.max_connections,
            d.max_connections,
            "limits.max_connections",
            errs,
        ),
        header_read_timeout: timeout(
            &l.header_read_timeout,
            d.header_read_timeout,
            "header_read_timeout",
            errs,
        ),
        idle_timeout: timeout(&l.idle_timeout, d.idle_timeout, "idle_timeout", errs),
        max_concurrent_streams,
        keepalive_interval: timeout(
            &l.keepalive_interval,
            d.keepalive_interval,
            "keepalive_interval",
            errs,
        ),
        keepalive_timeout: timeout(
            &l.keepalive_timeout,
            d.keepalive_timeout,
            "keepalive_timeout",
            errs,
        ),
        max_request_head_bytes: max_header_bytes.saturating_add(REQUEST_HEAD_SLACK),
    }
}
