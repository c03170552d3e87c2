"""Connections and consent against the real OpenID Provider, as API Management's credential manager
runs them: the admin API hands out a login URL, the user logs in and consents on the provider's
pages, the provider redirects to portcullis' /admin/callback, and portcullis keeps the refresh
token encrypted, rotates it, survives `kill -9`, and refuses a wrong store key or a corrupt store
without touching the file."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from credentials_harness import (ADMIN_TOKEN, BIN, OTHER_KEY, STORE_KEY, IdpError, admin, denied, drive_consent, eventually, free_port,
                      grant_count, injected_token, start_idp, verify)

WEB_SECRET = "web-app-secret"
SCOPE = "openid offline_access orders:read"


def idp_config(redirect_uris: list[str]) -> dict:
    return {
        # A short access-token lifetime so that refreshes (and rotations) happen within the test.
        "clients": [
            {"client_id": "web-app", "client_secret": WEB_SECRET, "grant_types": ["authorization_code", "refresh_token"],
             "redirect_uris": redirect_uris, "access_token_ttl": 20},
        ],
        "rotate_refresh_token": True,
    }


def config(idp, http_port: int, store: str, extra_credential: str = "") -> str:
    return f"""
telemetry: {{ log_format: json }}
listen: {{ grpc: 127.0.0.1:0, http: 127.0.0.1:{http_port} }}
admin: {{ token: "${{env:PORTCULLIS_ADMIN_TOKEN}}" }}
store: {{ path: {store}, key: "${{env:PORTCULLIS_STORE_KEY}}" }}
credentials:
  - name: crm
    grant: refresh_token
    token_url: {idp.token_endpoint}
    authorize_url: {idp.authorization_endpoint}
    redirect_uri: http://127.0.0.1:{http_port}/admin/callback
    client_id: web-app
    client_secret: {WEB_SECRET}
    scope: {SCOPE}
    resource: api://orders
    # 20 s tokens, refreshed 19 s before expiry: about one refresh a second.
    refresh_before_expiry: 19s
{extra_credential}
apis:
  - name: crm
    match: {{ path_prefix: /crm }}
    on_allow: {{ backend_credential: {{ name: crm, connection: shared }} }}
"""


def test_consent_rotation_restart_and_store_errors(start_portcullis, tmp_path):
    http_port = free_port()
    callback = f"http://127.0.0.1:{http_port}/admin/callback"
    store = tmp_path / "data" / "portcullis.db"
    with start_idp(idp_config([callback])) as idp:
        text = config(idp, http_port, str(store))
        p = start_portcullis(text)

        # The admin API wants its token; the connection does not exist yet.
        assert admin(http_port, "GET", "/admin/credentials", token=None)[0] == 401
        assert admin(http_port, "GET", "/admin/credentials", token="wrong-token-wrong-token")[0] == 401
        status, body = admin(http_port, "GET", "/admin/credentials")
        assert status == 200
        assert body["credentials"][0] | {"connections": None} == {"name": "crm", "grant": "refresh_token", "state": "needs_consent", "connections": None}
        assert denied(p.check("/crm/1")) == (14, 503, "BackendCredentialUnavailable")

        # Consent: a login URL with state and PKCE S256, the user's browser, the callback.
        status, started = admin(http_port, "POST", "/admin/credentials/crm/connections/shared/consent")
        assert status == 200, started
        login_url = started["login_url"]
        assert login_url.startswith(idp.authorization_endpoint)
        assert "code_challenge_method=S256" in login_url and "state=" in login_url
        redirect = drive_consent(idp, login_url, callback, login="alice")
        with urllib.request.urlopen(redirect, timeout=15) as r:
            assert r.status == 200
        # The callback's state is single use.
        with pytest.raises(urllib.error.HTTPError) as again:
            urllib.request.urlopen(redirect, timeout=15)
        assert again.value.code == 400

        status, conns = admin(http_port, "GET", "/admin/credentials/crm/connections")
        assert status == 200
        assert [(c["id"], c["state"]) for c in conns["connections"]] == [("shared", "connected")]
        assert "refresh_token\":" not in str(conns) and "eyJ" not in str(conns), "no token in admin answers"

        first = injected_token(p.check("/crm/1", {"authorization": "Bearer caller"}))
        claims = verify(idp, first, "api://orders")
        assert claims["sub"] == "alice"
        assert claims["client_id"] == "web-app"

        # Refresh with rotation: every refresh spends the previous refresh token, so two in a row
        # only work when each rotated token was stored and used.
        eventually("two refreshes", lambda: grant_count(idp, "refresh_token") >= 2, timeout=30)
        second = eventually("a new access token", lambda: (t := injected_token(p.check("/crm/2"))) != first and t)
        assert verify(idp, second, "api://orders")["sub"] == "alice"
        assert "connected" == admin(http_port, "GET", "/admin/credentials/crm/connections")[1]["connections"][0]["state"]

        # kill -9, start again: the connection works without new consent, from the stored token.
        p.kill()
        refreshes = grant_count(idp, "refresh_token")
        p2 = start_portcullis(text, name="again.yaml")
        token = injected_token(p2.check("/crm/3"))
        assert verify(idp, token, "api://orders")["sub"] == "alice"
        assert grant_count(idp, "refresh_token") > refreshes, "refreshed with the persisted refresh token"
        assert "eyJ" not in p2.stderr, "no token in the logs"

        # The store on disk holds no token in clear.
        assert b"eyJ" not in store.read_bytes()

        # A wrong key: exit 2, a message that says so, the file byte for byte as it was.
        p2.stop()
        digest = hashlib.sha256(store.read_bytes()).hexdigest()
        wrong = start_portcullis(text, env={"PORTCULLIS_STORE_KEY": OTHER_KEY}, ready=False, name="wrong.yaml")
        assert wrong.wait_exit() == 2
        assert "wrong key" in wrong.stderr
        assert hashlib.sha256(store.read_bytes()).hexdigest() == digest

        # A corrupt file: exit 2, a message that says so, the file untouched.
        corrupt = tmp_path / "corrupt.db"
        shutil.copy(store, corrupt)
        data = bytearray(corrupt.read_bytes())
        for i in range(600, len(data), 5):
            data[i] ^= 0xA5
        corrupt.write_bytes(bytes(data))
        bad = start_portcullis(config(idp, http_port, str(corrupt)), ready=False, name="corrupt.yaml")
        assert bad.wait_exit() == 2
        assert "corrupt" in bad.stderr
        assert corrupt.read_bytes() == bytes(data)

        # Deleting the connection: the API is refused again.
        p3 = start_portcullis(text, name="third.yaml")
        assert admin(http_port, "DELETE", "/admin/credentials/crm/connections/shared")[0] == 204
        assert denied(p3.check("/crm/4")) == (14, 503, "BackendCredentialUnavailable")
        assert admin(http_port, "DELETE", "/admin/credentials/crm/connections/shared")[0] == 404


def test_a_configured_refresh_token_is_rotated_and_the_old_one_stops_working(start_portcullis, tmp_path):
    http_port = free_port()
    redirect = "http://127.0.0.1:9/callback"
    with start_idp(idp_config([redirect])) as idp:
        tokens = idp.authorization_code_consent("web-app", WEB_SECRET, redirect, SCOPE, resource="api://orders", login="bob")
        original = tokens["refresh_token"]
        extra = """  - name: seeded
    grant: refresh_token
    token_url: {token_url}
    client_id: web-app
    client_secret: {secret}
    resource: api://orders
    refresh_token: ${{env:SEEDED_RT}}
