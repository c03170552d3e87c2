"""Helpers for the credential manager suite: the real portcullis binary, the real OpenID Provider
(tests/idp), Check calls through grpcio with Envoy's generated messages, and the admin API."""

from __future__ import annotations

import base64
import http.cookiejar
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import jwt
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "idp"))

from idp import Idp, IdpError, start_idp  # noqa: E402

BIN = os.environ.get("PORTCULLIS_BIN", str(ROOT / "target" / "debug" / "portcullis"))
ADMIN_TOKEN = "admin-token-for-the-credentials-suite"
STORE_KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(100, 132))).decode()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from harness import free_port  # noqa: E402  (one port picker for every suite)


def check_over(channel, path: str, headers: dict | None = None, timeout: float = 15) -> external_auth_pb2.CheckResponse:
    """A Check on `channel`, as Envoy would send it for `GET https://api.example.com{path}`."""
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method="GET", host="api.example.com", path=path, scheme="https", protocol="HTTP/1.1",
        headers={":method": "GET", ":path": path, ":authority": "api.example.com", **(headers or {})})
    peer = attribute_context_pb2.AttributeContext.Peer(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.0.0.7", port_value=40000)))
    req = external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        source=peer, request=attribute_context_pb2.AttributeContext.Request(http=http)))
    return stub.Check(req, timeout=timeout)

class Portcullis:
    """`portcullis serve` on a config file; stderr (JSON logs) is collected by a thread."""

    def __init__(self, config: Path, env: dict | None = None):
        self.config = config
        self.lines: list[str] = []
        self.proc = subprocess.Popen([BIN, "serve", "--config", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self._grpc: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.grpc_addr = None
        self._channel = None

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("listener") == "grpc":
                self._grpc.put(rec["addr"])
        self._grpc.put(None)

    def wait_ready(self, timeout: float = 30.0) -> "Portcullis":
        try:
            addr = self._grpc.get(timeout=timeout)
        except queue.Empty:
            addr = None
        if addr is None:
            raise RuntimeError("portcullis did not start:\n" + "".join(self.lines))
        self.grpc_addr = addr
        self._channel = grpc.insecure_channel(addr)
        return self

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def check(self, path: str, headers: dict | None = None) -> external_auth_pb2.CheckResponse:
        return check_over(self._channel, path, headers, timeout=15)

    def kill(self):
        """SIGKILL: no chance to flush or close anything."""
        if self._channel:
            self._channel.close()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self):
        if self._channel:
            self._channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def upstream_headers(resp) -> dict:
    return {h.header.key: h.header.value for h in resp.ok_response.headers}


def injected_token(resp) -> str:
    assert resp.status.code == 0, f"denied: {resp.status.code} {resp.denied_response.body}"
    value = upstream_headers(resp)["authorization"]
    assert value.startswith("Bearer "), value
    return value[len("Bearer "):]


def denied(resp) -> tuple[int, int, str]:
    body = json.loads(resp.denied_response.body)
    return resp.status.code, resp.denied_response.status.code, body["reason"]


def verify(idp: Idp, token: str, audience: str) -> dict:
    """The token's claims after checking its RS256 signature against the provider's JWKS."""
    key = jwt.PyJWKClient(idp.jwks_uri).get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["RS256"], audience=audience, issuer=idp.issuer)


def admin(http_port: int, method: str, path: str, body: dict | None = None, token: str | None = ADMIN_TOKEN):
    """Calls the admin API; returns (status, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        status = e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def drive_consent(idp: Idp, login_url: str, callback_prefix: str, login: str = "alice") -> str:
    """Plays the user's browser: log in and consent on the provider's development pages, then stop
    at the redirect to portcullis' callback and return that URL (the test then calls it)."""
    jar = http.cookiejar.CookieJar()

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPCookieProcessor(jar))
    url, method, data = login_url, "GET", None
    for _ in range(12):
        headers = {"content-type": "application/x-www-form-urlencoded"} if data is not None else {}
        status, resp_headers, text = idp.request(method, url, data=data, headers=headers, opener=opener)
        location = {k.lower(): v for k, v in resp_headers.items()}.get("location")
        if status in (301, 302, 303, 307, 308) and location:
            target = urllib.parse.urljoin(url, location)
            if target.startswith(callback_prefix):
                return target
            url, method, data = target, "GET", None
            continue
        if status == 200 and 'name="prompt"' in text:
            form = {"prompt": "login", "login": login, "password": "any"} if 'value="login"' in text else {"prompt": "consent"}
            method, data = "POST", urllib.parse.urlencode(form).encode()
            continue
        raise AssertionError(f"unexpected answer during consent ({method} {url}) -> {status}: {text[:300]}")
    raise AssertionError("too many steps during consent")


def eventually(what: str, f, timeout: float = 20.0, interval: float = 0.2):
    """Polls `f` until it returns a truthy value (bounded); returns it."""
    deadline = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(interval)


def grant_count(idp: Idp, grant: str) -> int:
    return idp.stats()["token"]["by_grant_type"].get(grant, 0)


