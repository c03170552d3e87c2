"""The fleet suite's topology: one real Redis, the real OpenID Provider (tests/idp, refresh-token
rotation on, short access tokens), THREE `portcullis serve` replicas with the same configuration
(each its own listen ports), one real Envoy balancing ext_authz checks over the three (round robin) in
front of an echo backend, and a recording pass-through in front of the provider's token endpoint.

    client -> Envoy --ext_authz--> replica 1 | replica 2 | replica 3 --> Redis
                |                        \\ token requests -> TokenTap -> IdP /token
                v
          echo backend (answers with the headers it received, so the test sees the injected token)

The same topology runs with each replica on its own embedded store (`store.path`, redb): the
deployment of issue 14, kept as the regression witness.

Generic pieces (processes, Envoy, the echo backend, HTTP requests) come from tests/e2e/harness.py;
the admin API, the consent browser and token checks from tests/credentials/credentials_harness.py.
Redis is spoken to with the tiny RESP client below (no Python package needed).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import jwt
import pytest
from envoy.service.auth.v3 import external_auth_pb2

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _d in ("e2e", "credentials", "idp"):
    if str(ROOT / "tests" / _d) not in sys.path:
        sys.path.insert(0, str(ROOT / "tests" / _d))

from credentials_harness import admin as _admin  # noqa: E402
from credentials_harness import check_over, drive_consent  # noqa: E402
from harness import (  # noqa: E402
    Backend, Envoy, Process, envoy_bin, free_port, listener_addrs, missing, portcullis_bin, request)
from idp import Idp, start_idp  # noqa: E402

ADMIN_TOKEN = "admin-token-for-the-fleet-suite"
STORE_KEY = base64.b64encode(bytes(range(32, 64))).decode()
CLIENT_ID = "web-app"
# Distinctive, so that finding it anywhere it must not be is unambiguous.
CLIENT_SECRET = "fleet-client-secret-5f0c9d2e8b7a41c3"
SCOPE = "openid offline_access orders:read"
RESOURCE = "api://orders"
CREDENTIAL = "crm"
PREFIX = "portcullis:"
# Where `idp.authorization_code_consent` (seeding a refresh token by hand) lands; never fetched.
MANUAL_REDIRECT = "http://127.0.0.1:9/callback"
START_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------------------
# prerequisites
# ---------------------------------------------------------------------------------------------------


def redis_server_bin() -> str:
    for path in (os.environ.get("REDIS_SERVER_BIN"), shutil.which("redis-server"), "/usr/bin/redis-server"):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    missing("no redis-server (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)")
    raise AssertionError("unreachable")


def require_idp() -> None:
    if not (ROOT / "tests" / "idp" / "node_modules" / "oidc-provider").is_dir():
        missing("the test OpenID Provider is not installed: npm ci --prefix tests/idp")


def validate(config_text: str, workdir: Path, env: dict) -> subprocess.CompletedProcess:
    path = workdir / "validate.yaml"
    path.write_text(config_text)
    return subprocess.run([portcullis_bin(), "validate", "--config", str(path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


# ---------------------------------------------------------------------------------------------------
# Redis: the server and a tiny RESP2 client
# ---------------------------------------------------------------------------------------------------


class RedisError(Exception):
    pass


def _read_reply(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_read_reply(f) for _ in range(n)]
    raise RedisError(f"unexpected RESP line {line!r}")


def redis_command(port: int, *args, timeout: float = 5.0):
    """One command on a fresh connection; bulk strings come back as bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        s.sendall(b"".join(parts))
        with s.makefile("rb") as f:
            return _read_reply(f)


