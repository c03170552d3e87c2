"""The load harness behind loadtest/load.sh: portcullis against its baselines, in one run on one machine.

Scenarios (all started at once, measured one after another, interleaved round by round):
  grpc noop           h2load -> a no-op Check server (examples/noop_check.rs: decode, answer OK): the bare
                      transport, the lowest baseline every ratio is also taken against
  grpc noop inline    the same no-op served on portcullis's own transport (`noop_check --inline`: hyper,
                      each connection's streams run in the connection's task): what the transport saves
                      told apart from what portcullis adds
  grpc floor          h2load -> portcullis (loadtest/load/floor.yaml: allow everything) over gRPC
  grpc realistic      h2load -> portcullis (loadtest/load/realistic.yaml) over gRPC
  grpc realistic redis  the same with `store.redis` on a local redis-server (its token shared through Redis)
  envoy               h2load -> Envoy -> backend (no authorization)
  envoy jwt_authn+rbac   ... Envoy's own filters doing the equivalent checks
  envoy+floor         ... Envoy asking portcullis (floor policy) over ext_authz gRPC
  envoy+realistic     ... Envoy asking portcullis (realistic policy) over ext_authz gRPC
  envoy+module realistic   ... Envoy deciding the realistic policy itself, with the dynamic module
                      (crates/portcullis-envoy: libportcullis_envoy.so next to PORTCULLIS_BIN, or
                      PORTCULLIS_ENVOY_MODULE); no portcullis process
  envoy+realistic all-headers   the same, with a browser-like request (16 headers, a 3 KiB cookie and a
                      user agent the policy never reads): Envoy copies every header into the CheckRequest
  envoy+realistic allow-list    the same request, with the filter `portcullis envoy-config` generates
                      for realistic.yaml: only the headers the policy reads go to portcullis (issue 18)
The backend is an Envoy answering every request itself (direct_response). gRPC load is h2load with a
pre-encoded CheckRequest shaped like Envoy's (the same bytes for floor and realistic); HTTP load through
Envoy is h2load over HTTP/1.1.

Each scenario is first run at fixed concurrency for saturation (throughput), then at a fixed rate of 50%
of its own saturation for latency (p50/p99/p99.9 from h2load's per-request log); the no-op server is
also run at the realistic policy's rate, so that their p99s compare at one rate (SAME_RATE). Every scenario is
verified before it is measured (a real gRPC client for the direct ones: grpc-status OK and the expected
headers; an HTTP request for the Envoy ones, plus a request that must be refused), and every measured
response must be 200. portcullis's own /metrics must show no deny during the measurements.

Settings (environment):
  PORTCULLIS_BIN   binary under test (default target/release/portcullis)
  ENVOY_CONFIG_BIN the binary whose `envoy-config` generates the allow-list filter (default PORTCULLIS_BIN)
  BASELINE_BIN     another build to compare with in the same run (say, a copy of target/release from
                   before a change, with libportcullis_envoy.so and examples/noop_check beside it):
                   adds "<scenario> @baseline" for grpc noop, grpc floor, grpc realistic and
                   envoy+module realistic, measured in the same interleaved rounds, and the ratios
                   "<scenario> / <scenario> @baseline" (sequential runs on a noisy machine differ more
                   than most changes do)
  ENVOY_BIN        default .venv/bin/envoy
  SAT_SECONDS=4 RATE_SECONDS=6 ROUNDS=3 WARMUP_SECONDS=1   per measurement; rounds interleave scenarios
                   (throughput: median of the rounds; latency: percentiles of all rounds' requests)
  GRPC_CLIENTS=16 GRPC_STREAMS=8    h2load -c/-m for the direct gRPC scenarios at saturation
  GRPC_RATE_STREAMS=1               h2load -m at the fixed rate (latency): one request in flight per
                                    connection, so h2load's own bursts do not set the tail
  HTTP_CLIENTS=32                   h2load --h1 -c for the scenarios through Envoy (one request in flight each)
  PIN=split|none  LOADGEN_CPUS=0 SERVER_CPUS=1   split: h2load on LOADGEN_CPUS, every server on SERVER_CPUS
  NICE=-10        run the servers and h2load at this priority (root only for < 0), to lessen (not
                  remove) the effect of other work on a busy machine; results should come from a quiet one
  SCENARIOS       comma-separated subset of the names above (e.g. "grpc floor,grpc realistic");
                  the allow-list comparison alone: SCENARIOS="envoy+realistic all-headers,envoy+realistic allow-list"
  OUT_DIR         default target/load (results.md, results.json, logs/)
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


PORTCULLIS_BIN = os.environ.get("PORTCULLIS_BIN") or str(ROOT / "target/release/portcullis")
# The bare transport (examples/noop_check.rs): decodes the CheckRequest and answers OK, nothing else.
ENVOY_CONFIG_BIN = os.environ.get("ENVOY_CONFIG_BIN") or PORTCULLIS_BIN
MODULE_SO = os.environ.get("PORTCULLIS_ENVOY_MODULE") or str(Path(PORTCULLIS_BIN).parent / "libportcullis_envoy.so")
NOOP_BIN = os.environ.get("NOOP_BIN") or str(Path(PORTCULLIS_BIN).parent / "examples" / "noop_check")
BASELINE_BIN = os.environ.get("BASELINE_BIN") or None
# Scenarios that BASELINE_BIN adds a "@baseline" twin of.
BASELINE_SCENARIOS = ["grpc noop", "grpc floor", "grpc realistic", "envoy+module realistic"]
ENVOY_BIN = os.environ.get("ENVOY_BIN") or str(ROOT / ".venv/bin/envoy")
SAT_SECONDS = env_float("SAT_SECONDS", 4)
RATE_SECONDS = env_float("RATE_SECONDS", 6)
ROUNDS = env_int("ROUNDS", 3)
WARMUP_SECONDS = env_float("WARMUP_SECONDS", 1)
GRPC_CLIENTS = env_int("GRPC_CLIENTS", 16)
GRPC_STREAMS = env_int("GRPC_STREAMS", 8)
GRPC_RATE_STREAMS = env_int("GRPC_RATE_STREAMS", 1)
HTTP_CLIENTS = env_int("HTTP_CLIENTS", 32)
PIN = os.environ.get("PIN", "split")
LOADGEN_CPUS = os.environ.get("LOADGEN_CPUS", "0")
SERVER_CPUS = os.environ.get("SERVER_CPUS", "1")
NICE = os.environ.get("NICE", "")
OUT_DIR = Path(os.environ.get("OUT_DIR") or ROOT / "target/load")
CLK_TCK = os.sysconf("SC_CLK_TCK")

ISSUER = "https://idp.load.test/tenant/v2.0"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------

def pinned(cpus: str) -> list[str]:
    """The command prefix that pins a process (PIN=split) and sets its priority (NICE)."""
    return (["taskset", "-c", cpus] if PIN == "split" else []) + (["nice", "-n", NICE] if NICE else [])


class Proc:
    """A server process this harness started; CPU time and peak RSS read from /proc."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict | None = None, stdout=None):
        self.name = name
        self.log_path = logdir / f"{name.replace(' ', '_')}.log"
        self.log_file = open(self.log_path, "wb")
        self.popen = subprocess.Popen(pinned(SERVER_CPUS) + argv, env=env, stdout=stdout or self.log_file,
                                      stderr=self.log_file, start_new_session=True)
        self.pid = self.popen.pid  # taskset execs the program: same pid

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads

    def reset_peak_rss(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise SystemExit(f"{self.name} exited ({self.popen.returncode}); see {self.log_path}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log_file.close()


PROCS: list[Proc] = []


def start(name: str, argv: list[str], logdir: Path, **kw) -> Proc:
    p = Proc(name, argv, logdir, **kw)
    PROCS.append(p)
    return p


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, probe, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p in PROCS:
            p.check_alive()
        try:
            if probe():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what} ({last})")


def http_get(url: str, headers: dict | None = None, timeout: float = 5) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---------------------------------------------------------------------------------------------------
# Credentials made at run time: an RSA key and token, a client certificate, a subscription key
# ---------------------------------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@dataclass
class Material:
    jwks_json: str
    token: str
    cert_pem: str
    subscription_key: str
    client_secret: str


def make_material() -> Material:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_numbers()
    kid = "load-" + secrets.token_hex(4)
    jwks = {"keys": [{"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": uint(pub.n), "e": uint(pub.e)}]}
    now = int(time.time())
    claims = {
        "iss": ISSUER, "aud": "api://orders", "sub": "user-42", "tid": TENANT, "azp": "load-client",
        "scp": "orders.read orders.write", "roles": ["reader", "writer"], "name": "Load Test User",
        "iat": now, "nbf": now - 60, "exp": now + 6 * 3600,
    }
    signing_input = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode()) + "." + \
        b64url(json.dumps(claims).encode())
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    token = signing_input + "." + b64url(sig)

    cert_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "partner"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Contoso")])
    utcnow = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(cert_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(utcnow - datetime.timedelta(hours=1))
            .not_valid_after(utcnow + datetime.timedelta(days=1))
            .sign(cert_key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return Material(json.dumps(jwks), token, cert_pem, "load-" + secrets.token_hex(16), secrets.token_hex(16))


def check_request(m: Material, *, with_key: bool = True, with_cert: bool = True) -> external_auth_pb2.CheckRequest:
    """What Envoy sends for `GET /orders/42` from 127.0.0.1 over mTLS (include_peer_certificate)."""
    headers = {
        ":authority": "api.example.com", ":path": "/orders/42", ":method": "GET", ":scheme": "https",
        "user-agent": "load-client/1.0", "accept": "application/json",
        "authorization": "Bearer " + m.token,
        "x-forwarded-proto": "https", "x-request-id": "6f0a5c1e-8a4b-4f3e-9a47-3f1c2b7d9e10",
        "x-envoy-expected-rq-timeout-ms": "15000",
    }
    if with_key:
        headers["ocp-apim-subscription-key"] = m.subscription_key
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="11843977254526939163", method="GET", path="/orders/42", host="api.example.com", scheme="https",
        protocol="HTTP/1.1")
    http.headers.update(headers)
    attrs = attribute_context_pb2.AttributeContext(
        source=attribute_context_pb2.AttributeContext.Peer(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=51234)),
            certificate=urllib.parse.quote(m.cert_pem, safe="") if with_cert else "",
        ),
        destination=attribute_context_pb2.AttributeContext.Peer(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=10443)),
        ),
        request=attribute_context_pb2.AttributeContext.Request(http=http),
    )
    attrs.request.time.GetCurrentTime()
    return external_auth_pb2.CheckRequest(attributes=attrs)


