"""`portcullis envoy-config` against a real Envoy 1.40: the generated ext_authz filter (header
allow-list limited to what the policy reads) is valid Envoy config for both transports, and, put in
the deploy bootstrap instead of the hand-written filter, gives the same decisions and the same
upstream request as the shipped bootstrap (which sends every header) for allows, missing and wrong
keys, keys in the query, client addresses, certificates and tokens in a custom header."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from harness import DEPLOY_ENVOY, Envoy, Portcullis, envoy_bin, portcullis_bin, render, request
from topology import (ALLOWED_CLIENT, DENIES, KEY_TEAM_A, grpc_envoy_params, http_envoy_params, lb,
                      main_config)

FILTER = "                  - name: envoy.filters.http.ext_authz\n"
ROUTER = "                  - name: envoy.filters.http.router\n"
INDENT = " " * 18
ISSUER = "https://issuer.e2e.test"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def signing_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key) -> str:
    pub = key.public_key().public_numbers()
    n = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
    return json.dumps({"kty": "RSA", "kid": "e2e", "alg": "RS256", "use": "sig", "n": b64url(n), "e": "AQAB"})


def token(key, sub: str = "user-7") -> str:
    now = int(time.time())
    head = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "e2e"}).encode())
    body = b64url(json.dumps({"iss": ISSUER, "sub": sub, "iat": now, "nbf": now - 60, "exp": now + 600}).encode())
    sig = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{b64url(sig)}"


def policy(pki, key) -> str:
    """The shared stack's policy plus an API whose token is read from a custom header."""
    base = main_config(pki)
    assert base.rstrip().endswith("unmatched: deny"), "topology.main_config changed shape"
    extra_api = """\
  - name: token
    match: {path_prefix: /token}
    jwt:
      providers: [local]
      from: {header: x-token}
    on_allow:
      set_headers: {x-user-id: "{jwt.sub}"}
"""
    # Low enough that one large unread header passes it only when Envoy does not send that header.
    limits = "limits: {max_header_bytes: 8192}\n"
    providers = limits + f"identity_providers:\n  - {{name: local, issuer: \"{ISSUER}\", algorithms: [RS256], keys: [{jwk(key)}]}}\n"
    head, _, _ = base.rstrip().rpartition("unmatched: deny")
    return providers + head + extra_api + "unmatched: deny\n"


