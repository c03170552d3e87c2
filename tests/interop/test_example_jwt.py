"""The bundled example's JWT workflow as a user on a fresh clone runs it: `gen-demo-keys.py token`
signs with the committed demo key (examples/demo-jwt-key.pem), `portcullis check` accepts the token,
and no file of the example changes. `gen-demo-keys.py keys` makes a pair of one's own in the
git-ignored .demo-keys/, with a copy of the config that trusts it through `jwks_file`."""

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
FILES = ("portcullis.yaml", "gen-demo-keys.py", "demo-jwt-key.pem")


@pytest.fixture()
def example(tmp_path):
    if not os.access(BIN, os.X_OK):
        pytest.fail(f"{BIN} is not built: run `cargo build` or set PORTCULLIS_BIN")
    for name in FILES:
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    return tmp_path


def run_check(config, *headers):
    args = [BIN, "check", "--json", "--config", str(config), "--url", "http://api.example.com/profile/me"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    return out.returncode, json.loads(out.stdout)


def script(example, *args):
    out = subprocess.run([sys.executable, str(example / "gen-demo-keys.py"), *args], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def token(example, *extra):
    return script(example, "token", *extra)


def test_a_fresh_clone_mints_a_token_the_example_accepts(example):
    before = {name: (example / name).read_bytes() for name in FILES}
    tok = token(example)
    config = example / "portcullis.yaml"

    code, d = run_check(config, f"authorization: Bearer {tok}")
    assert (code, d["decision"], d["api"]) == (0, "allow", "profile"), d
    headers = {h["name"]: h["value"] for h in d["headers_to_set"]}
    assert headers["x-user-id"] == "alice"
    assert headers["x-user-roles"] == "reader,writer"
    assert tok not in json.dumps(d)

    code, d = run_check(config)
    assert (code, d["status"], d["reason"]) == (1, 401, "TokenNotPresent")
    code, d = run_check(config, f"authorization: Bearer {token(example, '--scope', 'nothing')}")
    assert (code, d["status"], d["reason"]) == (1, 403, "InsufficientScope")
    code, d = run_check(config, f"authorization: Bearer {token(example, '--ttl', '-120')}")
    assert (code, d["status"], d["reason"]) == (1, 401, "TokenExpired")

    assert sorted(p.name for p in example.iterdir()) == sorted(FILES), "the script wrote a file"
    assert {name: (example / name).read_bytes() for name in FILES} == before, "the script changed a file"


def test_own_keys_go_to_the_ignored_directory_with_a_config_that_trusts_them(example):
    before = {name: (example / name).read_bytes() for name in FILES}
    script(example, "keys")
    own = example / ".demo-keys"
    assert sorted(p.name for p in own.iterdir()) == ["jwks.json", "portcullis.yaml", "private.pem"]
    assert {name: (example / name).read_bytes() for name in FILES} == before, "`keys` changed a tracked file"

    tok = token(example, "--key", str(own / "private.pem"))
    code, d = run_check(own / "portcullis.yaml", f"authorization: Bearer {tok}")
    assert (code, d["decision"], d["api"]) == (0, "allow", "profile"), d
    # The committed example does not trust the new key, and the copy no longer trusts the demo key.
    code, d = run_check(example / "portcullis.yaml", f"authorization: Bearer {tok}")
    assert (code, d["reason"]) == (1, "TokenSignatureKeyNotFound"), d
    code, d = run_check(own / "portcullis.yaml", f"authorization: Bearer {token(example)}")
    assert (code, d["reason"]) == (1, "TokenSignatureKeyNotFound"), d


def test_the_committed_example_still_validates():
    out = subprocess.run([BIN, "validate", "--config", str(ROOT / "examples" / "portcullis.yaml")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "1 identity providers" in out.stdout


def test_the_committed_demo_key_is_the_one_the_example_trusts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_demo_keys", ROOT / "examples" / "gen-demo-keys.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((ROOT / "examples" / "demo-jwt-key.pem").read_bytes(), password=None)
    assert json.dumps(gen.public_jwk(key)) in (ROOT / "examples" / "portcullis.yaml").read_text()
