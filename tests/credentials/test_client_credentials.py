"""Client credentials against the real OpenID Provider: the token portcullis injects upstream is a
valid JWT from the provider for the configured resource, obtained at start and then served from the
cache; `check` never fetches nor shows it; a failing token endpoint is a 503 (gRPC 14)."""

from __future__ import annotations

import subprocess

import pytest

from credentials_harness import BIN, denied, eventually, grant_count, injected_token, start_idp, verify


@pytest.fixture(scope="module")
def idp():
    with start_idp() as p:
        yield p


def config(idp, extra: str = "") -> str:
    return f"""
telemetry: {{ log_format: json }}
listen: {{ grpc: 127.0.0.1:0 }}
credentials:
  - name: orders-backend
    grant: client_credentials
    token_url: {idp.token_endpoint}
    client_id: svc-basic
    client_secret: svc-basic-secret
    resource: api://orders
    scope: orders:read
  - name: inventory-backend
    grant: client_credentials
    token_url: {idp.token_endpoint}
    client_id: svc-post
    client_secret: ${{env:SVC_POST_SECRET}}
    client_auth: client_secret_post
    resource: api://inventory
    scope: inventory:read
    timeout: 2s
{extra}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    on_allow: {{ backend_credential: {{ name: orders-backend }} }}
  - name: inventory
    match: {{ path_prefix: /inventory }}
    on_allow: {{ backend_credential: {{ name: inventory-backend }} }}
"""


ENV = {"SVC_POST_SECRET": "svc-post-secret"}


def test_the_injected_token_is_a_valid_jwt_for_the_resource(idp, start_portcullis):
    idp.clear_faults()
    idp.reset_stats()
    p = start_portcullis(config(idp), ENV)
    # Both credentials were obtained at start: the first request does not pay.
    assert grant_count(idp, "client_credentials") == 2

    resp = p.check("/orders/1", {"authorization": "Bearer the-callers-own-token"})
    token = injected_token(resp)
    claims = verify(idp, token, "api://orders")
    assert claims["client_id"] == "svc-basic"
    assert claims["sub"] == "svc-basic"
    assert "orders:read" in claims["scope"].split()
    assert "the-callers-own-token" not in str(resp), "the caller's authorization is replaced"
    assert all(h.append.value is False for h in resp.ok_response.headers), "headers overwrite"

    # Served from the cache.
    for _ in range(20):
        assert injected_token(p.check("/orders/2")) == token
    inv = verify(idp, injected_token(p.check("/inventory/9")), "api://inventory")
    assert inv["client_id"] == "svc-post"
    assert grant_count(idp, "client_credentials") == 2

    # Never in the logs.
    assert token not in p.stderr
    assert "svc-basic-secret" not in p.stderr and "svc-post-secret" not in p.stderr


def test_check_shows_the_injection_without_fetching(idp, tmp_path):
    idp.reset_stats()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(config(idp))
    out = subprocess.run([BIN, "check", "--config", str(cfg), "--url", "https://api.example.com/orders/1"],
                         capture_output=True, text=True, env={"SVC_POST_SECRET": "svc-post-secret", "PATH": "/usr/bin:/bin"},
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "authorization: <redacted credential>" in out.stdout
    assert "credential `orders-backend`" in out.stdout
    assert idp.stats()["token"]["total"] == 0, "dry run: nothing fetched"


def test_a_failing_token_endpoint_is_a_503_then_recovers(idp, start_portcullis):
    idp.fail("token", "500")
    try:
        p = start_portcullis(config(idp), ENV)
        resp = p.check("/orders/1")
        assert denied(resp) == (14, 503, "BackendCredentialUnavailable")
        assert resp.denied_response.headers, "a deny carries its headers"
    finally:
        idp.clear_faults()
    # After the backoff (at most a second or two for the first failures), a token is obtained.
    resp = eventually("recovery", lambda: (r := p.check("/orders/1")).status.code == 0 and r, timeout=30)
    verify(idp, injected_token(resp), "api://orders")