def grpc_frame(msg: bytes) -> bytes:
    return b"\x00" + len(msg).to_bytes(4, "big") + msg  # uncompressed, big-endian length


def http_headers(m: Material, *, with_key: bool = True, with_token: bool = True,
                 with_cert: bool = True) -> dict[str, str]:
    """Headers of the request sent through Envoy; the client certificate travels as XFCC (plain HTTP)."""
    h = {"accept": "application/json"}
    if with_cert:
        der = x509.load_pem_x509_certificate(m.cert_pem.encode()).public_bytes(serialization.Encoding.DER)
        h["x-forwarded-client-cert"] = 'Hash=%s;Cert="%s"' % (hashlib.sha256(der).hexdigest(),
                                                              urllib.parse.quote(m.cert_pem, safe=""))
    if with_token:
        h["authorization"] = "Bearer " + m.token
    if with_key:
        h["ocp-apim-subscription-key"] = m.subscription_key
    return h


# ---------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    kind: str                      # grpc | http
    url: str
    procs: list[Proc]              # servers whose CPU and RSS are measured
    portcullis: "Portcullis | None" = None
    sat: list[dict] = field(default_factory=list)
    rate: list[dict] = field(default_factory=list)
    headers: dict | None = None    # HTTP request headers, when not the shared benchmark request's
    # Runs of this scenario at another scenario's latency rate (50% of that one's saturation), by
    # that scenario's name: issue 18 compares p99s at the same rate (SAME_RATE).
    same_rate: dict = field(default_factory=dict)


# (a, b): b is also measured at a's latency rate, so that their p99s compare at one rate.
SAME_RATE = [("grpc realistic", "grpc noop")]


@dataclass
class Portcullis:
    proc: Proc
    grpc_port: int
    http_port: int

    def decisions(self) -> tuple[int, int]:
        """(allowed, not allowed) checks so far, from /metrics (`portcullis_decisions_total` by outcome)."""
        _, text = http_get(f"http://127.0.0.1:{self.http_port}/metrics")
        allow = other = 0.0
        for line in text.splitlines():
            if line.startswith("portcullis_decisions_total{") and "outcome=" in line:
                n = float(line.rsplit(" ", 1)[1])
                if 'outcome="allow"' in line:
                    allow += n
                else:
                    other += n
        return int(allow), int(other)


def start_portcullis(name: str, config: Path, logdir: Path, extra_env: dict,
                     binary: str = PORTCULLIS_BIN) -> Portcullis:
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, LOAD_GRPC_LISTEN=f"127.0.0.1:{grpc_port}", LOAD_HTTP_LISTEN=f"127.0.0.1:{http_port}",
               **extra_env)
    proc = start(name, [binary, "serve", "--config", str(config)], logdir, env=env)
    wait_until(f"{name} /readyz", lambda: http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200)
    return Portcullis(proc, grpc_port, http_port)


