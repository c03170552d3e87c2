"""portcullis against a real OpenID Provider (tests/idp, oidc-provider), called over gRPC with
Envoy's own generated ext_authz messages (xds-protos).

The provider issues RS256 JWT access tokens by client_credentials with a resource indicator;
portcullis finds its keys by OIDC discovery from the issuer alone.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import pytest
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "idp"))
from idp import decode_jwt, start_idp  # noqa: E402

BIN = os.environ.get("PORTCULLIS_BIN", str(ROOT / "target" / "debug" / "portcullis"))

IDP_CONFIG = {
    "resources": [
        {"resource": "api://orders", "scopes": ["orders:read", "orders:write"]},
        {"resource": "api://inventory", "scopes": ["inventory:read"]},
    ],
    "clients": [
        {
            "client_id": "svc",
            "client_secret": "svc-secret",
            "grant_types": ["client_credentials"],
            "extra_claims": {"roles": ["admin", "auditor"], "tid": "tenant-1"},
        },
        {
            "client_id": "svc-short",
            "client_secret": "svc-short-secret",
            "grant_types": ["client_credentials"],
            "access_token_ttl": 1,
        },
    ],
}

MIN_REFETCH = 1.0  # seconds; portcullis' min_refetch_interval below

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "e2e"))
from harness import free_port  # noqa: E402  (one port picker for every suite)


@pytest.fixture(scope="module")
def idp():
    if not (ROOT / "tests" / "idp" / "node_modules").is_dir():
        pytest.fail("tests/idp/node_modules is missing: run `npm ci --prefix tests/idp` (tests/run.sh does)")
    with start_idp(IDP_CONFIG) as p:
        yield p


class Portcullis:
    def __init__(self, issuer: str):
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
    min_refetch_interval: {int(MIN_REFETCH * 1000)}ms
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt:
      providers: [idp]
      audiences: [api://orders]
      scopes: {{ all: ["orders:read"] }}
    on_allow:
      set_headers: {{ x-user: "{{jwt.sub}}", x-roles: "{{jwt.roles}}", x-tenant: "{{jwt.tid}}" }}
"""
        )
        self.log = open(pathlib.Path(self.dir.name) / "portcullis.log", "w+")
        self.process = subprocess.Popen([BIN, "serve", "--config", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=20)
        except grpc.FutureTimeoutError:
            self.close()
            pytest.fail(f"portcullis did not start:\n{self.logs()}")
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def logs(self) -> str:
        self.log.flush()
        return (pathlib.Path(self.dir.name) / "portcullis.log").read_text()

    def check(self, token: str | None, path: str = "/orders/1") -> external_auth_pb2.CheckResponse:
        headers = {":method": "GET", ":path": path, ":authority": "api.example.com"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        attrs = attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.0.0.7", port_value=40000))
            ),
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    id="1", method="GET", path=path, host="api.example.com", scheme="https", protocol="HTTP/1.1", headers=headers
                )
            ),
        )
        return self.stub.Check(external_auth_pb2.CheckRequest(attributes=attrs), timeout=10)

    def close(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.channel.close()
        self.log.close()
        self.dir.cleanup()


@pytest.fixture(scope="module")
def portcullis(idp):
    p = Portcullis(idp.issuer)
    yield p
    p.close()


def upstream_headers(resp) -> dict:
    return {h.header.key: h.header.value for h in resp.ok_response.headers}


def denied(resp) -> dict:
    import json

    d = resp.denied_response
    return {
        "code": resp.status.code,
        "status": d.status.code,
        "body": json.loads(d.body) if d.body else None,
        "headers": {h.header.key: h.header.value for h in d.headers},
    }


def token_for(idp, resource: str, client=("svc", "svc-secret"), scope: str | None = "orders:read") -> str:
    return idp.client_credentials(client[0], client[1], resource=resource, scope=scope)["access_token"]


def test_discovery_and_a_real_token_is_accepted_with_its_claims_in_headers(idp, portcullis):
    token = token_for(idp, "api://orders")
    header, payload = decode_jwt(token)
    assert header["alg"] == "RS256" and header["kid"]
    resp = portcullis.check(token)
    assert resp.status.code == 0, denied(resp)
    h = upstream_headers(resp)
    assert h["x-user"] == "svc"
    assert h["x-roles"] == "admin,auditor"
    assert h["x-tenant"] == "tenant-1"
    assert len(h["x-portcullis-decision-id"]) == 32
    stats = idp.stats()
    assert stats["discovery"] >= 1 and stats["jwks"] >= 1, stats

    missing = denied(portcullis.check(None))
    assert (missing["code"], missing["status"], missing["body"]["reason"]) == (16, 401, "TokenNotPresent")
    assert missing["headers"]["www-authenticate"] == 'Bearer realm="orders"'


def test_a_token_for_another_audience_is_refused(idp, portcullis):
    token = token_for(idp, "api://inventory", scope="inventory:read")
    assert decode_jwt(token)[1]["aud"] == "api://inventory"
    d = denied(portcullis.check(token))
    assert (d["code"], d["status"], d["body"]["reason"]) == (16, 401, "TokenAudienceNotAllowed")
    assert d["headers"]["www-authenticate"] == 'Bearer realm="orders", error="invalid_token"'


def test_a_token_without_the_scope_is_refused_with_insufficient_scope(idp, portcullis):
    token = token_for(idp, "api://orders", scope="orders:write")
    d = denied(portcullis.check(token))
    assert (d["code"], d["status"], d["body"]["reason"]) == (7, 403, "InsufficientScope")
    assert d["headers"]["www-authenticate"] == 'Bearer realm="orders", error="insufficient_scope", scope="orders:read"'


def test_an_expired_token_is_refused(idp, portcullis):
    token = token_for(idp, "api://orders", client=("svc-short", "svc-short-secret"))
    exp = decode_jwt(token)[1]["exp"]
    # The provider's own clock says when; wait until it has passed (clock_skew is 0).
    while time.time() <= exp + 0.2:
        time.sleep(0.1)
    d = denied(portcullis.check(token))
    assert (d["code"], d["status"], d["body"]["reason"]) == (16, 401, "TokenExpired")


def test_key_rotation_needs_exactly_one_jwks_fetch_and_removed_keys_stop_working(idp, portcullis):
    old_token = token_for(idp, "api://orders")
    assert portcullis.check(old_token).status.code == 0
    # Past min_refetch_interval since the last fetch, so an unknown kid may fetch.
    time.sleep(MIN_REFETCH + 0.2)

    idp.reset_stats()
    rotated = idp.rotate()
    new_token = token_for(idp, "api://orders")
    assert decode_jwt(new_token)[0]["kid"] == rotated["kid"] != decode_jwt(old_token)[0]["kid"]
    resp = portcullis.check(new_token)
    assert resp.status.code == 0, denied(resp)
    stats = idp.stats()
    assert (stats["jwks"], stats["discovery"]) == (1, 0), stats
    # Both keys are published: the old token still passes, with no further fetch.
    assert portcullis.check(old_token).status.code == 0
    assert portcullis.check(new_token).status.code == 0
    assert idp.stats()["jwks"] == 1

    # Rotate again and drop every previous key.
    removed = idp.rotate(remove_old=True)
    assert rotated["kid"] in removed["removed"]
    time.sleep(MIN_REFETCH + 0.2)
    newest = token_for(idp, "api://orders")
    assert portcullis.check(newest).status.code == 0
    assert idp.stats()["jwks"] == 2
    # The removed key's tokens stop working, though they were verified (and cached) before.
    for token in (new_token, old_token):
        d = denied(portcullis.check(token))
        assert (d["code"], d["status"], d["body"]["reason"]) == (16, 401, "TokenSignatureKeyNotFound"), d


def test_tokens_never_reach_the_logs(idp, portcullis):
    token = token_for(idp, "api://orders")
    portcullis.check(token)
    portcullis.check(token[:-5] + "AAAAA")
    logs = portcullis.logs()
    assert "signing keys fetched" in logs
    assert token.split(".")[2] not in logs
    assert token.split(".")[1] not in logs
