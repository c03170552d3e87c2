//! `client_certificate.trust`: APIM's `validate-trust` and `validate-revocation`. A certificate
//! passes only when a chain from it to one of the configured CAs verifies: every signature, the
//! validity of every certificate (the CA's too) against the check's clock, basic constraints and
//! name constraints, and the clientAuth extended key usage when the leaf names any. With CRLs, no
//! certificate of the chain may be revoked.
//!
//! Path building and verification are rustls-webpki's (the verifier rustls itself uses, with ring
//! as the crypto provider the rest of the core already uses); nothing of it is written here. What
//! is ours: reading the PEM files, which chain a request brings (Envoy's verified peer certificate
//! plus configured intermediates, or XFCC's `Chain=`), the thumbprint of the issuer for
//! `issuer_thumbprint` identities, and a cache of verified chains keyed by the leaf and the chain
//! sent, so a client that sends the same certificate on every request is verified once.
//!
//! A cached verification is used only while every certificate of its chain is valid at the
//! check's time and, when revocation is on and a stale CRL refuses, while every CRL is before its
//! next update, and only while no fetched CRL changed since (see [`super::crl::generation`]). CRL
//! files and CAs are read when the configuration is compiled: a new CRL file takes effect with the
//! next reload (SIGHUP, or any change to the configuration file); CRLs of `crl_urls` are read per
//! verification from their fetchers.

use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::*;

use crate::digest::{Sha256, sha1_thumbprint};

/// Largest PEM or DER file of CAs, intermediates or CRLs read.
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Verified chains kept, by count (an entry is about 100 bytes).
const CACHE_ENTRIES: u64 = 16 * 1024;

/// A CA the chain may end at.
#[derive(Debug)]
struct Anchor {
    anchor: TrustAnchor<'static>,
    sha1: [u8; 20],
    sha256: [u8; 32],
    not_before: i64,
    not_after: i64,
}

/// The compiled `trust` section of one API.
pub struct Trust {
    anchors: Vec<Anchor>,
    /// Only the webpki view of `anchors`, as the verifier wants it.
    trust_anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    /// The earliest `nextUpdate` of the CRLs, seconds since the epoch.
    crls_fresh_until: Option<i64>,
    /// `crl_urls`: their current CRLs are used with `crls`.
    crl_urls: Vec<Arc<super::crl::UrlCrl>>,
    revocation: bool,
    /// Unknown revocation status (no CRL of the issuer, or a CRL past its next update) passes.
    unknown_revocation_allows: bool,
    cache: moka::sync::Cache<[u8; 32], Arc<Verified>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("anchors", &self.anchors.len())
            .field("intermediates", &self.intermediates.len())
            .field("crls", &self.crls.len())
            .field("crl_urls", &self.crl_urls.len())
            .field("revocation", &self.revocation)
            .finish_non_exhaustive()
    }
}

/// What a verification established.
#[derive(Debug)]
pub struct Verified {
    /// SHA-1 of the certificate that issued the leaf (APIM's issuer thumbprint).
    pub issuer_sha1: [u8; 20],
    /// SHA-256 of the same.
    pub issuer_sha256: [u8; 32],
    /// The chain may be used from then (seconds since the epoch)...
    valid_from: i64,
    /// ... until then.
    valid_until: i64,
    /// [`super::crl::generation`] before the verification read the CRLs.
    crl_generation: u64,
}

/// Why a certificate did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustFailure {
    /// No chain to a configured CA verifies; the detail says why (never a secret: certificates are public).
    NotTrusted(String),
    /// A certificate of the chain is revoked.
    Revoked,
    /// A certificate of the chain is past its not-after.
    Expired,
    /// A certificate of the chain is before its not-before.
    NotYetValid,
}

/// The settings as written, with the files' contents.
pub struct TrustFiles {
    /// PEM bundles of CAs.
    pub ca: Vec<(String, Vec<u8>)>,
    /// PEM bundles of intermediates.
    pub intermediates: Vec<(String, Vec<u8>)>,
    /// CRLs, PEM or DER.
    pub crls: Vec<(String, Vec<u8>)>,
    /// The fetchers of `crl_urls`.
    pub crl_urls: Vec<Arc<super::crl::UrlCrl>>,
    /// Check revocation.
    pub revocation: bool,
    /// Let unknown revocation status pass.
    pub unknown_revocation_allows: bool,
}

