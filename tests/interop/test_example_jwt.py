"""The bundled example's JWT workflow as a user on a fresh clone runs it: no private key yet, so
`gen-demo-keys.py token` makes a key pair, writes the public JWK into portcullis.yaml and prints a
token that `portcullis check` accepts."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("PORTCULLIS_BIN", str(ROOT / "target" / "debug" / "portcullis"))


@pytest.fixture()
def example(tmp_path):
    if not os.access(BIN, os.X_OK):
        pytest.fail(f"{BIN} is not built: run `cargo build` or set PORTCULLIS_BIN")
    for name in ("portcullis.yaml", "gen-demo-keys.py"):
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    return tmp_path


def run_check(example, *headers):
    args = [BIN, "check", "--json", "--config", str(example / "portcullis.yaml"), "--url", "http://api.example.com/profile/me"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    return out.returncode, json.loads(out.stdout)


def token(example, *extra):
    out = subprocess.run([sys.executable, str(example / "gen-demo-keys.py"), "token", *extra], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_a_fresh_clone_mints_a_token_the_example_accepts(example):
    committed = (example / "portcullis.yaml").read_text()
    tok = token(example)
    assert (example / ".demo-keys" / "private.pem").exists()
    assert (example / "portcullis.yaml").read_text() != committed, "the new public key was written"

    code, d = run_check(example, f"authorization: Bearer {tok}")
    assert (code, d["decision"], d["api"]) == (0, "allow", "profile"), d
    headers = {h["name"]: h["value"] for h in d["headers_to_set"]}
    assert headers["x-user-id"] == "alice"
    assert headers["x-user-roles"] == "reader,writer"
    assert tok not in json.dumps(d)

    code, d = run_check(example)
    assert (code, d["status"], d["reason"]) == (1, 401, "TokenNotPresent")
    code, d = run_check(example, f"authorization: Bearer {token(example, '--scope', 'nothing')}")
    assert (code, d["status"], d["reason"]) == (1, 403, "InsufficientScope")
    code, d = run_check(example, f"authorization: Bearer {token(example, '--ttl', '-120')}")
    assert (code, d["status"], d["reason"]) == (1, 401, "TokenExpired")


def test_the_committed_example_still_validates():
    out = subprocess.run([BIN, "validate", "--config", str(ROOT / "examples" / "portcullis.yaml")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "1 identity providers" in out.stdout
