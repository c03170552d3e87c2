//! The OTLP exporters themselves (cargo feature `otlp`, on by default): gRPC through tonic, or
//! HTTP/protobuf through the service's reqwest client.

use std::time::Duration;

use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};

use super::display_endpoint;
use super::{Counted, ExporterError, OtlpProtocol, OtlpTarget, Signal};

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

fn signal_url(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Builds `$exporter` (OTLP span or metric exporter) for `$target` over gRPC or HTTP/protobuf; the
/// two builders share no trait that covers `builder()`, so one macro serves both signals.
macro_rules! build_exporter {
    ($exporter:ty, $target:expr, $signal:expr, $path:expr) => {{
        let target: &OtlpTarget = $target;
        let err = |detail: String| ExporterError {
            signal: $signal,
            endpoint: display_endpoint(&target.endpoint),
            detail,
        };
        match target.protocol {
            OtlpProtocol::Grpc => <$exporter>::builder()
                .with_tonic()
                .with_endpoint(&target.endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .with_tls_config(tls_config())
                .build()
                .map_err(|e| err(e.to_string())),
            OtlpProtocol::HttpProtobuf => <$exporter>::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(signal_url(&target.endpoint, $path))
                .with_timeout(EXPORT_TIMEOUT)
                .with_http_client(RuntimeHttpClient::new().map_err(err)?)
                .build()
                .map_err(|e| err(e.to_string())),
        }
    }};
}

/// A span exporter for `target`. Must be called inside a tokio runtime: the gRPC channel and the
/// HTTP client run their I/O on it, while the SDK's batch processor calls them from its own thread.
pub(crate) fn span_exporter(
    target: &OtlpTarget,
) -> Result<Counted<opentelemetry_otlp::SpanExporter>, ExporterError> {
    let exporter = build_exporter!(
        opentelemetry_otlp::SpanExporter,
        target,
        "traces",
        "/v1/traces"
    )?;
    Ok(Counted::new(exporter, Signal::Traces, &target.endpoint))
}

/// A metric exporter for `target` (cumulative temporality, what Prometheus-style backends expect).
pub(crate) fn metric_exporter(
    target: &OtlpTarget,
) -> Result<Counted<opentelemetry_otlp::MetricExporter>, ExporterError> {
    let exporter = build_exporter!(
        opentelemetry_otlp::MetricExporter,
        target,
        "metrics",
        "/v1/metrics"
    )?;
    Ok(Counted::new(exporter, Signal::Metrics, &target.endpoint))
}

/// TLS for `https://` collectors, verified against the public web PKI roots. Plain `http://`
/// endpoints ignore it.
fn tls_config() -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new().with_webpki_roots()
}

/// OTLP over HTTP with the reqwest client the service already uses. The SDK calls exporters from
/// its own threads, outside any tokio runtime, so each request runs as a task on the runtime the
/// exporter was built in and the calling thread only waits for its result.
#[derive(Debug)]
struct RuntimeHttpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl RuntimeHttpClient {
    fn new() -> Result<Self, String> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|e| format!("no tokio runtime: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(RuntimeHttpClient { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for RuntimeHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))?;
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let mut out = http::Response::builder().status(response.status());
            if let Some(headers) = out.headers_mut() {
                *headers = response.headers().clone();
            }
            let body = response.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(out.body(body)?)
        });
        task.await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_signal_paths_are_appended_to_the_base_url() {
        assert_eq!(
            signal_url("http://c:4318", "/v1/traces"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            signal_url("http://c:4318/", "/v1/metrics"),
            "http://c:4318/v1/metrics"
        );
    }
}