class RedisServer:
    """`redis-server` on a loopback port, its data in its own directory; restartable on the same port
    and directory. Default: no persistence at all (`--save '' --appendonly no`); `aof=True`:
    `--appendonly yes --appendfsync always` (every write on disk before it is acknowledged)."""

    def __init__(self, workdir: Path, aof: bool = False):
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.aof = aof
        self.starts = 0
        self.process: Process | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        argv = [redis_server_bin(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--daemonize", "no", "--logfile", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        return argv

    def start(self) -> None:
        self.starts += 1
        self.process = Process(f"redis-{self.starts}", self.argv(), self.workdir)
        self.process.wait_for("redis PING", self._pong, timeout=START_TIMEOUT)

    def _pong(self) -> bool:
        try:
            return self.cmd("PING") == "PONG"
        except (OSError, ConnectionError, RedisError):   # refused, or LOADING while it reads its AOF
            return False

    def alive(self) -> bool:
        return bool(self.process and self.process.alive())

    def cmd(self, *args):
        return redis_command(self.port, *args)

    def kill(self) -> None:
        """SIGKILL: nothing is flushed (what `appendfsync always` is for)."""
        assert self.process
        self.process.stop(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown (with the default settings nothing is saved)."""
        if self.process:
            if self.process.alive():
                self.process.proc.send_signal(signal.SIGCONT)
            self.process.stop(signal.SIGTERM)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung or partitioned Redis)."""
        assert self.process
        self.process.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process
        self.process.proc.send_signal(signal.SIGCONT)

    def shutdown_save(self) -> None:
        """SHUTDOWN SAVE: writes dump.rdb even without save points, then exits; a later `start()`
        loads it (a planned maintenance restart without AOF)."""
        assert self.process
        try:
            self.cmd("SHUTDOWN", "SAVE")
        except (ConnectionError, OSError):
            pass    # the server closes the connection instead of answering
        self.process.proc.wait(timeout=30)
        self.process.stop()

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("redis-*.log")))

    # -- reading what the replicas wrote --------------------------------------------------------

    def keys(self, prefix: str = PREFIX) -> list[bytes]:
        found: set[bytes] = set()
        cursor = b"0"
        while True:
            cursor, batch = self.cmd("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            found.update(batch)
            if cursor in (b"0", 0):
                return sorted(found)

    def get(self, key: str) -> bytes | None:
        return self.cmd("GET", key)

    def dump_everything(self, prefix: str = PREFIX) -> list[tuple[bytes, str, list[bytes]]]:
        """Every key under `prefix` with its type and every byte string it holds (string value, hash
        fields and values, set and list members, and the key's DUMP serialisation)."""
        out = []
        for key in self.keys(prefix):
            kind = self.cmd("TYPE", key)
            values: list[bytes] = []
            if kind == "string":
                values.append(self.cmd("GET", key) or b"")
            elif kind == "hash":
                values.extend(self.cmd("HGETALL", key))
            elif kind == "set":
                values.extend(self.cmd("SMEMBERS", key))
            elif kind == "list":
                values.extend(self.cmd("LRANGE", key, 0, -1))
            elif kind == "zset":
                values.extend(self.cmd("ZRANGE", key, 0, -1, "WITHSCORES"))
            dumped = self.cmd("DUMP", key)
            if dumped:
                values.append(dumped)
            out.append((key, kind, values))
        return out


class RedisGate:
    """A TCP pass-through in front of Redis that reads the commands replicas send. Armed, it freezes
    the connection of the replica that has just taken a refresh lease (`SET <prefix>lease:... <fence>
    NX ...`) at its next script call carrying that fence (the in-flight marker's compare-and-set, sent
    before the refresh token goes out), and every later command of it: the holder is stopped after
    taking the lease and before the refresh token leaves, for as long as the test needs to kill it.

    Only a test that wants this window uses it (`start_fleet(redis_gate=True)`); restarting Redis
    behind it is not supported."""

    def __init__(self, redis_port: int):
        self.redis_port = redis_port
        self.armed = threading.Event()
        self.fences: set[bytes] = set()
        self.held: list[bytes] = []          # fences whose holder is frozen, in order
        self.commands = Counter()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, name="redis-gate", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.redis_port), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self._conns += [client, server]
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
            threading.Thread(target=self._commands, args=(client, server), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _commands(self, client: socket.socket, server: socket.socket) -> None:
        f = client.makefile("rb")
        frozen = False
        try:
            while True:
                raw, args = self._read_command(f)
                if raw is None:
                    break
                name = args[0].upper() if args else b""
                self.commands[name.decode(errors="replace")] += 1
                if name == b"SET" and len(args) >= 3 and b":lease:" in b":" + args[1] and b"NX" in (a.upper() for a in args[3:]):
                    self.fences.add(args[2])
                if not frozen and self.armed.is_set() and name in (b"EVAL", b"EVALSHA"):
                    fence = next((a for a in args[3:] if a in self.fences), None)
                    if fence is not None:
                        frozen = True
                        self.armed.clear()       # one holder only: the next lease holder must go through
                        self.held.append(fence)
                if frozen:
                    continue                     # swallowed: the replica waits for an answer forever
                server.sendall(raw)
        except (OSError, ValueError):
            pass
        self._pump_close(client, server)

    @staticmethod
    def _pump_close(*socks) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _read_command(f) -> tuple[bytes | None, list[bytes]]:
        """One RESP command (an array of bulk strings, as every client library sends them)."""
        head = f.readline()
        if not head:
            return None, []
        if not head.startswith(b"*"):
            return head, head.split()            # an inline command (redis-cli, telnet)
        parts = [head]
        args = []
        for _ in range(int(head[1:].strip())):
            size_line = f.readline()
            parts.append(size_line)
            n = int(size_line[1:].strip())
            data = f.read(n + 2)
            parts.append(data)
            args.append(data[:-2])
        return b"".join(parts), args

    def stop(self) -> None:
        self._closed = True
        self._sock.close()
        self._pump_close(*self._conns)
        for s in self._conns:
            s.close()


# ---------------------------------------------------------------------------------------------------
# the recording pass-through in front of the token endpoint
# ---------------------------------------------------------------------------------------------------


@dataclass
class TokenCall:
    t: float
    form: dict[str, str]
    status: int
    answer: dict | str

    @property
    def grant_type(self) -> str | None:
        return self.form.get("grant_type")

    @property
    def error(self) -> str | None:
        return self.answer.get("error") if isinstance(self.answer, dict) else None


class _TapHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        tap: TokenTap = self.server.tap  # type: ignore[attr-defined]
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization", "accept")}
        status, ctype, answer = 502, "text/plain", b"token tap: upstream failed"
        try:
            req = urllib.request.Request(tap.upstream + self.path, data=body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    status, ctype, answer = r.status, r.headers.get("content-type", ""), r.read()
            except urllib.error.HTTPError as e:
                status, ctype, answer = e.code, e.headers.get("content-type", ""), e.read()
        except OSError as e:
            answer = f"token tap: {e}".encode()
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode(errors="replace")).items()}
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = answer.decode(errors="replace")
        tap.calls.append(TokenCall(time.time(), form, status, parsed))
        try:
            self.send_response(status)
            self.send_header("content-type", ctype or "application/json")
            self.send_header("content-length", str(len(answer)))
            self.send_header("cache-control", "no-store")
            self.end_headers()
            self.wfile.write(answer)
        except OSError:
            pass    # the caller is gone (killed mid-refresh): the answer is lost, as it would be

    def log_message(self, *args):
        pass


class TokenTap:
    """Forwards POSTs to the provider and records every token request and answer, so the suite knows
    every refresh token and access token the replicas were given and can see a refresh token being
    sent twice (a replay) directly, not only through the provider's reaction."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.calls: list[TokenCall] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _TapHandler)
        self.server.daemon_threads = True
        self.server.tap = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="token-tap", daemon=True).start()

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def refreshes(self) -> list[TokenCall]:
        return [c for c in self.calls if c.grant_type == "refresh_token"]

    def replays(self) -> dict[str, int]:
        """Refresh tokens sent more than once (abbreviated): each is a replay of a spent token."""
        sent = Counter(c.form.get("refresh_token") for c in self.refreshes())
        return {f"{rt[:6]}...": n for rt, n in sent.items() if rt and n > 1}

    def errors(self) -> list[TokenCall]:
        return [c for c in self.calls if c.status != 200]

    def issued(self, kind: str) -> list[str]:
        """Every `access_token` / `refresh_token` / `id_token` the provider handed out through the tap."""
        return [c.answer[kind] for c in self.calls if isinstance(c.answer, dict) and c.answer.get(kind)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------------
# one replica
# ---------------------------------------------------------------------------------------------------


class Replica:
    """`portcullis serve` with fixed loopback ports (so Envoy's cluster and the redirect URI can name
    them before it starts); stdout (decision log) and stderr (JSON logs) in `<name>.log`."""

    def __init__(self, name: str, config_text: str, workdir: Path, env: dict, grpc_port: int, http_port: int):
        self.name = name
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(config_text)
        self.process = Process(name, [portcullis_bin(), "serve", "--config", str(self.config_path)], workdir,
                               env={**os.environ, "RUST_BACKTRACE": "1", **env})
        self.process.wait_for(f"{name} listening", lambda: {"grpc", "http"} <= listener_addrs(self.output()).keys(),
                              timeout=START_TIMEOUT)
        self._channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def alive(self) -> bool:
        return self.process.alive()

    def output(self) -> str:
        return self.process.output()

    def check(self, path: str = "/crm/direct", headers: dict | None = None) -> external_auth_pb2.CheckResponse:
        """A Check straight to this replica (no Envoy), as Envoy would send it."""
        return check_over(self._channel, path, headers, timeout=30)

    def admin(self, method: str, path: str, body: dict | None = None):
        return _admin(self.http_port, method, path, body, token=ADMIN_TOKEN)

    def connection(self, conn_id: str) -> dict | None:
        """This replica's admin view of one connection of the credential (None when not listed)."""
        status, body = self.admin("GET", f"/admin/credentials/{CREDENTIAL}/connections")
        assert status == 200, (status, body)
        return next((c for c in body["connections"] if c["id"] == conn_id), None)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def decision_ids(self) -> set[str]:
        ids = set()
        for line in self.output().splitlines():
            if '"decision_id"' in line:
                try:
                    ids.add(json.loads(line)["decision_id"])
                except (ValueError, KeyError):
                    pass
        return ids

    def kill(self) -> None:
        self._channel.close()
        self.process.stop(signal.SIGKILL)

    def stop(self) -> int | None:
        self._channel.close()
        return self.process.stop()


def check_token(resp) -> str:
    """The bearer token an allowed Check injects upstream."""
    assert resp.status.code == 0, f"denied: {resp.status.code} {resp.denied_response.body}"
    headers = {h.header.key: h.header.value for h in resp.ok_response.headers}
    value = headers.get("authorization", "")
    assert value.startswith("Bearer "), headers
    return value[len("Bearer "):]


def check_denial(resp) -> tuple[int, int, str]:
    """(gRPC code, HTTP status, reason) of a denied Check."""
    assert resp.status.code != 0, "allowed"
    body = json.loads(resp.denied_response.body)
    return resp.status.code, resp.denied_response.status.code, body["reason"]


# ---------------------------------------------------------------------------------------------------
# Prometheus text
# ---------------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
            except ValueError:
                pass
    return out


def metric_sum(text: str, name: str, **labels) -> float:
    return sum(v for n, ls, v in samples(text) if n == name and all(ls.get(k) == str(w) for k, w in labels.items()))


# ---------------------------------------------------------------------------------------------------
# traffic through Envoy
# ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    t: float                 # when the answer arrived (epoch seconds)
    status: int
    reason: str | None       # portcullis' deny reason (None for an allow, or an answer Envoy made itself)
    token: str | None        # the bearer token the backend received (allows only)
    decision_id: str | None
    detail: str = ""
    seconds: float = 0.0     # how long the answer took (Traffic sets it)

    @property
    def allowed(self) -> bool:
        return self.status == 200 and self.token is not None

    @property
    def from_portcullis(self) -> bool:
        return self.decision_id is not None


def classify(r) -> Outcome:
    now = time.time()
    decision_id = r.header("x-portcullis-decision-id")
    if r.status == 200 and r.header("x-echo") == "1":
        values = r.json()["headers"].get("authorization") or []
        token = values[0][len("Bearer "):] if values and values[0].startswith("Bearer ") else None
        return Outcome(now, 200, None, token, decision_id, "" if token else f"allowed without a bearer token: {values}")
    reason = None
    try:
        body = r.json()
        reason = body.get("reason")
        decision_id = decision_id or body.get("decisionId")
    except ValueError:
        pass
    return Outcome(now, r.status, reason, None, decision_id, str(r)[:300])


class Traffic:
    """`workers` threads sending GETs through Envoy in a loop until stopped; every answer is kept."""

    def __init__(self, url: str, workers: int = 3, pause: float = 0.05):
        self.url = url
        self.pause = pause
        self.outcomes: list[Outcome] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                sent = time.time()
                outcome = classify(request(f"{self.url}?w={i}&n={n}", timeout=30))
                outcome.seconds = outcome.t - sent
                self.outcomes.append(outcome)
            except OSError as e:
                self.errors.append(f"{time.time():.3f} {e!r}")
            self._stop.wait(self.pause)

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.t < end]


