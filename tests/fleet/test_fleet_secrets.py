"""Nothing secret is in Redis in clear: after consent and several rotations (and with a consent
pending), every key under the prefix and every byte it holds is read back, and no refresh token,
access token, ID token, authorization code, consent state or client secret appears in any of them."""

from __future__ import annotations

import base64
import hashlib
import re
import time
import urllib.parse

from fleet_harness import CLIENT_ID, CLIENT_SECRET, PREFIX, eventually

KEY_NAMES = re.compile(
    r"^" + re.escape(PREFIX) + r"(meta:key_check|conns:crm|(conn|lease|token):crm:[A-Za-z0-9._-]+|consent:[0-9a-f]{64})$")


def forms(secret: str) -> set[bytes]:
    """The secret and the parts of it that identify it on their own (a JWT's payload and signature;
    the JOSE header is the same for every token of the provider and is no secret)."""
    out = {secret.encode()}
    parts = secret.split(".")
    if len(parts) == 3:
        out.update(p.encode() for p in parts[1:] if len(p) >= 16)
    return out


def test_no_token_or_secret_in_redis_in_clear(fleet_factory):
    fleet = fleet_factory(access_token_ttl=15, refresh_before_expiry="10s")   # a refresh every 5 s
    fleet.consent()
    with fleet.traffic(workers=2, pause=0.1) as traffic:
        eventually("three rotations", lambda: len(fleet.tap.refreshes()) >= 3, timeout=40, diagnostics=fleet.tails)
        time.sleep(1)
    assert all(o.allowed for o in traffic.outcomes), [str(o) for o in traffic.outcomes if not o.allowed][:3]

    # A consent left pending: its state and PKCE verifier live in Redis for 10 minutes.
    login_url = fleet.start_consent(2)
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(login_url).query)["state"][0]

    secrets: dict[str, str] = {"client secret": CLIENT_SECRET,
                               "basic credentials": base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode(),
                               "consent state": state}
    for kind in ("refresh_token", "access_token", "id_token"):
        for i, value in enumerate(fleet.tap.issued(kind)):
            secrets[f"{kind} #{i}"] = value
    for i, call in enumerate(c for c in fleet.tap.calls if c.grant_type == "authorization_code"):
        secrets[f"authorization code #{i}"] = call.form["code"]
        secrets[f"PKCE verifier #{i}"] = call.form["code_verifier"]
    for i, token in enumerate({o.token for o in traffic.outcomes}):
        secrets[f"access token seen by the backend #{i}"] = token
    assert len([k for k in secrets if k.startswith("refresh_token")]) >= 4, secrets.keys()   # consent + 3 rotations

    dump = fleet.redis.dump_everything(PREFIX)
    names = [key.decode(errors="replace") for key, _kind, _values in dump]
    print("keys under the prefix:", names)
    # What the design says is there, and nothing else.
    assert f"{PREFIX}conn:crm:{fleet.connection}" in names and f"{PREFIX}conns:crm" in names, names
    assert f"{PREFIX}meta:key_check" in names, names
    assert f"{PREFIX}consent:{hashlib.sha256(state.encode()).hexdigest()}" in names, names
    assert all(KEY_NAMES.match(n) for n in names), [n for n in names if not KEY_NAMES.match(n)]
    pttl = fleet.redis.cmd("PTTL", f"{PREFIX}consent:{hashlib.sha256(state.encode()).hexdigest()}")
    assert 0 < pttl <= 10 * 60 * 1000, pttl

    found = []
    for key, kind, values in dump:
        for what, secret in secrets.items():
            for form in forms(secret):
                if form in key or any(form in v for v in values):
                    found.append(f"{what} in {key!r} ({kind})")
        for v in values:
            # No JSON and no JWT in clear (sealed values are version byte + nonce + ciphertext).
            if v.startswith(b"{") or b"eyJhbGci" in v or b"refresh_token" in v or b"access_token" in v:
                found.append(f"clear text in {key!r} ({kind}): {v[:40]!r}")
    assert found == [], found

    # The connection record is a hash with a plain version and a sealed record.
    record = fleet.redis.cmd("HGETALL", f"{PREFIX}conn:crm:{fleet.connection}")
    fields = dict(zip(record[::2], record[1::2]))
    assert set(fields) == {b"v", b"d"} and fields[b"v"].isdigit(), fields.keys()
    # And the replicas' logs carry no token either.
    for r in fleet.replicas:
        leaked = [what for what, s in secrets.items() if s in r.output()]
        assert leaked == [], (r.name, leaked)
