"""JWT validation and backend credentials end to end: client -> Envoy -> backend, portcullis deciding
with tokens from a real OpenID Provider (tests/idp).

These features land separately. Until then this build rejects `jwt` and `credentials` sections with
"not available in this build", and these tests skip saying so; they run as soon as
`portcullis validate` accepts the configs below.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness import ROOT, Envoy, Portcullis, assert_deny, missing, request, skip_unless_available
from topology import ALLOWED_CLIENT, grpc_envoy_params, jwt_orders_config

sys.path.insert(0, str(ROOT / "tests" / "idp"))
from idp import decode_jwt, start_idp  # noqa: E402

LB = {"x-forwarded-for": ALLOWED_CLIENT}

IDP_CONFIG = {
    "access_token_ttl": 300,
    "resources": [
        {"resource": "api://orders", "scopes": ["orders:read", "orders:write"]},
        {"resource": "api://inventory", "scopes": ["inventory:read"]},
    ],
    "clients": [
        {"client_id": "caller", "client_secret": "caller-secret", "grant_types": ["client_credentials"]},
        {"client_id": "portcullis-backend", "client_secret": "backend-secret", "token_endpoint_auth_method": "client_secret_post",
         "grant_types": ["client_credentials"]},
    ],
}


def jwt_config(issuer: str) -> str:
    return jwt_orders_config(issuer, '{set_headers: {x-user-id: "{jwt.sub}", x-api: "{api}"}}')


def credential_config(token_url: str, secret_file: Path) -> str:
    return f"""
listen: {{grpc: 127.0.0.1:0}}
telemetry: {{log_format: json}}
client_ip: {{from: x-forwarded-for, trusted_hops: 1}}
credentials:
  - name: inventory-backend
    grant: client_credentials
    token_url: {token_url}
    client_id: portcullis-backend
    client_secret: ${{file:{secret_file}}}
    client_auth: client_secret_post
    resource: api://inventory
    scope: inventory:read
  - name: unreachable
    grant: client_credentials
    token_url: http://127.0.0.1:1/token
    client_id: portcullis-backend
    client_secret: ${{file:{secret_file}}}
    client_auth: client_secret_post
    timeout: 1s
apis:
  - name: inventory
    match: {{path_prefix: /inventory}}
    on_allow:
      backend_credential: {{name: inventory-backend, header: authorization, format: "Bearer {{token}}"}}
  - name: broken
    match: {{path_prefix: /broken}}
    on_allow:
      backend_credential: {{name: unreachable, header: authorization, format: "Bearer {{token}}"}}