def redis_info(port: int) -> int | None:
    """Redis's `total_commands_processed`, or None when it does not answer (a bare RESP INFO)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"INFO stats\r\n")
            data = b""
            while b"total_commands_processed:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        mo = re.search(rb"total_commands_processed:(\d+)", data)
        return int(mo.group(1)) if mo else None
    except OSError:
        return None


def fill(template: Path, values: dict, out: Path) -> Path:
    def sub(mo):
        return str(values[mo.group(1)])  # KeyError: a placeholder the harness does not know
    out.write_text(re.sub(r"\$\{([A-Z_]+)\}", sub, template.read_text()))
    return out


def start_envoy(name: str, template: str, work: Path, logdir: Path, values: dict,
                env: dict | None = None) -> tuple[Proc, int]:
    admin, port = free_port(), free_port()
    cfg = fill(HERE / "envoy" / template, dict(values, ADMIN_PORT=admin, HTTP_PORT=port),
               work / f"{name.replace(' ', '_')}.yaml")
    p = start(name, [ENVOY_BIN, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
                     "--log-level", "error"], logdir, env=env)
    wait_until(f"{name} ready", lambda: http_get(f"http://127.0.0.1:{admin}/ready")[1].strip() == "LIVE")
    return p, port


FILTER = "                  - name: envoy.filters.http.ext_authz\n"
ROUTER = "                  - name: envoy.filters.http.router\n"


def generated_front(work: Path, env: dict) -> Path:
    """front-ext-authz.yaml with its ext_authz filter replaced by what `portcullis envoy-config` prints for
    realistic.yaml (same cluster and timeout; only allowed_headers and include_peer_certificate differ)."""
    out = subprocess.run([ENVOY_CONFIG_BIN, "envoy-config", "--config", str(HERE / "realistic.yaml"),
                          "--cluster", "portcullis", "--timeout", "1s"],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, LOAD_GRPC_LISTEN="127.0.0.1:0", LOAD_HTTP_LISTEN="127.0.0.1:0", **env))
    if out.returncode != 0:
        raise SystemExit(f"portcullis envoy-config failed:\n{out.stderr}")
    text = (HERE / "envoy" / "front-ext-authz.yaml").read_text()
    start = text.index(FILTER)
    end = text.index(ROUTER, start)
    block = "".join(" " * 18 + line if line.strip() else line for line in out.stdout.splitlines(keepends=True))
    path = work / "front-ext-authz-generated.yaml"
    path.write_text(text[:start] + block + text[end:])
    return path


# ---------------------------------------------------------------------------------------------------
# Verification (once per scenario, before measuring)
# ---------------------------------------------------------------------------------------------------

def verify_grpc(s: Scenario, body: bytes, m: Material, realistic: bool) -> None:
    req = external_auth_pb2.CheckRequest.FromString(body[5:])  # the exact bytes h2load will send
    with grpc.insecure_channel(urllib.parse.urlsplit(s.url).netloc) as ch:
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)
        resp = stub.Check(req, timeout=10)
        if resp.status.code != 0 or resp.WhichOneof("http_response") != "ok_response":
            raise SystemExit(f"{s.name}: the benchmark request is not allowed: {resp}")
        if realistic:
            got = {o.header.key: o.header.value or o.header.raw_value.decode() for o in resp.ok_response.headers}
            want = {"x-user-id": "user-42", "x-tenant-id": TENANT, "x-subscription": "contoso"}
            if any(got.get(k) != v for k, v in want.items()) or not got.get("authorization", "").startswith(
                    "Bearer load-backend-token-"):
                raise SystemExit(f"{s.name}: allowed without the expected headers: {sorted(got)}")
            if "ocp-apim-subscription-key" not in resp.ok_response.headers_to_remove:
                raise SystemExit(f"{s.name}: the subscription key is not removed")
            # The policy really checks: the same request without the key, or the certificate, is refused.
            for what, bad in (("subscription key", check_request(m, with_key=False)),
                              ("client certificate", check_request(m, with_cert=False))):
                if stub.Check(bad, timeout=10).status.code == 0:
                    raise SystemExit(f"{s.name}: a request without the {what} was allowed")
    log(f"  verified {s.name}: gRPC status OK" + (", headers set, key removed, denied without key / certificate"
                                                  if realistic else ""))


def browser_headers(m: Material, **kw) -> dict[str, str]:
    """The benchmark request as a browser-based client sends it: 16 headers, most of them never read by
    the policy (a 3 KiB cookie, the user agent, fetch metadata, ...)."""
    h = {
        "user-agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                      "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.2592.87",
        "accept-language": "en-GB,en;q=0.9,de;q=0.8",
        "accept-encoding": "gzip, deflate, br, zstd",
        "cookie": "; ".join(f"c{i}=" + secrets.token_hex(64) for i in range(24)),
        "referer": "https://portal.example.com/orders?view=all&page=3",
        "origin": "https://portal.example.com",
        "sec-fetch-site": "same-site", "sec-fetch-mode": "cors", "sec-fetch-dest": "empty",
        "cache-control": "no-cache", "pragma": "no-cache",
        "x-client-version": "4.18.2",
    }
    return {**h, **http_headers(m, **kw)}


def verify_http(s: Scenario, m: Material, must_refuse: bool, needs_cert: bool) -> None:
    headers = http_headers if s.headers is None else browser_headers
    status, body = http_get(s.url, headers(m))
    if status != 200 or body != "ok":
        raise SystemExit(f"{s.name}: the benchmark request got {status} {body[:200]!r}")
    if must_refuse:
        bad = [("no token", headers(m, with_token=False)), ("no key", headers(m, with_key=False))]
        if needs_cert:
            bad.append(("no certificate", headers(m, with_cert=False)))
        for what, h in bad:
            status, _ = http_get(s.url, h)
            if status not in (401, 403):
                raise SystemExit(f"{s.name}: a request with {what} got {status}, expected 401/403")
    log(f"  verified {s.name}: 200" + (", refused without token / key" + (" / certificate" if needs_cert else "")
                                        if must_refuse else ""))


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------

def h2load_argv(s: Scenario, files: dict, seconds: float, log_file: Path | None, rate: float | None) -> list[str]:
    argv = pinned(LOADGEN_CPUS) + ["h2load", "-D", f"{round(seconds * 1000)}ms"]
    if s.kind == "grpc":
        clients = GRPC_CLIENTS
        # At a fixed rate, one request in flight per connection: with -m N h2load fires N requests
        # per connection at once, and the burst queueing (not portcullis) would set the p99.
        streams = GRPC_RATE_STREAMS if rate is not None else GRPC_STREAMS
        argv += ["-c", str(clients), "-m", str(streams), "-d", str(files["body"]),
                 "-H", "content-type: application/grpc", "-H", "te: trailers"]
    else:
        clients = HTTP_CLIENTS
        argv += ["--h1", "-c", str(clients)]
        for k, v in (s.headers or files["headers"]).items():
            argv += ["-H", f"{k}: {v}"]
    if rate is not None:
        argv += ["--rps", f"{max(rate / clients, 0.1):.3f}"]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    return argv + [s.url]


def parse_h2load(out: str) -> dict:
    fin = re.search(r"finished in ([\d.]+)(m?s)", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (fin and req and codes):
        raise SystemExit(f"cannot read h2load's output:\n{out}")
    secs = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    return {"seconds": secs, "done": int(req.group(3)), "succeeded": int(req.group(4)),
            "failed": int(req.group(5)) + int(req.group(6)) + int(req.group(7)), "ok_2xx": int(codes.group(1)),
            "not_2xx": int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4))}


def latencies(log_file: Path) -> tuple[list[int], int]:
    """Per-request microseconds from h2load's log, and how many responses were not 200."""
    us, bad = [], 0
    with open(log_file) as f:
        for line in f:
            cols = line.split("\t")
            if cols[1] != "200":
                bad += 1
            us.append(int(cols[2]))
    return us, bad