def timeline(outcomes: list[Outcome], t0: float, marks: dict[str, float] | None = None) -> str:
    """Per second from `t0`: allowed / denied-by-portcullis (reason) / made by Envoy, for messages."""
    rows: dict[int, Counter] = {}
    for o in outcomes:
        key = "allow" if o.allowed else (o.reason or f"envoy {o.status}")
        rows.setdefault(int(o.t - t0 if o.t >= t0 else o.t - t0 - 1), Counter())[key] += 1
    at = {int(t - t0): name for name, t in (marks or {}).items()}
    return "\n".join(f"{s:+4d}s {dict(c)}" + (f"   <- {at[s]}" if s in at else "") for s, c in sorted(rows.items()))


class TokenVerifier:
    """Checks an injected token as the backend would: the provider's RS256 signature, issuer and
    audience; returns its claims. Expiry is checked against the moment it was received (`at`)."""

    def __init__(self, idp: Idp):
        self.idp = idp
        self.jwks = jwt.PyJWKClient(idp.jwks_uri)
        self.claims: dict[str, dict] = {}

    def __call__(self, token: str, at: float | None = None) -> dict:
        claims = self.claims.get(token)
        if claims is None:
            key = self.jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=RESOURCE, issuer=self.idp.issuer,
                                options={"verify_exp": False})
            self.claims[token] = claims
        if at is not None:
            # exp is whole seconds; one second of slack for the rounding.
            assert at <= claims["exp"] + 1, f"an expired token was injected: exp {claims['exp']}, received at {at:.1f}"
        return claims

    def assert_valid(self, outcome: Outcome, subject: str = "alice") -> dict:
        assert outcome.allowed, outcome
        claims = self(outcome.token, outcome.t)
        assert claims["sub"] == subject and claims["client_id"] == CLIENT_ID, claims
        return claims


