"""portcullis's facts as ext_authz dynamic metadata, used by the rest of a real Envoy: its access log
(the deploy bootstrap's stdout log line), its RBAC filter (a client refused by Envoy on portcullis's
`client_id`) and its router (a request header written from the metadata). Tokens come from the real
OpenID Provider (tests/idp)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from harness import DEPLOY_ENVOY, ROOT, Envoy, Portcullis, assert_deny, missing, request
from topology import ALLOWED_CLIENT, grpc_envoy_params, jwt_orders_config

sys.path.insert(0, str(ROOT / "tests" / "idp"))
from idp import decode_jwt, start_idp  # noqa: E402

LB = {"x-forwarded-for": ALLOWED_CLIENT}

IDP_CONFIG = {
    "access_token_ttl": 300,
    "resources": [{"resource": "api://orders", "scopes": ["orders:read"]}],
    "clients": [
        {"client_id": "caller", "client_secret": "caller-secret", "grant_types": ["client_credentials"],
         "extra_claims": {"tenant": "contoso"}},
        {"client_id": "suspended-client", "client_secret": "suspended-secret", "grant_types": ["client_credentials"]},
    ],
}

# Added to the deploy bootstrap for this suite only: RBAC on portcullis's metadata, after ext_authz
# (the metadata exists once ext_authz answered), and a header the router writes from it.
RBAC_FILTER = """\
                  - name: envoy.filters.http.rbac
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
                      rules:
                        action: DENY
                        policies:
                          suspended-clients:
                            permissions: [{any: true}]
                            principals:
                              - metadata:
                                  filter: envoy.filters.http.ext_authz
                                  path: [{key: client_id}]
                                  value: {string_match: {exact: suspended-client}}
"""
ROUTER = "                  - name: envoy.filters.http.router\n"
VHOST = '                      domains: ["*"]\n'
HEADER_FROM_METADATA = """\
                      request_headers_to_add:
                        - header: {key: x-envoy-saw-tenant, value: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:tenant)%"}
                          append_action: OVERWRITE_IF_EXISTS_OR_ADD
"""


def portcullis_config(issuer: str) -> str:
    return jwt_orders_config(issuer, '{metadata: {tenant: "{jwt.tenant}"}}')


def bootstrap_template(workdir: Path) -> Path:
    """The deploy bootstrap with the RBAC filter before the http listener's router and the header on
    the shared routes (the text must be where this suite expects it: asserted)."""
    text = (DEPLOY_ENVOY / "ext-authz-grpc.yaml").read_text()
    assert text.count(VHOST) == 1 and ROUTER in text, "deploy/envoy/ext-authz-grpc.yaml changed shape"
    text = text.replace(VHOST, VHOST + HEADER_FROM_METADATA, 1)
    text = text.replace(ROUTER, RBAC_FILTER + ROUTER, 1)
    path = workdir / "ext-authz-grpc-rbac.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, backend, pki):
    if not (ROOT / "tests" / "idp" / "node_modules" / "oidc-provider").is_dir():
        missing("the test OpenID Provider is not installed: npm ci --prefix tests/idp")
    workdir = tmp_path_factory.mktemp("metadata")
    started = []
    try:
        idp = start_idp(IDP_CONFIG)
        started.append(idp)
        portcullis = Portcullis(portcullis_config(idp.issuer), workdir)
        started.append(portcullis)
        envoy = Envoy(str(bootstrap_template(workdir)), grpc_envoy_params(portcullis, backend, pki), workdir)
        started.append(envoy)
        envoy.wait_healthy("portcullis")
        yield idp, envoy
    finally:
        for s in reversed(started):
            s.close() if hasattr(s, "close") else s.stop()


def token(idp, client: str, secret: str) -> str:
    return idp.client_credentials(client, secret, resource="api://orders", scope="orders:read")["access_token"]


def access_log_line(envoy: Envoy, decision_id: str) -> str:
    """The access log line of the request with this decision id (Envoy flushes it shortly after)."""
    deadline = time.monotonic() + 15
    while True:
        lines = [l for l in envoy.output().splitlines() if f"decision={decision_id}" in l]
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        assert time.monotonic() < deadline, f"no access log line for {decision_id}:\n{envoy.output()[-3000:]}"
        time.sleep(0.1)


def test_access_log_router_and_rbac_read_the_facts_of_an_allow(stack):
    idp, envoy = stack
    t = token(idp, "caller", "caller-secret")
    subject = decode_jwt(t)[1]["sub"]
    r = request(envoy.url("http", "/orders/1"), headers={**LB, "authorization": f"Bearer {t}"})
    assert r.status == 200, r
    h = r.echo["headers"]
    # The router wrote a header from portcullis's `on_allow.metadata` entry.
    assert h["x-envoy-saw-tenant"] == ["contoso"], h
    decision_id = h["x-portcullis-decision-id"][0]
    line = access_log_line(envoy, decision_id)
    assert f" GET 200 api=orders subject={subject} client=caller reason=- decision={decision_id}" in line, line


def test_rbac_refuses_a_client_on_portcullis_metadata(stack):
    idp, envoy = stack
    t = token(idp, "suspended-client", "suspended-secret")
    before = len(envoy.output())
    r = request(envoy.url("http", "/orders/1"), headers={**LB, "authorization": f"Bearer {t}"})
    # portcullis allowed; Envoy's RBAC filter refused on the `client_id` portcullis reported.
    assert r.status == 403, r
    assert r.header("x-echo") is None, "the request must not reach the backend"
    assert b"RBAC" in r.body, r
    deadline = time.monotonic() + 15
    while "client=suspended-client" not in envoy.output()[before:]:
        assert time.monotonic() < deadline, envoy.output()[-3000:]
        time.sleep(0.1)
    line = next(l for l in envoy.output()[before:].splitlines() if "client=suspended-client" in l)
    assert re.search(r" GET 403 api=orders subject=\S+ client=suspended-client reason=- decision=[0-9a-f]{32}", line), line


def test_a_deny_reports_its_reason_in_the_access_log(stack):
    _, envoy = stack
    r = request(envoy.url("http", "/orders/1"), headers=LB)
    assert_deny(r, 401, "TokenNotPresent", 'Bearer realm="orders"')
    decision_id = r.header("x-portcullis-decision-id")
    line = access_log_line(envoy, decision_id)
    assert f" GET 401 api=orders subject=- client=- reason=TokenNotPresent decision={decision_id}" in line, line
