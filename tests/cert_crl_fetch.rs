//! `client_certificate.trust.crl_urls`: CRLs fetched in the background from a fake CRL server on
//! 127.0.0.1 that tests can change, break or make serve garbage. The policy is compiled with the
//! service's runtime (background fetches) and checks are decided in process.

mod cert_common;
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cert_common::{Ca, allowed, ca, denied, enc, leaf, signed_crl, verdict};
use common::get;
use rcgen::ExtendedKeyUsagePurpose;
use time::OffsetDateTime;

/// What the fake server answers.
#[derive(Clone)]
enum Serve {
    Body(Vec<u8>),
    /// The body in 64 KiB chunks, without Content-Length.
    Streamed(Vec<u8>),
    Status(u16),
}

struct Shared {
    serve: Mutex<Serve>,
    hits: AtomicUsize,
}

#[derive(Clone)]
struct CrlServer {
    url: String,
    shared: Arc<Shared>,
}

impl CrlServer {
    async fn start(serve: Serve) -> CrlServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            serve: Mutex::new(serve),
            hits: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/ca.crl", axum::routing::get(answer))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CrlServer {
            url: format!("http://{addr}/ca.crl"),
            shared,
        }
    }

    fn serve(&self, serve: Serve) {
        *self.shared.serve.lock().unwrap() = serve;
    }

    fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Waits until the server has answered `n` more requests than `since`.
    async fn answered(&self, since: usize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.hits() < since + n {
            assert!(Instant::now() < deadline, "the CRL was not fetched again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The fetcher installs (or refuses) the body just after the server answers.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn answer(State(s): State<Arc<Shared>>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let serve = s.serve.lock().unwrap().clone();
    match serve {
        Serve::Body(b) => (StatusCode::OK, b).into_response(),
        Serve::Streamed(b) => {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                b.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
            axum::body::Body::from_stream(futures::stream::iter(chunks)).into_response()
        }
        Serve::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
    }
}

struct Pki {
    root: Ca,
    inter: Ca,
    good: rcgen::Certificate,
}

fn pki(dir: &Path) -> Pki {
    let far = OffsetDateTime::now_utc() + time::Duration::days(3650);
    let root = ca("Contoso Root", None, far);
    let inter = ca("Contoso Issuing", Some(&root), far);
    let good = leaf(
        "partner",
        &inter,
        1001,
        ExtendedKeyUsagePurpose::ClientAuth,
        None,
    );
    std::fs::write(dir.join("root.pem"), root.cert.pem()).unwrap();
    std::fs::write(dir.join("inter.pem"), inter.cert.pem()).unwrap();
    Pki { root, inter, good }
}

/// The intermediate's CRL revoking `revoked` and the root's (empty), as PEM.
fn crls_pem(p: &Pki, revoked: &[u64]) -> Vec<u8> {
    crls_pem_until(
        p,
        revoked,
        OffsetDateTime::now_utc() + time::Duration::days(7),
    )
}

/// The same, with this `nextUpdate`.
fn crls_pem_until(p: &Pki, revoked: &[u64], far: OffsetDateTime) -> Vec<u8> {
    format!(
        "{}{}",
        signed_crl(&p.inter, revoked, far).pem().unwrap(),
        signed_crl(&p.root, &[], far).pem().unwrap()
    )
    .into_bytes()
}

fn config(dir: &Path, url: &str, extra: &str) -> String {
    format!(
        "apis:\n  - name: partners\n    match: {{ path_prefix: / }}\n    client_certificate:\n      trust:\n        ca_files: [{d}/root.pem]\n        intermediate_files: [{d}/inter.pem]\n        crl_urls: [\"{url}\"]\n        crl_refresh: 100ms\n{extra}",
        d = dir.display()
    )
}

struct Service {
    runtime: portcullis::policy::Runtime,
    policy: portcullis::policy::PolicySet,
}

impl Service {
    fn compile(yaml: &str) -> Service {
        let runtime = portcullis::policy::Runtime::default();
        let src = portcullis::config::parse(yaml, Path::new(".")).unwrap();
        let (policy, _) = portcullis::policy::compile(&src, &runtime).unwrap();
        Service { runtime, policy }
    }

    async fn decide(&self, cert: &rcgen::Certificate) -> (i32, Option<i32>, Option<String>) {
        let mut req = get("/x");
        req.certificate = enc(&cert.pem());
        let r =
            portcullis::server::grpc::decide_at(&self.policy, &req.request(), SystemTime::now())
                .await;
        verdict(&r)
    }

    /// `(successes, failures)` of `portcullis.crl.fetches` for the API.
    fn fetches(&self) -> (u64, u64) {
        self.runtime
            .crl
            .fetches()
            .into_iter()
            .find(|(api, _, _)| api == "partners")
            .map(|(_, ok, failed)| (ok, failed))
            .unwrap_or((0, 0))
    }
}

#[tokio::test]
async fn a_certificate_is_refused_once_the_fetched_crl_revokes_it_and_the_last_good_crl_stays() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let srv = CrlServer::start(Serve::Body(crls_pem(&p, &[]))).await;
    let svc = Service::compile(&config(dir.path(), &srv.url, ""));

    srv.answered(0, 1).await;
    assert_eq!(svc.decide(&p.good).await, allowed(), "not revoked yet");
    // Again: this verdict comes from the cache of verified chains.
    assert_eq!(svc.decide(&p.good).await, allowed());

    // The CA revokes it: the next refresh installs the CRL, and the cached verification, made
    // with the older CRL, is not used any more.
    srv.serve(Serve::Body(crls_pem(&p, &[1001])));
    let seen = srv.hits();
    srv.answered(seen, 1).await;
    assert_eq!(
        svc.decide(&p.good).await,
        denied("ClientCertificateRevoked")
    );

    // The server fails, then serves garbage, then a body that is not a CRL: the last good CRL is
    // kept, and the certificate stays revoked.
    for bad in [
        Serve::Status(500),
        Serve::Body(b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n".to_vec()),
        Serve::Body(vec![0x30, 0x82, 0x01]),
    ] {
        srv.serve(bad);
        let seen = srv.hits();
        srv.answered(seen, 2).await;
        assert_eq!(
            svc.decide(&p.good).await,
            denied("ClientCertificateRevoked"),
            "last good CRL kept"
        );
    }
    let (ok, failed) = svc.fetches();
    assert!(
        ok >= 2 && failed >= 6,
        "fetch counts: {ok} ok, {failed} failed"
    );
}

/// A DER body, with the root's CRL from `crl_files`: both are used together.
#[tokio::test]
async fn a_der_crl_from_a_url_is_used_with_crl_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let far = OffsetDateTime::now_utc() + time::Duration::days(7);
    let root_crl = dir.path().join("root-crl.pem");
    std::fs::write(&root_crl, signed_crl(&p.root, &[], far).pem().unwrap()).unwrap();
    let other = leaf(
        "partner",
        &p.inter,
        1002,
        ExtendedKeyUsagePurpose::ClientAuth,
        None,
    );
    let srv = CrlServer::start(Serve::Body(
        signed_crl(&p.inter, &[1001], far).der().to_vec(),
    ))
    .await;
    let svc = Service::compile(&config(
        dir.path(),
        &srv.url,
        &format!("        crl_files: [{}]\n", root_crl.display()),
    ));
    srv.answered(0, 1).await;
    assert_eq!(
        svc.decide(&p.good).await,
        denied("ClientCertificateRevoked")
    );
    assert_eq!(svc.decide(&other).await, allowed());
}

#[tokio::test]
async fn a_crl_never_obtained_refuses_unless_unknown_revocation_allows() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let srv = CrlServer::start(Serve::Status(503)).await;
    let strict = Service::compile(&config(dir.path(), &srv.url, ""));
    let lenient = Service::compile(&config(
        dir.path(),
        &srv.url,
        "        unknown_revocation: allow\n",
    ));
    srv.answered(0, 2).await;
    assert_eq!(
        strict.decide(&p.good).await,
        denied("ClientCertificateNotTrusted"),
        "no CRL obtained: revocation status unknown"
    );
    assert_eq!(lenient.decide(&p.good).await, allowed());
    assert_eq!(strict.fetches().0, 0);
    assert!(strict.fetches().1 >= 1);
    assert!(
        strict.runtime.crl.first_fetch_attempted(),
        "a failed first fetch does not hold readiness back"
    );

    // Once it is obtained, the strict API passes.
    srv.serve(Serve::Body(crls_pem(&p, &[])));
    let seen = srv.hits();
    srv.answered(seen, 2).await;
    assert_eq!(strict.decide(&p.good).await, allowed());
}

