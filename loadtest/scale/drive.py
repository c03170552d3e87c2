"""Runs `portcullis serve` on a generated configuration and measures start-up, memory, reloads, and
the gRPC checks served while it reloads.

    python3 loadtest/scale/drive.py CONFIG_DIR --bin target/release/portcullis [--rate 300]
        [--seconds 10] [--reloads 10] [--out result.json]

CONFIG_DIR comes from gen.py (portcullis.yaml + requests.json). Every check is an Envoy-shaped
CheckRequest (xds-protos) sent through grpcio at a constant rate (open loop: a request's latency counts
from when it was due, so a stall shows up even if the client was waiting); its decision is compared
with the one requests.json expects. Any failed call or wrong decision is counted (must be 0).

Phases: (1) start, wait for the gRPC listener, read VmHWM idle; (2) every request once, checked;
(3) `--seconds` of traffic with no reload (baseline); (3b) with a `keys.txt` beside the config
(gen.py --keys-in file): the same traffic while the keys file alone is replaced `--reloads` times
(one subscription suspended and reactivated in turn, both versions written beforehand and linked into
place by an atomic rename, which the watcher reloads without touching the policy), then VmHWM, and
the 1% slowest checks placed against the nearest replacement and reload (`slowest`); (4) the same traffic while the config is reloaded `--reloads` times
(alternately rewritten, which the file watcher picks up, and SIGHUP), each reload started after the
previous one has logged; (5) VmHWM after all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

CHECK = "/envoy.service.auth.v3.Authorization/Check"


def envoy_request(path: str, headers: dict, peer: str, host: str = "api.example.com") -> bytes:
    all_headers = {":method": "GET", ":path": path, ":authority": host, ":scheme": "http", "x-request-id": "scale-1", **headers}
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method="GET", path=path, host=host, scheme="http", protocol="HTTP/1.1")
    http.headers.update(all_headers)
    attrs = attribute_context_pb2.AttributeContext(
        source=attribute_context_pb2.AttributeContext.Peer(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=peer, port_value=40000))),
        destination=attribute_context_pb2.AttributeContext.Peer(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=10000))),
        request=attribute_context_pb2.AttributeContext.Request(http=http),
    )
    return external_auth_pb2.CheckRequest(attributes=attrs).SerializeToString()


def status_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0])
    return out


class Server:
    """The portcullis process; its JSON log lines are collected by a reader thread."""

    def __init__(self, binary: str, config: Path, log_path: Path):
        self.log = open(log_path, "w")
        self.lines: list[tuple[float, dict]] = []
        self.cond = threading.Condition()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([binary, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            # portcullis logs flattened JSON (fields beside `message`); accept nested too.
            rec = {**rec, **rec.get("fields", {})}
            with self.cond:
                self.lines.append((time.monotonic(), rec))
                self.cond.notify_all()

    def wait_for(self, message: str, start: int = 0, timeout: float = 120.0) -> tuple[int, float, dict]:
        """The first log record from index `start` whose message starts with `message`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.lines)):
                    at, rec = self.lines[i]
                    msg = rec.get("message", "")
                    if msg.startswith(message):
                        return i, at, rec
                    if rec.get("level") == "ERROR":
                        raise RuntimeError(f"server logged an error: {rec}")
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"no `{message}` log line (exit={self.proc.poll()})")
                self.cond.wait(min(left, 0.5))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(lat: list[float]) -> dict:
    ms = [x * 1e3 for x in lat]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "max_ms": max(ms) if ms else None}


