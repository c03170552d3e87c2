"""Real HTTP requests through a real Envoy (deploy/envoy/ext-authz-grpc.yaml) that asks the real
portcullis over ext_authz v3 gRPC; the echo backend tells what reached it."""

from __future__ import annotations

import re
import ssl

import pytest

from harness import assert_deny, client_tls_context, request
from topology import ALLOWED_CLIENT, KEY_TEAM_A, OTHER_CLIENT, deny_params, lb

DECISION_ID = re.compile(r"[0-9a-f]{32}")


def via(stack, path, headers=None, listener="http", **kw):
    return request(stack.envoy.url(listener, path), headers=headers, **kw)


# ---------------------------------------------------------------------------------------------------
# allow
# ---------------------------------------------------------------------------------------------------


def test_allowed_request_reaches_the_backend_with_injected_headers_and_without_the_key_header(grpc_stack):
    r = via(grpc_stack, "/orders/42?keep=1", lb(**{
        "ocp-apim-subscription-key": KEY_TEAM_A,
        # A caller cannot pre-set what portcullis sets: append is false, so Envoy overwrites.
        "x-subscription": "forged",
        "x-portcullis-decision-id": "forged",
    }))
    assert r.status == 200, r
    got = r.echo
    assert got["path"] == "/orders/42?keep=1"
    h = got["headers"]
    assert "ocp-apim-subscription-key" not in h, h
    assert h["x-subscription"] == ["team-a"], h
    assert h["x-api"] == ["orders"], h
    assert h["x-client-ip"] == [ALLOWED_CLIENT], h
    assert len(h["x-portcullis-decision-id"]) == 1 and DECISION_ID.fullmatch(h["x-portcullis-decision-id"][0]), h


def test_allowed_request_reaches_the_backend_without_the_key_query_parameter(grpc_stack):
    r = via(grpc_stack, f"/orders/7?a=1&subscription-key={KEY_TEAM_A}&b=2", lb())
    assert r.status == 200, r
    got = r.echo
    assert KEY_TEAM_A not in got["path"], got["path"]
    assert got["path"].startswith("/orders/7?"), got["path"]
    assert sorted(got["path"].split("?", 1)[1].split("&")) == ["a=1", "b=2"], got["path"]
    assert got["headers"]["x-subscription"] == ["team-a"]


def test_each_allow_carries_a_fresh_decision_id_upstream(grpc_stack):
    ids = {via(grpc_stack, "/public/x", lb()).echo["headers"]["x-portcullis-decision-id"][0] for _ in range(3)}
    assert len(ids) == 3


def test_injected_headers_overwrite_every_copy_the_client_sent(grpc_stack):
    r = via(grpc_stack, "/public/x", [("x-forwarded-for", ALLOWED_CLIENT), ("x-api", "forged-1"), ("x-api", "forged-2")])
    assert r.status == 200, r
    assert r.echo["headers"]["x-api"] == ["public"]


# ---------------------------------------------------------------------------------------------------
# deny
# ---------------------------------------------------------------------------------------------------

@deny_params()
def test_deny_reaches_the_client_with_status_body_and_headers(grpc_stack, path, headers, status, reason, challenge):
    before = len(grpc_stack.backend.received)
    r = via(grpc_stack, path, headers)
    assert_deny(r, status, reason, challenge)
    # Envoy replaced its own text/plain local-reply type: exactly one content-type.
    assert r.headers["content-type"] == ["application/json"], r.headers
    assert len(grpc_stack.backend.received) == before, "a denied request reached the backend"


def test_deny_decision_id_is_the_one_in_the_decision_log(grpc_stack):
    r = via(grpc_stack, "/nowhere/logged", lb())
    decision_id = assert_deny(r, 403, "NoMatchingApi")["decisionId"]
    grpc_stack.portcullis.process.wait_for("the decision in the log", lambda: decision_id in grpc_stack.portcullis.output(), timeout=10)


# ---------------------------------------------------------------------------------------------------
# per-route settings
# ---------------------------------------------------------------------------------------------------


