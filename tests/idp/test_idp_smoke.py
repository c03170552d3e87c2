"""Smoke tests for the OpenID Provider fixture (tests/idp/server.mjs + idp.py).

They run the real provider (node + oidc-provider) on 127.0.0.1 and check every
feature the other suites rely on. Signatures are verified with `cryptography`.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from idp import (
    TOKEN_EXCHANGE_GRANT,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT,
    IdpError,
    decode_jwt,
    start_idp,
)

REDIRECT_URI = "http://127.0.0.1:9/cb"

CONFIG = {
    "access_token_ttl": 300,
    "resources": [
        {"resource": "api://orders", "scopes": ["orders:read", "orders:write"]},
        {"resource": "api://inventory", "scopes": ["inventory:read"], "access_token_ttl": 120},
        {"resource": "api://short", "scopes": ["short:read"], "access_token_ttl": 2},
        {"resource": "https://billing.example.test/api", "scopes": ["billing"], "audience": "billing"},
    ],
    "clients": [
        {
            "client_id": "svc-basic",
            "client_secret": "s3cret-basic",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials", TOKEN_EXCHANGE_GRANT],
            "extra_claims": {"roles": ["admin"], "tid": "tenant-42"},
        },
        {
            "client_id": "svc-post",
            "client_secret": "s3cret-post",
            "token_endpoint_auth_method": "client_secret_post",
            "grant_types": ["client_credentials"],
        },
        {
            "client_id": "svc-short",
            "client_secret": "s3cret-short",
            "grant_types": ["client_credentials"],
            "access_token_ttl": 2,
        },
        {
            "client_id": "web",
            "client_secret": "s3cret-web",
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [REDIRECT_URI],
        },
        {
            "client_id": "exchanger",
            "client_secret": "s3cret-x",
            "token_endpoint_auth_method": "client_secret_post",
            "grant_types": [TOKEN_EXCHANGE_GRANT],
            "extra_claims": {"roles": ["must-not-leak"]},
        },
    ],
    "accounts": {
        "alice": {
            "claims": {"email": "alice@example.test", "email_verified": True},
            "token_claims": {"roles": ["user"], "tid": "tenant-42"},
        }
    },
}


# --------------------------------------------------------------------------- helpers
def b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_rs256(token: str, jwks: dict) -> dict:
    """Verify a compact RS256 JWS against a JWKS; return the payload."""
    header, payload = decode_jwt(token)
    assert header["alg"] == "RS256"
    matches = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    assert matches, f"kid {header['kid']} not in JWKS {[k['kid'] for k in jwks['keys']]}"
    jwk = matches[0]
    assert jwk["kty"] == "RSA"
    public_key = rsa.RSAPublicNumbers(
        int.from_bytes(b64d(jwk["e"]), "big"), int.from_bytes(b64d(jwk["n"]), "big")
    ).public_key()
    signing_input, signature = token.rsplit(".", 1)
    public_key.verify(b64d(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return payload


def kids(jwks: dict) -> list[str]:
    return [k["kid"] for k in jwks["keys"]]


def raw_get(url: str, timeout: float = 5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("content-type"), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type"), err.read().decode()


@pytest.fixture(scope="module")
def idp():
    with start_idp(CONFIG) as server:
        yield server
        assert "server_error" not in server.stderr and "fixture error" not in server.stderr, server.stderr


@pytest.fixture(scope="module")
def jwks(idp):
    return idp.jwks()


# --------------------------------------------------------------------------- discovery / jwks
def test_ready_line_and_discovery(idp):
    assert idp.issuer.startswith("http://127.0.0.1:")
    doc = idp.discovery()
    assert doc["issuer"] == idp.issuer
    assert doc["token_endpoint"] == idp.issuer + "/token"
    assert doc["jwks_uri"] == idp.issuer + "/jwks"
    assert doc["authorization_endpoint"] == idp.issuer + "/auth"
    for grant in ("authorization_code", "refresh_token", "client_credentials", TOKEN_EXCHANGE_GRANT):
        assert grant in doc["grant_types_supported"]
    assert {"client_secret_basic", "client_secret_post"} <= set(doc["token_endpoint_auth_methods_supported"])
    assert "S256" in doc["code_challenge_methods_supported"]


def test_jwks_has_public_rs256_keys_only(idp, jwks):
    assert len(jwks["keys"]) == 1
    (key,) = jwks["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig" and key["kid"]
    for private in ("d", "p", "q", "dp", "dq", "qi"):
        assert private not in key
    status, ctype, _ = raw_get(idp.discovery()["jwks_uri"])
    assert status == 200 and "json" in ctype


# --------------------------------------------------------------------------- client_credentials
def test_client_credentials_basic_jwt(idp, jwks):
    tok = idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders", scope="orders:read")
    assert tok["token_type"] == "Bearer"
    assert tok["scope"] == "orders:read"
    assert tok["expires_in"] == 300
    header, _ = decode_jwt(tok["access_token"])
    assert header["typ"] == "at+jwt"
    assert header["kid"] == jwks["keys"][0]["kid"]
    claims = verify_rs256(tok["access_token"], jwks)
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == "api://orders"
    assert claims["sub"] == "svc-basic"
    assert claims["client_id"] == "svc-basic"
    assert claims["scope"] == "orders:read"
    assert claims["roles"] == ["admin"]
    assert claims["tid"] == "tenant-42"
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - time.time()) < 30


def test_client_credentials_post_and_scope_filtering(idp, jwks):
    tok = idp.client_credentials(
        "svc-post", "s3cret-post", resource="api://orders", scope="orders:read orders:write not-allowed", auth="post"
    )
    claims = verify_rs256(tok["access_token"], jwks)
    assert claims["aud"] == "api://orders"
    assert claims["sub"] == "svc-post"
    assert set(claims["scope"].split()) == {"orders:read", "orders:write"}
    assert "roles" not in claims
    # oidc-provider treats client_secret_basic and client_secret_post as interchangeable
    # for a client registered with either of them
    assert idp.client_credentials("svc-post", "s3cret-post", resource="api://orders", auth="basic")["access_token"]
    assert idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders", auth="post")["access_token"]


def test_client_credentials_errors(idp):
    with pytest.raises(IdpError) as err:
        idp.client_credentials("svc-basic", "wrong", resource="api://orders")
    assert err.value.status == 401 and err.value.error == "invalid_client"
    with pytest.raises(IdpError) as err:
        idp.client_credentials("svc-basic", "s3cret-basic", resource="api://unknown")
    assert err.value.status == 400 and err.value.error == "invalid_target"


def test_resource_audience_override(idp, jwks):
    tok = idp.client_credentials("svc-basic", "s3cret-basic", resource="https://billing.example.test/api",
                                 scope="billing")
    claims = verify_rs256(tok["access_token"], jwks)
    assert claims["aud"] == "billing"
    assert claims["scope"] == "billing"


def test_short_ttl_per_resource_and_per_client(idp, jwks):
    by_resource = idp.client_credentials("svc-basic", "s3cret-basic", resource="api://short")
    assert by_resource["expires_in"] == 2
    c = verify_rs256(by_resource["access_token"], jwks)
    assert c["exp"] - c["iat"] == 2
    # per-client TTL wins over the resource TTL (api://inventory has 120)
    by_client = idp.client_credentials("svc-short", "s3cret-short", resource="api://inventory")
    assert by_client["expires_in"] == 2
    c = verify_rs256(by_client["access_token"], jwks)
    assert c["exp"] - c["iat"] == 2
    # per-resource TTL
    inv = idp.client_credentials("svc-basic", "s3cret-basic", resource="api://inventory")
    assert inv["expires_in"] == 120


# --------------------------------------------------------------------------- authorization code + refresh
def test_authorization_code_pkce_consent_and_refresh_rotation(idp, jwks):
    tokens = idp.authorization_code_consent(
        "web", "s3cret-web", REDIRECT_URI, "openid email offline_access orders:read", resource="api://orders",
        login="alice",
    )
    assert tokens["token_type"] == "Bearer"
    assert tokens["refresh_token"]
    at = verify_rs256(tokens["access_token"], jwks)
    assert at["aud"] == "api://orders"
    assert at["sub"] == "alice"
    assert at["client_id"] == "web"
    assert at["scope"] == "orders:read"
    assert at["roles"] == ["user"] and at["tid"] == "tenant-42"
    assert at["exp"] - at["iat"] == 300
    id_token = verify_rs256(tokens["id_token"], jwks)
    assert id_token["aud"] == "web" and id_token["sub"] == "alice" and id_token["iss"] == idp.issuer

    rt1 = tokens["refresh_token"]
    refreshed = idp.refresh("web", "s3cret-web", rt1)
    rt2 = refreshed["refresh_token"]
    assert rt2 and rt2 != rt1
    at2 = verify_rs256(refreshed["access_token"], jwks)
    assert at2["aud"] == "api://orders" and at2["sub"] == "alice" and at2["jti"] != at["jti"]

    refreshed2 = idp.refresh("web", "s3cret-web", rt2)
    rt3 = refreshed2["refresh_token"]
    assert rt3 not in (rt1, rt2)

    # a used (rotated) refresh token is rejected
    status, body = idp.token_request({"grant_type": "refresh_token", "refresh_token": rt1}, "web", "s3cret-web")
    assert status == 400 and body["error"] == "invalid_grant"
    # reuse detection: oidc-provider then revokes the whole grant, current refresh token included
    status, body = idp.token_request({"grant_type": "refresh_token", "refresh_token": rt3}, "web", "s3cret-web")
    assert status == 400 and body["error"] == "invalid_grant"


def test_authorization_code_without_resource_gives_opaque_token(idp):
    tokens = idp.authorization_code_consent("web", "s3cret-web", REDIRECT_URI, "openid", login="bob")
    assert tokens["access_token"].count(".") == 0  # opaque (usable at userinfo only)
    assert "refresh_token" not in tokens
    assert decode_jwt(tokens["id_token"])[1]["sub"] == "bob"


def test_authorization_code_is_single_use(idp):
    result = idp.authorize("web", REDIRECT_URI, "openid orders:read", resource="api://orders")
    assert result["redirect"].startswith(REDIRECT_URI)
    idp.exchange_code("web", "s3cret-web", result["code"], result["code_verifier"], REDIRECT_URI)
    with pytest.raises(IdpError) as err:
        idp.exchange_code("web", "s3cret-web", result["code"], result["code_verifier"], REDIRECT_URI)
    assert err.value.error == "invalid_grant"
    # wrong PKCE verifier
    result = idp.authorize("web", REDIRECT_URI, "openid orders:read", resource="api://orders")
    with pytest.raises(IdpError) as err:
        idp.exchange_code("web", "s3cret-web", result["code"], "x" * 43, REDIRECT_URI)
    assert err.value.error == "invalid_grant"


# --------------------------------------------------------------------------- token exchange
def test_token_exchange_user_token(idp, jwks):
    user = idp.authorization_code_consent(
        "web", "s3cret-web", REDIRECT_URI, "openid orders:read", resource="api://orders", login="alice"
    )
    subject = decode_jwt(user["access_token"])[1]
    out = idp.token_exchange(
        "exchanger", "s3cret-x", user["access_token"], resource="api://inventory", scope="inventory:read",
        auth="post",
    )
    assert out["issued_token_type"] == TOKEN_TYPE_ACCESS_TOKEN
    assert out["token_type"] == "Bearer"
    assert out["scope"] == "inventory:read"
    claims = verify_rs256(out["access_token"], jwks)
    assert decode_jwt(out["access_token"])[0]["typ"] == "at+jwt"
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": "exchanger"}
    assert claims["aud"] == "api://inventory"
    assert claims["iss"] == idp.issuer
    assert claims["client_id"] == "exchanger"
    assert claims["scope"] == "inventory:read"
    assert claims["roles"] == ["user"]  # carried from the subject, not the exchanging client's extra_claims
    assert out["expires_in"] <= 120
    assert claims["exp"] <= subject["exp"]

    # `audience` naming a resource by its configured audience, requested_token_type jwt
    out2 = idp.token_exchange("exchanger", "s3cret-x", user["access_token"], audience="billing",
                              scope="billing", requested_token_type=TOKEN_TYPE_JWT, auth="post")
    assert out2["issued_token_type"] == TOKEN_TYPE_JWT
    c2 = verify_rs256(out2["access_token"], jwks)
    assert c2["aud"] == "billing" and c2["sub"] == "alice"

    # exchanging an exchanged token nests `act`
    out3 = idp.token_exchange("svc-basic", "s3cret-basic", out["access_token"], resource="api://orders",
                              subject_token_type=TOKEN_TYPE_JWT)
    c3 = verify_rs256(out3["access_token"], jwks)
    assert c3["sub"] == "alice"
    assert c3["act"] == {"sub": "svc-basic", "act": {"sub": "exchanger"}}


def test_token_exchange_lifetime_capped_by_subject(idp, jwks):
    short = idp.client_credentials("svc-short", "s3cret-short", resource="api://orders")
    subject = decode_jwt(short["access_token"])[1]
    out = idp.token_exchange("exchanger", "s3cret-x", short["access_token"], resource="api://inventory",
                             auth="post")
    assert 1 <= out["expires_in"] <= 2
    claims = verify_rs256(out["access_token"], jwks)
    assert claims["sub"] == "svc-short"
    assert claims["exp"] <= subject["exp"]
    # once the subject token expired, it can't be exchanged
    time.sleep(max(0.0, subject["exp"] - time.time()) + 1.1)
    with pytest.raises(IdpError) as err:
        idp.token_exchange("exchanger", "s3cret-x", short["access_token"], resource="api://inventory", auth="post")
    assert err.value.status == 400 and err.value.error == "invalid_grant"


def test_token_exchange_rejections(idp):
    good = idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders")["access_token"]
    h, p, s = good.split(".")
    forged_payload = json.loads(b64d(p))
    forged_payload["sub"] = "mallory"
    forged = ".".join([h, base64.urlsafe_b64encode(json.dumps(forged_payload).encode()).rstrip(b"=").decode(), s])
    for bad in (forged, "not-a-jwt", good[:-4] + "AAAA"):
        with pytest.raises(IdpError) as err:
            idp.token_exchange("exchanger", "s3cret-x", bad, resource="api://inventory", auth="post")
        assert err.value.error == "invalid_grant", bad
    # unknown target
    with pytest.raises(IdpError) as err:
        idp.token_exchange("exchanger", "s3cret-x", good, resource="api://nope", auth="post")
    assert err.value.error == "invalid_target"
    # missing subject_token_type
    status, body = idp.token_request(
        {"grant_type": TOKEN_EXCHANGE_GRANT, "subject_token": good, "resource": "api://inventory"},
        "exchanger", "s3cret-x", auth="post",
    )
    assert status == 400 and body["error"] == "invalid_request"
    # bad client credentials
    with pytest.raises(IdpError) as err:
        idp.token_exchange("exchanger", "wrong", good, resource="api://inventory", auth="post")
    assert err.value.error == "invalid_client"
    # client not allowed to use the grant
    with pytest.raises(IdpError) as err:
        idp.token_exchange("svc-post", "s3cret-post", good, resource="api://inventory", auth="post")
    assert err.value.status == 400


# --------------------------------------------------------------------------- stats + faults
def test_stats_count_and_reset(idp):
    idp.reset_stats()
    idp.discovery()
    idp.discovery()
    idp.jwks()
    idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders")
    idp.client_credentials("svc-post", "s3cret-post", resource="api://orders", auth="post")
    idp.token_request({"grant_type": "refresh_token", "refresh_token": "nope"}, "web", "s3cret-web")
    s = idp.stats()
    assert s["discovery"] == 2
    assert s["jwks"] == 1
    assert s["token"]["total"] == 3
    assert s["token"]["by_grant_type"] == {"client_credentials": 2, "refresh_token": 1}
    reset = idp.reset_stats()
    assert reset["discovery"] == 0 and reset["token"]["total"] == 0
    assert idp.stats()["token"]["by_grant_type"] == {}


def test_fault_injection(idp):
    try:
        idp.fail("jwks", "500")
        status, _, body = raw_get(idp.jwks_uri)
        assert status == 500 and json.loads(body)["error"] == "server_error"
        idp.fail("jwks", "none")
        assert raw_get(idp.jwks_uri)[0] == 200

        idp.fail("discovery", "garbage")
        status, _, body = raw_get(idp.discovery_url)
        assert status == 200
        with pytest.raises(ValueError):
            json.loads(body)
        idp.fail("discovery", "none")
        assert idp.discovery()["issuer"] == idp.issuer

        idp.fail("token", "slow", delay_ms=400)
        t0 = time.monotonic()
        tok = idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders")
        assert time.monotonic() - t0 >= 0.4
        assert tok["access_token"]
        idp.fail("token", "none")

        # a fault limited to the next request, with a status of choice
        idp.fail("token", "503", times=1)
        with pytest.raises(IdpError) as err:
            idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders")
        assert err.value.status == 503
        assert idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders")["access_token"]

        # requests are counted even when a fault answers them
        idp.reset_stats()
        idp.fail("jwks", "reset")
        with pytest.raises((urllib.error.URLError, ConnectionError, socket.error)):
            urllib.request.urlopen(idp.jwks_uri, timeout=5).read()
        assert idp.stats()["jwks"] == 1
    finally:
        idp.clear_faults()
    assert raw_get(idp.jwks_uri)[0] == 200


# --------------------------------------------------------------------------- key rotation
def test_key_rotation():
    with start_idp(CONFIG) as idp:
        jwks0 = idp.jwks()
        (k1,) = kids(jwks0)
        user = idp.authorization_code_consent(
            "web", "s3cret-web", REDIRECT_URI, "openid offline_access orders:read", resource="api://orders"
        )
        old = idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders")["access_token"]
        assert decode_jwt(old)[0]["kid"] == k1

        rotated = idp.rotate()
        k2 = rotated["kid"]
        assert k2 != k1 and rotated["kids"] == [k2, k1]
        jwks1 = idp.jwks()
        assert kids(jwks1) == [k2, k1]  # JWKS endpoint reflects the change immediately
        new = idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders")["access_token"]
        assert decode_jwt(new)[0]["kid"] == k2
        verify_rs256(new, jwks1)
        verify_rs256(old, jwks1)  # old key still published
        # provider state (grants, refresh tokens) survives the rotation
        refreshed = idp.refresh("web", "s3cret-web", user["refresh_token"])
        assert decode_jwt(refreshed["access_token"])[0]["kid"] == k2
        assert decode_jwt(refreshed["id_token"])[0]["kid"] == k2
        # tokens signed with the old (still published) key can still be exchanged
        idp.token_exchange("svc-basic", "s3cret-basic", old, resource="api://inventory")

        removed = idp.rotate(remove_old=True)
        k3 = removed["kid"]
        assert removed["kids"] == [k3]
        assert set(removed["removed"]) == {k1, k2}
        jwks2 = idp.jwks()
        assert kids(jwks2) == [k3]
        newest = idp.client_credentials("svc-basic", "s3cret-basic", resource="api://orders")["access_token"]
        assert decode_jwt(newest)[0]["kid"] == k3
        verify_rs256(newest, jwks2)
        with pytest.raises(AssertionError):
            verify_rs256(old, jwks2)  # kid no longer published
        with pytest.raises(InvalidSignature):
            _verify_with_kid(new, k3, jwks2)  # k2's signature does not verify with k3
        # the provider no longer accepts tokens signed with removed keys
        with pytest.raises(IdpError) as err:
            idp.token_exchange("svc-basic", "s3cret-basic", new, resource="api://inventory")
        assert err.value.error == "invalid_grant"
        assert idp.keys() == {"signing_kid": k3, "kids": [k3]}


def _verify_with_kid(token: str, kid: str, jwks: dict) -> None:
    """Verify the signature of `token` with the key `kid` regardless of its header."""
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    public_key = rsa.RSAPublicNumbers(
        int.from_bytes(b64d(jwk["e"]), "big"), int.from_bytes(b64d(jwk["n"]), "big")
    ).public_key()
    signing_input, signature = token.rsplit(".", 1)
    public_key.verify(b64d(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())


# --------------------------------------------------------------------------- defaults
def test_default_config():
    with start_idp() as idp:
        jwks = idp.jwks()
        tok = idp.client_credentials("svc-basic", "svc-basic-secret", resource="api://orders", scope="orders:read")
        claims = verify_rs256(tok["access_token"], jwks)
        assert claims["aud"] == "api://orders" and claims["roles"] == ["admin"]
        tok = idp.client_credentials("svc-post", "svc-post-secret", resource="api://inventory", auth="post")
        assert verify_rs256(tok["access_token"], jwks)["aud"] == "api://inventory"
        tokens = idp.authorization_code_consent(
            "web-app", "web-app-secret", "http://127.0.0.1:9/callback", "openid offline_access orders:read",
            resource="api://orders",
        )
        assert tokens["refresh_token"]
