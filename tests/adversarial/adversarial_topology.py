"""The pieces of the differential suite: a tree of marker files, the two real static backends that
serve it (`python3 -m http.server` and nginx), Envoy configurations rendered from
deploy/envoy/ext-authz-grpc.yaml, a raw-socket HTTP/1.1 client, the portcullis policy, and the
invariant that ties them together.

The invariant: when a backend answers 200 with a marker, the marker's location (virtual host and file
path) must be one that the API which allowed the request owns, i.e. the API that portcullis picks for
that location when it is spelled canonically. Anything else is a request that one component read one
way and another component read another way: a bypass.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from adversarial_corpus import ADMIN_HOST, Case
from harness import DEPLOY_ENVOY, Envoy, Nginx, Process, accepts, free_port, key_hash, render

# (suite, Envoy configuration, backend) -> a line of counts, printed at the end of the run (conftest.py).
SUMMARY: dict[tuple[str, str, str], str] = {}

KEY = "adversarial-differential-key-0123456789"

# First match in file order wins; `unmatched: deny`. `{request}` is the `request:` section.
POLICY_TEMPLATE = """
listen: {{grpc: 127.0.0.1:0, http: 127.0.0.1:0}}
telemetry: {{log_format: json, log_level: info, decision_log: true}}
subscriptions:
  keys:
    - {{id: differential, scope: all, primary: "{key}"}}
apis:
  - name: admin-host
    match: {{hosts: [{admin_host}]}}
    subscription_required: true
  - name: public
    match: {{path_prefix: /public}}
  - name: admin
    match: {{path_prefix: /admin}}
    subscription_required: true
  - name: open
    match: {{path_prefix: /open}}
unmatched: deny
{request}
"""

# portcullis's request canonicalisation, by name: the default, and `escaped_slashes: keep` (for
# backends that never decode `%2F`; the backends here do, so only the proxy can close that class).
POLICIES = {
    "canonical": "",
    "keep-escaped-slashes": "request: {escaped_slashes: keep}",
}


def policy(name: str) -> str:
    return POLICY_TEMPLATE.format(key=key_hash(KEY), admin_host=ADMIN_HOST, request=POLICIES[name])


def controls(vhosts: bool) -> list[tuple[Case, int, tuple[str, str] | None]]:
    """Plain requests and what they must get: without these a suite that refused everything would
    pass. (case, status, marker)."""
    key = f"Ocp-Apim-Subscription-Key: {KEY}\r\n".encode()
    out = [
        (Case("control", b"/public/secret"), 200, ("default", "/public/secret")),
        (Case("control", b"/open/secret"), 200, ("default", "/open/secret")),
        (Case("control", b"/admin/secret"), 401, None),
        (Case("control", b"/admin/secret", headers=key), 200, ("default", "/admin/secret")),
        (Case("control", b"/secret"), 403, None),
        (Case("control", b"/open/secret", ADMIN_HOST.encode()), 401, None),
    ]
    if vhosts:
        out.append((Case("control", b"/open/secret", ADMIN_HOST.encode(), key), 200, (ADMIN_HOST, "/open/secret")))
    return out


def owner(vhost: str, path: str) -> str | None:
    """The API that owns a location: what portcullis must pick for the canonical request."""
    if vhost == ADMIN_HOST:
        return "admin-host"
    for prefix in ("public", "admin", "open"):
        if path == f"/{prefix}" or path.startswith(f"/{prefix}/"):
            return prefix
    return None


# ---------------------------------------------------------------------------------------------------
# the tree
# ---------------------------------------------------------------------------------------------------

DIRS = ["", "public", "admin", "open", "public/admin", "admin/public", "open/admin", "public/public"]
VHOSTS = ["default", ADMIN_HOST]
_MARKER = re.compile(rb"MARKER (\S+) (\S+)")


def make_tree(root: Path) -> Path:
    """root/<vhost>/<dir>/{secret,index.html}, each containing `MARKER <vhost> /<dir>/<file>`."""
    for vhost in VHOSTS:
        for d in DIRS:
            directory = root / vhost / d
            directory.mkdir(parents=True, exist_ok=True)
            for name in ("secret", "index.html"):
                location = f"/{d}/{name}" if d else f"/{name}"
                (directory / name).write_text(f"MARKER {vhost} {location}\n")
    # The tree must be readable by an nginx worker running as another user.
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return root


# ---------------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------------


class PythonHttpServer:
    """`python3 -m http.server` over the default virtual host's tree (it has no virtual hosts)."""

    name = "python-http.server"
    vhosts = False

    def __init__(self, tree: Path, workdir: Path):
        self.port = free_port()
        argv = [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(tree / "default")]
        self.process = Process("python-http-server", argv, workdir)
        self.process.wait_for("python http.server listening", lambda: accepts(self.port))

    def stop(self) -> None:
        self.process.stop()