def pct(sorted_us: list[int], p: float) -> float:
    if not sorted_us:
        return float("nan")
    return sorted_us[min(len(sorted_us) - 1, int(round(p / 100 * (len(sorted_us) - 1))))]


def measure(s: Scenario, files: dict, seconds: float, log_file: Path, rate: float | None) -> dict:
    for p in s.procs:
        p.check_alive()
        p.reset_peak_rss()
    cpu0 = {p.name: p.cpu_seconds() for p in s.procs}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    decisions0 = s.portcullis.decisions() if s.portcullis else (0, 0)
    log_file.unlink(missing_ok=True)  # h2load appends to an existing log
    proc = subprocess.run(h2load_argv(s, files, seconds, log_file, rate), capture_output=True, text=True)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {p.name: p.cpu_seconds() - cpu0[p.name] for p in s.procs}
    rss = {p.name: p.peak_rss_mib() for p in s.procs}
    if proc.returncode != 0:
        raise SystemExit(f"{s.name}: h2load failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    r = parse_h2load(proc.stdout)
    us, bad = latencies(log_file)
    decisions1 = s.portcullis.decisions() if s.portcullis else (0, 0)
    allows, denies = decisions1[0] - decisions0[0], decisions1[1] - decisions0[1]
    r.update(rps=r["ok_2xx"] / r["seconds"], cpu_s=cpu, loadgen_cpu_s=(ru1.ru_utime + ru1.ru_stime) -
             (ru0.ru_utime + ru0.ru_stime), peak_rss_mib=rss, not_200=bad, portcullis_allows=allows, portcullis_denies=denies,
             target_rps=rate)
    us.sort()
    r.update(p50_us=pct(us, 50), p99_us=pct(us, 99), p999_us=pct(us, 99.9), logged=len(us), samples_us=us)
    problems = []
    if r["failed"] or r["not_2xx"] or bad:
        problems.append(f"{r['failed']} failed, {r['not_2xx'] + bad} not 200")
    if denies:
        problems.append(f"{denies} checks denied by portcullis")
    # Every 200 must be an allow (an h2load request portcullis could not read would still be HTTP 200,
    # with a gRPC error in the trailers). Slack: requests still in flight when h2load stopped.
    in_flight = GRPC_CLIENTS * GRPC_STREAMS if s.kind == "grpc" else HTTP_CLIENTS
    if s.portcullis and allows < r["ok_2xx"] - in_flight:
        problems.append(f"only {allows} allows counted by portcullis for {r['ok_2xx']} responses")
    if problems:
        raise SystemExit(f"{s.name}: {', '.join(problems)} — the measurement would be of the wrong thing")
    log_file.unlink()  # large; the numbers are kept
    return r


def summarise(s: Scenario) -> dict:
    def total(runs, key):
        return sum(r[key] for r in runs)

    sat_rps = statistics.median(r["rps"] for r in s.sat)
    out = {"scenario": s.name, "saturation_rps": sat_rps,
           "rounds": {"saturation": [{k: v for k, v in r.items() if k != "samples_us"} for r in s.sat],
                      "rate": [{k: v for k, v in r.items() if k != "samples_us"} for r in s.rate]},
           "saturation_p99_us": pct(sorted(x for r in s.sat for x in r["samples_us"]), 99)}
    for phase, runs in (("saturation", s.sat), ("rate", s.rate)):
        n = total(runs, "ok_2xx")
        cpu = {p.name: sum(r["cpu_s"][p.name] for r in runs) for p in s.procs}
        out[f"{phase}_requests"] = n
        out[f"{phase}_cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
        out[f"{phase}_cpu_ms_per_1k"] = {k: round(1e6 * v / n, 2) if n else None for k, v in cpu.items()}
        lg = total(runs, "loadgen_cpu_s")
        out[f"{phase}_loadgen_cpu_s"] = round(lg, 3)
        out[f"{phase}_loadgen_cpu_ms_per_1k"] = round(1e6 * lg / n, 2) if n else None
    if s.rate:
        out["rate_target_rps"] = s.rate[0]["target_rps"]
        out["rate_rps"] = statistics.median(r["rps"] for r in s.rate)
        merged = sorted(x for r in s.rate for x in r["samples_us"])
        for k, p in (("p50_us", 50), ("p99_us", 99), ("p999_us", 99.9)):
            out[f"rate_{k}"] = pct(merged, p)
            out[f"rate_{k}_rounds"] = [r[k] for r in s.rate]
    if s.same_rate:
        out["same_rate"] = {}
        for other, runs in s.same_rate.items():
            merged = sorted(x for r in runs for x in r["samples_us"])
            out["same_rate"][other] = {
                "target_rps": runs[0]["target_rps"], "rps": statistics.median(r["rps"] for r in runs),
                **{k: pct(merged, p) for k, p in (("p50_us", 50), ("p99_us", 99), ("p999_us", 99.9))},
                "p99_us_rounds": [r["p99_us"] for r in runs]}
    out["peak_rss_mib"] = {p.name: round(max(r["peak_rss_mib"][p.name] for r in s.sat + s.rate), 1)
                           for p in s.procs}
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def ms(us: float) -> str:
    return f"{us / 1000:.3f}"


def report(rows: dict[str, dict], meta: dict) -> tuple[str, dict]:
    lines = [
        "# portcullis load harness results", "",
        f"{meta['date']} · {meta['cpus']} CPUs ({meta['cpu_model']}) · pinning: {meta['pinning']} · "
        f"portcullis `{meta['portcullis']}` ({meta['portcullis_version']}) · Envoy {meta['envoy_version']} · "
        f"{meta['h2load_version']} · load average at start/end {meta['loadavg_start_end']}", "",
        f"Load: gRPC h2load -c {GRPC_CLIENTS} -m {GRPC_STREAMS} at saturation, -m {GRPC_RATE_STREAMS} at the "
        f"fixed rate (pre-encoded CheckRequest, "
        f"{meta['check_request_bytes']} bytes); through Envoy h2load --h1 -c {HTTP_CLIENTS}. "
        f"Saturation {SAT_SECONDS:g} s and rate (50% of the scenario's saturation) {RATE_SECONDS:g} s per "
        f"round, {ROUNDS} rounds interleaved. Throughput: median of the rounds; latency: h2load's per-request "
        f"times of all rounds at the fixed rate.", "",
        "| scenario | saturation req/s | rate req/s | p50 ms | p99 ms | p99.9 ms | portcullis (or no-op) CPU s (µs/req) "
        "| Envoy CPU s (µs/req) | backend CPU µs/req | h2load CPU µs/req | peak RSS MiB portcullis / Envoy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def proc_cell(row, prefix):
        names = [n for n in row["saturation_cpu_s"] if n.startswith(prefix)]
        if not names:
            return "–"
        n = names[0]
        return f"{row['saturation_cpu_s'][n]:.2f} ({row['saturation_cpu_ms_per_1k'][n]:.1f})"

    def rss_cell(row):
        def one(prefix):
            v = [x for n, x in row["peak_rss_mib"].items() if n.startswith(prefix)]
            return f"{v[0]:.0f}" if v else "–"
        return f"{one(('portcullis', 'noop'))} / {one('envoy')}"

    for name, row in rows.items():
        backend = row["saturation_cpu_ms_per_1k"].get("backend envoy")
        lines.append(
            f"| {name} | {row['saturation_rps']:,.0f} | {row.get('rate_rps', float('nan')):,.0f} | "
            f"{ms(row['rate_p50_us'])} | {ms(row['rate_p99_us'])} | {ms(row['rate_p999_us'])} | "
            f"{proc_cell(row, ('portcullis', 'noop'))} | {proc_cell(row, 'envoy')} | "
            f"{'–' if backend is None else f'{backend:.1f}'} | {row['saturation_loadgen_cpu_ms_per_1k']:.1f} | "
            f"{rss_cell(row)} |")
    lines += ["", "Latency columns at the fixed rate; CPU columns over all saturation rounds: seconds, and CPU "
              "microseconds per request served (= ms per 1,000 requests).", ""]

    # Where the time goes: server CPU per request at saturation, and what each scenario adds to the
    # cheapest one of its kind.
    lines += ["| CPU per request at saturation (µs) | portcullis | front Envoy | backend Envoy | all servers "
              "| added over baseline |", "|---|---:|---:|---:|---:|---|"]
    per_req = {}
    for name, row in rows.items():
        c = row["saturation_cpu_ms_per_1k"]
        pc = next((v for n, v in c.items() if n.startswith(("portcullis", "noop"))), 0.0)
        fe = next((v for n, v in c.items() if n.startswith("envoy")), 0.0)
        be = c.get("backend envoy", 0.0)
        per_req[name] = pc + fe + be
        base = ("grpc noop" if "grpc noop" in rows else "grpc floor") if name.startswith("grpc") else "envoy"
        added = "" if name == base or base not in per_req else f"{per_req[name] - per_req[base]:+.1f} vs {base}"
        lines.append(f"| {name} | {pc:.1f} | {fe:.1f} | {be:.1f} | {per_req[name]:.1f} | {added} |")
    lines.append("")

    ratios = []

    def ratio(label, a, b, target=None, kind="ratio"):
        if a not in rows or b not in rows:
            return
        ra, rb = rows[a], rows[b]
        if kind == "ratio":
            v = ra["saturation_rps"] / rb["saturation_rps"]
            text = f"{v:.3f}x"
            ok = None if target is None else v >= target
            tgt = "" if target is None else f">= {target}x"
        elif kind in ("p99ratio", "p99same"):
            if kind == "p99same":
                # b's p99 measured at a's rate (SAME_RATE), not at b's own 50%.
                if a not in rb.get("same_rate", {}):
                    return
                v = ra["rate_p99_us"] / rb["same_rate"][a]["p99_us"]
            else:
                v = ra["rate_p99_us"] / rb["rate_p99_us"]
            ok = None if target is None else v <= target
            tgt = "" if target is None else f"<= {target}x"
            kind = "ratio"
        else:
            v = ra["rate_p99_us"] - rb["rate_p99_us"]
            text = f"{v:+.0f} us"
            ok = None if target is None else v <= target
            tgt = "" if target is None else f"<= {target} us"
        spread = rounds(a, b) if kind == "ratio" and "throughput" in label else None
        ratios.append({"label": label, "value": round(v, 4), "target": tgt or None,
                       "met": ok, "kind": kind, "a": a, "b": b, "rounds_min_median_max": spread})

    def cpu_ratio(label, a, b, proc_prefix, target, control=None):
        """CPU per request of one process (the first whose name starts with proc_prefix) in scenario a
        over the same in b: over all saturation rounds, and per round (rounds are interleaved). With
        `control`, each CPU figure is first divided by that process's CPU in the same round."""
        if a not in rows or b not in rows:
            return

        def per_round(name):
            out = []
            for r in rows[name]["rounds"]["saturation"]:
                proc = next(n for n in r["cpu_s"] if n.startswith(proc_prefix) and n != "backend envoy")
                out.append(r["cpu_s"][proc] / (r["cpu_s"][control] if control else r["ok_2xx"]))
            return out

        def total(name):
            c = rows[name]["saturation_cpu_ms_per_1k"]
            v = next(v for n, v in c.items() if n.startswith(proc_prefix) and n != "backend envoy")
            return v / c[control] if control else v

        v = total(a) / total(b)
        pairs = [x / y for x, y in zip(per_round(a), per_round(b))]
        spread = f"{min(pairs):.3f} / {statistics.median(pairs):.3f} / {max(pairs):.3f}"
        ok = None if target is None else v <= target
        ratios.append({"label": label, "value": round(v, 4), "target": None if target is None else f"<= {target}x",
                       "met": ok, "kind": "ratio", "a": a, "b": b, "rounds_min_median_max": spread})

    def rounds(a, b):
        """min / median / max of the per-round throughput ratios (rounds are interleaved)."""
        pairs = [x["rps"] / y["rps"] for x, y in zip(rows[a]["rounds"]["saturation"], rows[b]["rounds"]["saturation"])]
        return f"{min(pairs):.3f} / {statistics.median(pairs):.3f} / {max(pairs):.3f}"

    ratio("floor / no-op server throughput (gRPC)", "grpc floor", "grpc noop", 0.95)
    ratio("realistic / no-op server throughput (gRPC)", "grpc realistic", "grpc noop", 0.85)
    ratio("p99 realistic at 50% of its saturation / p99 no-op at that same rate (gRPC)", "grpc realistic",
          "grpc noop", 1.2, "p99same")
    ratio("p99 realistic / p99 no-op, each at 50% of its own saturation (gRPC)", "grpc realistic", "grpc noop",
          None, "p99ratio")
    ratio("no-op on portcullis's transport / no-op (gRPC)", "grpc noop inline", "grpc noop")
    ratio("floor / no-op on the same transport throughput (gRPC)", "grpc floor", "grpc noop inline")
    ratio("realistic / no-op on the same transport throughput (gRPC)", "grpc realistic", "grpc noop inline")
    ratio("realistic / floor throughput (gRPC)", "grpc realistic", "grpc floor", 0.85)
    ratio("realistic on store.redis / realistic throughput (gRPC)", "grpc realistic redis", "grpc realistic", 0.97)
    ratio("p99 realistic - floor at 50% (gRPC)", "grpc realistic", "grpc floor", None, "p99")
    ratio("Envoy+realistic / Envoy+floor throughput", "envoy+realistic", "envoy+floor", 0.9)
    # Issue 17: the policy inside Envoy (the dynamic module) against ext_authz and Envoy's own filters.
    ratio("Envoy+module realistic / Envoy jwt_authn+rbac throughput", "envoy+module realistic",
          "envoy jwt_authn+rbac", 1.0)
    ratio("Envoy+module realistic / Envoy+realistic (ext_authz) throughput", "envoy+module realistic",
          "envoy+realistic", 1.6)
    ratio("Envoy+module realistic / Envoy (no authorization) throughput", "envoy+module realistic", "envoy")
    ratio("p99 Envoy+module realistic - Envoy+realistic at 50%", "envoy+module realistic", "envoy+realistic",
          None, "p99")
    cpu_ratio("front Envoy CPU/request, module realistic / no authorization", "envoy+module realistic", "envoy",
              "envoy", None)
    ratio("p99 Envoy+realistic - Envoy+floor at 50%", "envoy+realistic", "envoy+floor", 100, "p99")
    ratio("Envoy+realistic / Envoy jwt_authn+rbac throughput", "envoy+realistic", "envoy jwt_authn+rbac")
    ratio("p99 Envoy+realistic - Envoy jwt_authn+rbac at 50%", "envoy+realistic", "envoy jwt_authn+rbac", None, "p99")
    ratio("Envoy+floor / Envoy (no ext_authz) throughput", "envoy+floor", "envoy")
    ratio("Envoy+realistic allow-list / all-headers throughput", "envoy+realistic allow-list",
          "envoy+realistic all-headers")
    # Issue 18: the front Envoy's CPU per request with the generated filter vs the deploy filter.
    cpu_ratio("front Envoy CPU/request, allow-list / all-headers", "envoy+realistic allow-list",
              "envoy+realistic all-headers", "envoy", 0.8)
    cpu_ratio("portcullis CPU/request, allow-list / all-headers", "envoy+realistic allow-list",
              "envoy+realistic all-headers", "portcullis", None)
    # The backend Envoy does the same work per request in both (it gets every header either way): its
    # CPU per request moves only with the machine. Dividing by it takes out what other work on a busy
    # machine does to every process alike.
    cpu_ratio("front Envoy CPU/request over backend Envoy's, allow-list / all-headers", "envoy+realistic allow-list",
              "envoy+realistic all-headers", "envoy", 0.8, control="backend envoy")
    cpu_ratio("portcullis CPU/request over backend Envoy's, allow-list / all-headers", "envoy+realistic allow-list",
              "envoy+realistic all-headers", "portcullis", None, control="backend envoy")
    ratio("Envoy jwt_authn+rbac / Envoy (no authz) throughput", "envoy jwt_authn+rbac", "envoy")
    # BASELINE_BIN: this build against the other one, scenario by scenario, in the same rounds.
    for n, proc in (("grpc noop", "noop"), ("grpc floor", "portcullis"), ("grpc realistic", "portcullis"),
                    ("envoy+module realistic", "envoy")):
        ratio(f"{n} / {n} @baseline throughput", n, f"{n} @baseline")
        cpu_ratio(f"{'front Envoy' if proc == 'envoy' else proc} CPU/request, {n} / {n} @baseline", n,
                  f"{n} @baseline", proc, None)
    if "grpc realistic" in rows:
        p99 = rows["grpc realistic"]["rate_p99_us"]
        ratios.insert(2, {"label": "p99 realistic at 50% of saturation (gRPC)", "value": p99, "target": "<= 1000 us",
                          "met": p99 <= 1000, "kind": "p99", "a": "grpc realistic", "b": None})
    lines += ["| comparison | value (median) | per round: min / median / max | target |", "|---|---:|---:|---|"]
    for r in ratios:
        v = f"{r['value']:.3f}x" if r["kind"] == "ratio" else f"{r['value']:+.0f} us" if r["b"] else f"{r['value']:.0f} us"
        t = "" if not r["target"] else f"{r['target']} — {'met' if r['met'] else 'MISSED'}"
        lines.append(f"| {r['label']} | {v} | {r.get('rounds_min_median_max') or ''} | {t} |")
    same = [f"{b} at {a}'s rate ({v['rps']:,.0f} req/s): p50 {ms(v['p50_us'])} / p99 {ms(v['p99_us'])} / "
            f"p99.9 {ms(v['p999_us'])} ms"
            for b, row in rows.items() for a, v in row.get("same_rate", {}).items()]
    lines += ["", "Notes: p99 differences compare each scenario at 50% of its own saturation" +
              (f"; measured at another's rate as well: {'; '.join(same)}. " if same else ". ") +
              meta["notes"], ""]
    return "\n".join(lines), {"meta": meta, "scenarios": rows, "comparisons": ratios}


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

def version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        mo = re.search(pattern, out.stdout + out.stderr)
        return mo.group(1) if mo else "?"
    except OSError:
        return "?"


def main() -> int:
    for tool, path in (("h2load", shutil.which("h2load")), ("portcullis", PORTCULLIS_BIN), ("envoy", ENVOY_BIN)):
        if not path or not os.access(path, os.X_OK):
            raise SystemExit(f"missing {tool} ({path or 'not on PATH'})")
    if PIN == "split" and not shutil.which("taskset"):
        raise SystemExit("PIN=split needs taskset (util-linux); or run with PIN=none")
    if PIN not in ("split", "none"):
        raise SystemExit("PIN must be split or none")
    if "/debug/" in PORTCULLIS_BIN:
        log(f"warning: {PORTCULLIS_BIN} is a debug build; numbers will be pessimistic")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = OUT_DIR / "work"
    shutil.rmtree(work, ignore_errors=True)
    logdir = work / "logs"
    logdir.mkdir(parents=True)
    m = make_material()
    (work / "jwks.json").write_text(m.jwks_json)

    # Token endpoint stub (its own process, next to the servers).
    tok = start("token endpoint", [sys.executable, str(HERE / "token_endpoint.py"), "portcullis-load", m.client_secret],
                logdir, stdout=subprocess.PIPE)
    token_port = int(tok.popen.stdout.readline())
    token_stats = f"http://127.0.0.1:{token_port}/stats"

    names = ["grpc noop", "grpc noop inline", "grpc floor", "grpc realistic", "grpc realistic redis", "envoy", "envoy jwt_authn+rbac",
             "envoy+floor", "envoy+realistic", "envoy+module realistic", "envoy+realistic all-headers",
             "envoy+realistic allow-list"]
    if BASELINE_BIN:
        names += [f"{n} @baseline" for n in BASELINE_SCENARIOS]
    wanted = [w.strip() for w in os.environ.get("SCENARIOS", ",".join(names)).split(",") if w.strip()]
    if set(wanted) - set(names) or not wanted:
        raise SystemExit(f"unknown SCENARIOS {sorted(set(wanted) - set(names))}; known: {names}")

    # Only what the chosen scenarios need is started.
    floor = realistic = backend = None
    if {"grpc floor", "envoy+floor"} & set(wanted):
        floor = start_portcullis("portcullis floor", HERE / "floor.yaml", logdir, {})
    realistic_env = {
        "LOAD_JWKS_FILE": str(work / "jwks.json"), "LOAD_SUBSCRIPTION_KEY": m.subscription_key,
        "LOAD_TOKEN_URL": f"http://127.0.0.1:{token_port}/token", "LOAD_CLIENT_SECRET": m.client_secret}
    if {"grpc realistic", "envoy+realistic", "envoy+realistic all-headers", "envoy+realistic allow-list"} & set(wanted):
        realistic = start_portcullis("portcullis realistic", HERE / "realistic.yaml", logdir, realistic_env)
    noop_port = None
    if "grpc noop" in wanted:
        if not os.access(NOOP_BIN, os.X_OK):
            raise SystemExit(f"missing {NOOP_BIN}: cargo build --release --example noop_check")
        noop_port = free_port()
        noop = start("noop", pinned(SERVER_CPUS) + [NOOP_BIN, f"127.0.0.1:{noop_port}"], logdir, stdout=subprocess.PIPE)
        if not noop.popen.stdout.readline().startswith(b"listening"):
            raise SystemExit("the no-op server did not start")
    noop_inline_port = None
    if "grpc noop inline" in wanted:
        if not os.access(NOOP_BIN, os.X_OK):
            raise SystemExit(f"missing {NOOP_BIN}: cargo build --release --example noop_check")
        noop_inline_port = free_port()
        noop_inline = start("noop inline", pinned(SERVER_CPUS) + [NOOP_BIN, f"127.0.0.1:{noop_inline_port}", "--inline"],
                            logdir, stdout=subprocess.PIPE)
        if not noop_inline.popen.stdout.readline().startswith(b"listening"):
            raise SystemExit("the no-op server (--inline) did not start")
    base = {}  # the baseline build's servers, by scenario
    if BASELINE_BIN:
        base_dir = Path(BASELINE_BIN).parent
        if "grpc noop @baseline" in wanted:
            port = free_port()
            p = start("noop @baseline", pinned(SERVER_CPUS) + [str(base_dir / "examples" / "noop_check"),
                                                              f"127.0.0.1:{port}"], logdir, stdout=subprocess.PIPE)
            if not p.popen.stdout.readline().startswith(b"listening"):
                raise SystemExit("the baseline no-op server did not start")
            base["grpc noop @baseline"] = (p, port, None)
        if "grpc floor @baseline" in wanted:
            pc = start_portcullis("portcullis floor @baseline", HERE / "floor.yaml", logdir, {}, BASELINE_BIN)
            base["grpc floor @baseline"] = (pc.proc, pc.grpc_port, pc)
        if "grpc realistic @baseline" in wanted:
            pc = start_portcullis("portcullis realistic @baseline", HERE / "realistic.yaml", logdir, realistic_env,
                                  BASELINE_BIN)
            base["grpc realistic @baseline"] = (pc.proc, pc.grpc_port, pc)
    redis_port = None
    if "grpc realistic redis" in wanted:
        # The same policy with its store on a shared Redis (issue 14): the token is cached locally, so
        # Redis is off the hot path; Redis's own command count says how much it was asked.
        if not shutil.which("redis-server"):
            raise SystemExit("grpc realistic redis needs redis-server (apt-get install redis-server)")
        redis_port = free_port()
        (work / "redis").mkdir()
        start("redis", pinned(SERVER_CPUS) + ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                              "--dir", str(work / "redis"), "--save", "", "--appendonly", "no"],
              logdir)
        wait_until("redis", lambda: redis_info(redis_port) is not None)
        # In a directory of its own: portcullis watches its config's directory, and h2load writes its log
        # into `work` all the time.
        (work / "redis-config").mkdir()
        config = work / "redis-config" / "realistic.yaml"
        config.write_text((HERE / "realistic.yaml").read_text() +
                          "\nstore:\n  redis: { url: \"${env:LOAD_REDIS_URL}\" }\n  key: ${env:LOAD_STORE_KEY}\n")
        realistic_redis = start_portcullis("portcullis realistic redis", config, logdir, {
            "LOAD_JWKS_FILE": str(work / "jwks.json"), "LOAD_SUBSCRIPTION_KEY": m.subscription_key,
            "LOAD_TOKEN_URL": f"http://127.0.0.1:{token_port}/token", "LOAD_CLIENT_SECRET": m.client_secret,
            "LOAD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LOAD_STORE_KEY": base64.b64encode(os.urandom(32)).decode()})
    if any(w.startswith("envoy") for w in wanted):
        backend, backend_port = start_envoy("backend envoy", "backend.yaml", work, logdir, {})
    path = "/orders/42"

    def front(name: str, template: str, extra: dict, pc: Portcullis | None, env: dict | None = None) -> Scenario:
        e, port = start_envoy(name, template, work, logdir, dict(extra, BACKEND_PORT=backend_port), env)
        return Scenario(name, "http", f"http://127.0.0.1:{port}{path}", [e] + ([pc.proc] if pc else []) + [backend], pc)

    browser = browser_headers(m)
    scenarios = []
    for name in names:
        if name not in wanted:
            continue
        if name in base:
            proc, port, pc = base[name]
            scenarios.append(Scenario(name, "grpc", f"http://127.0.0.1:{port}{CHECK_PATH}", [proc], pc))
        elif name == "grpc noop":
            scenarios.append(Scenario(name, "grpc", f"http://127.0.0.1:{noop_port}{CHECK_PATH}", [noop], None))
        elif name == "grpc noop inline":
            scenarios.append(Scenario(name, "grpc", f"http://127.0.0.1:{noop_inline_port}{CHECK_PATH}",
                                      [noop_inline], None))
        elif name == "grpc floor":
            scenarios.append(Scenario(name, "grpc", f"http://127.0.0.1:{floor.grpc_port}{CHECK_PATH}", [floor.proc], floor))
        elif name == "grpc realistic":
            scenarios.append(Scenario(name, "grpc", f"http://127.0.0.1:{realistic.grpc_port}{CHECK_PATH}",
                                      [realistic.proc], realistic))
        elif name == "grpc realistic redis":
            scenarios.append(Scenario(name, "grpc", f"http://127.0.0.1:{realistic_redis.grpc_port}{CHECK_PATH}",
                                      [realistic_redis.proc], realistic_redis))
        elif name == "envoy":
            scenarios.append(front(name, "front-none.yaml", {}, None))
        elif name == "envoy jwt_authn+rbac":
            scenarios.append(front(name, "front-jwt-rbac.yaml", {"JWKS_JSON": m.jwks_json,
                                                                  "SUBSCRIPTION_KEY": m.subscription_key}, None))
        elif name == "envoy+realistic all-headers":
            s = front(name, "front-ext-authz.yaml", {"PORTCULLIS_PORT": realistic.grpc_port}, realistic)
            s.headers = browser
            scenarios.append(s)
        elif name == "envoy+realistic allow-list":
            template = generated_front(work, realistic_env)
            s = front(name, str(template), {"PORTCULLIS_PORT": realistic.grpc_port}, realistic)
            s.headers = browser
            scenarios.append(s)
        elif name == "envoy+floor":
            scenarios.append(front(name, "front-ext-authz.yaml", {"PORTCULLIS_PORT": floor.grpc_port}, floor))
        elif name in ("envoy+module realistic", "envoy+module realistic @baseline"):
            so = MODULE_SO if name == "envoy+module realistic" else str(Path(BASELINE_BIN).parent /
                                                                        "libportcullis_envoy.so")
            if not os.path.isfile(so):
                raise SystemExit(f"missing {so}: cargo build --release -p portcullis-envoy")
            # The module reads realistic.yaml itself: the harness's values go into Envoy's environment
            # (`listen` is unused by the module, but its placeholders must resolve).
            env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(Path(so).parent),
                       LOAD_GRPC_LISTEN="127.0.0.1:0", LOAD_HTTP_LISTEN="127.0.0.1:0", **realistic_env)
            scenarios.append(front(name, "front-module.yaml", {"PORTCULLIS_CONFIG": HERE / "realistic.yaml"},
                                   None, env))
        else:
            scenarios.append(front(name, "front-ext-authz.yaml", {"PORTCULLIS_PORT": realistic.grpc_port}, realistic))

    body = grpc_frame(check_request(m).SerializeToString())
    (work / "check.bin").write_bytes(body)
    files = {"body": work / "check.bin", "headers": http_headers(m)}

    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    log("verifying ...")
    for s in scenarios:
        if s.kind == "grpc":
            verify_grpc(s, body, m, realistic=s.name.startswith("grpc realistic"))
        else:
            verify_http(s, m, must_refuse=s.name in ("envoy jwt_authn+rbac", "envoy+realistic",
                                                     "envoy+module realistic",
                                                     "envoy+module realistic @baseline") or
                        s.name.startswith("envoy+realistic "),
                        needs_cert=s.name.startswith(("envoy+realistic", "envoy+module")))
    tokens_before = json.loads(http_get(token_stats)[1])["token_requests"]
    redis_before = redis_info(redis_port) if redis_port else None

    log("warming up ...")
    for s in scenarios:
        subprocess.run(h2load_argv(s, files, WARMUP_SECONDS, None, None), capture_output=True, check=True)

    def order(rnd: int) -> list[Scenario]:
        k = rnd % len(scenarios)  # rotate the order each round so drift spreads over all scenarios
        return scenarios[k:] + scenarios[:k] if rnd % 2 == 0 else list(reversed(scenarios[k:] + scenarios[:k]))

    for rnd in range(ROUNDS):
        for s in order(rnd):
            r = measure(s, files, SAT_SECONDS, work / "h2load.log", None)
            s.sat.append(r)
            log(f"saturation round {rnd + 1}: {s.name:<22} {r['rps']:>9,.0f} req/s  p99 {ms(r['p99_us'])} ms")
    for rnd in range(ROUNDS):
        for s in order(rnd):
            target = 0.5 * statistics.median(x["rps"] for x in s.sat)
            r = measure(s, files, RATE_SECONDS, work / "h2load.log", target)
            s.rate.append(r)
            log(f"rate round {rnd + 1}:       {s.name:<22} {r['rps']:>9,.0f} req/s (target {target:,.0f})  "
                f"p50 {ms(r['p50_us'])}  p99 {ms(r['p99_us'])}  p99.9 {ms(r['p999_us'])} ms")
        by_name = {s.name: s for s in scenarios}
        for a, b in SAME_RATE:
            if a in by_name and b in by_name:
                target = 0.5 * statistics.median(x["rps"] for x in by_name[a].sat)
                r = measure(by_name[b], files, RATE_SECONDS, work / "h2load.log", target)
                by_name[b].same_rate.setdefault(a, []).append(r)
                log(f"rate round {rnd + 1}:       {b:<22} {r['rps']:>9,.0f} req/s (at {a}'s rate {target:,.0f})  "
                    f"p50 {ms(r['p50_us'])}  p99 {ms(r['p99_us'])}  p99.9 {ms(r['p999_us'])} ms")

    tokens_after = json.loads(http_get(token_stats)[1])["token_requests"]
    redis_note = ""
    if redis_port:
        # Every command Redis served during the measurements (the harness's own INFO calls included),
        # over the whole time the Redis scenario was under load.
        commands = redis_info(redis_port) - redis_before
        loaded = sum(r["seconds"] for sc in scenarios if sc.name == "grpc realistic redis" for r in sc.sat + sc.rate)
        redis_note = (f"Redis served {commands} command(s) during the measurements ({commands / loaded:.2f}/s "
                      f"over the {loaded:.0f} s the Redis scenario was loaded). ")
    cpu_model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "cpu_model": cpu_model,
        "pinning": (f"h2load on CPU {LOADGEN_CPUS}, servers (portcullis, Envoys, token stub) on CPU {SERVER_CPUS}"
                    if PIN == "split" else "none (all processes float over all CPUs)") +
                   (f", nice {NICE}" if NICE else ""),
        "portcullis": PORTCULLIS_BIN, "portcullis_version": version([PORTCULLIS_BIN, "--version"], r"(\S+\s+\S+)"),
        "envoy_version": version([ENVOY_BIN, "--version"], r"/(1\.\d+\.\d+)/"),
        "h2load_version": version(["h2load", "--version"], r"(h2load nghttp2/\S+)"),
        "check_request_bytes": len(body),
        # Other work on the machine skews everything; the load average shows whether there was any.
        "loadavg_start_end": [loadavg_start, Path("/proc/loadavg").read_text().split()[:3]],
        "settings": {"SAT_SECONDS": SAT_SECONDS, "RATE_SECONDS": RATE_SECONDS, "ROUNDS": ROUNDS,
                     "GRPC_CLIENTS": GRPC_CLIENTS, "GRPC_STREAMS": GRPC_STREAMS, "HTTP_CLIENTS": HTTP_CLIENTS,
                     "PIN": PIN, "NICE": NICE},
        "backend_token_requests": {"before_measuring": tokens_before, "after": tokens_after},
        "notes": (redis_note + (f"The backend credential was fetched {tokens_after} time(s) in the whole run "
                   f"({tokens_after - tokens_before} during the measurements): served from the token cache. "
                   if realistic else "") +
                  "jwt_authn+rbac does not check the client certificate (that needs mTLS at Envoy) or fetch a "
                  "backend credential; it compares the subscription key as a plain header."),
    }
    rows = {s.name: summarise(s) for s in scenarios}
    md, js = report(rows, meta)
    (OUT_DIR / "results.md").write_text(md)
    (OUT_DIR / "results.json").write_text(json.dumps(js, indent=2) + "\n")
    print(md)
    log(f"wrote {OUT_DIR / 'results.md'} and {OUT_DIR / 'results.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        for p in reversed(PROCS):
            p.stop()
