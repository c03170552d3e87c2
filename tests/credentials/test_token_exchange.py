"""RFC 8693 token exchange against the real OpenID Provider: the caller's validated JWT is the
subject token; the token injected upstream is the provider's exchanged token for the backend's
audience, cached per caller token.

Needs JWT validation in the binary (the caller's token must be validated before it is exchanged):
skipped, with the reason, while `portcullis validate` reports JWT validation as not available."""

from __future__ import annotations

import subprocess

import pytest

from credentials_harness import BIN, grant_count, injected_token, start_idp, verify

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


def config(idp) -> str:
    return f"""
telemetry: {{ log_format: json }}
listen: {{ grpc: 127.0.0.1:0 }}
identity_providers:
  - name: test-idp
    issuer: {idp.issuer}
    jwks_uri: {idp.jwks_uri}
credentials:
  - name: inventory-obo
    grant: token_exchange
    token_url: {idp.token_endpoint}
    client_id: svc-basic
    client_secret: svc-basic-secret
    audience: api://inventory
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt:
      providers: [test-idp]
      audiences: [api://orders]
    on_allow: {{ backend_credential: {{ name: inventory-obo }} }}
"""


@pytest.fixture(scope="module")
def idp():
    with start_idp() as p:
        yield p


@pytest.fixture(autouse=True)
def _needs_jwt(idp, tmp_path):
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(config(idp))
    out = subprocess.run([BIN, "validate", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 and "not available in this build" in out.stderr:
        pytest.skip("JWT validation is not available in this build (`portcullis validate` says so); "
                    "token exchange needs the caller's validated token")
    assert out.returncode == 0, out.stderr


def test_the_callers_token_is_exchanged_once_per_token(idp, start_portcullis):
    caller = idp.client_credentials("svc-post", "svc-post-secret", resource="api://orders", scope="orders:read")["access_token"]
    other = idp.client_credentials("svc-post", "svc-post-secret", resource="api://orders", scope="orders:read")["access_token"]
    idp.reset_stats()
    p = start_portcullis(config(idp))

    exchanged = injected_token(p.check("/orders/1", {"authorization": f"Bearer {caller}"}))
    assert exchanged != caller
    claims = verify(idp, exchanged, "api://inventory")
    assert claims["sub"] == "svc-post", "the subject is the caller"
    assert claims["act"] == {"sub": "svc-basic"}, "portcullis acts for it"
    assert grant_count(idp, EXCHANGE) == 1

    # The same caller token: the cached result. Another caller token: another exchange.
    for _ in range(10):
        assert injected_token(p.check("/orders/2", {"authorization": f"Bearer {caller}"})) == exchanged
    assert grant_count(idp, EXCHANGE) == 1
    second = injected_token(p.check("/orders/3", {"authorization": f"Bearer {other}"}))
    assert second != exchanged
    assert grant_count(idp, EXCHANGE) == 2
    assert caller not in p.stderr and exchanged not in p.stderr
