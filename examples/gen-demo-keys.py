#!/usr/bin/env python3
"""Demo signing key and tokens for the `profile` API of portcullis.yaml (next to this script).

The example trusts one RSA public key, written inline in portcullis.yaml, so it runs with no identity
provider and no network. Its private half is committed next to it, demo-jwt-key.pem: a DEMO key that
everyone has, so anyone can mint tokens the example accepts (like its subscription key demo-key-123).
Never trust it outside this example. Nothing here writes to a tracked file.

    python3 examples/gen-demo-keys.py token                    # a token for alice, valid 1 hour
    python3 examples/gen-demo-keys.py token --sub bob --roles reader --scope profile.read --ttl 600

    TOKEN=$(python3 examples/gen-demo-keys.py token)
    portcullis check --config examples/portcullis.yaml --url http://api.example.com/profile/me \\
        -H "authorization: Bearer $TOKEN"

A key pair of your own (git-ignored, in .demo-keys/ next to this script): `keys` writes private.pem,
its public jwks.json, and portcullis.yaml there, a copy of the example whose `demo` provider reads
`jwks_file: jwks.json`:

    python3 examples/gen-demo-keys.py keys
    TOKEN=$(python3 examples/gen-demo-keys.py token --key examples/.demo-keys/private.pem)
    portcullis check --config examples/.demo-keys/portcullis.yaml --url http://api.example.com/profile/me \\
        -H "authorization: Bearer $TOKEN"

Needs the `cryptography` package (`.venv/bin/pip install cryptography`; the test venv .venv has it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import pathlib
import sys
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

HERE = pathlib.Path(__file__).resolve().parent
CONFIG = HERE / "portcullis.yaml"
DEMO_KEY = HERE / "demo-jwt-key.pem"
OWN = HERE / ".demo-keys"
ISSUER = "https://issuer.example.com/demo"
AUDIENCE = "api://profile"
BEGIN, END = "# BEGIN demo-key", "# END demo-key"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def public_jwk(key: rsa.RSAPrivateKey) -> dict:
    numbers = key.public_key().public_numbers()
    n, e = uint(numbers.n), uint(numbers.e)
    # RFC 7638 thumbprint as the kid: the same key always gets the same kid.
    canonical = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True)
    kid = b64(hashlib.sha256(canonical.encode()).digest())[:16]
    return {"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": n, "e": e}


def make_keys() -> None:
    """A new key pair in .demo-keys/ (git-ignored), with a copy of the example config that trusts it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    OWN.mkdir(mode=0o700, exist_ok=True)
    private = OWN / "private.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private.chmod(0o600)
    (OWN / "jwks.json").write_text(json.dumps({"keys": [public_jwk(key)]}, indent=2) + "\n")
    lines = CONFIG.read_text().splitlines(keepends=True)
    try:
        start = next(i for i, l in enumerate(lines) if l.strip().startswith(BEGIN))
        end = next(i for i, l in enumerate(lines) if l.strip().startswith(END))
    except StopIteration:
        sys.exit(f"{CONFIG}: no `{BEGIN}` ... `{END}` block to replace with a jwks_file")
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    lines[start : end + 1] = [f"{indent}jwks_file: jwks.json   # made by gen-demo-keys.py keys\n"]
    (OWN / "portcullis.yaml").write_text("".join(lines))
    print(
        f"private key: {private}\npublic key:  {OWN / 'jwks.json'}\nconfig:      {OWN / 'portcullis.yaml'}\n"
        f"tokens:      python3 {sys.argv[0]} token --key {private}",
        file=sys.stderr,
    )


def make_token(key_file: pathlib.Path, sub: str, roles: list[str], scope: str, ttl: int) -> str:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": public_jwk(key)["kid"]}
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scp": scope, "iat": now, "nbf": now, "exp": now + ttl}
    if roles:
        claims["roles"] = roles
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("keys", help="a key pair of your own, and a config trusting it, in .demo-keys/ (git-ignored)")
    tok = sub.add_parser("token", help="print a signed demo token")
    tok.add_argument("--key", type=pathlib.Path, default=DEMO_KEY, help="private key (default: the committed demo key)")
    tok.add_argument("--sub", default="alice")
    tok.add_argument("--roles", default="reader,writer", help="comma-separated; empty for none")
    tok.add_argument("--scope", default="profile.read")
    tok.add_argument("--ttl", type=int, default=3600, help="seconds until exp")
    args = parser.parse_args()
    if args.command == "keys":
        make_keys()
    else:
        print(make_token(args.key, args.sub, [r for r in args.roles.split(",") if r], args.scope, args.ttl))


if __name__ == "__main__":
    main()