# ---------------------------------------------------------------------------------------------------
# the fleet
# ---------------------------------------------------------------------------------------------------


def idp_config(redirect_uris: list[str], access_token_ttl: int) -> dict:
    return {
        "clients": [
            {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "grant_types": ["authorization_code", "refresh_token"],
             "redirect_uris": redirect_uris, "access_token_ttl": access_token_ttl},
        ],
        "resources": [{"resource": RESOURCE, "scopes": ["orders:read"]}],
        "rotate_refresh_token": True,
    }


def replica_config(*, grpc_port: int, http_port: int, store: str, token_url: str, authorize_url: str,
                   redirect_uri: str, connection: str, refresh_before_expiry: str, timeout: str, seeded: bool) -> str:
    seed = '    refresh_token: "${env:FLEET_SEED_REFRESH_TOKEN}"\n' if seeded else ""
    return f"""
telemetry: {{ log_format: json, log_level: info, decision_log: true }}
listen: {{ grpc: "127.0.0.1:{grpc_port}", http: "127.0.0.1:{http_port}" }}
admin: {{ token: "${{env:PORTCULLIS_ADMIN_TOKEN}}" }}
{store}
credentials:
  - name: {CREDENTIAL}
    grant: refresh_token
    token_url: {token_url}
    authorize_url: {authorize_url}
    redirect_uri: {redirect_uri}
    client_id: {CLIENT_ID}
    client_secret: "${{env:FLEET_CLIENT_SECRET}}"
    scope: {SCOPE}
    resource: {RESOURCE}
    refresh_before_expiry: {refresh_before_expiry}
    timeout: {timeout}
{seed}apis:
  - name: crm
    match: {{ path_prefix: /crm }}
    on_allow: {{ backend_credential: {{ name: {CREDENTIAL}, connection: {connection} }} }}
unmatched: deny
"""


