"""The two deployments decide alike: real Envoy 1.40 asking portcullis over ext_authz
(deploy/envoy/ext-authz-grpc.yaml) and real Envoy 1.40 deciding in-process with the dynamic module
(deploy/envoy/dynamic-module.yaml, crates/portcullis-envoy), both on the same policy file, in front
of the same echo backend. Every case goes through both; status, reason, response headers and body
(or what reached the backend) must be identical, decision ids aside (fresh per decision, but
checked to be present and consistent). Then the module's own behaviour: deferred decisions while
keys are fetched, the deadline that fails closed, hot reload, counters and the decision log.
"""

from __future__ import annotations

import base64
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import Envoy, Portcullis, client_tls_context, envoy_module_dir, key_hash, request
from topology import (ALLOWED_CLIENT, BLOCKED_CLIENT, KEY_PAUSED, KEY_TEAM_A, OTHER_CLIENT, grpc_envoy_params,
                      shared_apis, shared_subscriptions)

DECISION_ID = re.compile(r"[0-9a-f]{32}")
ISSUER = "https://issuer.e2e.test"
AUDIENCE = "api://orders"

# ---------------------------------------------------------------------------------------------------
# a signing key and its JWKS endpoint
# ---------------------------------------------------------------------------------------------------


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    """An RS256 key pair; `token(...)` signs a JWT, `jwks` is its public key set."""

    def __init__(self, kid: str = "e2e-1"):
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = self.key.public_key().public_numbers()
        self.jwks = {"keys": [{
            "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
            "n": b64u(pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")),
            "e": b64u(pub.e.to_bytes((pub.e.bit_length() + 7) // 8, "big")),
        }]}

    def token(self, **overrides) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "orders:read", "iat": now, "nbf": now - 5, "exp": now + 600}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{b64u(json.dumps(header).encode())}.{b64u(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64u(sig)}"


class JwksServer:
    """Serves a JWKS at /jwks.json, each answer held for `delay` seconds (to make fetches slow)."""

    def __init__(self, jwks: dict, delay: float = 0.0):
        outer = self
        self.delay = delay
        self.fetches = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.fetches += 1
                time.sleep(outer.delay)
                body = json.dumps(jwks).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------------
# the policy both modes run
# ---------------------------------------------------------------------------------------------------


def policy(jwks_url: str, extra_apis: str = "", pki=None) -> str:
    # Client certificates: ext_authz reads Envoy's peer certificate, the module the XFCC element
    # Envoy sets itself (deploy/envoy/dynamic-module.yaml); the header never goes upstream.
    mtls = "" if pki is None else f"""
  - name: mtls
    match: {{path_prefix: /mtls}}
    client_certificate:
      trust_forwarded_client_cert: true
      identities:
        - thumbprint: "{pki.partner_cert.sha1}"
    on_allow:
      set_headers: {{x-client-thumbprint: "{{cert.thumbprint}}", x-api: "{{api}}"}}
      remove_headers: [x-forwarded-client-cert]"""
    return f"""
listen: {{grpc: 127.0.0.1:0}}
telemetry: {{log_format: json, decision_log: true}}
client_ip: {{from: x-forwarded-for, trusted_hops: 1}}
identity_providers:
  - name: local
    issuer: {ISSUER}
    jwks_uri: {jwks_url}
    algorithms: [RS256]
{shared_subscriptions()}apis:{extra_apis}{mtls}
{shared_apis()}  - name: jwt
    match: {{path_prefix: /jwt}}
    jwt:
      providers: [local]
      audiences: ["{AUDIENCE}"]
      scopes: {{any: [orders:read]}}
    on_allow:
      set_headers: {{x-user-id: "{{jwt.sub}}", x-api: "{{api}}"}}
      remove_headers: [authorization]
  - name: shadow
    match: {{path_prefix: /shadow}}
    mode: shadow
    subscription_required: true
    on_allow:
      set_headers: {{x-subscription: "{{subscription.id}}", x-api: "{{api}}"}}
unmatched: deny
"""


def module_params(backend, pki, config: str) -> dict:
    """Placeholders of deploy/envoy/dynamic-module.yaml; `config` is the filter_config value."""
    return {"ENVOY_ADMIN_PORT": 0, "ENVOY_HTTP_PORT": 0, "ENVOY_HTTPS_PORT": 0, "BACKEND_PORT": backend.port,
            "PORTCULLIS_CONFIG": config, "TLS_CERT_FILE": pki.server[0], "TLS_KEY_FILE": pki.server[1],
            "CLIENT_CA_FILE": pki.client_ca}


def module_envoy(workdir, backend, pki, config: str, name: str = "envoy-module") -> Envoy:
    return Envoy("dynamic-module.yaml", module_params(backend, pki, config), workdir, name,
                 env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": envoy_module_dir()},
                 extra_args=["--component-log-level", "dynamic_modules:info"])


class Pair:
    def __init__(self, ext_authz: Envoy, module: Envoy, signer: Signer, pki):
        self.ext_authz = ext_authz
        self.module = module
        self.signer = signer
        self.pki = pki


@pytest.fixture(scope="module")
def pair(tmp_path_factory, backend, pki):
    workdir = tmp_path_factory.mktemp("module-pair")
    signer = Signer()
    jwks = JwksServer(signer.jwks)
    text = policy(jwks.url, pki=pki)
    started = []
    try:
        portcullis = Portcullis(text, workdir)
        started.append(portcullis)
        ext_authz = Envoy("ext-authz-grpc.yaml", grpc_envoy_params(portcullis, backend, pki), workdir, "envoy-ext-authz")
        started.append(ext_authz)
        ext_authz.wait_healthy("portcullis")
        module_config = workdir / "module.yaml"
        module_config.write_text(text)
        module = module_envoy(workdir, backend, pki, str(module_config))
        started.append(module)
        yield Pair(ext_authz, module, signer, pki)
    finally:
        for p in reversed(started):
            p.stop()
        jwks.stop()


# ---------------------------------------------------------------------------------------------------
# what a client and the backend observe
# ---------------------------------------------------------------------------------------------------

# Differ by nature between two requests: Envoy's request id, timing and date, and the Host (each
# Envoy listens on its own port).
VOLATILE = {"x-request-id", "date", "x-envoy-upstream-service-time", "x-envoy-expected-rq-timeout-ms", "host"}


def observe(r) -> dict:
    """Status, response headers and body, and (for a request that reached the backend) the method,
    path and headers it arrived with; decision ids checked, then replaced by a placeholder."""
    headers = {k: v for k, v in r.headers.items() if k not in VOLATILE}
    out: dict = {"status": r.status}
    ids = headers.pop("x-portcullis-decision-id", None)
    if ids is not None:
        assert len(ids) == 1 and DECISION_ID.fullmatch(ids[0]), r
        headers["x-portcullis-decision-id"] = ["<id>"]
    if r.header("x-echo") == "1":
        echo = r.json()
        up = {k: v for k, v in echo["headers"].items() if k not in VOLATILE}
        up_ids = up.pop("x-portcullis-decision-id", None)
        if up_ids is not None:
            assert len(up_ids) == 1 and DECISION_ID.fullmatch(up_ids[0]), echo
            up["x-portcullis-decision-id"] = ["<id>"]
        headers.pop("content-length", None)  # the echo holds the decision id: same length, but be safe
        out["response_headers"] = headers
        out["upstream"] = {"method": echo["method"], "path": echo["path"], "headers": up, "body": echo["body"]}
        return out
    body: object = r.body.decode(errors="replace")
    if (r.header("content-type") or "").startswith("application/json") and r.body:
        body = r.json()
        if isinstance(body, dict) and "decisionId" in body:
            assert ids and body["decisionId"] == ids[0], (body, ids)
            body["decisionId"] = "<id>"
    out["response_headers"] = headers
    out["body"] = body
    return out


def send(envoy: Envoy, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None = None,
         listener: str = "http", ssl_context=None) -> dict:
    return observe(request(envoy.url(listener, path), method=method, headers=headers, body=body, ssl_context=ssl_context))


def both(pair: Pair, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None = None,
         listener: str = "http", ssl_context=None) -> dict:
    """Sends the request through both modes; asserts they are observed alike and returns that."""
    via_ext_authz = send(pair.ext_authz, method, path, headers, body, listener, ssl_context)
    via_module = send(pair.module, method, path, headers, body, listener, ssl_context)
    assert via_module == via_ext_authz, f"{method} {path} {headers}:\n ext_authz: {via_ext_authz}\n module:    {via_module}"
    return via_module


def lb(client: str = ALLOWED_CLIENT, *more: tuple[str, str]) -> list[tuple[str, str]]:
    return [("x-forwarded-for", client), *more]


# ---------------------------------------------------------------------------------------------------
# the decision cases, through both modes
# ---------------------------------------------------------------------------------------------------

KEY = ("ocp-apim-subscription-key", KEY_TEAM_A)

CASES = [
    # id, method, path, headers, expected status, expected reason (None: allowed)
    ("allow-key-and-templates", "GET", "/orders/42?keep=1", lb(ALLOWED_CLIENT, KEY, ("x-subscription", "forged"), ("x-portcullis-decision-id", "forged")), 200, None),
    ("allow-key-in-query-removed", "GET", f"/orders/7?a=1&subscription-key={KEY_TEAM_A}&b=2", lb(), 200, None),
    ("allow-overwrites-forged-copies", "GET", "/public/x", lb(ALLOWED_CLIENT, ("x-api", "forged-1"), ("x-api", "forged-2")), 200, None),
    # portcullis refuses a CheckRequest whose header list repeats a name or spells one in upper case
    # (tests/adversarial/request_line.rs); through Envoy neither reaches it: Envoy lower-cases names
    # and joins a repeated header, and the module does the same.
    ("allow-key-header-name-in-mixed-case", "GET", "/orders/1", lb(ALLOWED_CLIENT, ("Ocp-Apim-Subscription-Key", KEY_TEAM_A)), 200, None),
    ("deny-key-header-sent-twice-is-one-joined-value", "GET", "/orders/1", lb(ALLOWED_CLIENT, KEY, KEY), 401, "SubscriptionKeyInvalid"),
    ("allow-method", "GET", "/readonly/x", lb(), 200, None),
    ("deny-method", "DELETE", "/readonly/x", lb(), 403, "NoMatchingApi"),
    ("deny-no-api", "GET", "/nowhere", lb(), 403, "NoMatchingApi"),
    ("deny-key-missing", "GET", "/orders/1", lb(), 401, "SubscriptionKeyNotFound"),
    ("deny-key-wrong", "GET", "/orders/1", lb(ALLOWED_CLIENT, ("ocp-apim-subscription-key", "not-a-key")), 401, "SubscriptionKeyInvalid"),
    ("deny-key-suspended", "GET", "/orders/1", lb(ALLOWED_CLIENT, ("ocp-apim-subscription-key", KEY_PAUSED)), 401, "SubscriptionKeyInvalid"),
    ("deny-key-wrong-in-query", "GET", "/orders/1?subscription-key=nope", lb(), 401, "SubscriptionKeyInvalid"),
    ("allow-ip", "GET", "/ip/x", lb(), 200, None),
    ("deny-ip-not-allowed", "GET", "/ip/x", lb(OTHER_CLIENT), 403, "CallerIpNotAllowed"),
    ("deny-ip-blocked", "GET", "/blocked/x", lb(BLOCKED_CLIENT), 403, "CallerIpBlocked"),
    ("allow-route-context-alpha", "GET", "/tenant-a/orders", lb(), 200, None),
    ("deny-route-context-beta-no-key", "GET", "/tenant-b/orders", lb(), 401, "SubscriptionKeyNotFound"),
    ("allow-route-context-beta-key", "GET", "/tenant-b/orders", lb(ALLOWED_CLIENT, KEY), 200, None),
    ("deny-route-without-context", "GET", "/tenant-c/orders", lb(), 403, "NoMatchingApi"),
    ("allow-route-disabled", "GET", "/no-authz/probe", lb(), 200, None),
    ("deny-jwt-missing", "GET", "/jwt/me", lb(), 401, "TokenNotPresent"),
    ("deny-jwt-garbage", "GET", "/jwt/me", lb(ALLOWED_CLIENT, ("authorization", "Bearer not.a.jwt")), 401, None),
    ("shadow-deny-waived-and-headers-stripped", "GET", "/shadow/x", lb(ALLOWED_CLIENT, ("x-subscription", "forged"), ("x-api", "forged")), 200, None),
    ("shadow-allow", "GET", "/shadow/x", lb(ALLOWED_CLIENT, KEY), 200, None),
    ("deny-forged-xfcc-dropped-by-envoy", "GET", "/mtls/x", lb(ALLOWED_CLIENT, ("x-forwarded-client-cert", 'Hash=00;Cert="forged"')), 401, "ClientCertificateMissing"),
    ("post-with-body", "POST", "/public/upload", lb(ALLOWED_CLIENT, ("content-type", "application/json")), 200, None),
]


@pytest.mark.parametrize("method,path,headers,status,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_both_modes_decide_alike(pair, method, path, headers, status, reason):
    body = b'{"order": 1}' if method == "POST" else None
    seen = both(pair, method, path, headers, body)
    assert seen["status"] == status, seen
    if reason is not None:
        assert seen["body"]["reason"] == reason, seen
    if status == 200 and path.startswith("/no-authz/"):
        assert "x-portcullis-decision-id" not in seen["upstream"]["headers"], seen
    elif status == 200:
        assert seen["upstream"]["headers"]["x-portcullis-decision-id"] == ["<id>"], seen


def jwt_cases(signer: Signer) -> list[tuple[str, str, int, str | None]]:
    now = int(time.time())
    return [
        ("valid", signer.token(), 200, None),
        ("expired", signer.token(exp=now - 3600, iat=now - 7200, nbf=now - 7200), 401, None),
        ("wrong-audience", signer.token(aud="api://other"), 401, None),
        ("wrong-issuer", signer.token(iss="https://elsewhere.test"), 401, None),
        ("missing-scope", signer.token(scope="orders:write"), 403, None),
        ("foreign-key", Signer("e2e-1").token(), 401, None),
    ]


def test_jwt_cases_and_claim_headers_are_alike(pair):
    for name, token, status, _ in jwt_cases(pair.signer):
        seen = both(pair, "GET", "/jwt/me", lb(ALLOWED_CLIENT, ("authorization", f"Bearer {token}")))
        assert seen["status"] == status, (name, seen)
        if status == 200:
            up = seen["upstream"]["headers"]
            assert up["x-user-id"] == ["alice"], (name, up)
            assert "authorization" not in up, (name, up)


@pytest.mark.parametrize("client,status,reason", [
    ("partner", 200, None),
    ("intruder", 403, "ClientCertificateIdentityNotMatched"),
])
def test_client_certificates_decide_alike_over_mtls(pair, client, status, reason):
    ctx = client_tls_context(pair.pki.server_ca, getattr(pair.pki, client))
    for path in ("/mtls/x", "/mtls/y?z=1"):
        seen = both(pair, "GET", path, lb(), listener="https", ssl_context=ctx)
        assert seen["status"] == status, seen
        if reason:
            assert seen["body"]["reason"] == reason, seen
        else:
            up = seen["upstream"]["headers"]
            assert up["x-client-thumbprint"] == [pair.pki.partner_cert.sha1], up
            assert "x-forwarded-client-cert" not in up, up


def test_a_generated_corpus_is_decided_alike_request_by_request(pair):
    rng = random.Random(17)
    paths = ["/orders/1", "/orders/2?x=1", "/public/a", "/readonly/r", "/ip/i", "/blocked/b", "/tenant-a/t", "/tenant-b/t",
             "/tenant-c/t", "/jwt/j", "/shadow/s", "/nowhere", "/no-authz/n", "/public/../orders/3", "/public//x"]
    clients = [ALLOWED_CLIENT, OTHER_CLIENT, BLOCKED_CLIENT, None]
    keys = [None, KEY_TEAM_A, KEY_PAUSED, "wrong-key"]
    tokens = [None, pair.signer.token(), pair.signer.token(aud="api://other"), "garbage"]
    for i in range(80):
        method = rng.choice(["GET", "GET", "POST", "DELETE", "PUT"])
        path = rng.choice(paths)
        headers: list[tuple[str, str]] = []
        client = rng.choice(clients)
        if client:
            headers.append(("x-forwarded-for", client))
        key = rng.choice(keys)
        if key and rng.random() < 0.5:
            headers.append(("ocp-apim-subscription-key", key))
        elif key:
            path += ("&" if "?" in path else "?") + f"subscription-key={key}"
        token = rng.choice(tokens)
        if token:
            headers.append(("authorization", f"Bearer {token}"))
        if rng.random() < 0.3:
            headers.append(("x-api", "forged"))
        body = b"{}" if method in ("POST", "PUT") else None
        both(pair, method, path, headers, body)


# ---------------------------------------------------------------------------------------------------
# the module on its own
# ---------------------------------------------------------------------------------------------------


def test_counters_and_decision_log_reach_envoy(pair):
    before = pair.module.stats()
    r = request(pair.module.url("http", "/nowhere/logged"), headers=lb())
    assert r.status == 403
    decision_id = r.json()["decisionId"]
    request(pair.module.url("http", "/public/counted"), headers=lb())
    after = pair.module.stats()
    assert after["dynamicmodulescustom.portcullis_deny"] == before["dynamicmodulescustom.portcullis_deny"] + 1
    assert after["dynamicmodulescustom.portcullis_allow"] == before["dynamicmodulescustom.portcullis_allow"] + 1
    pair.module.process.wait_for("the decision in Envoy's log", lambda: decision_id in pair.module.output(), timeout=10)
    line = next(l for l in pair.module.output().splitlines() if decision_id in l)
    assert 'reason="NoMatchingApi"' in line and 'outcome="deny"' in line, line
    # The http and https listeners' filter configs share one policy, runtime and set of caches.
    assert pair.module.output().count("portcullis module: configuration loaded") == 1, pair.module.output()[-3000:]


def access_log_line(envoy: Envoy, decision_id: str) -> str:
    """The access log line (deploy/envoy bootstraps) of one decision, without its time stamp."""
    def find():
        return next((l for l in envoy.output().splitlines() if f"decision={decision_id}" in l), None)
    line = envoy.process.wait_for("the access log line", find, timeout=10)
    return line.split("] ", 1)[1].replace(decision_id, "<id>")


@pytest.mark.parametrize("path,headers", [
    ("/orders/1", lb()),
    ("/jwt/me", lb()),
    ("/nowhere", lb()),
], ids=["key-missing", "token-missing", "no-api"])
def test_the_access_log_reads_the_same_dynamic_metadata_in_both_modes(pair, path, headers):
    lines = []
    for envoy in (pair.ext_authz, pair.module):
        r = request(envoy.url("http", path), headers=headers)
        lines.append(access_log_line(envoy, r.json()["decisionId"]))
    assert lines[0] == lines[1], lines
    assert "reason=-" not in lines[0], lines


def test_an_allows_facts_reach_the_access_log_in_both_modes(pair):
    lines = []
    for envoy in (pair.ext_authz, pair.module):
        r = request(envoy.url("http", "/jwt/me"), headers=lb(ALLOWED_CLIENT, ("authorization", f"Bearer {pair.signer.token()}")))
        assert r.status == 200, r
        lines.append(access_log_line(envoy, r.echo["headers"]["x-portcullis-decision-id"][0]))
    assert lines[0] == lines[1], lines
    assert "api=jwt subject=alice" in lines[1], lines


@pytest.fixture
def slow_keys(tmp_path, backend, pki):
    """A module Envoy whose identity provider answers key fetches only after 2 s; the JWKS server
    and Envoy are stopped at the end."""
    started = []

    def start(delay: float, filter_config=None):
        signer = Signer()
        jwks = JwksServer(signer.jwks, delay=delay)
        started.append(jwks)
        config = tmp_path / "slow.yaml"
        config.write_text(policy(jwks.url))
        value = filter_config(config) if filter_config else str(config)
        envoy = module_envoy(tmp_path, backend, pki, value, "envoy-slow")
        started.append(envoy)
        return envoy, signer, jwks

    yield start
    for s in reversed(started):
        s.stop()


def test_a_decision_that_needs_a_key_fetch_parks_the_request_and_resumes_it(slow_keys):
    envoy, signer, jwks = slow_keys(2.0)
    started = time.monotonic()
    r = request(envoy.url("http", "/jwt/me"), headers=lb(ALLOWED_CLIENT, ("authorization", f"Bearer {signer.token()}")))
    assert r.status == 200, r
    assert r.echo["headers"]["x-user-id"] == ["alice"]
    assert envoy.stats()["dynamicmodulescustom.portcullis_deferred"] >= 1
    assert jwks.fetches >= 1
    # Keys cached now: decided on the worker, at once.
    began = time.monotonic()
    r = request(envoy.url("http", "/jwt/me"), headers=lb(ALLOWED_CLIENT, ("authorization", f"Bearer {signer.token(sub='bob')}")))
    assert r.status == 200 and r.echo["headers"]["x-user-id"] == ["bob"], r
    assert time.monotonic() - began < 1.0, "a cached decision waited"
    assert began - started >= 0  # ordering only


def test_a_fetch_that_outlives_the_deadline_fails_closed(slow_keys):
    envoy, signer, _ = slow_keys(4.0, lambda p: "'" + json.dumps({"config_file": str(p), "decision_timeout_ms": 500}) + "'")
    r = request(envoy.url("http", "/jwt/me"), headers=lb(ALLOWED_CLIENT, ("authorization", f"Bearer {signer.token()}")))
    assert r.status == 500, r
    assert r.header("x-echo") is None
    body = r.json()
    assert body["reason"] == "Internal" and body["decisionId"] == r.header("x-portcullis-decision-id"), body
    assert envoy.stats()["dynamicmodulescustom.portcullis_failed_closed"] >= 1
    # Envoy keeps serving other requests meanwhile.
    assert request(envoy.url("http", "/public/x"), headers=lb()).status == 200


def test_a_broken_reload_keeps_the_last_good_policy_and_a_good_one_applies(tmp_path, backend, pki):
    signer = Signer()
    jwks = JwksServer(signer.jwks)
    config = tmp_path / "reload.yaml"
    config.write_text(policy(jwks.url))
    envoy = module_envoy(tmp_path, backend, pki, str(config), "envoy-reload")
    try:
        assert request(envoy.url("http", "/public/x"), headers=lb()).status == 200
        # Broken: an unknown field. Written atomically, as editors and ConfigMaps do.
        tmp = tmp_path / ".reload.yaml.tmp"
        tmp.write_text(policy(jwks.url).replace("mode: shadow", "mode: shadow\n    bogus: 1"))
        tmp.replace(config)
        envoy.process.wait_for("the rejected reload", lambda: "configuration rejected" in envoy.output(), timeout=20)
        assert request(envoy.url("http", "/public/x"), headers=lb()).status == 200
        # Good: a new API in front.
        extra = "\n  - name: public-closed\n    match: {path_prefix: /public/closed}\n    ip_filter: {action: allow, addresses: [192.0.2.1]}"
        tmp.write_text(policy(jwks.url, extra))
        tmp.replace(config)
        envoy.process.wait_for("the new policy", lambda: request(envoy.url("http", "/public/closed"), headers=lb()).status == 403, timeout=20)
        assert request(envoy.url("http", "/public/x"), headers=lb()).status == 200
    finally:
        envoy.stop()
        jwks.stop()


def test_the_keys_file_is_watched_and_reloaded_alone_inside_envoy(tmp_path, backend, pki):
    """`subscriptions.keys_file` in the module: a change of the keys file alone (the config file
    unchanged) puts its keys in service, a broken one keeps the last good keys, as in the service."""
    signer = Signer()
    jwks = JwksServer(signer.jwks)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    keys = keys_dir / "keys.txt"

    def write_keys(text: str) -> None:
        tmp = keys_dir / ".keys.txt.tmp"
        tmp.write_text(text)
        tmp.replace(keys)

    write_keys(f"filed active all {key_hash('filed-key-1')} -\n")
    config = tmp_path / "keys-file.yaml"
    config.write_text(policy(jwks.url).replace("subscriptions:\n  keys:", f"subscriptions:\n  keys_file: {keys}\n  keys:", 1))
    envoy = module_envoy(tmp_path, backend, pki, str(config), "envoy-keys-file")

    def status(key: str) -> int:
        return request(envoy.url("http", "/orders/1"), headers=lb(ALLOWED_CLIENT, ("ocp-apim-subscription-key", key))).status

    try:
        assert status("filed-key-1") == 200
        assert status(KEY_TEAM_A) == 200
        assert status("filed-key-2") == 401
        write_keys(f"filed active all {key_hash('filed-key-2')} -\n")
        envoy.process.wait_for("the new keys", lambda: status("filed-key-2") == 200, timeout=20)
        assert status("filed-key-1") == 401
        assert status(KEY_TEAM_A) == 200
        assert "subscription keys file reloaded" in envoy.output()
        # A broken keys file: refused with its line, the last good keys keep serving.
        write_keys("filed active all not-a-hash -\n")
        envoy.process.wait_for("the rejected keys", lambda: "subscription keys file rejected" in envoy.output(), timeout=20)
        assert f"{keys}:1" in envoy.output() or "keys.txt:1" in envoy.output()
        assert "not-a-hash" not in envoy.output()
        assert status("filed-key-2") == 200
    finally:
        envoy.stop()
        jwks.stop()


def test_a_panic_inside_the_module_is_a_500_deny_and_envoy_keeps_serving(tmp_path, backend, pki):
    # `test_panic_header` exists in debug builds only (the suite's build): a request carrying it
    # panics inside the filter's request hook.
    signer = Signer()
    jwks = JwksServer(signer.jwks)
    config = tmp_path / "panic.yaml"
    config.write_text(policy(jwks.url))
    options = json.dumps({"config_file": str(config), "test_panic_header": "x-portcullis-test-panic"})
    envoy = module_envoy(tmp_path, backend, pki, f"'{options}'", "envoy-panic")
    try:
        r = request(envoy.url("http", "/public/x"), headers=lb(ALLOWED_CLIENT, ("x-portcullis-test-panic", "1")))
        assert r.status == 500, r
        assert r.header("x-echo") is None
        body = r.json()
        assert body["reason"] == "Internal" and body["statusCode"] == 500, body
        assert body["decisionId"] == r.header("x-portcullis-decision-id"), body
        assert envoy.process.alive()
        assert request(envoy.url("http", "/public/x"), headers=lb()).status == 200
        assert envoy.stats()["dynamicmodulescustom.portcullis_failed_closed"] == 1
        assert "panic while deciding" in envoy.output()
    finally:
        envoy.stop()
        jwks.stop()


def test_the_decision_log_carries_the_callers_trace_id(pair):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = request(pair.module.url("http", "/public/traced"), headers=lb(ALLOWED_CLIENT, ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")))
    assert r.status == 200, r
    decision_id = r.echo["headers"]["x-portcullis-decision-id"][0]
    line = pair.module.process.wait_for("the decision log line",
                                        lambda: next((l for l in pair.module.output().splitlines() if f"decision_id={decision_id}" in l), None),
                                        timeout=10)
    assert f"trace_id={trace_id}" in line.replace('"', ""), line


def test_a_broken_config_at_start_refuses_the_filter(tmp_path, backend, pki):
    config = tmp_path / "broken.yaml"
    config.write_text("apis: [{name: x, bogus: 1}]\n")
    with pytest.raises(AssertionError) as failed:
        module_envoy(tmp_path, backend, pki, str(config), "envoy-broken")
    assert "bogus" in str(failed.value), failed.value
