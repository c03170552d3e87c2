"""The same decisions over HTTP forward-auth: a real Envoy with ext_authz `http_service`
(deploy/envoy/ext-authz-http.yaml) asking portcullis's `/authz/` endpoint."""

from __future__ import annotations

import re

from harness import assert_deny, request
from topology import ALLOWED_CLIENT, KEY_TEAM_A, deny_params, http_envoy_params, lb

DECISION_ID = re.compile(r"[0-9a-f]{32}")


def test_allow_sets_headers_upstream_and_strips_the_key_header(http_service_envoy):
    r = request(http_service_envoy.url("http", "/orders/42?keep=1"), headers=lb(**{
        "ocp-apim-subscription-key": KEY_TEAM_A,
        "x-subscription": "forged",
    }))
    assert r.status == 200, r
    got = r.echo
    assert got["path"] == "/orders/42?keep=1"
    h = got["headers"]
    # x-envoy-auth-headers-to-remove: ocp-apim-subscription-key
    assert "ocp-apim-subscription-key" not in h, h
    assert "x-envoy-auth-headers-to-remove" not in h, h
    assert h["x-subscription"] == ["team-a"], h
    assert h["x-api"] == ["orders"], h
    assert h["x-client-ip"] == [ALLOWED_CLIENT], h
    assert len(h["x-portcullis-decision-id"]) == 1 and DECISION_ID.fullmatch(h["x-portcullis-decision-id"][0]), h


def test_allow_with_the_key_in_the_query(http_service_envoy):
    # Decided the same way; but http_service cannot remove query parameters (see the bootstrap).
    r = request(http_service_envoy.url("http", f"/orders/7?subscription-key={KEY_TEAM_A}"), headers=lb())
    assert r.status == 200, r
    assert r.echo["headers"]["x-subscription"] == ["team-a"]


def test_the_original_method_reaches_the_policy(http_service_envoy):
    r = request(http_service_envoy.url("http", "/readonly/x"), headers=lb())
    assert r.status == 200 and r.echo["headers"]["x-api"] == ["readonly"], r
    assert_deny(request(http_service_envoy.url("http", "/readonly/x"), method="POST", headers=lb(), body=b"{}"), 403, "NoMatchingApi")


@deny_params()
def test_deny_reaches_the_client_with_status_body_and_headers(http_service_envoy, backend, path, headers, status, reason, challenge):
    before = len(backend.received)
    r = request(http_service_envoy.url("http", path), headers=headers)
    assert_deny(r, status, reason, challenge)
    assert len(backend.received) == before


def test_disabled_route_does_not_ask(http_service_envoy):
    r = request(http_service_envoy.url("http", "/no-authz/x"), headers=lb())
    assert r.status == 200, r
    assert "x-portcullis-decision-id" not in r.echo["headers"]


def test_portcullis_down_means_503(stacks, backend):
    portcullis = stacks.portcullis("listen: {grpc: 127.0.0.1:0, http: 127.0.0.1:0}\napis: [{name: public, match: {path_prefix: /public}}]\n")
    envoy = stacks.envoy(portcullis, "ext-authz-http.yaml", http_envoy_params(portcullis, backend))
    envoy.wait_healthy("portcullis_http")
    assert request(envoy.url("http", "/public/x"), headers=lb()).status == 200
    portcullis.stop()
    before = len(backend.received)
    r = request(envoy.url("http", "/public/x"), headers=lb())
    assert r.status == 503, r
    assert len(backend.received) == before


def test_a_client_cannot_describe_another_request(http_service_envoy):
    # portcullis reads X-Forwarded-Uri/-Host/-Method when a forward-auth proxy sets them; Envoy's
    # http_service passes only allowed_headers, so a client's own copies never reach portcullis.
    spoof = lb(**{"x-forwarded-uri": "/public/x", "x-forwarded-method": "GET", "x-forwarded-host": "elsewhere"})
    assert_deny(request(http_service_envoy.url("http", "/orders/1"), headers=spoof), 401, "SubscriptionKeyNotFound")