impl Trust {
    /// Reads the files' contents; each error is `(name of the file's setting, what is wrong)`.
    pub fn compile(files: TrustFiles) -> Result<Trust, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let mut anchors = Vec::new();
        for (name, bytes) in &files.ca {
            match certificates(bytes) {
                Ok(ders) if ders.is_empty() => {
                    errors.push((name.clone(), "no certificate".to_string()))
                }
                Ok(ders) => {
                    for der in ders {
                        match anchor(der) {
                            Ok(a) => anchors.push(a),
                            Err(e) => errors.push((name.clone(), e.clone())),
                        }
                    }
                }
                Err(e) => errors.push((name.clone(), e.clone())),
            }
        }
        let mut intermediates = Vec::new();
        for (name, bytes) in &files.intermediates {
            match certificates(bytes) {
                Ok(ders) if ders.is_empty() => {
                    errors.push((name.clone(), "no certificate".to_string()))
                }
                Ok(ders) => {
                    for der in ders {
                        if X509Certificate::from_der(&der).is_err() {
                            errors.push((
                                name.clone(),
                                "a certificate is not valid X.509".to_string(),
                            ));
                        } else {
                            intermediates.push(CertificateDer::from(der));
                        }
                    }
                }
                Err(e) => errors.push((name.clone(), e.clone())),
            }
        }
        let mut crls = Vec::new();
        let mut crls_fresh_until: Option<i64> = None;
        for (name, bytes) in &files.crls {
            match parse_crls(bytes) {
                Ok((parsed, _)) if parsed.is_empty() => {
                    errors.push((name.clone(), "no CRL".to_string()))
                }
                Ok((parsed, next_update)) => {
                    crls.extend(parsed);
                    crls_fresh_until = earliest(crls_fresh_until, next_update);
                }
                Err(e) => errors.push((name.clone(), e)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let trust_anchors = anchors.iter().map(|a| a.anchor.clone()).collect();
        Ok(Trust {
            anchors,
            trust_anchors,
            intermediates,
            crls,
            crls_fresh_until,
            crl_urls: files.crl_urls,
            revocation: files.revocation,
            unknown_revocation_allows: files.unknown_revocation_allows,
            cache: moka::sync::Cache::new(CACHE_ENTRIES),
        })
    }

    /// Whether revocation is checked (for explanations).
    pub fn checks_revocation(&self) -> bool {
        self.revocation
    }

    /// Verifies `leaf` (DER; `leaf_sha256` its digest) with the intermediates the request sent
    /// (`chain`: URL-encoded PEM, as XFCC's `Chain=`, which may repeat the leaf) and the
    /// configured ones, at `now`.
    pub fn verify(
        &self,
        leaf: &[u8],
        leaf_sha256: &[u8; 32],
        chain: Option<&str>,
        now: SystemTime,
    ) -> Result<Arc<Verified>, TrustFailure> {
        let now_secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let key = {
            let mut h = Sha256::new();
            h.update(leaf_sha256);
            if let Some(c) = chain {
                h.update(c);
            }
            h.finalize()
        };
        let crl_generation = super::crl::generation();
        if let Some(hit) = self.cache.get(&key)
            && hit.valid_from <= now_secs
            && now_secs <= hit.valid_until
            && (self.crl_urls.is_empty() || hit.crl_generation == crl_generation)
        {
            return Ok(hit);
        }
        let verified =
            Arc::new(self.verify_uncached(leaf, chain, now, now_secs, crl_generation)?);
        self.cache.insert(key, verified.clone());
        Ok(verified)
    }

    fn verify_uncached(
        &self,
        leaf: &[u8],
        chain: Option<&str>,
        now: SystemTime,
        now_secs: i64,
        crl_generation: u64,
    ) -> Result<Verified, TrustFailure> {
        let mut intermediates: Vec<CertificateDer<'_>> = Vec::new();
        if let Some(chain) = chain {
            let pem: Vec<u8> = percent_encoding::percent_decode_str(chain).collect();
            let ders = certificates(&pem)
                .map_err(|e| TrustFailure::NotTrusted(format!("the chain sent: {e}")))?;
            intermediates.extend(
                ders.into_iter()
                    .filter(|d| d.as_slice() != leaf)
                    .map(CertificateDer::from),
            );
        }
        intermediates.extend(self.intermediates.iter().cloned());
        let leaf_der = CertificateDer::from(leaf);
        let ee = EndEntityCert::try_from(&leaf_der)
            .map_err(|e| TrustFailure::NotTrusted(format!("the certificate: {e}")))?;
        let fetched: Vec<_> = if self.revocation {
            self.crl_urls.iter().filter_map(|u| u.current()).collect()
        } else {
            Vec::new()
        };
        let mut crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        let mut crls_fresh_until = self.crls_fresh_until;
        for f in &fetched {
            crl_refs.extend(f.crls.iter());
            crls_fresh_until = earliest(crls_fresh_until, f.next_update);
        }
        // No CRL at all (every URL still unobtained): webpki would check nothing.
        let no_crl_yet = self.revocation && crl_refs.is_empty();
        let revocation = match (self.revocation, RevocationOptionsBuilder::new(&crl_refs)) {
            (true, Ok(builder)) => Some(
                builder
                    .with_depth(RevocationCheckDepth::Chain)
                    .with_status_policy(if self.unknown_revocation_allows {
                        UnknownStatusPolicy::Allow
                    } else {
                        UnknownStatusPolicy::Deny
                    })
                    .with_expiration_policy(if self.unknown_revocation_allows {
                        ExpirationPolicy::Ignore
                    } else {
                        ExpirationPolicy::Enforce
                    })
                    .build(),
            ),
            _ => None,
        };
        let time = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let path = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.trust_anchors,
                &intermediates,
                time,
                KeyUsage::client_auth(),
                revocation,
                None,
            )
            .map_err(failure)?;
        if no_crl_yet && !self.unknown_revocation_allows {
            return Err(TrustFailure::NotTrusted(
                "no CRL was obtained from `crl_urls` yet: revocation status unknown".into(),
            ));
        }

        // The validity of the chain, for the cache and for the CA itself (webpki does not look at
        // a trust anchor's dates).
        let (mut valid_from, mut valid_until) = validity(leaf).unwrap_or((i64::MAX, i64::MIN));
        for cert in path.intermediate_certificates() {
            let (from, until) = validity(&cert.der()).unwrap_or((i64::MAX, i64::MIN));
            valid_from = valid_from.max(from);
            valid_until = valid_until.min(until);
        }
        let used = path.anchor();
        let anchor = self
            .anchors
            .iter()
            .find(|a| {
                a.anchor.subject == used.subject
                    && a.anchor.subject_public_key_info == used.subject_public_key_info
            })
            .ok_or_else(|| TrustFailure::NotTrusted("the CA of the chain is unknown".into()))?;
        if now_secs > anchor.not_after {
            return Err(TrustFailure::Expired);
        }
        if now_secs < anchor.not_before {
            return Err(TrustFailure::NotYetValid);
        }
        valid_from = valid_from.max(anchor.not_before);
        valid_until = valid_until.min(anchor.not_after);
        if self.revocation
            && !self.unknown_revocation_allows
            && let Some(fresh) = crls_fresh_until
        {
            valid_until = valid_until.min(fresh);
        }
        let (issuer_sha1, issuer_sha256) = match path.intermediate_certificates().next() {
            Some(issuer) => {
                let der = issuer.der();
                (sha1_thumbprint(&der), Sha256::digest(&*der))
            }
            None => (anchor.sha1, anchor.sha256),
        };
        Ok(Verified {
            issuer_sha1,
            issuer_sha256,
            valid_from,
            valid_until,
            crl_generation,
        })
    }
}

fn failure(e: webpki::Error) -> TrustFailure {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => TrustFailure::Expired,
        E::CertNotValidYet { .. } => TrustFailure::NotYetValid,
        E::CertRevoked => TrustFailure::Revoked,
        E::UnknownRevocationStatus => TrustFailure::NotTrusted(
            "no CRL of its issuer says whether a certificate of the chain is revoked".into(),
        ),
        E::CrlExpired { .. } => TrustFailure::NotTrusted(
            "a CRL of the chain is past its next update: revocation status unknown".into(),
        ),
        E::UnknownIssuer => {
            TrustFailure::NotTrusted("no chain to a configured CA (unknown issuer)".into())
        }
        E::RequiredEkuNotFoundContext(_) => TrustFailure::NotTrusted(
            "the certificate is not for client authentication (extended key usage)".into(),
        ),
        other => TrustFailure::NotTrusted(format!("the chain does not verify ({other})")),
    }
}