#[tokio::test]
async fn an_oversized_crl_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let mut huge = crls_pem(&p, &[]);
    huge.resize(9 * 1024 * 1024, b'\n');
    for (how, serve) in [
        ("with Content-Length", Serve::Body(huge.clone())),
        ("streamed", Serve::Streamed(huge.clone())),
    ] {
        let srv = CrlServer::start(serve).await;
        let svc = Service::compile(&config(dir.path(), &srv.url, ""));
        srv.answered(0, 1).await;
        assert_eq!(
            svc.decide(&p.good).await,
            denied("ClientCertificateNotTrusted"),
            "a body over 8 MiB ({how}) is not installed"
        );
        assert_eq!(svc.fetches().0, 0, "{how}");
        assert!(svc.fetches().1 >= 1, "{how}");
    }
}

/// A fetched CRL past its `nextUpdate` (the server has nothing newer): revocation status unknown.
#[tokio::test]
async fn a_stale_fetched_crl_refuses_unless_unknown_revocation_allows() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let past = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let srv = CrlServer::start(Serve::Body(crls_pem_until(&p, &[], past))).await;
    let strict = Service::compile(&config(dir.path(), &srv.url, ""));
    let lenient = Service::compile(&config(
        dir.path(),
        &srv.url,
        "        unknown_revocation: allow\n",
    ));
    srv.answered(0, 2).await;
    assert!(strict.fetches().0 >= 1, "the stale CRL was installed");
    assert_eq!(
        strict.decide(&p.good).await,
        denied("ClientCertificateNotTrusted")
    );
    assert_eq!(lenient.decide(&p.good).await, allowed());

    // A fresh one arrives: the strict API passes again.
    srv.serve(Serve::Body(crls_pem(&p, &[])));
    let seen = srv.hits();
    srv.answered(seen, 2).await;
    assert_eq!(strict.decide(&p.good).await, allowed());
}

/// `portcullis check` fetches the CRL URLs once before it decides.
#[tokio::test]
async fn check_fetches_the_crl_urls_before_deciding() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let revoked = leaf(
        "partner",
        &p.inter,
        1002,
        ExtendedKeyUsagePurpose::ClientAuth,
        None,
    );
    let srv = CrlServer::start(Serve::Body(crls_pem(&p, &[1002]))).await;
    let file = dir.path().join("portcullis.yaml");
    std::fs::write(&file, config(dir.path(), &srv.url, "")).unwrap();
    for (name, cert, code, reason) in [
        ("good", &p.good, 0, None),
        ("revoked", &revoked, 1, Some("ClientCertificateRevoked")),
    ] {
        let pem = dir.path().join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        let file = file.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["check", "--url", "https://api.example.com/x", "--config"])
                .arg(&file)
                .arg("--cert")
                .arg(&pem)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{name}: {stdout}");
        if let Some(r) = reason {
            assert!(stdout.contains(r), "{name}: {stdout}");
        }
    }
    assert!(srv.hits() >= 2, "one fetch per check");
}
