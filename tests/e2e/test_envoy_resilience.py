"""Failure and change, through a real Envoy: portcullis down (Envoy must refuse, never allow), and
config reloads under traffic (no request dropped, no mixed policy)."""

from __future__ import annotations

import threading
import time

from harness import assert_deny, key_hash, request
from topology import ALLOWED_CLIENT, KEY_TEAM_A

LB = {"x-forwarded-for": ALLOWED_CLIENT}

OPEN_CONFIG = """
listen: {{grpc: 127.0.0.1:{port}}}
telemetry: {{log_format: json}}
apis:
  - name: public
    match: {{path_prefix: /public}}
unmatched: deny
"""


def test_portcullis_down_means_503_from_envoy_never_an_allow(stacks, backend):
    portcullis = stacks.portcullis(OPEN_CONFIG.format(port=0))
    port = portcullis.grpc_port
    envoy = stacks.envoy(portcullis)
    envoy.wait_healthy("portcullis")
    assert request(envoy.url("http", "/public/x"), headers=LB).status == 200

    assert portcullis.stop() == 0, portcullis.output()
    before = len(backend.received)
    for _ in range(5):
        r = request(envoy.url("http", "/public/x"), headers=LB)
        # status_on_error: ServiceUnavailable, failure_mode_allow: false.
        assert r.status == 503, r
        assert r.header("x-echo") is None, r
    assert len(backend.received) == before, "a request passed while portcullis was down"
    stats = envoy.stats()
    assert stats["http.http.ext_authz.error"] >= 5, stats
    assert stats.get("http.http.ext_authz.failure_mode_allowed", 0) == 0
    # Routes that never ask are unaffected.
    assert request(envoy.url("http", "/no-authz/x"), headers=LB).status == 200

    # Back on the same port: Envoy reconnects by itself and requests pass again.
    stacks.portcullis(OPEN_CONFIG.format(port=port), name="portcullis-again")
    envoy.process.wait_for("an allow after the restart", lambda: request(envoy.url("http", "/public/x"), headers=LB).status == 200)


# Two policies for one path whose decisions differ for both kinds of request the traffic sends:
#   no key:    v1 -> 200, backend sees x-policy: v1        v2 -> 401 SubscriptionKeyNotFound
#   with key:  v1 -> 200, x-policy: v1, key passed on      v2 -> 200, x-policy: v2, key removed
# so any response mixing the two (v2's header with v1's key handling, ...) is detected.
RELOAD_V1 = """
listen: {grpc: 127.0.0.1:0}
telemetry: {log_format: json}
apis:
  - name: reload
    match: {path_prefix: /reload}
    on_allow:
      set_headers: {x-policy: v1}
unmatched: deny
"""

RELOAD_V2 = f"""
listen: {{grpc: 127.0.0.1:0}}
telemetry: {{log_format: json}}
subscriptions:
  keys:
    - {{id: team-a, scope: all, primary: "{key_hash(KEY_TEAM_A)}"}}
apis:
  - name: reload
    match: {{path_prefix: /reload}}
    subscription_required: true
    on_allow:
      set_headers: {{x-policy: v2, x-subscription: "{{subscription.id}}"}}
unmatched: deny
"""


def classify(r, with_key: bool) -> str:
    """'v1' or 'v2' when the response is exactly what that policy decides, else a description."""
    if r.status == 200 and r.header("x-echo") == "1":
        h = r.json()["headers"]
        policy = h.get("x-policy")
        key = h.get("ocp-apim-subscription-key")
        if policy == ["v1"] and "x-subscription" not in h and (key == [KEY_TEAM_A] if with_key else key is None):
            return "v1"
        if policy == ["v2"] and with_key and key is None and h.get("x-subscription") == ["team-a"]:
            return "v2"
        return f"mixed allow: {h}"
    if r.status == 401 and not with_key:
        try:
            assert_deny(r, 401, "SubscriptionKeyNotFound")
            return "v2"
        except AssertionError as e:
            return f"bad deny: {e}"
    return f"unexpected: {r}"


def test_reload_under_traffic_drops_no_request_and_mixes_no_policies(stacks):
    portcullis = stacks.portcullis(RELOAD_V1)
    envoy = stacks.envoy(portcullis)
    envoy.wait_healthy("portcullis")
    url = envoy.url("http", "/reload/x")

    def send(i: int) -> str:
        with_key = i % 2 == 1
        headers = {**LB, "ocp-apim-subscription-key": KEY_TEAM_A} if with_key else LB
        try:
            return classify(request(url, headers=headers, timeout=30), with_key)
        except OSError as e:
            return f"connection error: {e!r}"

    results: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    max_per_worker = 1500  # bounded even if the writer stalls

    def worker(offset: int):
        for i in range(max_per_worker):
            if stop.is_set():
                return
            outcome = send(offset + i)
            with lock:
                results.append(outcome)

    # Traffic starts under v1.
    assert send(0) == "v1"
    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(3)]
    for w in workers:
        w.start()
    versions = [RELOAD_V2, RELOAD_V1] * 3 + [RELOAD_V2]  # seven rewrites, ending with v2
    for text in versions:
        time.sleep(0.4)
        portcullis.write_config(text)
    time.sleep(0.4)
    stop.set()
    for w in workers:
        w.join(120)
        assert not w.is_alive()

    print("outcomes:", {v: results.count(v) for v in set(results)})
    bad = [r for r in results if r not in ("v1", "v2")]
    assert not bad, f"{len(bad)} of {len(results)} responses were neither policy: {bad[:5]}"
    assert results, "no traffic was sent"

    # After the last write, the last version decides.
    envoy.process.wait_for("the last version to decide", lambda: send(0) == "v2" and send(1) == "v2", timeout=30)
    tail = [send(i) for i in range(20)]
    assert tail == ["v2"] * 20, tail
    assert "configuration reloaded" in portcullis.output()
