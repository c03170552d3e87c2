"""RFC 8705 certificate-bound access tokens from the real OpenID Provider (tests/idp, oidc-provider
with its mTLS feature): portcullis accepts such a token only from a client presenting the certificate
the token was issued for. `portcullis check --cert` stands for Envoy's verified peer certificate."""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "idp"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from harness import make_cert  # noqa: E402
from idp import decode_jwt, start_idp  # noqa: E402

BIN = os.environ.get("PORTCULLIS_BIN", str(ROOT / "target" / "debug" / "portcullis"))

IDP_CONFIG = {
    "resources": [{"resource": "api://orders", "scopes": ["orders:read"]}],
    "clients": [
        {"client_id": "bound", "client_secret": "bound-secret", "grant_types": ["client_credentials"],
         "tls_client_certificate_bound_access_tokens": True},
        {"client_id": "plain", "client_secret": "plain-secret", "grant_types": ["client_credentials"]},
    ],
}


@pytest.fixture(scope="module")
def idp():
    if not (ROOT / "tests" / "idp" / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("the test OpenID Provider is not installed: npm ci --prefix tests/idp")
    p = start_idp(IDP_CONFIG)
    yield p
    p.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    out = {}
    for name in ("mine", "other"):
        c = make_cert("partner", organization="Contoso")  # same names: only the key differs
        path = d / f"{name}.pem"
        path.write_bytes(c.cert_pem)
        out[name] = (c, path)
    return out


def config(tmp_path: pathlib.Path, issuer: str, required: bool) -> pathlib.Path:
    path = tmp_path / "portcullis.yaml"
    path.write_text(f"""
identity_providers:
  - {{name: idp, issuer: "{issuer}", algorithms: [RS256]}}
apis:
  - name: orders
    match: {{path_prefix: /orders}}
    jwt: {{providers: [idp], audiences: [api://orders]{", certificate_bound: required" if required else ""}}}
""")
    return path


def check(cfg: pathlib.Path, token: str, cert: pathlib.Path | None) -> tuple[int, str]:
    argv = [BIN, "check", "--config", str(cfg), "--url", "http://api.example.com/orders/1",
            "-H", f"authorization: Bearer {token}"]
    if cert is not None:
        argv += ["--cert", str(cert)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_the_provider_binds_the_token_to_the_certificate(idp, certs):
    cert, _ = certs["mine"]
    token = idp.client_credentials("bound", "bound-secret", resource="api://orders", scope="orders:read",
                                   client_cert_pem=cert.cert_pem.decode())["access_token"]
    claims = decode_jwt(token)[1]
    der = cert.cert.public_bytes(__import__("cryptography").hazmat.primitives.serialization.Encoding.DER)
    want = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert claims["cnf"] == {"x5t#S256": want}, claims


def test_a_bound_token_passes_only_with_its_certificate(idp, certs, tmp_path):
    cfg = config(tmp_path, idp.issuer, required=False)
    mine, mine_path = certs["mine"]
    token = idp.client_credentials("bound", "bound-secret", resource="api://orders", scope="orders:read",
                                   client_cert_pem=mine.cert_pem.decode())["access_token"]
    code, out = check(cfg, token, mine_path)
    assert code == 0, out
    assert "bound to the client certificate" in out, out
    for what, cert in (("another certificate with the same names", certs["other"][1]), ("no certificate", None)):
        code, out = check(cfg, token, cert)
        assert code == 1, f"{what}: {out}"
        assert "TokenCertificateBindingMismatch" in out, f"{what}: {out}"


def test_required_binding_refuses_the_providers_unbound_tokens(idp, certs, tmp_path):
    cfg = config(tmp_path, idp.issuer, required=True)
    token = idp.client_credentials("plain", "plain-secret", resource="api://orders", scope="orders:read")["access_token"]
    assert "cnf" not in decode_jwt(token)[1]
    code, out = check(cfg, token, certs["mine"][1])
    assert code == 1 and "TokenCertificateBindingMismatch" in out, out
    code, out = check(config(tmp_path, idp.issuer, required=False), token, None)
    assert code == 0, out
