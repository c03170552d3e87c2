"""Faults of a fleet on a shared Redis store: the replica holding the refresh lease killed with -9
while its refresh is at the provider, Redis down for 20 s, Redis killed and restarted with AOF.

What must hold through all of them: no check is allowed without a valid credential, no refresh token
is ever replayed (so the provider never answers `invalid_grant`), and whatever can resume without a
new consent does."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from credentials_harness import drive_consent
from fleet_harness import PREFIX, check_denial, check_token, eventually, metric_sum, timeline


def warm(fleet):
    for r in fleet.replicas:
        eventually(f"{r.name} allows", lambda r=r: r.alive() and r.check().status.code == 0, timeout=15, diagnostics=fleet.tails)


def first_token_claims(fleet) -> dict:
    return fleet.verify(check_token(fleet.replicas[0].check()), time.time())


def assert_no_replay(fleet):
    assert fleet.tap.replays() == {}, f"refresh token replayed: {fleet.tap.replays()}\n{fleet.tails()}"
    assert not [c for c in fleet.tap.errors() if c.error == "invalid_grant"], fleet.tails()
    assert not [l for l in fleet.grant_errors() if "invalid_grant" in l], fleet.grant_errors()


def test_lease_holder_killed_after_sending_the_refresh_token(fleet_factory):
    """The holder dies while the provider is answering its refresh (slowed to 8 s): the refresh token
    it sent is spent, and the in-flight marker it left says so. The survivors must not send it again
    (the provider would answer invalid_grant and revoke the grant): after the lease's TTL the
    connection becomes `needs_consent`, checks are denied once the cached token expires, nothing is
    ever allowed without a valid token, and a new consent brings the fleet back."""
    ttl, timeout_s = 30, 10
    lease_ttl = timeout_s + 5                       # per the design: credential timeout + 5 s
    fleet = fleet_factory(access_token_ttl=ttl, refresh_before_expiry="20s", timeout=f"{timeout_s}s")
    fleet.consent()
    warm(fleet)
    exp = first_token_claims(fleet)["exp"]
    refreshes_before = fleet.refresh_count()
    fleet.idp.fail("token", "slow", delay_ms=8000, times=1)

    with fleet.traffic(workers=3, pause=0.05) as traffic:
        # The refresh is due 10 s after consent. Wait until the lease exists AND the provider has the
        # refresh request (it counts requests as they arrive, before the delay).
        def holder():
            lease = fleet.lease()
            return lease if lease and fleet.refresh_count() > refreshes_before else None

        lease = eventually("a lease held while the refresh is at the provider", holder, timeout=30, interval=0.02,
                           diagnostics=fleet.tails)
        # The value starts with the holder's pid (then a random part: "<pid>:<hex>" in the contract).
        pid = int(re.match(rb"\d+", lease).group())
        (victim,) = [r for r in fleet.replicas if r.pid == pid]
        killed_at = time.time()
        victim.kill()
        survivors = [r for r in fleet.replicas if r is not victim]
        refreshes_at_kill = fleet.refresh_count()

        # The lease disappears within its TTL.
        pttl = fleet.redis.cmd("PTTL", f"{PREFIX}lease:crm:{fleet.connection}")
        assert pttl is None or pttl <= lease_ttl * 1000, pttl
        eventually("the dead holder's lease expires", lambda: fleet.lease() is None, timeout=lease_ttl + 2, interval=0.1,
                   diagnostics=fleet.tails)
        lease_gone = time.time() - killed_at

        # The survivors find the in-flight marker: needs_consent, not a replay.
        for r in survivors:
            eventually(f"{r.name} reports needs_consent", lambda r=r: (r.connection(fleet.connection) or {}).get("state") == "needs_consent",
                       timeout=lease_ttl + 10, diagnostics=fleet.tails)
        # Keep the traffic going past the cached token's expiry.
        while time.time() < exp + 4:
            time.sleep(0.2)

    assert lease_gone <= lease_ttl + 1, lease_gone
    outcomes = traffic.outcomes
    assert traffic.errors == [], traffic.errors[:5]
    for o in outcomes:
        if o.status == 200:
            fleet.verify.assert_valid(o)          # never an allow without a valid, unexpired token
    denied = [o for o in outcomes if o.status != 200 and o.from_portcullis]
    assert all((o.status, o.reason) == (503, "BackendCredentialUnavailable") for o in denied), [str(o) for o in denied[:5]]
    after_expiry = [o for o in outcomes if o.t > exp + 1.5]
    assert after_expiry and not any(o.allowed for o in after_expiry), "allowed after the last token expired"
    # Answers Envoy made itself (no portcullis decision): only while the dead replica was being taken
    # out of the cluster by its health check.
    envoy_made = [o for o in outcomes if o.status != 200 and not o.from_portcullis]
    late = [f"{o.t - killed_at:+.1f}s {o}" for o in envoy_made if not killed_at <= o.t <= killed_at + 5]
    assert late == [], late[:5]

    # The provider never saw the spent token again, and answered no invalid_grant.
    assert fleet.refresh_count() == refreshes_at_kill, f"a refresh was sent after the holder died\n{fleet.tails()}"
    assert_no_replay(fleet)
    for r in survivors:
        conn = r.connection(fleet.connection)
        assert conn["state"] == "needs_consent" and conn.get("error"), conn
        assert check_denial(r.check()) == (14, 503, "BackendCredentialUnavailable"), r.name

    # A new consent (started and completed on the survivors) brings the fleet back.
    redirect = drive_consent(fleet.idp, fleet.start_consent(fleet.replicas.index(survivors[0])), fleet.redirect_uri)
    assert fleet.callback(redirect, fleet.replicas.index(survivors[1]))[0] == 200
    for r in survivors:
        resp = eventually(f"{r.name} allows after the new consent", lambda r=r: (resp := r.check()).status.code == 0 and resp, timeout=15)
        fleet.verify(check_token(resp), time.time())
    assert_no_replay(fleet)


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_redis_down_for_20_seconds(fleet_factory, outage):
    """Redis stops 2-3 s after consent for 20 s (`stopped`: shut down, connections refused, then started
    again on the same port with its data; `frozen`: SIGSTOP, connections open and nothing answers, so
    only `store.redis.timeout` (500 ms) bounds each call); the access tokens live 15 s. Checks keep being allowed
    with the cached token while it is valid; after it expired a check needs a new token, which needs
    Redis: 503 BackendCredentialUnavailable. When Redis is back (same port, its data reloaded), every
    replica allows again within 5 s (the fresh shared token is one Redis read away), without a new
    consent and without a replayed refresh token."""
    ttl = 15
    fleet = fleet_factory(access_token_ttl=ttl, refresh_before_expiry="5s")
    fleet.consent()
    warm(fleet)
    exp = first_token_claims(fleet)["exp"]
    authorizations = fleet.idp.stats()["authorization"]

    with fleet.traffic(workers=3, pause=0.05) as traffic:
        time.sleep(1)
        down_at = time.time()
        if outage == "stopped":
            fleet.redis.shutdown_save()           # a clean stop: its data is in dump.rdb
        else:
            fleet.redis.freeze()
        assert exp - down_at > 8, "Redis must go down well before the token needs refreshing"
        # Health and readiness do not depend on Redis once started.
        time.sleep(2)
        for r in fleet.replicas:
            with urllib.request.urlopen(f"http://127.0.0.1:{r.http_port}/readyz", timeout=10) as resp:
                assert resp.status == 200, r.name
        while time.time() < down_at + 20:
            time.sleep(0.2)
        back_at = time.time()                     # Redis answers again from here on
        if outage == "stopped":
            fleet.redis.start()                   # same port, same directory
        else:
            fleet.redis.thaw()
        eventually("allowed again after Redis is back", lambda: any(o.allowed and o.t > back_at for o in traffic.outcomes),
                   timeout=45, diagnostics=fleet.tails)
        recovered_at = min(o.t for o in traffic.outcomes if o.allowed and o.t > back_at)
        # Within 5 s of Redis' return every replica must have the new shared token; watch 10 s more.
        while time.time() < back_at + 15:
            time.sleep(0.2)
    settled = back_at + 5
    story = timeline(traffic.outcomes, down_at, {"redis down": down_at, "token expired": exp, "redis back": back_at})
    print(f"Redis down {back_at - down_at:.1f} s; token expired {exp - down_at:.1f} s after; allowed again {recovered_at - back_at:.1f} s after Redis")

    assert traffic.errors == [], traffic.errors[:5]
    outcomes = traffic.outcomes
    for o in outcomes:
        if o.status == 200:
            fleet.verify.assert_valid(o)
    # Redis down, cached token valid: allowed.
    while_valid = traffic.between(down_at, exp - 1)
    assert while_valid and all(o.allowed for o in while_valid), [str(o) for o in while_valid if not o.allowed][:5]
    # Redis down, token expired: 503 BackendCredentialUnavailable from portcullis (never an allow).
    while_expired = traffic.between(exp + 1.5, back_at)
    assert while_expired, "no request fell between the token's expiry and Redis' return"
    wrong = [o for o in while_expired if (o.status, o.reason) != (503, "BackendCredentialUnavailable")]
    assert wrong == [], [str(o) for o in wrong[:5]]
    # Never held up by the outage: each answer within a few Redis timeouts (Envoy would give up at 20 s).
    slow = sorted((o.seconds for o in traffic.between(down_at, back_at)), reverse=True)
    assert slow and slow[0] < 3.0, f"slowest answers during the outage: {[round(x, 2) for x in slow[:5]]} s"
    # Redis back: allowed again (a few seconds for every replica), with a new token, no new consent.
    assert recovered_at - back_at < 40, recovered_at - back_at
    after = traffic.between(settled, time.time() + 1)
    late = fleet.deciders([o for o in after if not o.allowed])
    assert after and not late, f"still denied more than 5 s after Redis was back (by replica: {dict(late)}):\n{story}\n{fleet.tails()}"
    assert fleet.idp.stats()["authorization"] == authorizations, "a new consent was needed"
    for r in fleet.replicas:
        assert r.connection(fleet.connection)["state"] == "connected", r.name
    assert_no_replay(fleet)
    assert fleet.tap.errors() == [], [(c.grant_type, c.status, c.answer) for c in fleet.tap.errors()]
    # The outage is visible on /metrics.
    for r in fleet.replicas:
        text = r.metrics()
        failed = sum(metric_sum(text, "portcullis_store_operations_total", result=res) for res in ("error", "timeout"))
        assert failed > 0, (r.name, [l for l in text.splitlines() if l.startswith("portcullis_store")])


def test_redis_killed_and_restarted_with_aof_loses_nothing(fleet_factory):
    """`appendonly yes`, `appendfsync always`: Redis killed with -9 right after a rotation and started
    again keeps the rotated refresh token; the fleet goes on rotating from it without a new consent,
    with no check denied and no invalid_grant."""
    fleet = fleet_factory(aof=True, access_token_ttl=20, refresh_before_expiry="12s")   # a refresh every 8 s
    fleet.consent()
    warm(fleet)
    authorizations = fleet.idp.stats()["authorization"]

    with fleet.traffic(workers=3, pause=0.05) as traffic:
        # Right after a rotation (the rotated refresh token is only in Redis and at the provider).
        eventually("a rotation", lambda: len(fleet.tap.refreshes()) >= 1, timeout=30, diagnostics=fleet.tails)
        time.sleep(1)
        rotations = len(fleet.tap.refreshes())
        fleet.redis.kill()
        fleet.redis.start()
        restarted_at = time.time()
        assert fleet.redis.cmd("SISMEMBER", f"{PREFIX}conns:crm", fleet.connection) == 1
        assert fleet.redis.cmd("EXISTS", f"{PREFIX}conn:crm:{fleet.connection}") == 1
        # The next rotations start from what Redis kept.
        eventually("two rotations after the restart", lambda: len(fleet.tap.refreshes()) >= rotations + 2, timeout=40,
                   diagnostics=fleet.tails)
        time.sleep(1)

    assert traffic.errors == [], traffic.errors[:5]
    refused = [o for o in traffic.outcomes if not o.allowed]
    assert refused == [], [str(o) for o in refused[:5]]
    for o in traffic.outcomes:
        fleet.verify.assert_valid(o)
    assert [c for c in fleet.tap.refreshes() if c.t > restarted_at], "no refresh after the restart"
    assert fleet.tap.errors() == [], [(c.grant_type, c.status, c.answer) for c in fleet.tap.errors()]
    assert_no_replay(fleet)
    assert fleet.idp.stats()["authorization"] == authorizations, "a new consent was needed"
    for r in fleet.replicas:
        assert r.connection(fleet.connection)["state"] == "connected", r.name


def test_lease_holder_killed_before_sending_the_refresh_token(fleet_factory):
    """The holder is stopped right after taking the lease, before its in-flight marker is written and
    before the refresh token leaves (a pass-through in front of Redis freezes it), and killed with -9.
    The refresh token in Redis was never sent, so the survivors take over once the lease's TTL has
    passed: they refresh with it and go on serving, before the cached token expires, without a deny,
    without a new consent, without invalid_grant."""
    ttl, timeout_s = 30, 10
    lease_ttl = timeout_s + 5
    fleet = fleet_factory(access_token_ttl=ttl, refresh_before_expiry="20s", timeout=f"{timeout_s}s", redis_gate=True)
    fleet.consent()
    warm(fleet)
    first = check_token(fleet.replicas[0].check())
    exp = fleet.verify(first, time.time())["exp"]
    refreshes_before = fleet.refresh_count()
    authorizations = fleet.idp.stats()["authorization"]

    with fleet.traffic(workers=3, pause=0.05) as traffic:
        fleet.gate.armed.set()
        fence = eventually("a lease holder frozen before its in-flight marker", lambda: fleet.gate.held and fleet.gate.held[0],
                           timeout=30, interval=0.01, diagnostics=fleet.tails)
        pid = int(re.match(rb"\d+", fence).group())
        (victim,) = [r for r in fleet.replicas if r.pid == pid]
        victim.kill()
        killed_at = time.time()
        survivors = [r for r in fleet.replicas if r is not victim]
        assert fleet.refresh_count() == refreshes_before, "the refresh token left before the holder was frozen"
        assert fleet.lease() is not None, "the dead holder's lease is there"

        eventually("the dead holder's lease expires", lambda: fleet.lease() != fence, timeout=lease_ttl + 2, interval=0.1,
                   diagnostics=fleet.tails)
        lease_gone = time.time() - killed_at
        eventually("a survivor refreshes", lambda: [c for c in fleet.tap.refreshes() if c.t > killed_at], timeout=lease_ttl + 10,
                   diagnostics=fleet.tails)
        while time.time() < exp + 4:
            time.sleep(0.2)

    assert lease_gone <= lease_ttl + 1, lease_gone
    story = timeline(traffic.outcomes, killed_at, {"holder killed": killed_at, "first token expired": exp})
    assert traffic.errors == [], traffic.errors[:5]
    for o in traffic.outcomes:
        if o.status == 200:
            fleet.verify.assert_valid(o)
    denied = [o for o in traffic.outcomes if o.status != 200 and o.from_portcullis]
    assert denied == [], f"denied by portcullis:\n{story}\n{fleet.tails()}"
    late = [f"{o.t - killed_at:+.1f}s {o}" for o in traffic.outcomes
            if o.status != 200 and not o.from_portcullis and not killed_at - 1 <= o.t <= killed_at + 5]
    assert late == [], late[:5]
    after = traffic.between(exp + 1.5, time.time() + 1)
    assert after and all(o.allowed and o.token != first for o in after), story
    refreshed = [c for c in fleet.tap.refreshes() if c.t > killed_at]
    assert len(refreshed) <= 2 and all(c.status == 200 for c in refreshed), [(c.status, c.answer) for c in refreshed]
    assert_no_replay(fleet)
    assert fleet.idp.stats()["authorization"] == authorizations, "a new consent was needed"
    for r in survivors:
        assert r.connection(fleet.connection)["state"] == "connected", r.name
