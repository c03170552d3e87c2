"""Python driver for the OpenID Provider test fixture (tests/idp/server.mjs).

Standard library only. Typical use::

    from idp import start_idp

    with start_idp({"clients": [...], "resources": [...]}) as idp:
        tok = idp.client_credentials("svc", "secret", resource="api://orders")
        ...

`start_idp` runs ``node server.mjs --port 0 --config <tmpfile> --exit-on-stdin-close``
(the script is located next to this file), waits for the ``IDP_READY <issuer>``
line and returns an :class:`Idp`. ``node_modules`` must have been installed with
``npm ci --prefix tests/idp``.
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

__all__ = [
    "HERE",
    "SERVER_SCRIPT",
    "TOKEN_EXCHANGE_GRANT",
    "TOKEN_TYPE_ACCESS_TOKEN",
    "TOKEN_TYPE_JWT",
    "Idp",
    "IdpError",
    "start_idp",
    "decode_jwt",
    "pkce_pair",
]

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "server.mjs")

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"


class IdpError(Exception):
    """A non-2xx answer from the provider (or a failed flow step).

    ``status`` is the HTTP status, ``body`` the parsed JSON body (dict) when the
    answer was JSON else None, ``text`` the raw body text.
    """

    def __init__(self, message: str, status: int | None = None, body=None, text: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body
        self.text = text

    @property
    def error(self) -> str | None:
        """The OAuth ``error`` code of the answer, if any."""
        return self.body.get("error") if isinstance(self.body, dict) else None


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def decode_jwt(token: str) -> tuple[dict, dict]:
    """Return ``(header, payload)`` of a compact JWS **without verifying it**."""
    header_b64, payload_b64, _sig = token.split(".")
    return json.loads(_b64url_decode(header_b64)), json.loads(_b64url_decode(payload_b64))


def pkce_pair() -> tuple[str, str]:
    """Return ``(code_verifier, code_challenge)`` for PKCE S256."""
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401
        return None


def _parse_body(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


class Idp:
    """A running provider. Create it with :func:`start_idp`."""

    def __init__(self, process: subprocess.Popen, issuer: str, config: dict | None, tmpdir: str | None):
        self.process = process
        self.issuer = issuer.rstrip("/")
        self.port = urllib.parse.urlsplit(self.issuer).port
        self.config = config
        self._tmpdir = tmpdir
        self._stderr_lines: list[str] = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()

    # ------------------------------------------------------------------ basics
    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/jwks"

    @property
    def authorization_endpoint(self) -> str:
        return self.issuer + "/auth"

    def url(self, path: str) -> str:
        return self.issuer + "/" + path.lstrip("/")

    @property
    def stderr(self) -> str:
        """What the server printed on stderr so far (warnings, errors)."""
        return "".join(self._stderr_lines)

    def _drain_stderr(self):
        stream = self.process.stderr
        if stream is None:
            return
        for line in iter(stream.readline, ""):
            self._stderr_lines.append(line)

    def request(self, method: str, url: str, *, data: bytes | None = None, headers: dict | None = None,
                timeout: float = 10.0, opener=None) -> tuple[int, dict, str]:
        """Raw HTTP call, never raises on HTTP status. Returns ``(status, headers, text)``."""
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        opener = opener or urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as err:
            text = err.read().decode("utf-8", "replace")
            return err.code, dict(err.headers or {}), text

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None
        headers = {}
        if method == "POST":
            data = json.dumps(body or {}).encode()
            headers["content-type"] = "application/json"
        status, _h, text = self.request(method, self.url(path), data=data, headers=headers)
        parsed = _parse_body(text)
        if status // 100 != 2:
            raise IdpError(f"{method} {path} -> {status}: {text}", status, parsed, text)
        return parsed

    def discovery(self) -> dict:
        return self._json("GET", "/.well-known/openid-configuration")

    def jwks(self) -> dict:
        return self._json("GET", "/jwks")

    # ---------------------------------------------------------- token endpoint
    def token_request(self, form: dict, client_id: str | None = None, secret: str | None = None,
                      auth: str = "basic", timeout: float = 10.0,
                      client_cert_pem: str | None = None, dpop: str | None = None) -> tuple[int, object]:
        """POST ``form`` to the token endpoint. ``auth``: 'basic' | 'post' | 'none'.
        ``client_cert_pem``: the client's certificate, as the fixture's stand-in for a TLS client
        certificate (a client registered with ``tls_client_certificate_bound_access_tokens`` gets a
        token bound to it, RFC 8705).

        Returns ``(status, body)`` (body parsed JSON, or the raw text if not JSON); never raises on status.
        ``dpop``: an RFC 9449 proof for the token endpoint (the token is then DPoP-bound).
        """
        form = {k: v for k, v in form.items() if v is not None}
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        if client_cert_pem is not None:
            headers["x-test-client-cert"] = urllib.parse.quote(client_cert_pem, safe="")
        if dpop is not None:
            headers["dpop"] = dpop
        if auth == "basic":
            cred = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret or '', safe='')}"
            headers["authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        elif auth == "post":
            form["client_id"] = client_id
            form["client_secret"] = secret
        elif auth == "none":
            if client_id is not None:
                form["client_id"] = client_id
        else:
            raise ValueError("auth must be 'basic', 'post' or 'none'")
        data = urllib.parse.urlencode(form, doseq=True).encode()
        status, _h, text = self.request("POST", self.token_endpoint, data=data, headers=headers, timeout=timeout)
        parsed = _parse_body(text)
        return status, (parsed if parsed is not None else text)

    def _token(self, form: dict, client_id, secret, auth, client_cert_pem: str | None = None) -> dict:
        status, body = self.token_request(form, client_id, secret, auth, client_cert_pem=client_cert_pem)
        if status != 200 or not isinstance(body, dict):
            raise IdpError(f"token request ({form.get('grant_type')}) -> {status}: {body}", status,
                           body if isinstance(body, dict) else None, body if isinstance(body, str) else json.dumps(body))
        return body

    def client_credentials(self, client_id: str, secret: str, resource: str | None = None,
                           scope: str | None = None, auth: str = "basic",
                           client_cert_pem: str | None = None) -> dict:
        """client_credentials grant. Returns the token response dict; raises IdpError on error."""
        return self._token({"grant_type": "client_credentials", "resource": resource, "scope": scope},
                           client_id, secret, auth, client_cert_pem=client_cert_pem)

    def _client_post(self, path: str, form: dict, client_id: str, secret: str) -> tuple[int, object]:
        cred = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret, safe='')}"
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json",
                   "authorization": "Basic " + base64.b64encode(cred.encode()).decode()}
        status, _h, text = self.request("POST", self.url(path), data=urllib.parse.urlencode(form).encode(),
                                        headers=headers)
        parsed = _parse_body(text)
        return status, (parsed if parsed is not None else text)

    def introspect(self, client_id: str, secret: str, token: str) -> dict:
        """RFC 7662 introspection at /token/introspection (client_secret_basic)."""
        status, body = self._client_post("/token/introspection", {"token": token}, client_id, secret)
        if status != 200 or not isinstance(body, dict):
            raise IdpError(f"introspection -> {status}: {body}", status)
        return body

    def revoke(self, client_id: str, secret: str, token: str) -> None:
        """RFC 7009 revocation at /token/revocation (client_secret_basic; the token's own client)."""
        status, body = self._client_post("/token/revocation", {"token": token, "token_type_hint": "access_token"},
                                         client_id, secret)
        if status != 200:
            raise IdpError(f"revocation -> {status}: {body}", status)

    def refresh(self, client_id: str, secret: str, refresh_token: str, resource: str | None = None,
                scope: str | None = None, auth: str = "basic") -> dict:
        """refresh_token grant (the answer carries a new, rotated refresh_token)."""
        return self._token({"grant_type": "refresh_token", "refresh_token": refresh_token,
                            "resource": resource, "scope": scope}, client_id, secret, auth)

    def token_exchange(self, client_id: str, secret: str, subject_token: str, resource: str | None = None,
                       audience: str | None = None, scope: str | None = None,
                       subject_token_type: str = TOKEN_TYPE_ACCESS_TOKEN,
                       requested_token_type: str | None = None, auth: str = "basic") -> dict:
        """RFC 8693 token exchange. Returns ``{access_token, issued_token_type, token_type, expires_in[, scope]}``."""
        return self._token({
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type,
            "requested_token_type": requested_token_type,
            "resource": resource,
            "audience": audience,
            "scope": scope,
        }, client_id, secret, auth)

    # ------------------------------------------------------ authorization code
    def authorize(self, client_id: str, redirect_uri: str, scope: str, resource: str | None = None,
                  login: str = "alice", prompt: str | None = "consent", extra_params: dict | None = None,
                  max_steps: int = 12) -> dict:
        """Drive /auth + the dev login and consent pages by HTTP (PKCE S256).

        Returns ``{"code", "code_verifier", "state", "redirect"}`` where ``redirect`` is the final
        Location that points at ``redirect_uri`` (never fetched). ``prompt="consent"`` is sent by
        default because oidc-provider drops ``offline_access`` without it.
        """
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(12)
        params = {
            "client_id": client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "nonce": secrets.token_urlsafe(12),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if prompt:
            params["prompt"] = prompt
        if resource is not None:
            params["resource"] = resource
        params.update(extra_params or {})

        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPCookieProcessor(jar))
        url = self.authorization_endpoint + "?" + urllib.parse.urlencode(params)
        method, data = "GET", None
        for _ in range(max_steps):
            headers = {"content-type": "application/x-www-form-urlencoded"} if data is not None else {}
            status, resp_headers, text = self.request(method, url, data=data, headers=headers, opener=opener)
            location = {k.lower(): v for k, v in resp_headers.items()}.get("location")
            if status in (301, 302, 303, 307, 308) and location:
                target = urllib.parse.urljoin(url, location)
                if target.startswith(redirect_uri):
                    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
                    if "error" in query:
                        raise IdpError(f"authorization error: {query}", status,
                                       {k: v[0] for k, v in query.items()}, target)
                    if query.get("state", [None])[0] != state:
                        raise IdpError(f"state mismatch in {target}", status, None, target)
                    return {"code": query["code"][0], "code_verifier": verifier, "state": state,
                            "redirect": target}
                url, method, data = target, "GET", None
                continue
            if status == 200 and 'name="prompt"' in text:
                if 'value="login"' in text:
                    form = {"prompt": "login", "login": login, "password": "any"}
                elif 'value="consent"' in text:
                    form = {"prompt": "consent"}
                else:
                    raise IdpError("unrecognised interaction page", status, None, text)
                # the dev interaction form posts back to the same /interaction/<uid> URL
                method, data = "POST", urllib.parse.urlencode(form).encode()
                continue
            raise IdpError(f"unexpected answer during authorization ({method} {url}) -> {status}",
                           status, _parse_body(text), text)
        raise IdpError("too many steps during authorization")

    def exchange_code(self, client_id: str, secret: str, code: str, code_verifier: str, redirect_uri: str,
                      resource: str | None = None, auth: str = "basic") -> dict:
        """authorization_code grant at the token endpoint."""
        return self._token({"grant_type": "authorization_code", "code": code, "code_verifier": code_verifier,
                            "redirect_uri": redirect_uri, "resource": resource}, client_id, secret, auth)

    def authorization_code_consent(self, client_id: str, secret: str, redirect_uri: str, scope: str,
                                   resource: str | None = None, login: str = "alice", auth: str = "basic") -> dict:
        """Full code flow: authorize, log in as ``login``, consent, exchange the code (PKCE).

        Returns the token response (``access_token``, ``refresh_token`` when ``offline_access`` is in
        ``scope`` and the client may refresh, ``id_token`` when ``openid`` is in scope, ...).
        """
        result = self.authorize(client_id, redirect_uri, scope, resource=resource, login=login)
        return self.exchange_code(client_id, secret, result["code"], result["code_verifier"], redirect_uri,
                                  resource=resource, auth=auth)

    # ------------------------------------------------------- test control API
    def rotate(self, remove_old: bool = False) -> dict:
        """New RS256 signing key. Returns ``{"kid": new_kid, "kids": [kids in JWKS, signing first], "removed": [...]}``."""
        return self._json("POST", "/__test/rotate", {"remove_old": bool(remove_old)})

    def keys(self) -> dict:
        """``{"signing_kid": kid, "kids": [...]}``."""
        return self._json("GET", "/__test/keys")

    def stats(self) -> dict:
        """Request counts: ``{"discovery", "jwks", "token": {"total", "by_grant_type": {...}}, "authorization",
        "interaction", "userinfo", "introspection", "revocation", "other"}``."""
        return self._json("GET", "/__test/stats")

    def reset_stats(self) -> dict:
        return self._json("POST", "/__test/stats/reset")

    def fail(self, endpoint: str, mode: str, delay_ms: int = 0, times: int | None = None) -> dict:
        """Inject a fault into ``endpoint`` ('token' | 'jwks' | 'discovery' | 'introspection').

        ``mode``: '500' (or any 3-digit status), 'slow' (delay then answer normally), 'garbage'
        (200 with a non-JSON body), 'reset' (close the connection), 'none' (clear).
        ``delay_ms`` delays the faulty answer too; ``times`` limits the fault to the next N requests.
        """
        body = {"endpoint": endpoint, "mode": str(mode), "delay_ms": int(delay_ms)}
        if times is not None:
            body["times"] = int(times)
        return self._json("POST", "/__test/fail", body)

    def clear_faults(self) -> dict:
        return self._json("POST", "/__test/fail", {"mode": "none"})

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        proc = self.process
        if proc.poll() is None:
            try:
                if proc.stdin:
                    proc.stdin.close()
            except OSError:
                pass
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "Idp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort
        try:
            self.close()
        except Exception:
            pass


def start_idp(config: dict | None = None, timeout: float = 60.0, node: str | None = None,
              port: int = 0) -> Idp:
    """Start ``node server.mjs`` and wait until it is ready.

    ``config`` is written to a temporary JSON file (see README.md for the format); ``None``
    uses the server's defaults. ``port=0`` picks a free port. The process exits when
    :meth:`Idp.close` is called or when this Python process dies (stdin is a pipe).
    """
    node = node or os.environ.get("NODE", "node")
    if not os.path.isdir(os.path.join(HERE, "node_modules", "oidc-provider")):
        raise RuntimeError(f"oidc-provider is not installed: run `npm ci --prefix {HERE}`")
    tmpdir = None
    cmd = [node, SERVER_SCRIPT, "--port", str(port), "--exit-on-stdin-close"]
    if config is not None:
        tmpdir = tempfile.mkdtemp(prefix="idp-")
        path = os.path.join(tmpdir, "config.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(config, fh)
        cmd += ["--config", path]
    # A start that fails is tried again (three times in all), each failure described: a CI run once
    # saw node end (or hang) before listening with nothing on stderr but its version warning, and
    # never again; one flake must not fail a suite, and the record says what happened if it recurs.
    failures = []
    for _attempt in range(3):
        proc = subprocess.Popen(cmd, cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1)
        result: dict = {}

        def read_ready(proc=proc, result=result):
            result["line"] = proc.stdout.readline()

        started = time.monotonic()
        reader = threading.Thread(target=read_ready, daemon=True)
        reader.start()
        reader.join(timeout)
        line = result.get("line", "")
        if line.startswith("IDP_READY "):
            break
        elapsed = time.monotonic() - started
        exited = None
        if "line" in result:  # stdout ended (or said something else): it is exiting, or did
            try:
                exited = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        try:
            _out, err = proc.communicate(timeout=5)
        except Exception:  # pragma: no cover
            err = ""
        how = "no line within the timeout" if "line" not in result else f"stdout said {line!r}"
        status = exited if exited is not None else "none (still running: killed)"
        failures.append(f"after {elapsed:.1f}s, {how}, exit status {status}; stderr:\n{err}")
    else:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise RuntimeError("IdP did not start in 3 attempts:\n" + "\n".join(failures))
    if failures:
        print(f"IdP started after {len(failures)} failed attempt(s):\n" + "\n".join(failures), file=sys.stderr)
    issuer = line.split(None, 1)[1].strip()
    return Idp(proc, issuer, config, tmpdir)