def redis_store(url: str, timeout: str = "500ms") -> str:
    return f"""store:
  redis:
    url: {url}
    prefix: "{PREFIX}"
    timeout: {timeout}
  key: "${{env:PORTCULLIS_STORE_KEY}}"
"""


def embedded_store(path: Path) -> str:
    return f"""store:
  path: {path}
  key: "${{env:PORTCULLIS_STORE_KEY}}"
"""


@dataclass
class Fleet:
    workdir: Path
    idp: Idp
    tap: TokenTap
    redis: RedisServer | None
    replicas: list[Replica]
    envoy: Envoy
    backend: Backend
    connection: str
    redirect_uri: str
    access_token_ttl: int
    verify: TokenVerifier
    gate: RedisGate | None = None
    closers: list = field(default_factory=list)

    # -- through Envoy --------------------------------------------------------------------------

    def url(self, path: str = "/crm/orders") -> str:
        return self.envoy.url("http", path)

    def get(self, path: str = "/crm/orders") -> Outcome:
        return classify(request(self.url(path), timeout=30))

    def traffic(self, workers: int = 3, pause: float = 0.05) -> Traffic:
        return Traffic(self.url("/crm/orders"), workers, pause)

    # -- consent --------------------------------------------------------------------------------

    def start_consent(self, on: int) -> str:
        status, started = self.replicas[on].admin("POST", f"/admin/credentials/{CREDENTIAL}/connections/{self.connection}/consent")
        assert status == 200, (status, started)
        return started["login_url"]

    def callback(self, redirect: str, on: int) -> tuple[int, str]:
        """Delivers the provider's redirect (aimed at `redirect_uri`) to replica `on` instead."""
        target = urllib.parse.urlsplit(redirect)._replace(netloc=f"127.0.0.1:{self.replicas[on].http_port}")
        try:
            with urllib.request.urlopen(urllib.parse.urlunsplit(target), timeout=30) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def consent(self, start_on: int = 0, callback_on: int = 1, login: str = "alice") -> None:
        """The operator starts consent on one replica's admin API; the user's browser comes back to
        another replica's /admin/callback."""
        redirect = drive_consent(self.idp, self.start_consent(start_on), self.redirect_uri, login=login)
        status, text = self.callback(redirect, callback_on)
        assert status == 200, f"callback on {self.replicas[callback_on].name}: {status} {text[:300]}"

    # -- what happened --------------------------------------------------------------------------

    def refresh_count(self) -> int:
        return self.idp.stats()["token"]["by_grant_type"].get("refresh_token", 0)

    def grant_errors(self) -> list[str]:
        return [line for line in self.idp.stderr.splitlines() if "grant.error" in line]

    def deciders(self, outcomes: list[Outcome]) -> Counter:
        """How many of `outcomes` each replica decided (by decision id, from the decision logs)."""
        by_id = {d: r.name for r in self.replicas for d in r.decision_ids()}
        return Counter(by_id.get(o.decision_id) for o in outcomes)

    def lease(self) -> bytes | None:
        assert self.redis
        return self.redis.get(f"{PREFIX}lease:{CREDENTIAL}:{self.connection}")

    def tails(self, lines: int = 25) -> str:
        out = []
        for r in self.replicas:
            out.append(f"--- {r.name} (pid {r.pid}, {'alive' if r.alive() else 'dead'}) ---")
            out += [l for l in r.output().splitlines() if '"decision_id"' not in l][-lines:]
        out.append("--- idp stderr ---")
        out += self.idp.stderr.splitlines()[-lines:]
        out.append("--- token requests (grant, status, error) ---")
        out += [f"{c.t:.1f} {c.grant_type} {c.status} {c.error or ''}" for c in self.tap.calls][-lines:]
        if self.redis:
            out.append("--- redis ---")
            out += self.redis.output().splitlines()[-10:]
        return "\n".join(out)

    def close(self) -> None:
        for c in reversed(self.closers):
            try:
                c()
            except Exception as e:  # keep stopping the rest
                print(f"fleet teardown: {e!r}", file=sys.stderr)