def slowest(lat: list[tuple[float, float]], writes: list[float], windows: list[tuple[float, float]]) -> list[dict]:
    """The 1% slowest checks, each placed against the reload it came nearest: milliseconds after the
    file was written (`after_write_ms`), and after the reload began and ended (from its log line)."""
    out = []
    for due, x in sorted(lat, key=lambda t: -t[1])[: max(1, len(lat) // 100)]:
        k = max((i for i, w in enumerate(writes) if w <= due), default=None)
        if k is None:
            out.append({"latency_ms": round(x * 1e3, 2), "before_first_write": True})
            continue
        lo, hi = windows[k]
        out.append({"latency_ms": round(x * 1e3, 2), "after_write_ms": round((due - writes[k]) * 1e3, 1),
                    "after_reload_start_ms": round((due - lo) * 1e3, 1), "after_reload_end_ms": round((due - hi) * 1e3, 1)})
    return out


async def traffic(target: str, reqs: list[tuple[dict, bytes]], rate: float, seconds: float,
                  during=None) -> dict:
    """Sends `rate` checks a second for `seconds` (open loop, round robin over `reqs`), while
    `during()` (a coroutine, optional) runs; returns latencies and failures."""
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_unary(CHECK, request_serializer=None,
                              response_deserializer=external_auth_pb2.CheckResponse.FromString)
        lat: list[tuple[float, float]] = []  # (due time, latency)
        failures: list[str] = []
        wrong: list[str] = []

        async def one(due: float, spec: dict, body: bytes) -> None:
            try:
                resp = await call(body, timeout=10)
            except grpc.aio.AioRpcError as e:
                failures.append(f"{spec['name']}: {e.code().name} {e.details()}")
                return
            lat.append((due, time.monotonic() - due))
            allowed = resp.status.code == 0
            if allowed != spec["allow"]:
                wrong.append(f"{spec['name']}: status {resp.status.code}")

        start = time.monotonic()
        n = int(rate * seconds)
        tasks = []
        side = asyncio.create_task(during(start)) if during else None
        i = 0
        # At least `seconds`, and on until the side task (the reloads) is done.
        while i < n or (side is not None and not side.done()):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            spec, body = reqs[i % len(reqs)]
            tasks.append(asyncio.create_task(one(due, spec, body)))
            i += 1
        sent = time.monotonic() - start
        await asyncio.gather(*tasks)
        side_result = await side if side else None
        return {"lat": lat, "failures": failures, "wrong": wrong, "side": side_result,
                "achieved_rps": len(tasks) / sent}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config_dir", type=Path)
    ap.add_argument("--bin", default=os.environ.get("PORTCULLIS_BIN", "target/release/portcullis"))
    ap.add_argument("--rate", type=float, default=300)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    config = a.config_dir / "portcullis.yaml"
    original = config.read_text()
    specs = json.loads((a.config_dir / "requests.json").read_text())
    reqs = [(s, envoy_request(s["path"], s["headers"], s["peer"])) for s in specs]
    result: dict = {"config_bytes": len(original)}

    srv = Server(a.bin, config, a.config_dir / "server.log")
    try:
        _, loaded_at, loaded = srv.wait_for("configuration loaded")
        i, listening_at, rec = srv.wait_for("listening (ext_authz")
        target = rec["addr"]
        result["start"] = {
            "load_compile_ms": loaded.get("duration_ms"),
            "to_listening_ms": (listening_at - srv.t0) * 1e3,
            "summary": loaded.get("summary"),
        }
        time.sleep(0.5)
        result["rss_idle_kib"] = status_kib(srv.proc.pid)

        # Every request once: the expectations hold before any load.
        check = asyncio.run(traffic(target, reqs, rate=50, seconds=len(reqs) / 50))
        if check["failures"] or check["wrong"]:
            print(json.dumps(check["failures"] + check["wrong"]), file=sys.stderr)
            result["precheck_errors"] = check["failures"] + check["wrong"]

        base = asyncio.run(traffic(target, reqs, a.rate, a.seconds))
        result["baseline"] = {**summary([x for _, x in base["lat"]]), "failures": len(base["failures"]),
                              "wrong_decisions": len(base["wrong"]), "achieved_rps": base["achieved_rps"]}
        result["rss_after_traffic_kib"] = status_kib(srv.proc.pid)

        keys_file = a.config_dir / "keys.txt"
        if keys_file.exists():
            keys_text = keys_file.read_text()
            # The first `sub-3 active` line (a scope `all` key no request uses) is toggled.
            toggled = keys_text.replace("\nsub-3 active ", "\nsub-3 suspended ", 1)
            # Both versions are written before the phase and each reload links one into place (an
            # atomic rename, as a deploy or a ConfigMap swap does): writing 10 MB from this process
            # during the phase stalled the client's event loop and showed as latency of the checks.
            versions = []
            for k, text in enumerate((toggled, keys_text)):
                v = keys_file.with_name(f"keys.v{k}.txt")
                v.write_text(text)
                versions.append(v)

            async def key_reloads(start: float) -> dict:
                durations, windows, cpus, writes = [], [], [], []
                nxt = len(srv.lines)
                gap = a.seconds / (a.reloads + 1)
                for r in range(a.reloads):
                    await asyncio.sleep(max(0.0, start + (r + 1) * gap - time.monotonic()))
                    tmp = keys_file.with_suffix(".tmp")
                    writes.append(time.monotonic())
                    tmp.unlink(missing_ok=True)
                    os.link(versions[r % 2], tmp)
                    os.replace(tmp, keys_file)
                    idx, at, rec = await asyncio.to_thread(srv.wait_for, "subscription keys file reloaded", nxt, 60)
                    nxt = idx + 1
                    d = rec.get("duration_ms")
                    durations.append(d)
                    cpus.append(rec.get("cpu_ms"))
                    windows.append((at - (d or 0) / 1e3, at))
                return {"durations": durations, "windows": windows, "cpu": cpus, "writes": writes}

            kr = asyncio.run(traffic(target, reqs, a.rate, a.seconds, during=key_reloads))
            kwin = kr["side"]["windows"]
            kin = [x for due, x in kr["lat"] if any(lo - 0.001 <= due <= hi for lo, hi in kwin)]
            kds = [d for d in kr["side"]["durations"] if d is not None]
            result["keys_reload"] = {
                "count": len(kds),
                "keys_file_bytes": len(keys_text),
                "duration_ms": {"min": min(kds) if kds else None, "p50": pct(kds, 50), "max": max(kds) if kds else None},
                "cpu_ms_p50": pct([c for c in kr["side"]["cpu"] if c is not None], 50),
                "checks_during_key_reloads": {**summary([x for _, x in kr["lat"]]), "failures": len(kr["failures"]),
                                              "wrong_decisions": len(kr["wrong"]), "achieved_rps": kr["achieved_rps"]},
                "checks_while_reloading_keys": summary(kin),
                "slowest": slowest(kr["lat"], kr["side"]["writes"], kwin),
            }
            keys_file.unlink()
            keys_file.write_text(keys_text)
            for v in versions:
                v.unlink()
            result["rss_after_key_reloads_kib"] = status_kib(srv.proc.pid)

        async def reloads(start: float) -> dict:
            durations, windows = [], []
            nxt = len(srv.lines)
            gap = a.seconds / (a.reloads + 1)
            for r in range(a.reloads):
                await asyncio.sleep(max(0.0, start + (r + 1) * gap - time.monotonic()))
                began = time.monotonic()
                if r % 2 == 0:
                    # A real change (new digest): the watcher reloads after its debounce.
                    # Written off the event loop: 13 MB written inline would stall the client and
                    # show up as latency of the checks due meanwhile.
                    tmp = config.with_suffix(".tmp")
                    await asyncio.to_thread(tmp.write_text, original + f"# reload {r}\n")
                    os.replace(tmp, config)
                    how = "file"
                else:
                    srv.proc.send_signal(signal.SIGHUP)
                    how = "sighup"
                idx, at, rec = await asyncio.to_thread(srv.wait_for, "configuration reloaded", nxt, 60)
                nxt = idx + 1
                d = rec.get("duration_ms")
                durations.append({"how": how, "duration_ms": d, "load_ms": rec.get("load_ms"), "cpu_ms": rec.get("cpu_ms")})
                # The compile ran in the `duration_ms` before the log line.
                windows.append((at - (d or 0) / 1e3, at))
                del began
            return {"durations": durations, "windows": windows}

        rel = asyncio.run(traffic(target, reqs, a.rate, a.seconds, during=reloads))
        windows = rel["side"]["windows"]
        in_window = [x for due, x in rel["lat"] if any(lo - 0.001 <= due <= hi for lo, hi in windows)]
        ds = [d["duration_ms"] for d in rel["side"]["durations"] if d["duration_ms"] is not None]
        result["reload"] = {
            "count": len(ds),
            "duration_ms": {"min": min(ds) if ds else None, "p50": pct(ds, 50), "max": max(ds) if ds else None},
            "load_ms_p50": pct([d["load_ms"] for d in rel["side"]["durations"] if d.get("load_ms") is not None], 50),
            "cpu_ms_p50": pct([d["cpu_ms"] for d in rel["side"]["durations"] if d.get("cpu_ms") is not None], 50),
            "each": rel["side"]["durations"],
            "checks_during_reload_phase": {**summary([x for _, x in rel["lat"]]), "failures": len(rel["failures"]),
                                           "wrong_decisions": len(rel["wrong"]), "achieved_rps": rel["achieved_rps"]},
            "checks_while_compiling": summary(in_window),
            "failure_samples": (rel["failures"] + rel["wrong"])[:10],
        }
        result["rss_after_reloads_kib"] = status_kib(srv.proc.pid)
    finally:
        config.write_text(original)
        srv.stop()
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