def nginx_static_conf(tree: Path, port: int, workdir: Path) -> str:
    """nginx serving the tree as static files, with `admin.example.com` as a virtual host of its own
    and everything else on the default server. Defaults otherwise (merge_slashes on)."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {d}_temp_path {workdir}/{d}_temp;" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
events {{ worker_connections 512; }}
http {{
    access_log {workdir}/access.log;
{temp}
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} default_server;
        server_name _;
        root {tree}/default;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name {ADMIN_HOST};
        root {tree}/{ADMIN_HOST};
    }}
}}
"""


class NginxStatic:
    name = "nginx-static"
    vhosts = True

    def __init__(self, tree: Path, workdir: Path):
        self.port = free_port()
        d = workdir / "nginx-static"
        d.mkdir(parents=True, exist_ok=True)
        self.nginx = Nginx(nginx_static_conf(tree, self.port, d), self.port, workdir, "nginx-static")

    def stop(self) -> None:
        self.nginx.stop()


# ---------------------------------------------------------------------------------------------------
# Envoy
# ---------------------------------------------------------------------------------------------------

# The HttpConnectionManager settings under test, by name, applied over the bootstrap: "defaults" is
# Envoy's own defaults (no path normalisation), "shipped" the bootstrap exactly as deploy/ has it.
ENVOY_VARIANTS: dict[str, dict] = {
    "defaults": {"normalize_path": False, "merge_slashes": False, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"},
    "shipped": {},
    "reject": {"normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "REJECT_REQUEST"},
    "redirect": {"normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"},
    "forward": {"normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"},
    "reject+host": {
        "normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "strip_trailing_host_dot": True, "strip_any_host_port": True,
    },
}

# Envoy copies the decision id that portcullis added to the upstream request into the response, so
# the client learns which decision let a backend's answer through (portcullis's own denies carry it
# already). An allow without it would mean the backend was reached without a decision.
DECISION_ECHO = "x-differential-decision-id"


def envoy_config(params: dict, variant: str, out: Path) -> Path:
    """deploy/envoy/ext-authz-grpc.yaml rendered with `params`, the variant's connection-manager
    settings on both listeners, and the decision-id echo on the shared route table."""
    text = render(DEPLOY_ENVOY / "ext-authz-grpc.yaml", params)
    doc = yaml.safe_load(text)
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                if f["name"] == "envoy.filters.network.http_connection_manager":
                    hcm = f["typed_config"]
                    hcm.update(ENVOY_VARIANTS[variant])
                    routes = hcm["route_config"]
                    routes["response_headers_to_add"] = [
                        {"header": {"key": DECISION_ECHO, "value": "%REQ(x-portcullis-decision-id)%"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    ]
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def start_envoy(config: Path, workdir: Path, name: str) -> Envoy:
    """harness.Envoy on a bootstrap rendered by `envoy_config` (an absolute path replaces the
    deploy/envoy/ directory it would otherwise render from; nothing is left to substitute)."""
    return Envoy(str(config.resolve()), {}, workdir, name)


# ---------------------------------------------------------------------------------------------------
# the raw client
# ---------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str | None = None
    elapsed: float = 0.0

    @property
    def marker(self) -> tuple[str, str] | None:
        m = _MARKER.search(self.body)
        return (m.group(1).decode(), m.group(2).decode()) if m else None


def send_raw(port: int, data: bytes, timeout: float = 15.0) -> Reply:
    """Writes `data` as it is and reads until the server closes (every request says Connection:
    close). http.client would normalise or refuse part of the corpus, so this is a socket."""
    start = time.monotonic()
    reply = _send_raw(port, data, timeout)
    reply.elapsed = time.monotonic() - start
    return reply


def _send_raw(port: int, data: bytes, timeout: float) -> Reply:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            raw = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not _complete(raw):
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                raw += chunk
    except OSError as e:
        return Reply(None, {}, b"", f"{type(e).__name__}: {e}")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", lines[0]) if lines else None
    if not m:
        return Reply(None, {}, raw, "no HTTP status line" if raw else "connection closed without a response")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode(errors="replace")] = value.strip().decode(errors="replace")
    return Reply(int(m.group(1)), headers, body)


def _complete(raw: bytes) -> bool:
    """Whether `raw` holds a whole response (servers may linger a second before closing after an
    error, so waiting for the close would make the corpus slow)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if m:
        return len(body) >= int(m.group(1))
    if re.search(rb"(?im)^transfer-encoding:.*chunked", head):
        return body.endswith(b"0\r\n\r\n")
    return False


# ---------------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------------


def decision_log(output: str) -> dict[str, dict]:
    """decision_id -> record, from the JSON lines portcullis writes with `telemetry.decision_log`."""
    out = {}
    for line in output.splitlines():
        if not line.startswith("{") or '"decision_id"' not in line or '"outcome"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "decision_id" in rec and "outcome" in rec:
            out[rec["decision_id"]] = rec
    return out


@dataclass
class Result:
    case: Case
    reply: Reply
    redirects: list[bytes] = field(default_factory=list)
    decision_id: str | None = None
    api: str | None = None
    outcome: str | None = None
    violation: str | None = None

    def describe(self) -> str:
        r = self.reply
        hops = "".join(f" -> redirect {loc!r}" for loc in self.redirects)
        return (
            f"sent {self.case.wire()!r}{hops}: HTTP {r.status} marker={r.marker} "
            f"decision={self.decision_id} api={self.api} outcome={self.outcome} reason={r.headers.get('x-portcullis-reason') or _reason(r)}"
        )


def _reason(r: Reply) -> str | None:
    if (r.headers.get("content-type") or "").startswith("application/json"):
        try:
            return json.loads(r.body).get("reason")
        except ValueError:
            return None
    return None


def classify(r: Result) -> str:
    """What answered, in words a report can count: `served`, `portcullis <reason>` (its own deny),
    `redirect <status>`, `<status> after a decision` (the backend's, or a proxy's translation of a
    deny: nginx auth_request turns portcullis's 400 into 500), `proxy <status>` (no decision at all:
    the proxy refused the request itself)."""
    rep = r.reply
    if rep.status is None:
        return f"no response ({rep.error})"
    if rep.status == 200 and rep.marker:
        return "served"
    reason = _reason(rep)
    if reason and rep.headers.get("x-portcullis-decision-id"):
        return f"portcullis {reason}"
    if rep.status in (301, 302, 307, 308):
        return f"redirect {rep.status}"
    if r.decision_id:
        return f"{rep.status} after a decision"
    return f"proxy {rep.status}"


def _follow(port: int, case: Case, reply: Reply, hops: list[bytes]) -> Reply:
    """Follows up to two same-origin redirects (Envoy's UNESCAPE_AND_REDIRECT, a backend's
    directory redirect), as a browser would: the invariant must hold where the client ends up."""
    for _ in range(2):
        loc = reply.headers.get("location")
        if reply.status not in (301, 302, 307, 308) or not loc:
            return reply
        target = re.sub(r"^https?://[^/]+", "", loc).encode("latin-1", errors="replace") or b"/"
        hops.append(target)
        reply = send_raw(port, Case(case.family, target, case.host).wire())
    return reply


def run_corpus(port: int, cases: list[Case], portcullis_output, vhosts: bool, workers: int = 6) -> list[Result]:
    """Sends every case through Envoy on `port`, then joins each answer with portcullis's decision
    record and checks the invariant."""

    def one(case: Case) -> Result:
        hops: list[bytes] = []
        reply = send_raw(port, case.wire())
        reply = _follow(port, case, reply, hops)
        return Result(case, reply, hops, reply.headers.get(DECISION_ECHO) or reply.headers.get("x-portcullis-decision-id"))

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, cases))

    # The decision log is written by a background thread: wait until every decision is in it.
    wanted = {r.decision_id for r in results if r.decision_id}
    deadline = time.monotonic() + 20
    log: dict[str, dict] = {}
    while time.monotonic() < deadline:
        log = decision_log(portcullis_output())
        if wanted <= log.keys():
            break
        time.sleep(0.2)
    for r in results:
        rec = log.get(r.decision_id or "")
        if rec:
            r.api, r.outcome = rec.get("api"), rec.get("outcome")
        r.violation = violation(r, vhosts)
    return results


def violation(r: Result, vhosts: bool) -> str | None:
    """None, or why this answer breaks the invariant."""
    rep = r.reply
    if rep.status != 200 or rep.marker is None:
        return None
    vhost, path = rep.marker
    expected = owner(vhost if vhosts else "default", path)
    if r.decision_id is None or r.outcome is None:
        return f"marker {vhost} {path} served without a portcullis decision"
    if r.outcome != "allow":
        return f"marker {vhost} {path} served after a `{r.outcome}` decision"
    if r.api != expected:
        return f"marker {vhost} {path} belongs to API {expected!r} but API {r.api!r} allowed the request"
    return None
