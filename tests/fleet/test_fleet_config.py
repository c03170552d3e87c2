"""`store.redis` as an operator writes it: `portcullis validate` accepts the fleet's config and refuses
the mistakes with the path of the offending key (never echoing a password), and `serve` logs in to a
Redis that requires a password given through `${env:...}`, and stops with exit 2 on a wrong one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleet_harness import STORE_KEY, Process, RedisServer, portcullis_bin, redis_server_bin

REDIS_PASSWORD = "fleet-redis-password-3b9e1d"

CREDENTIAL = """credentials:
  - name: crm
    grant: refresh_token
    token_url: http://127.0.0.1:1/token
    client_id: web-app
    client_secret: "${env:FLEET_CLIENT_SECRET}"
    refresh_token: "${env:FLEET_SEED}"
apis:
  - name: crm
    match: { path_prefix: /crm }
    on_allow: { backend_credential: { name: crm } }
"""
KEY = 'key: "${env:PORTCULLIS_STORE_KEY}"'
ENV = {"PORTCULLIS_STORE_KEY": STORE_KEY, "FLEET_CLIENT_SECRET": "s3cret-client", "FLEET_SEED": "seed-refresh-token",
       "FLEET_REDIS_PASSWORD": REDIS_PASSWORD}


def validate(tmp_path: Path, store: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "portcullis.yaml"
    cfg.write_text("listen: { grpc: 127.0.0.1:0 }\n" + store + "\n" + CREDENTIAL)
    return subprocess.run([portcullis_bin(), "validate", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **ENV})


@pytest.mark.parametrize("store", [
    'store: { redis: { url: "redis://127.0.0.1:6379/0" }, ' + KEY + " }",
    'store: { redis: { url: "rediss://redis.example:6380/2", username: portcullis, password: "${env:FLEET_REDIS_PASSWORD}", '
    'prefix: "team-a:", timeout: 250ms }, ' + KEY + " }",
], ids=["minimal", "every-field"])
def test_validate_accepts_store_redis(tmp_path, store):
    out = validate(tmp_path, store)
    assert out.returncode == 0, out.stdout + out.stderr
    assert REDIS_PASSWORD not in out.stdout + out.stderr


@pytest.mark.parametrize("store,path", [
    ('store: { path: /tmp/x.db, redis: { url: "redis://127.0.0.1:6379/0" }, ' + KEY + " }", "store"),
    ('store: { redis: { url: "http://127.0.0.1:6379/0" }, ' + KEY + " }", "store.redis.url"),
    ('store: { redis: { url: "redis://127.0.0.1:6379/0", password: ' + REDIS_PASSWORD + " }, " + KEY + " }", "store.redis.password"),
    ('store: { redis: { url: "redis://:' + REDIS_PASSWORD + '@127.0.0.1:6379/0" }, ' + KEY + " }", "store.redis.url"),
    ('store: { redis: { url: "redis://127.0.0.1:6379/0", timeout: 0s }, ' + KEY + " }", "store.redis.timeout"),
    ('store: { redis: { prefix: "x:" }, ' + KEY + " }", "store.redis"),
], ids=["path-and-redis", "not-a-redis-url", "password-in-file", "password-in-url", "zero-timeout", "no-url"])
def test_validate_refuses_store_redis_mistakes(tmp_path, store, path):
    out = validate(tmp_path, store)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    errors = [line.strip() for line in text.splitlines() if line.startswith((" ", "\t")) and line.strip()]
    assert any(e.startswith(path) for e in errors), text
    assert REDIS_PASSWORD not in text, "the password was echoed"


def test_serve_logs_in_with_a_substituted_password_and_stops_on_a_wrong_one(tmp_path):
    redis_server_bin()
    redis = RedisServer(tmp_path)
    try:
        redis.cmd("CONFIG", "SET", "requirepass", REDIS_PASSWORD)
        cfg = tmp_path / "portcullis.yaml"
        cfg.write_text(f"""listen: {{ grpc: 127.0.0.1:0 }}
telemetry: {{ log_format: json }}
store:
  redis: {{ url: "{redis.url}", password: "${{env:FLEET_REDIS_PASSWORD}}" }}
  {KEY}
""" + CREDENTIAL)
        good = Process("serve-good", [portcullis_bin(), "serve", "--config", str(cfg)], tmp_path, env={**os.environ, **ENV})
        try:
            good.wait_for("the store connected", lambda: "shared store connected" in good.output(), timeout=30)
        finally:
            good.stop()
        assert REDIS_PASSWORD not in good.output()
        assert redis.cmd("AUTH", REDIS_PASSWORD) == "OK"

        bad = Process("serve-bad", [portcullis_bin(), "serve", "--config", str(cfg)], tmp_path,
                      env={**os.environ, **ENV, "FLEET_REDIS_PASSWORD": "not-the-password-0000"})
        assert bad.proc.wait(timeout=30) == 2, bad.output()
        assert "not-the-password-0000" not in bad.output()
        assert f"127.0.0.1:{redis.port}" in bad.output(), "the error names the store"
    finally:
        redis.stop()
