"""portcullis validating opaque access tokens of a real OpenID Provider (tests/idp, oidc-provider)
by RFC 7662 token introspection, over gRPC with Envoy's own generated ext_authz messages.

The provider issues opaque (reference) access tokens for the resource `api://orders-opaque`
(`"format": "opaque"` in the fixture config, tests/idp/README.md) by client_credentials; portcullis
finds the introspection endpoint by OIDC discovery from the issuer and authenticates as the client
`rs` with client_secret_basic. Revocation at `/token/revocation` ends a token at the provider; portcullis
refuses it once its cached answer (cache_ttl 1s here) has ended.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "interop"))
sys.path.insert(0, str(ROOT / "tests" / "idp"))
from idp import start_idp  # noqa: E402
from test_jwt_interop import BIN, Portcullis as _JwtPortcullis, denied, free_port, upstream_headers  # noqa: E402

CACHE_TTL = 1.0  # seconds; the introspection cache_ttl below

IDP_CONFIG = {
    "resources": [
        {"resource": "api://orders-opaque", "scopes": ["orders:read", "orders:write"], "format": "opaque"},
    ],
    "clients": [
        {
            "client_id": "svc",
            "client_secret": "svc-secret",
            "grant_types": ["client_credentials"],
            "extra_claims": {"tid": "tenant-1"},
        },
        {"client_id": "rs", "client_secret": "rs-secret", "grant_types": ["client_credentials"]},
    ],
}


@pytest.fixture(scope="module")
def idp():
    if not (ROOT / "tests" / "idp" / "node_modules").is_dir():
        pytest.fail("tests/idp/node_modules is missing: run `npm ci --prefix tests/idp` (tests/run.sh does)")
    with start_idp(IDP_CONFIG) as p:
        yield p


class Portcullis(_JwtPortcullis):
    """The JWT interop harness with an introspection config."""

    def __init__(self, issuer: str):  # noqa: D107 - same harness, another config
        if not os.access(BIN, os.X_OK):
            pytest.fail(f"{BIN} is not built: run `cargo build` or set PORTCULLIS_BIN")
        self.dir = tempfile.TemporaryDirectory()
        self.grpc_port = free_port()
        self.config = pathlib.Path(self.dir.name) / "portcullis.yaml"
        self.config.write_text(
            f"""
listen: {{ grpc: "127.0.0.1:{self.grpc_port}" }}
telemetry: {{ log_level: debug }}
identity_providers:
  - name: idp
    issuer: "{issuer}"
    introspection:
      client_id: rs
      client_secret: ${{env:RS_SECRET}}
      cache_ttl: {int(CACHE_TTL * 1000)}ms
      negative_cache_ttl: 1s
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt:
      providers: [idp]
      audiences: [api://orders-opaque]
      scopes: {{ all: ["orders:read"] }}
    on_allow:
      set_headers: {{ x-client: "{{jwt.client_id}}", x-tenant: "{{jwt.tid}}" }}
"""
        )
        self.log = open(pathlib.Path(self.dir.name) / "portcullis.log", "w+")
        env = dict(os.environ, RS_SECRET="rs-secret")
        self.process = subprocess.Popen(
            [BIN, "serve", "--config", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=20)
        except grpc.FutureTimeoutError:
            self.close()
            pytest.fail(f"portcullis did not start:\n{self.logs()}")
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)


@pytest.fixture(scope="module")
def portcullis(idp):
    p = Portcullis(idp.issuer)
    yield p
    p.close()


def opaque_token(idp, scope: str = "orders:read") -> str:
    token = idp.client_credentials("svc", "svc-secret", resource="api://orders-opaque", scope=scope)["access_token"]
    assert token.count(".") != 2, "the fixture issues opaque tokens for this resource"
    return token


def test_an_opaque_token_is_introspected_and_its_answer_feeds_the_rules_and_headers(idp, portcullis):
    token = opaque_token(idp)
    answer = idp.introspect("rs", "rs-secret", token)
    assert answer["active"] is True and answer["aud"] == "api://orders-opaque", answer
    before = idp.stats().get("introspection", 0)
    resp = portcullis.check(token)
    assert resp.status.code == 0, denied(resp)
    h = upstream_headers(resp)
    assert (h["x-client"], h["x-tenant"]) == ("svc", "tenant-1")
    # A second check within cache_ttl asks nobody.
    assert portcullis.check(token).status.code == 0
    assert idp.stats()["introspection"] - before == 1, idp.stats()
    assert token not in portcullis.logs() and "rs-secret" not in portcullis.logs()


def test_a_token_without_the_scope_is_refused_with_insufficient_scope(idp, portcullis):
    d = denied(portcullis.check(opaque_token(idp, scope="orders:write")))
    assert (d["code"], d["status"], d["body"]["reason"]) == (7, 403, "InsufficientScope")


def test_a_revoked_token_is_refused_once_its_cached_answer_ends(idp, portcullis):
    token = opaque_token(idp)
    assert portcullis.check(token).status.code == 0
    idp.revoke("svc", "svc-secret", token)
    assert idp.introspect("rs", "rs-secret", token) == {"active": False}
    # Still the cached answer: the documented window of cache_ttl.
    assert portcullis.check(token).status.code == 0
    time.sleep(CACHE_TTL + 0.2)
    d = denied(portcullis.check(token))
    assert (d["code"], d["status"], d["body"]["reason"]) == (16, 401, "TokenNotActive"), d
    assert d["body"]["message"] == "Token is not active."
    assert d["headers"]["www-authenticate"] == 'Bearer realm="orders", error="invalid_token"'


def test_a_random_string_is_not_active(idp, portcullis):
    d = denied(portcullis.check(secrets.token_urlsafe(32)))
    assert (d["code"], d["status"], d["body"]["reason"]) == (16, 401, "TokenNotActive"), d


def test_a_provider_that_is_down_fails_closed(idp, portcullis):
    idp.fail("introspection", "500")
    try:
        d = denied(portcullis.check(opaque_token(idp)))
    finally:
        idp.clear_faults()
    assert (d["code"], d["status"], d["body"]["reason"]) == (14, 503, "IdentityProviderUnavailable"), d
