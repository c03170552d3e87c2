"""nginx `auth_request` in front of the echo backend, asking portcullis's HTTP forward-auth endpoint.
The config is deploy/nginx/nginx.conf itself, with its ports (and nothing else) replaced."""

from __future__ import annotations

import re

import pytest

from harness import DEPLOY_NGINX, Nginx, Portcullis, assert_deny, free_port, key_hash, request
from topology import ALLOWED_CLIENT, KEY_TEAM_A

# nginx is the edge in the example: it sends X-Forwarded-For: $remote_addr, which portcullis reads
# with trusted_hops: 0 (a client's own X-Forwarded-For never reaches portcullis).
CONFIG = f"""
listen: {{grpc: 127.0.0.1:0, http: 127.0.0.1:0}}
telemetry: {{log_format: json}}
client_ip: {{from: x-forwarded-for, trusted_hops: 0}}
subscriptions:
  keys:
    - {{id: team-a, scope: all, primary: "{key_hash(KEY_TEAM_A)}"}}
apis:
  - name: orders
    match: {{path_prefix: /orders}}
    subscription_required: true
    on_allow:
      set_headers: {{x-subscription: "{{subscription.id}}", x-user-id: "{{client_ip}}"}}
  - name: readonly
    match: {{path_prefix: /readonly, methods: [GET, HEAD]}}
  - name: local
    match: {{path_prefix: /local}}
    ip_filter: {{action: allow, addresses: [127.0.0.1]}}
  - name: ip
    match: {{path_prefix: /ip}}
    ip_filter: {{action: allow, addresses: ["{ALLOWED_CLIENT}"]}}
unmatched: deny
"""


def render_nginx_conf(portcullis_http_port: int, backend_port: int, listen_port: int, workdir) -> str:
    text = (DEPLOY_NGINX / "nginx.conf").read_text()
    for old, new in [
        ("127.0.0.1:9192", f"127.0.0.1:{portcullis_http_port}"),
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{backend_port};"),
        ("listen 8000;", f"listen 127.0.0.1:{listen_port};"),
    ]:
        assert old in text, f"deploy/nginx/nginx.conf no longer contains {old!r}"
        text = text.replace(old, new)
    # Logs and temporary files in the test's directory instead of the distribution's paths.
    paths = "\n".join(
        f"    {d}_temp_path {workdir}/{d}_temp;" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # Workers run as an unprivileged user who may not enter the test's directory: never buffer to disk.
    extra = f"    access_log {workdir}/access.log;\n{paths}\n    proxy_max_temp_file_size 0;"
    text, n = re.subn(r"^http \{$", f"http {{\n{extra}", text, count=1, flags=re.M)
    assert n == 1
    return text


@pytest.fixture(scope="module")
def portcullis(tmp_path_factory):
    p = Portcullis(CONFIG, tmp_path_factory.mktemp("nginx-portcullis"))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, portcullis, backend):
    workdir = tmp_path_factory.mktemp("nginx")
    port = free_port()
    n = Nginx(render_nginx_conf(portcullis.http_port, backend.port, port, workdir), port, workdir)
    yield n
    n.stop()


def test_allow_copies_portcullis_headers_upstream_and_strips_the_key(nginx):
    r = request(nginx.url("/orders/42?keep=1"), headers={"ocp-apim-subscription-key": KEY_TEAM_A, "x-subscription": "forged"})
    assert r.status == 200, r
    got = r.echo
    assert got["path"] == "/orders/42?keep=1"
    h = got["headers"]
    assert "ocp-apim-subscription-key" not in h, h
    assert h["x-subscription"] == ["team-a"], h
    assert h["x-user-id"] == ["127.0.0.1"], h
    decision_id = h["x-portcullis-decision-id"]
    assert len(decision_id) == 1 and re.fullmatch(r"[0-9a-f]{32}", decision_id[0]), h
    # ... and the client gets the same decision id.
    assert r.header("x-portcullis-decision-id") == decision_id[0]


def test_the_original_method_reaches_the_policy(nginx):
    assert request(nginx.url("/readonly/x")).status == 200
    assert_deny(request(nginx.url("/readonly/x"), method="POST", body=b"{}"), 403, "NoMatchingApi")


@pytest.mark.parametrize(
    "path,headers,status,reason,challenge",
    [
        ("/nowhere", {}, 403, "NoMatchingApi", None),
        ("/orders/1", {}, 401, "SubscriptionKeyNotFound", "AzureApiManagementKey"),
        ("/orders/1", {"ocp-apim-subscription-key": "not-a-key"}, 401, "SubscriptionKeyInvalid", "AzureApiManagementKey"),
        # nginx overwrites X-Forwarded-For with the TCP peer: a forged one does not help.
        ("/ip/x", {"x-forwarded-for": ALLOWED_CLIENT}, 403, "CallerIpNotAllowed", None),
    ],
    ids=["no-matching-api", "key-missing", "key-wrong", "forged-xff"],
)
def test_deny_reaches_the_client_with_status_and_json_body(nginx, backend, path, headers, status, reason, challenge):
    before = len(backend.received)
    r = request(nginx.url(path), headers=headers)
    assert_deny(r, status, reason, challenge)
    assert len(backend.received) == before
    if challenge:
        assert len(r.headers["www-authenticate"]) == 1, r.headers


def test_a_client_cannot_describe_another_request(nginx):
    # nginx sets X-Forwarded-Uri/-Method/-Host itself; the client's own copies are not passed on.
    spoof = {"x-forwarded-uri": "/readonly/x", "x-forwarded-method": "GET", "x-forwarded-host": "elsewhere"}
    assert_deny(request(nginx.url("/nowhere"), headers=spoof), 403, "NoMatchingApi")
    assert_deny(request(nginx.url("/readonly/x"), method="POST", headers=spoof, body=b"{}"), 403, "NoMatchingApi")


def test_client_address_is_the_tcp_peer(nginx):
    assert request(nginx.url("/local/x")).status == 200


def test_portcullis_down_means_500_never_an_allow(tmp_path, backend):
    # auth_request turns anything but 2xx/401/403 (here: a refused connection) into 500.
    port = free_port()
    n = Nginx(render_nginx_conf(free_port(), backend.port, port, tmp_path), port, tmp_path)
    try:
        before = len(backend.received)
        r = request(n.url("/readonly/x"))
        assert r.status == 500, r
        assert len(backend.received) == before
    finally:
        n.stop()
