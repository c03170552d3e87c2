"""The differential proof of path and host handling: thousands of hostile request targets and Host
headers (adversarial_corpus.py) through a real Envoy 1.40 asking the real portcullis, in front of two
real static backends (`python3 -m http.server` and nginx) serving a tree of marker files.

For every request: if a backend served a marker with 200, the API that portcullis said allowed the
request (its decision log, joined by the decision id Envoy echoes) must be the API that owns the
marker's location. Envoy runs deploy/envoy/ext-authz-grpc.yaml with its connection manager's path
settings replaced: `defaults` (Envoy's own: no normalisation, %2F kept), `shipped` (the bootstrap as it
is: normalize_path, merge_slashes, REJECT_REQUEST), `redirect` (UNESCAPE_AND_REDIRECT), and on request
`reject`, `forward` (UNESCAPE_AND_FORWARD), `reject+host` (also strip_trailing_host_dot and
strip_any_host_port). The corpus also runs through nginx `auth_request` (deploy/nginx/nginx.conf).

ADVERSARIAL_ENVOY_VARIANTS=defaults,shipped,redirect,forward,reject+host picks the Envoy configurations
(default: defaults,shipped,redirect); ADVERSARIAL_REPORT_DIR keeps every answer as JSON lines.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest

from adversarial_corpus import corpus
from adversarial_topology import (
    ENVOY_VARIANTS,
    SUMMARY,
    NginxStatic,
    PythonHttpServer,
    classify,
    controls,
    envoy_config,
    make_tree,
    policy,
    run_corpus,
    send_raw,
    start_envoy,
)
from harness import Portcullis, nginx_bin
from topology import grpc_envoy_params

VARIANTS = [v for v in os.environ.get("ADVERSARIAL_ENVOY_VARIANTS", "defaults,shipped,redirect").split(",") if v]
assert all(v in ENVOY_VARIANTS for v in VARIANTS), f"unknown Envoy variant in {VARIANTS}; known: {sorted(ENVOY_VARIANTS)}"

CASES = corpus()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def portcullis_for(tmp_path_factory):
    """One portcullis per policy name (adversarial_topology.POLICIES), started on first use."""
    started: dict[str, Portcullis] = {}

    def get(name: str) -> Portcullis:
        if name not in started:
            started[name] = Portcullis(policy(name), tmp_path_factory.mktemp(f"differential-portcullis-{name}"))
        return started[name]

    yield get
    for p in started.values():
        p.stop()


@pytest.fixture(scope="module")
def python_backend(tree, tmp_path_factory):
    b = PythonHttpServer(tree, tmp_path_factory.mktemp("python-backend"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def nginx_backend(tree, tmp_path_factory):
    nginx_bin()  # skips (fails under CI=true) without nginx
    b = NginxStatic(tree, tmp_path_factory.mktemp("nginx-backend"))
    yield b
    b.stop()


@pytest.fixture
def pki_params(tmp_path):
    """The https listener of the bootstrap needs files; this suite only uses the http listener."""
    from harness import make_cert

    ca = make_cert("differential CA", ca=True)
    server = make_cert("localhost", ca, server_names=["127.0.0.1"]).write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    return {"TLS_CERT_FILE": server[0], "TLS_KEY_FILE": server[1], "CLIENT_CA_FILE": tmp_path / "ca.crt"}


@pytest.mark.parametrize("backend_name", ["python", "nginx"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_request_reaches_a_location_its_api_does_not_own(request, variant, backend_name, portcullis_for, tmp_path, pki_params):
    """portcullis as it ships (every ambiguous path or host refused): no configuration of Envoy may
    let a request through to a location its API does not own."""
    check_matrix(request, "canonical", variant, backend_name, portcullis_for, tmp_path, pki_params)


@pytest.mark.parametrize("backend_name", ["python", "nginx"])
@pytest.mark.parametrize("variant", ["shipped", "redirect"])
def test_with_escaped_slashes_kept_only_the_proxy_closes_the_encoded_slash(request, variant, backend_name, portcullis_for, tmp_path, pki_params):
    """`request.escaped_slashes: keep` tells portcullis that `%2F` is data, which these backends
    contradict (they decode it into a separator). Envoy's path settings must close that class; with
    Envoy's defaults it stays open (see test_escaped_slashes_kept_behind_envoy_defaults_is_a_bypass)."""
    check_matrix(request, "keep-escaped-slashes", variant, backend_name, portcullis_for, tmp_path, pki_params)


@pytest.mark.parametrize("backend_name", ["python", "nginx"])
def test_escaped_slashes_kept_behind_envoy_defaults_is_a_bypass(request, backend_name, portcullis_for, tmp_path, pki_params):
    """The proof that the test above can fail: Envoy's defaults forward `%2F` as it is, portcullis
    (told to keep it) matches `/public`, and the backend decodes it and serves /admin/secret."""
    results = run_variant(request, "keep-escaped-slashes", "defaults", backend_name, portcullis_for, tmp_path, pki_params)
    violations = [r for r in results if r.violation]
    SUMMARY[("keep-escaped-slashes", "Envoy defaults", "nginx-static" if backend_name == "nginx" else "python-http.server")] = (
        f"{len(results)} requests, {len(violations)} violations (expected: the documented risk of `keep`)"
    )
    hits = {r.case.target for r in violations}
    assert b"/public/..%2Fadmin/secret" in hits, sorted(hits)[:20]
    # Only the encoded slash: every other class stays closed by portcullis itself.
    assert all(b"%2f" in t.lower() or b"%252f" in t.lower() for t in hits), sorted(hits)