""".format(token_url=idp.token_endpoint, secret=WEB_SECRET)
        text = config(idp, http_port, str(tmp_path / "s.db"), extra) + """  - name: seeded
    match: { path_prefix: /seeded }
    on_allow: { backend_credential: { name: seeded } }
"""
        p = start_portcullis(text, env={"SEEDED_RT": original})
        token = injected_token(p.check("/seeded/1"))
        assert verify(idp, token, "api://orders")["sub"] == "bob"
        assert grant_count(idp, "refresh_token") >= 1
        # portcullis rotated it: the configured (original) refresh token no longer works.
        with pytest.raises(IdpError) as err:
            idp.refresh("web-app", WEB_SECRET, original)
        assert err.value.error == "invalid_grant"
        assert original not in p.stderr


def jwt_available(tmp_path, text: str) -> bool:
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(text)
    out = subprocess.run([BIN, "validate", "--config", str(cfg)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PORTCULLIS_STORE_KEY": STORE_KEY, "PORTCULLIS_ADMIN_TOKEN": ADMIN_TOKEN})
    if out.returncode != 0 and "not available in this build" in out.stderr:
        return False
    assert out.returncode == 0, out.stderr
    return True


def test_each_caller_uses_their_own_connection(start_portcullis, tmp_path):
    http_port = free_port()
    callback = f"http://127.0.0.1:{http_port}/admin/callback"
    user_redirect = "http://127.0.0.1:9/callback"
    with start_idp(idp_config([callback, user_redirect])) as idp:
        text = config(idp, http_port, str(tmp_path / "u.db")).replace("credentials:", f"""identity_providers:
  - name: test-idp
    issuer: {idp.issuer}
    jwks_uri: {idp.jwks_uri}
credentials:""", 1) + """  - name: me
    match: { path_prefix: /me }
    jwt: { providers: [test-idp], audiences: ["api://orders"] }
    on_allow: { backend_credential: { name: crm, connection: "{jwt.sub}" } }
"""
        if not jwt_available(tmp_path, text):
            pytest.skip("JWT validation is not available in this build; per-user connections need the caller's validated token")
        p = start_portcullis(text)
        alice = idp.authorization_code_consent("web-app", WEB_SECRET, user_redirect, SCOPE, resource="api://orders", login="alice")
        bob = idp.authorization_code_consent("web-app", WEB_SECRET, user_redirect, SCOPE, resource="api://orders", login="bob")

        # Nobody has a connection yet: consent required (403), not an outage.
        assert denied(p.check("/me", {"authorization": f"Bearer {alice['access_token']}"})) == (7, 403, "BackendCredentialConsentRequired")

        # A per-user connection's id is namespaced by issuer and subject; the operator looks it up.
        user = {"issuer": idp.issuer, "subject": "alice"}
        status, looked = admin(http_port, "GET", "/admin/credentials/crm/connections?" + urllib.parse.urlencode(user))
        assert status == 200 and looked["id"].startswith("user:"), looked
        status, started = admin(http_port, "POST", f"/admin/credentials/crm/connections/{looked['id']}/consent", user)
        assert status == 200, started
        with urllib.request.urlopen(drive_consent(idp, started["login_url"], callback, login="alice"), timeout=15) as r:
            assert r.status == 200

        token = injected_token(p.check("/me", {"authorization": f"Bearer {alice['access_token']}"}))
        assert token != alice["access_token"]
        assert verify(idp, token, "api://orders")["sub"] == "alice"
        assert denied(p.check("/me", {"authorization": f"Bearer {bob['access_token']}"})) == (7, 403, "BackendCredentialConsentRequired")
