"""Run-time subscription changes on a 3-replica Redis setup: how long a change made through one
replica's admin API takes to be enforced by the other two.

    python3 loadtest/scale/propagation.py --bin target/release/portcullis [--rate 10000] [--seconds 60]
        [--subscriptions 10000] [--out result.json]

Starts a redis-server of its own (loopback, a temporary directory) and three `portcullis serve` on it.
Creates `--subscriptions` run-time subscriptions, then changes them at `--rate` changes a minute through
replica 1 (suspend / activate / regenerate, round robin). Every 10th change is a probe: a regeneration
whose new key is then checked on replicas 2 and 3 every 5 ms until both allow it; the delay from the
admin answer to each replica's first allow is one sample. Reports p50 / p99 / max of the samples, the
admin call latency and any failure. Needs grpcio and xds-protos (tests/wire/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2

sys.path.insert(0, str(Path(__file__).parent))
from drive import CHECK, envoy_request, pct  # noqa: E402

TOKEN = "propagation-admin-token"
STORE_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin(http: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{http}/admin/subscriptions{path}", data=data, method=method,
                                 headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("PORTCULLIS_BIN", "target/release/portcullis"))
    ap.add_argument("--rate", type=float, default=10_000, help="changes a minute")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--subscriptions", type=int, default=10_000)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="portcullis-propagation-"))
    procs: list[subprocess.Popen] = []
    try:
        port = free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
        time.sleep(0.5)
        (tmp / "store.key").write_text(STORE_KEY)
        replicas = []
        for r in range(3):
            grpc_port, http_port = free_port(), free_port()
            cfg = tmp / f"r{r}.yaml"
            cfg.write_text(
                f"listen: {{grpc: 127.0.0.1:{grpc_port}, http: 127.0.0.1:{http_port}}}\n"
                f"telemetry: {{log_format: json, log_level: warn}}\n"
                f"admin: {{token: \"{TOKEN}\"}}\n"
                f"store: {{redis: {{url: \"redis://127.0.0.1:{port}/0\"}}, key: \"${{file:{tmp / 'store.key'}}}\"}}\n"
                "apis: [{name: orders, match: {path_prefix: /orders}, subscription_required: true}]\n")
            log = open(tmp / f"r{r}.log", "w")
            procs.append(subprocess.Popen([a.bin, "serve", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT))
            replicas.append((f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"))
        for _, http in replicas:
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://{http}/readyz", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
        http1 = replicas[0][1]
        t0 = time.monotonic()
        keys: dict[str, str] = {}
        for i in range(a.subscriptions):
            status, body = admin(http1, "POST", "", {"id": f"s{i}"})
            assert status == 201, body
            keys[f"s{i}"] = body["primary_key"]
        created_s = time.monotonic() - t0

        channels = [grpc.insecure_channel(g) for g, _ in replicas[1:]]
        calls = [ch.unary_unary(CHECK, request_serializer=None,
                                response_deserializer=external_auth_pb2.CheckResponse.FromString) for ch in channels]
        samples: list[float] = []
        failures: list[str] = []
        admin_lat: list[float] = []
        lock = threading.Lock()

        def probe(key: str, answered: float) -> None:
            body = envoy_request("/orders/1", {"ocp-apim-subscription-key": key}, "192.0.2.1")
            pending = set(range(len(calls)))
            deadline = answered + 5
            while pending and time.monotonic() < deadline:
                for c in list(pending):
                    if calls[c](body, timeout=5).status.code == 0:
                        with lock:
                            samples.append(time.monotonic() - answered)
                        pending.discard(c)
                time.sleep(0.005)
            if pending:
                with lock:
                    failures.append(f"replicas {sorted(pending)} did not allow a regenerated key within 5 s")

        n = int(a.rate / 60 * a.seconds)
        state = {f"s{i}": "active" for i in range(a.subscriptions)}
        probes = []
        start = time.monotonic()
        for c in range(n):
            due = start + c * 60 / a.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sid = f"s{c % a.subscriptions}"
            began = time.monotonic()
            if c % 10 == 0:
                if state[sid] != "active":
                    admin(http1, "POST", f"/{sid}/activate")
                    state[sid] = "active"
                status, body = admin(http1, "POST", f"/{sid}/regenerate/primary")
                answered = time.monotonic()
                if status == 200:
                    t = threading.Thread(target=probe, args=(body["primary_key"], answered), daemon=True)
                    t.start()
                    probes.append(t)
            else:
                action = "suspend" if state[sid] == "active" else "activate"
                status, body = admin(http1, "POST", f"/{sid}/{action}")
                if status == 200:
                    state[sid] = "suspended" if action == "suspend" else "active"
            admin_lat.append(time.monotonic() - began)
            if status not in (200, 201):
                failures.append(f"{sid}: {status} {body}")
        elapsed = time.monotonic() - start
        for t in probes:
            t.join()
        ms = [x * 1e3 for x in samples]
        al = [x * 1e3 for x in admin_lat]
        result = {
            "replicas": 3,
            "subscriptions": a.subscriptions,
            "create_all_s": created_s,
            "changes": n,
            "achieved_changes_per_min": n / elapsed * 60,
            "probes": len(probes),
            "propagation_ms": {"n": len(ms), "p50": pct(ms, 50), "p99": pct(ms, 99), "max": max(ms) if ms else None},
            "admin_call_ms": {"p50": pct(al, 50), "p99": pct(al, 99), "max": max(al) if al else None},
            "failures": failures[:10],
            "failure_count": len(failures),
        }
        text = json.dumps(result, indent=1)
        if a.out:
            a.out.write_text(text)
        print(text)
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