fn anchor(der: Vec<u8>) -> Result<Anchor, String> {
    let (not_before, not_after) = validity(&der).ok_or("a certificate is not valid X.509")?;
    let cert = CertificateDer::from(der.as_slice());
    let anchor = webpki::anchor_from_trusted_cert(&cert)
        .map_err(|e| format!("a certificate cannot be a CA ({e})"))?
        .to_owned();
    Ok(Anchor {
        anchor,
        sha1: sha1_thumbprint(&der),
        sha256: Sha256::digest(&der),
        not_before,
        not_after,
    })
}

/// `(not_before, not_after)` in seconds since the epoch.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let v = &cert.tbs_certificate.validity;
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Every `CERTIFICATE` block of a PEM document, as DER.
fn certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|_| "not PEM".to_string())?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The CRLs of a file or a fetched body (PEM or DER) and their earliest `nextUpdate`; an error says
/// what is wrong, never naming the source.
pub(super) fn parse_crls(
    bytes: &[u8],
) -> Result<(Vec<CertRevocationList<'static>>, Option<i64>), String> {
    let mut crls = Vec::new();
    let mut fresh_until = None;
    for der in crl_ders(bytes)? {
        let next_update = match CertificateRevocationList::from_der(&der) {
            Ok((_, crl)) => crl.next_update().map(|t| t.timestamp()),
            Err(_) => return Err("a CRL is not valid DER".to_string()),
        };
        let crl = OwnedCertRevocationList::from_der(&der)
            .map_err(|e| format!("a CRL is unusable ({e})"))?;
        crls.push(CertRevocationList::Owned(crl));
        fresh_until = earliest(fresh_until, next_update);
    }
    Ok((crls, fresh_until))
}

/// CRLs: `X509 CRL` PEM blocks, or one DER CRL.
fn crl_ders(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if bytes.starts_with(b"-----") || bytes.iter().take(64).all(u8::is_ascii) {
        let mut out = Vec::new();
        for block in Pem::iter_from_buffer(bytes) {
            let block = block.map_err(|_| "not PEM".to_string())?;
            if block.label == "X509 CRL" {
                out.push(block.contents);
            }
        }
        return Ok(out);
    }
    Ok(vec![bytes.to_vec()])
}
