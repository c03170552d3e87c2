"""RFC 9449 DPoP against a real OpenID Provider (tests/idp, oidc-provider with `features.dPoP`):
the provider binds a client_credentials token to the client's P-256 key (`cnf.jkt`) when the token
request carries a proof; portcullis (`dpop: required`) accepts that token with a fresh proof for the
resource request and refuses it as Bearer, with another key's proof, or replayed.
"""

from __future__ import annotations

import base64
import hashlib
import json
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
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "idp"))
from idp import decode_jwt, start_idp  # noqa: E402

BIN = os.environ.get("PORTCULLIS_BIN", str(ROOT / "target" / "debug" / "portcullis"))
HTU = "https://api.example.com/orders/1"

IDP_CONFIG = {
    "resources": [{"resource": "api://orders", "scopes": ["orders:read"]}],
    "clients": [{"client_id": "svc", "client_secret": "svc-secret", "grant_types": ["client_credentials"]}],
}

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "fleet"))
from harness import free_port  # noqa: E402  (one port picker for every suite)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Key:
    def __init__(self):
        self.private = ec.generate_private_key(ec.SECP256R1())
        n = self.private.public_key().public_numbers()
        self.jwk = {"kty": "EC", "crv": "P-256", "x": b64(n.x.to_bytes(32, "big")), "y": b64(n.y.to_bytes(32, "big"))}

    def proof(self, htm: str, htu: str, token: str | None = None) -> str:
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk}
        claims = {"jti": secrets.token_urlsafe(16), "htm": htm, "htu": htu, "iat": int(time.time())}
        if token is not None:
            claims["ath"] = b64(hashlib.sha256(token.encode()).digest())
        signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
        r, s = decode_dss_signature(self.private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))




@pytest.fixture(scope="module")
def idp():
    if not (ROOT / "tests" / "idp" / "node_modules").is_dir():
        pytest.fail("tests/idp/node_modules is missing: run `npm ci --prefix tests/idp` (tests/run.sh does)")
    with start_idp(IDP_CONFIG) as p:
        yield p


def start_portcullis(workdir: pathlib.Path, idp, store: str = "", env: dict | None = None):
    """One portcullis replica with `dpop: required`: its Check as a function, and its stop."""
    if not os.access(BIN, os.X_OK):
        pytest.fail(f"{BIN} is not built: run `cargo build` or set PORTCULLIS_BIN")
    port = free_port()
    config = workdir / f"portcullis-{port}.yaml"
    config.write_text(
        f"""
listen: {{ grpc: "127.0.0.1:{port}" }}
{store}
identity_providers:
  - {{ name: idp, issuer: "{idp.issuer}" }}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [idp], audiences: [api://orders], dpop: required }}
"""
    )
    log = open(workdir / f"portcullis-{port}.log", "w+")
    proc = subprocess.Popen([BIN, "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=20)
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)

    def check(authorization: str, proof: str | None):
        headers = {":method": "GET", ":path": "/orders/1", ":authority": "api.example.com", "authorization": authorization}
        if proof is not None:
            headers["dpop"] = proof
        attrs = attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.0.0.7", port_value=40000))
            ),
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    id="1", method="GET", path="/orders/1", host="api.example.com", scheme="https", protocol="HTTP/1.1", headers=headers
                )
            ),
        )
        return stub.Check(external_auth_pb2.CheckRequest(attributes=attrs), timeout=10)

    def stop():
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        channel.close()
        log.close()

    return check, stop


@pytest.fixture(scope="module")
def portcullis(idp):
    d = tempfile.TemporaryDirectory()
    check, stop = start_portcullis(pathlib.Path(d.name), idp)
    yield check
    stop()
    d.cleanup()