unmatched: deny
"""


def idp_or_skip():
    if not (ROOT / "tests" / "idp" / "node_modules" / "oidc-provider").is_dir():
        missing("the test OpenID Provider is not installed: npm ci --prefix tests/idp")
    return start_idp(IDP_CONFIG)


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory, backend, pki):
    workdir = tmp_path_factory.mktemp("jwt")
    skip_unless_available(jwt_config("http://127.0.0.1:1"), workdir, "JWT validation")
    started = []
    try:
        idp = idp_or_skip()
        started.append(idp)
        portcullis = Portcullis(jwt_config(idp.issuer), workdir)
        started.append(portcullis)
        envoy = Envoy("ext-authz-grpc.yaml", grpc_envoy_params(portcullis, backend, pki), workdir)
        started.append(envoy)
        envoy.wait_healthy("portcullis")
        yield idp, envoy
    finally:
        for s in reversed(started):
            s.close() if hasattr(s, "close") else s.stop()


@pytest.fixture(scope="module")
def credential_stack(tmp_path_factory, backend, pki):
    workdir = tmp_path_factory.mktemp("credentials")
    secret_file = workdir / "backend-secret"
    secret_file.write_text("backend-secret")
    skip_unless_available(credential_config("http://127.0.0.1:1/token", secret_file), workdir, "Backend credentials")
    started = []
    try:
        idp = idp_or_skip()
        started.append(idp)
        portcullis = Portcullis(credential_config(idp.token_endpoint, secret_file), workdir)
        started.append(portcullis)
        envoy = Envoy("ext-authz-grpc.yaml", grpc_envoy_params(portcullis, backend, pki), workdir)
        started.append(envoy)
        envoy.wait_healthy("portcullis")
        yield idp, envoy, portcullis
    finally:
        for s in reversed(started):
            s.close() if hasattr(s, "close") else s.stop()


def bearer(token: str) -> dict:
    return {**LB, "authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------------------------------
# JWT
# ---------------------------------------------------------------------------------------------------


def test_jwt_from_the_idp_is_accepted_and_its_subject_reaches_the_backend(jwt_stack):
    idp, envoy = jwt_stack
    token = idp.client_credentials("caller", "caller-secret", resource="api://orders", scope="orders:read")["access_token"]
    r = request(envoy.url("http", "/orders/1"), headers=bearer(token))
    assert r.status == 200, r
    h = r.echo["headers"]
    assert h["x-user-id"] == [decode_jwt(token)[1]["sub"]]
    assert h["x-api"] == ["orders"]


def test_jwt_missing(jwt_stack):
    _, envoy = jwt_stack
    assert_deny(request(envoy.url("http", "/orders/1"), headers=LB), 401, "TokenNotPresent", 'Bearer realm="orders"')


def test_jwt_with_a_broken_signature(jwt_stack):
    idp, envoy = jwt_stack
    token = idp.client_credentials("caller", "caller-secret", resource="api://orders", scope="orders:read")["access_token"]
    head, payload, sig = token.split(".")
    forged = ".".join([head, payload, ("A" if sig[0] != "A" else "B") + sig[1:]])
    assert_deny(request(envoy.url("http", "/orders/1"), headers=bearer(forged)), 401, "TokenSignatureInvalid", 'error="invalid_token"')


def test_jwt_for_another_audience(jwt_stack):
    idp, envoy = jwt_stack
    token = idp.client_credentials("caller", "caller-secret", resource="api://inventory", scope="inventory:read")["access_token"]
    assert_deny(request(envoy.url("http", "/orders/1"), headers=bearer(token)), 401, "TokenAudienceNotAllowed", 'error="invalid_token"')


def test_jwt_without_the_scope(jwt_stack):
    idp, envoy = jwt_stack
    token = idp.client_credentials("caller", "caller-secret", resource="api://orders", scope="orders:write")["access_token"]
    assert_deny(request(envoy.url("http", "/orders/1"), headers=bearer(token)), 403, "InsufficientScope", 'error="insufficient_scope"')


# ---------------------------------------------------------------------------------------------------
# backend credentials
# ---------------------------------------------------------------------------------------------------


def test_backend_credential_replaces_the_callers_authorization(credential_stack):
    idp, envoy, portcullis = credential_stack
    seen = []
    for _ in range(3):
        r = request(envoy.url("http", "/inventory/items"), headers={**LB, "authorization": "Bearer caller-own-token"})
        assert r.status == 200, r
        auth = r.echo["headers"]["authorization"]
        assert len(auth) == 1 and auth[0].startswith("Bearer "), auth
        seen.append(auth[0].removeprefix("Bearer "))
    claims = decode_jwt(seen[0])[1]
    assert claims["aud"] == "api://inventory"
    assert claims["client_id"] == "portcullis-backend"
    # Served from the token cache: one token for all three requests.
    assert len(set(seen)) == 1
    assert idp.stats()["token"]["by_grant_type"].get("client_credentials", 0) == 1
    # The token is a secret: never in portcullis' logs.
    assert seen[0] not in portcullis.output()


def test_backend_credential_unavailable_is_a_503_deny_with_body(credential_stack):
    _, envoy, _ = credential_stack
    r = request(envoy.url("http", "/broken/x"), headers=LB)
    assert_deny(r, 503, "BackendCredentialUnavailable")