def test_route_context_extensions_choose_the_api(grpc_stack):
    # /tenant-a/ sends {api: alpha}: the open API.
    r = via(grpc_stack, "/tenant-a/orders", lb())
    assert r.status == 200, r
    assert r.echo["headers"]["x-api"] == ["alpha"]
    # /tenant-b/ sends {api: beta}: same kind of path, but this API wants a key.
    assert_deny(via(grpc_stack, "/tenant-b/orders", lb()), 401, "SubscriptionKeyNotFound")
    r = via(grpc_stack, "/tenant-b/orders", lb(**{"ocp-apim-subscription-key": KEY_TEAM_A}))
    assert r.status == 200, r
    assert r.echo["headers"]["x-api"] == ["beta"]
    # Without context extensions no API selects /tenant-c/.
    assert_deny(via(grpc_stack, "/tenant-c/orders", lb()), 403, "NoMatchingApi")


def test_method_reaches_the_policy(grpc_stack):
    r = via(grpc_stack, "/readonly/x", lb())
    assert r.status == 200 and r.echo["headers"]["x-api"] == ["readonly"], r
    assert_deny(via(grpc_stack, "/readonly/x", lb(), method="POST", body=b"{}"), 403, "NoMatchingApi")


def test_route_with_ext_authz_disabled_never_asks_portcullis(grpc_stack):
    def checks():
        st = grpc_stack.envoy.stats()
        return st["http.http.ext_authz.ok"] + st["http.http.ext_authz.denied"] + st["http.http.ext_authz.error"]

    before = checks()
    # No API matches /no-authz/ and `unmatched: deny`: only a disabled filter lets this through.
    r = via(grpc_stack, "/no-authz/probe", lb())
    assert r.status == 200, r
    assert "x-portcullis-decision-id" not in r.echo["headers"]
    assert checks() == before


# ---------------------------------------------------------------------------------------------------
# client address through x-forwarded-for
# ---------------------------------------------------------------------------------------------------


def test_client_ip_is_the_address_the_trusted_load_balancer_saw(grpc_stack):
    r = via(grpc_stack, "/ip/x", lb(ALLOWED_CLIENT))
    assert r.status == 200, r
    h = r.echo["headers"]
    assert h["x-client-ip"] == [ALLOWED_CLIENT]
    # Envoy appended one entry for its TCP peer, the load balancer (for a loopback peer Envoy writes
    # its own host address instead), and agrees with portcullis on who the client is.
    entries = [e.strip() for e in h["x-forwarded-for"][0].split(",")]
    assert len(h["x-forwarded-for"]) == 1 and len(entries) == 2 and entries[0] == ALLOWED_CLIENT, h
    assert h.get("x-envoy-external-address") == [ALLOWED_CLIENT], h


def test_client_ip_ignores_what_the_client_wrote_left_of_the_trusted_entry(grpc_stack):
    # The client forged the allowed address; the load balancer appended the address it really saw.
    r = via(grpc_stack, "/ip/x", {"x-forwarded-for": f"{ALLOWED_CLIENT}, {OTHER_CLIENT}"})
    body = assert_deny(r, 403, "CallerIpNotAllowed")
    assert OTHER_CLIENT in body["message"], body


def test_client_ip_without_a_load_balancer_entry_is_the_tcp_peer(grpc_stack):
    # Only Envoy's own entry: nothing left of the trusted hop, so the TCP peer (127.0.0.1) is used.
    # A request that reaches Envoy directly cannot pass as an allowed client.
    body = assert_deny(via(grpc_stack, "/ip/x"), 403, "CallerIpNotAllowed")
    assert "127.0.0.1" in body["message"], body


# ---------------------------------------------------------------------------------------------------
# mTLS: Envoy verifies the client certificate, portcullis decides which may call
# ---------------------------------------------------------------------------------------------------


def tls(stack, client):
    return client_tls_context(stack.pki.server_ca, client)