def generated_filter(config: Path, transport: str) -> str:
    out = subprocess.run([portcullis_bin(), "envoy-config", "--config", str(config), "--transport", transport,
                          "--timeout", "5s"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def with_generated_filter(template: str, generated: str) -> str:
    """A deploy bootstrap with every listener's hand-written ext_authz filter replaced by `generated`."""
    text = (DEPLOY_ENVOY / template).read_text()
    block = "".join(INDENT + line if line.strip() else line for line in generated.splitlines(keepends=True))
    count = text.count(FILTER)
    assert count >= 1 and text.count(ROUTER) == count, f"{template} changed shape"
    pos = 0
    for _ in range(count):
        start = text.index(FILTER, pos)
        end = text.index(ROUTER, start)
        text = text[:start] + block + text[end:]
        pos = start + len(block) + len(ROUTER)
    return text


def validate(bootstrap_text: str, params: dict, workdir: Path, name: str) -> subprocess.CompletedProcess:
    template = workdir / f"{name}.template.yaml"
    template.write_text(bootstrap_text)
    path = workdir / f"{name}.yaml"
    path.write_text(render(template, params))
    return subprocess.run([envoy_bin(), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, pki, signing_key) -> Path:
    path = tmp_path_factory.mktemp("envoy-config") / "portcullis.yaml"
    path.write_text(policy(pki, signing_key))
    return path


@pytest.mark.parametrize("transport,template,params", [
    ("grpc", "ext-authz-grpc.yaml", "grpc"),
    ("http", "ext-authz-http.yaml", "http"),
])
def test_generated_filter_is_valid_envoy_config(transport, template, params, config_file, tmp_path, backend, pki):
    generated = generated_filter(config_file, transport)
    assert "allowed_headers:" in generated and "failure_mode_allow: false" in generated
    values = grpc_envoy_params(9191, backend, pki) if params == "grpc" else http_envoy_params(9192, backend)
    out = validate(with_generated_filter(template, generated), values, tmp_path, f"validate-{transport}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout + out.stderr, out.stdout + out.stderr


def start_two_envoys(workdir, config_file, params, template: str, transport: str, cluster: str, name: str):
    """One portcullis, Envoy on the shipped `template` and Envoy on the same bootstrap with the
    filter `envoy-config --transport <transport>` generates; yields (shipped, generated)."""
    started = []
    try:
        portcullis = Portcullis(config_file.read_text(), workdir)
        started.append(portcullis)
        params = params(portcullis)  # the bootstrap placeholders, given the portcullis ports
        shipped = Envoy(template, params, workdir, name=f"shipped-{name}")
        started.append(shipped)
        generated_template = workdir / f"generated-{name}.template.yaml"
        generated_template.write_text(with_generated_filter(template, generated_filter(config_file, transport)))
        generated = Envoy(str(generated_template), params, workdir, name=f"generated-{name}")
        started.append(generated)
        shipped.wait_healthy(cluster)
        generated.wait_healthy(cluster)
        yield shipped, generated
    finally:
        for s in reversed(started):
            s.stop()


@pytest.fixture(scope="module")
def two_envoys(tmp_path_factory, config_file, backend, pki):
    """One portcullis; Envoy with the shipped bootstrap, and Envoy with the generated filter."""
    yield from start_two_envoys(tmp_path_factory.mktemp("envoy-config-stack"), config_file,
                                lambda p: grpc_envoy_params(p, backend, pki), "ext-authz-grpc.yaml", "grpc", "portcullis", "grpc")


# What the backend receives that a decision shapes: headers portcullis sets or removes.
UPSTREAM = ["x-subscription", "x-client-ip", "x-api", "x-user-id", "ocp-apim-subscription-key", "x-token"]


def outcome(r) -> tuple:
    if r.header("x-echo") == "1":
        echo = r.json()
        return ("allow", r.status, echo["path"], {h: echo["headers"].get(h) for h in UPSTREAM})
    body = r.json() if (r.header("content-type") or "").startswith("application/json") else {}
    return ("deny", r.status, body.get("reason"), r.header("www-authenticate"))


# A realistic browser-ish request: headers the policy never reads ride along.
NOISE = {
    "user-agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "accept": "application/json, text/plain, */*",
    "accept-language": "en-GB,en;q=0.9",
    "cookie": "session=" + "s" * 2000 + "; theme=dark",
    "x-custom-trace": "abc",
}

ALLOWS = [
    ("key-in-header", "/orders/1", lb(**{"ocp-apim-subscription-key": KEY_TEAM_A}), 200),
    ("key-in-query", f"/orders/1?subscription-key={KEY_TEAM_A}&x=1", lb(), 200),
    ("ip-allowed", "/ip/x", lb(ALLOWED_CLIENT), 200),
    ("open", "/public/x", lb(), 200),
    ("forged-upstream-header", "/public/x", lb(**{"x-subscription": "forged", "x-user-id": "admin"}), 200),
]


@pytest.mark.parametrize("path,headers,status", [a[1:] for a in ALLOWS], ids=[a[0] for a in ALLOWS])
def test_same_allows_as_the_shipped_bootstrap(two_envoys, path, headers, status):
    shipped, generated = two_envoys
    a = request(shipped.url("http", path), headers={**NOISE, **headers})
    b = request(generated.url("http", path), headers={**NOISE, **headers})
    assert a.status == status, a
    assert outcome(a) == outcome(b), (a, b)


@pytest.mark.parametrize("path,headers,status,reason,challenge", [d[1:] for d in DENIES], ids=[d[0] for d in DENIES])
def test_same_denies_as_the_shipped_bootstrap(two_envoys, path, headers, status, reason, challenge):
    shipped, generated = two_envoys
    a = request(shipped.url("http", path), headers={**NOISE, **headers})
    b = request(generated.url("http", path), headers={**NOISE, **headers})
    assert outcome(a) == ("deny", status, reason, a.header("www-authenticate")), a
    if challenge:
        assert challenge in (a.header("www-authenticate") or "")
    assert outcome(a) == outcome(b), (a, b)


def test_same_token_decisions_as_the_shipped_bootstrap(two_envoys, signing_key):
    shipped, generated = two_envoys
    good = token(signing_key)
    cases = [
        ("token in the custom header", lb(**{"x-token": good}), 200),
        ("no token", lb(), 401),
        ("token only in authorization", lb(authorization=f"Bearer {good}"), 401),
        ("bad signature", lb(**{"x-token": good[:-4] + "AAAA"}), 401),
    ]
    for what, headers, status in cases:
        a = request(shipped.url("http", "/token/x"), headers={**NOISE, **headers})
        b = request(generated.url("http", "/token/x"), headers={**NOISE, **headers})
        assert a.status == status, (what, a)
        assert outcome(a) == outcome(b), (what, a, b)
        if status == 200:
            assert a.echo["headers"]["x-user-id"] == ["user-7"], a


@pytest.mark.parametrize("client,status,reason", [
    ("partner", 200, None),
    ("intruder", 403, "ClientCertificateIdentityNotMatched"),
])
def test_same_client_certificate_decisions_on_the_https_listener(two_envoys, pki, client, status, reason):
    """Both listeners run the generated filter, with include_peer_certificate (the policy has
    client_certificate rules): the verified leaf reaches portcullis as with the shipped filter."""
    from harness import client_tls_context
    shipped, generated = two_envoys
    ctx = client_tls_context(pki.server_ca, getattr(pki, client))
    a = request(shipped.url("https", "/mtls/thumbprint/x"), headers={**NOISE, **lb()}, ssl_context=ctx)
    b = request(generated.url("https", "/mtls/thumbprint/x"), headers={**NOISE, **lb()}, ssl_context=ctx)
    assert a.status == status, a
    if reason:
        assert outcome(a)[2] == reason, a
    assert outcome(a) == outcome(b), (a, b)


def test_only_the_listed_headers_reach_portcullis(two_envoys):
    """The difference the allow-list makes, and the one the generated comments warn about:
    `limits.max_header_bytes` counts only the headers Envoy sends. A 10 KiB header the policy never
    reads draws 431 RequestHeadersTooLarge through the shipped filter (Envoy sends it) and is not even
    seen through the generated one; the decision on what the policy reads is the same."""
    shipped, generated = two_envoys
    headers = lb(**{"ocp-apim-subscription-key": KEY_TEAM_A, "x-unread": "u" * 10240})
    a = request(shipped.url("http", "/orders/1"), headers=headers)
    b = request(generated.url("http", "/orders/1"), headers=headers)
    assert outcome(a)[:3] == ("deny", 431, "RequestHeadersTooLarge"), a
    assert b.status == 200, b
    assert b.echo["headers"]["x-subscription"] == ["team-a"], b
    assert b.echo["headers"]["x-unread"] == ["u" * 10240], b


@pytest.fixture(scope="module")
def two_http_service_envoys(tmp_path_factory, config_file, backend):
    """The same over http_service: the shipped ext-authz-http.yaml, and the same bootstrap with the
    generated `--transport http` filter."""
    yield from start_two_envoys(tmp_path_factory.mktemp("envoy-config-http"), config_file,
                                lambda p: http_envoy_params(p, backend), "ext-authz-http.yaml", "http", "portcullis_http", "http")


@pytest.mark.parametrize("path,headers", [a[1:3] for a in ALLOWS] + [d[1:3] for d in DENIES],
                         ids=[a[0] for a in ALLOWS] + [d[0] for d in DENIES])
def test_same_decisions_over_http_service(two_http_service_envoys, path, headers):
    shipped, generated = two_http_service_envoys
    a = request(shipped.url("http", path), headers={**NOISE, **headers})
    b = request(generated.url("http", path), headers={**NOISE, **headers})
    assert a.status in (200, 401, 403), a
    assert outcome(a) == outcome(b), (a, b)