@pytest.fixture(scope="module")
def replicas(idp):
    """Two replicas sharing a real Redis (`store.redis`), and that Redis."""
    from fleet_harness import RedisServer  # tests/fleet: the Redis every fleet test runs

    d = tempfile.TemporaryDirectory()
    workdir = pathlib.Path(d.name)
    redis = RedisServer(workdir)
    store = f"""store:
  redis: {{ url: "{redis.url}", timeout: 500ms }}
  key: "${{env:STORE_KEY}}"
"""
    env = {"STORE_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    started = [start_portcullis(workdir, idp, store, env) for _ in range(2)]
    yield [check for check, _ in started], redis
    for _, stop in started:
        stop()
    redis.stop()
    d.cleanup()


def reason(resp) -> str | None:
    body = resp.denied_response.body
    return json.loads(body)["reason"] if body else None


def test_a_dpop_bound_token_from_oidc_provider_is_accepted_only_with_its_proof(idp, portcullis):
    key = Key()
    status, body = idp.token_request(
        {"grant_type": "client_credentials", "resource": "api://orders", "scope": "orders:read"},
        "svc",
        "svc-secret",
        dpop=key.proof("POST", idp.token_endpoint),
    )
    assert status == 200, body
    assert body["token_type"] == "DPoP", body
    token = body["access_token"]
    _, claims = decode_jwt(token)
    assert claims["cnf"]["jkt"], claims

    ok = portcullis(f"DPoP {token}", key.proof("GET", HTU, token))
    assert ok.status.code == 0, ok

    # Replayed, as Bearer, with another key's proof, without `ath`.
    proof = key.proof("GET", HTU, token)
    assert portcullis(f"DPoP {token}", proof).status.code == 0
    assert reason(portcullis(f"DPoP {token}", proof)) == "DpopProofInvalid"
    assert reason(portcullis(f"Bearer {token}", key.proof("GET", HTU, token))) == "TokenBindingMismatch"
    assert reason(portcullis(f"DPoP {token}", Key().proof("GET", HTU, token))) == "TokenBindingMismatch"
    assert reason(portcullis(f"DPoP {token}", key.proof("GET", HTU))) == "DpopProofInvalid"
    denied = portcullis(f"DPoP {token}", key.proof("POST", HTU, token))
    challenge = {h.header.key: h.header.value for h in denied.denied_response.headers}["www-authenticate"]
    assert challenge.startswith('DPoP realm="orders", error="invalid_dpop_proof", algs="ES256'), challenge


def test_an_unbound_token_is_refused_where_dpop_is_required(idp, portcullis):
    token = idp.client_credentials("svc", "svc-secret", resource="api://orders", scope="orders:read")["access_token"]
    assert "cnf" not in decode_jwt(token)[1]
    assert reason(portcullis(f"Bearer {token}", None)) == "TokenBindingMismatch"


def dpop_token(idp, key: Key) -> str:
    status, body = idp.token_request(
        {"grant_type": "client_credentials", "resource": "api://orders", "scope": "orders:read"},
        "svc",
        "svc-secret",
        dpop=key.proof("POST", idp.token_endpoint),
    )
    assert status == 200 and body["token_type"] == "DPoP", body
    return body["access_token"]


def test_a_proof_replayed_against_a_second_replica_is_refused(idp, replicas):
    (first, second), redis = replicas
    key = Key()
    token = dpop_token(idp, key)
    proof = key.proof("GET", HTU, token)
    assert first(f"DPoP {token}", proof).status.code == 0
    # The second replica never saw this proof; Redis did.
    replayed = second(f"DPoP {token}", proof)
    assert reason(replayed) == "DpopProofInvalid", replayed
    assert second(f"DPoP {token}", key.proof("GET", HTU, token)).status.code == 0
    # What Redis holds: digests, never the token or the proof.
    for name, _kind, values in redis.dump_everything():
        for blob in [name, *values]:
            assert token.encode() not in blob and proof.encode() not in blob, name
    # Redis gone: DPoP fails closed on every replica (a replay elsewhere cannot be ruled out).
    redis.freeze()
    try:
        down = first(f"DPoP {token}", key.proof("GET", HTU, token))
        assert reason(down) == "ReplayProtectionUnavailable", down
        assert down.denied_response.status.code == 503
    finally:
        redis.thaw()