def run_variant(request, policy_name, variant, backend_name, portcullis_for, tmp_path, pki_params):
    backend = request.getfixturevalue(f"{backend_name}_backend")
    portcullis = portcullis_for(policy_name)
    # Host spellings only mean something to a backend with virtual hosts.
    cases = [c for c in CASES if backend.vhosts or c.family != "host"]

    class _Pki:  # grpc_envoy_params reads these two from a Pki
        server = (pki_params["TLS_CERT_FILE"], pki_params["TLS_KEY_FILE"])
        client_ca = pki_params["CLIENT_CA_FILE"]

    params = grpc_envoy_params(portcullis, backend, _Pki())  # type: ignore[arg-type]
    config = envoy_config(params, variant, tmp_path / "envoy-rendered.yaml")
    envoy = start_envoy(config, tmp_path, "envoy")
    try:
        envoy.wait_healthy("portcullis")
        port = envoy.ports["http"]
        check_controls(port, backend.vhosts)
        results = run_corpus(port, cases, portcullis.output, backend.vhosts)
    finally:
        envoy.stop()
    return results


def check_matrix(request, policy_name, variant, backend_name, portcullis_for, tmp_path, pki_params):
    results = run_variant(request, policy_name, variant, backend_name, portcullis_for, tmp_path, pki_params)
    report(results, policy_name, f"Envoy {variant}", backend_name, tmp_path)


def check_controls(port, vhosts):
    """Plain requests first, with known answers: a topology that refused everything would pass the
    invariant."""
    for case, status, marker in controls(vhosts):
        reply = send_raw(port, case.wire())
        assert (reply.status, reply.marker) == (status, marker), f"control {case.wire()!r}: HTTP {reply.status} {reply.body[:300]!r}"


def report(results, policy_name, proxy, backend_name, tmp_path=None):
    """Counts into the run's summary, every answer into a JSON-lines file, and a failure that lists
    each violation with the exact bytes sent."""
    backend_label = "nginx-static" if backend_name == "nginx" else "python-http.server"
    outcomes = collections.Counter(classify(r) for r in results)
    violations = [r for r in results if r.violation]
    by_family = collections.Counter(r.case.family for r in violations)
    SUMMARY[(policy_name, proxy, backend_label)] = (
        f"{len(results)} requests, {len(violations)} violations {dict(by_family)}; "
        f"served {outcomes.get('served', 0)}; " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()) if k != "served")
    )
    report_dir = os.environ.get("ADVERSARIAL_REPORT_DIR")
    out = Path(report_dir) if report_dir else (tmp_path or Path("."))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"differential-{policy_name}-{proxy.replace(' ', '-')}-{backend_label}.jsonl"
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps({
                "family": r.case.family, "sent": r.case.wire().decode("latin-1"), "status": r.reply.status,
                "marker": r.reply.marker, "redirects": [h.decode("latin-1") for h in r.redirects],
                "api": r.api, "outcome": r.outcome, "class": classify(r), "violation": r.violation,
            }) + "\n")
    if violations:
        shown = "\n".join(f"  {r.violation}\n    {r.describe()}" for r in violations[:40])
        more = f"\n  ... and {len(violations) - 40} more" if len(violations) > 40 else ""
        pytest.fail(
            f"portcullis `{policy_name}`, {proxy} -> {backend_label}: {len(violations)} of {len(results)} requests "
            f"reached a location their API does not own (by family: {dict(by_family)}; every answer: {path}):\n{shown}{more}",
            pytrace=False,
        )


@pytest.mark.parametrize("backend_name", ["python", "nginx"])
def test_nginx_auth_request_lets_no_request_reach_a_location_its_api_does_not_own(request, backend_name, portcullis_for, tmp_path):
    """The same corpus through nginx `auth_request` (deploy/nginx/nginx.conf with only its ports
    replaced) asking portcullis's forward-auth endpoint, in front of the same backends."""
    from harness import Nginx, free_port
    from test_nginx import render_nginx_conf

    nginx_bin()
    backend = request.getfixturevalue(f"{backend_name}_backend")
    portcullis = portcullis_for("canonical")
    cases = [c for c in CASES if backend.vhosts or c.family != "host"]
    port = free_port()
    front = Nginx(render_nginx_conf(portcullis.http_port, backend.port, port, tmp_path), port, tmp_path, "nginx-auth-request")
    try:
        check_controls(port, backend.vhosts)
        results = run_corpus(port, cases, portcullis.output, backend.vhosts)
    finally:
        front.stop()
    report(results, "canonical", "nginx auth_request", backend_name, tmp_path)