def test_client_certificate_thumbprint_identity(grpc_stack):
    r = via(grpc_stack, "/mtls/thumbprint/x", lb(), listener="https", ssl_context=tls(grpc_stack, grpc_stack.pki.partner))
    assert r.status == 200, r
    h = r.echo["headers"]
    assert h["x-client-thumbprint"] == [grpc_stack.pki.partner_cert.sha1]
    assert h["x-api"] == ["mtls-thumbprint"]


def test_client_certificate_subject_identity(grpc_stack):
    r = via(grpc_stack, "/mtls/subject/x", lb(), listener="https", ssl_context=tls(grpc_stack, grpc_stack.pki.partner))
    assert r.status == 200, r
    assert r.echo["headers"]["x-api"] == ["mtls-subject"]


def test_client_certificate_chain_trusted_and_issuer_named_by_thumbprint(grpc_stack):
    r = via(grpc_stack, "/mtls/trusted/x", lb(), listener="https", ssl_context=tls(grpc_stack, grpc_stack.pki.partner))
    assert r.status == 200, r
    assert r.echo["headers"]["x-api"] == ["mtls-trusted"]


@pytest.mark.parametrize("path", ["/mtls/thumbprint/x", "/mtls/subject/x", "/mtls/trusted/x"])
def test_client_certificate_of_someone_else_is_refused(grpc_stack, path):
    # Signed by the trusted CA, so the TLS handshake succeeds; portcullis refuses the identity.
    r = via(grpc_stack, path, lb(), listener="https", ssl_context=tls(grpc_stack, grpc_stack.pki.intruder))
    assert_deny(r, 403, "ClientCertificateIdentityNotMatched")


@pytest.mark.parametrize("client", ["foreign", None], ids=["untrusted-ca", "no-certificate"])
def test_tls_listener_refuses_unverified_clients_before_asking(grpc_stack, client):
    pki = grpc_stack.pki
    ctx = tls(grpc_stack, getattr(pki, client) if client else None)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        via(grpc_stack, "/mtls/thumbprint/x", lb(), listener="https", ssl_context=ctx)


def test_mtls_with_subscription_key_from_raw_header_map(grpc_stack):
    # The https listener sends headers as http.header_map (encode_raw_headers: true).
    ctx = tls(grpc_stack, grpc_stack.pki.partner)
    assert_deny(via(grpc_stack, "/mtls/orders/1", lb(), listener="https", ssl_context=ctx), 401, "SubscriptionKeyNotFound")
    r = via(grpc_stack, "/mtls/orders/1", lb(**{"ocp-apim-subscription-key": KEY_TEAM_A}), listener="https", ssl_context=ctx)
    assert r.status == 200, r
    h = r.echo["headers"]
    assert h["x-subscription"] == ["team-a"]
    assert "ocp-apim-subscription-key" not in h


# ---------------------------------------------------------------------------------------------------
# Envoy's view
# ---------------------------------------------------------------------------------------------------


def test_envoy_found_nothing_to_complain_about(grpc_stack):
    via(grpc_stack, "/public/x", lb())
    via(grpc_stack, "/mtls/thumbprint/x", lb(), listener="https", ssl_context=tls(grpc_stack, grpc_stack.pki.partner))
    stats = grpc_stack.envoy.stats()
    assert stats["runtime.deprecated_feature_use"] == 0
    for listener in ("http", "https"):
        prefix = f"http.{listener}.ext_authz."
        assert stats[prefix + "ok"] > 0
        # invalid: a response Envoy could not apply (e.g. a bad header mutation or append action);
        # omitted_response_headers: headers Envoy dropped; error: failed checks (timeouts, resets).
        for counter in ("invalid", "omitted_response_headers", "error", "failure_mode_allowed"):
            assert stats[prefix + counter] == 0, (prefix + counter, stats[prefix + counter])


def test_the_envoy_under_test_is_1_40():
    import subprocess

    from harness import envoy_bin

    out = subprocess.run([envoy_bin(), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"/1\.40\.\d+/", out), out