def start_fleet(workdir: Path, *, store: str = "redis", access_token_ttl: int = 20, refresh_before_expiry: str = "10s",
                timeout: str = "10s", redis_timeout: str = "500ms", aof: bool = False, seeded: bool = False,
                redis_gate: bool = False) -> Fleet:
    """Starts the whole topology. `store`: "redis" (the fix) or "embedded" (each replica its own
    `store.path`: issue 14's deployment). `seeded`: the `default` connection is seeded from a refresh
    token obtained by hand (what a multi-replica deployment without a shared store had to do)."""
    # Every prerequisite before anything starts: a missing one skips (fails under CI=true).
    portcullis_bin()
    require_idp()
    envoy_bin()
    redis_bin = redis_server_bin() if store == "redis" else None
    closers: list = []

    def undo():
        for c in reversed(closers):
            try:
                c()
            except Exception:
                pass

    try:
        grpc_ports = [free_port() for _ in range(3)]
        http_ports = [free_port() for _ in range(3)]
        redirect_uri = f"http://127.0.0.1:{http_ports[1]}/admin/callback"
        idp = start_idp(idp_config([redirect_uri, MANUAL_REDIRECT], access_token_ttl))
        closers.append(idp.close)
        tap = TokenTap(idp.issuer)
        closers.append(tap.stop)
        redis = gate = None
        if redis_bin:
            redis = RedisServer(workdir, aof=aof)
            closers.append(redis.stop)
            if redis_gate:
                gate = RedisGate(redis.port)
                closers.append(gate.stop)
        env = {"PORTCULLIS_STORE_KEY": STORE_KEY, "PORTCULLIS_ADMIN_TOKEN": ADMIN_TOKEN, "FLEET_CLIENT_SECRET": CLIENT_SECRET}
        connection = "shared"
        if seeded:
            tokens = idp.authorization_code_consent(CLIENT_ID, CLIENT_SECRET, MANUAL_REDIRECT, SCOPE, resource=RESOURCE, login="alice")
            env["FLEET_SEED_REFRESH_TOKEN"] = tokens["refresh_token"]
            connection = "default"

        def config(i: int) -> str:
            if redis:
                store_text = redis_store(gate.url if gate else redis.url, redis_timeout)
            else:
                (workdir / f"replica{i + 1}").mkdir(exist_ok=True)
                store_text = embedded_store(workdir / f"replica{i + 1}" / "store.db")
            return replica_config(grpc_port=grpc_ports[i], http_port=http_ports[i], store=store_text, token_url=tap.token_url,
                                  authorize_url=idp.authorization_endpoint, redirect_uri=redirect_uri, connection=connection,
                                  refresh_before_expiry=refresh_before_expiry, timeout=timeout, seeded=seeded)

        checked = validate(config(0), workdir, env)
        if checked.returncode != 0:
            what = "store.redis" if redis else "the embedded-store fleet config"
            pytest.fail(f"`portcullis validate` refuses {what} (exit {checked.returncode}); this build does not "
                        f"implement the shared store yet:\n{checked.stdout}{checked.stderr}")

        replicas = []
        for i in range(3):
            r = Replica(f"replica{i + 1}", config(i), workdir, env, grpc_ports[i], http_ports[i])
            closers.append(r.stop)
            replicas.append(r)
        backend = Backend()
        closers.append(backend.stop)
        params = {"EXT_AUTHZ_TIMEOUT": "20s", "BACKEND_PORT": backend.port,
                  **{f"PORTCULLIS_GRPC_PORT_{i + 1}": p for i, p in enumerate(grpc_ports)}}
        # harness.Envoy renders deploy/envoy/<template>; an absolute path picks this suite's own.
        envoy = Envoy(str(HERE / "envoy-fleet.yaml"), params, workdir)
        closers.append(envoy.stop)
        envoy.wait_healthy("portcullis")
    except BaseException:
        undo()
        raise
    return Fleet(workdir, idp, tap, redis, replicas, envoy, backend, connection, redirect_uri, access_token_ttl,
                 TokenVerifier(idp), gate, closers)


def eventually(what: str, f, timeout: float = 30.0, interval: float = 0.2, diagnostics=None):
    deadline = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}" + (f"\n{diagnostics()}" if diagnostics else ""))
        time.sleep(interval)
