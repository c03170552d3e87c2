"""Three replicas sharing one Redis (`store.redis`) behind one Envoy, against the real OpenID Provider
with refresh-token rotation: a consent made through any replica serves the whole fleet, and the fleet
rotates the refresh token as ONE client would (one refresh per access-token period, no replay, no
deny) while checks keep arriving on all three."""

from __future__ import annotations

import time

from credentials_harness import drive_consent
from fleet_harness import check_denial, check_token, eventually, metric_sum


def leases(replica, outcome: str) -> float:
    return metric_sum(replica.metrics(), "portcullis_store_leases_total", outcome=outcome)


def allows(replica) -> float:
    return metric_sum(replica.metrics(), "portcullis_decisions_total", api="crm", outcome="allow")


def test_consent_on_replica_1_callback_on_replica_2_used_by_all_three(fleet_factory):
    fleet = fleet_factory(access_token_ttl=30, refresh_before_expiry="10s")
    r1, r2, r3 = fleet.replicas

    # No connection yet: the shared connection needs consent, every replica says so and denies 503.
    for r in fleet.replicas:
        status, body = r.admin("GET", "/admin/credentials")
        assert status == 200, body
        assert body["credentials"][0]["state"] == "needs_consent", (r.name, body)
        assert check_denial(r.check()) == (14, 503, "BackendCredentialUnavailable"), r.name
    before = fleet.get()
    assert (before.status, before.reason) == (503, "BackendCredentialUnavailable"), before

    # The operator starts consent on replica 1; the user's browser comes back to replica 2.
    redirect = drive_consent(fleet.idp, fleet.start_consent(0), fleet.redirect_uri, login="alice")
    status, text = fleet.callback(redirect, 1)
    assert status == 200, (status, text, fleet.tails())
    # The state is single use for the whole fleet: replaying the redirect on replica 3 is refused.
    status, text = fleet.callback(redirect, 2)
    assert status == 400, (status, text)

    # Every replica lists the connection as connected and injects a valid token for alice.
    for r in fleet.replicas:
        conn = eventually(f"{r.name} lists the connection as connected",
                          lambda r=r: (c := r.connection(fleet.connection)) and c["state"] == "connected" and c, timeout=15,
                          diagnostics=fleet.tails)
        assert "refresh_token\":" not in str(conn) and "eyJ" not in str(conn), "no token in admin answers"
    tokens = []
    for r in fleet.replicas:
        resp = eventually(f"{r.name} allows", lambda r=r: (resp := r.check()).status.code == 0 and resp, timeout=15,
                          diagnostics=fleet.tails)
        tokens.append(check_token(resp))
        claims = fleet.verify(tokens[-1], time.time())
        assert claims["sub"] == "alice", claims
    # One connection, one token: the code's, shared through Redis. No replica redeemed anything else.
    assert len(set(tokens)) == 1, "each replica holds its own token"
    grants = [c.grant_type for c in fleet.tap.calls]
    assert grants == ["authorization_code"], grants

    # Through Envoy (round robin over the three): every request reaches the backend with that token,
    # and every replica decided some of them.
    counts = [allows(r) for r in fleet.replicas]
    outcomes = [fleet.get(f"/crm/orders/{i}") for i in range(30)]
    for o in outcomes:
        fleet.verify.assert_valid(o)
    assert {o.token for o in outcomes} == {tokens[0]}
    gained = [allows(r) - c for r, c in zip(fleet.replicas, counts)]
    assert all(g > 0 for g in gained), f"not every replica served checks through Envoy: {gained}"
    assert fleet.grant_errors() == [], fleet.grant_errors()


def test_rotations_under_concurrent_traffic_one_refresh_per_period_no_deny_no_replay(fleet_factory):
    ttl, ahead = 20, 10
    period = ttl - ahead                      # a token is refreshed when it is `ahead` seconds from expiry
    duration = 65.0
    fleet = fleet_factory(access_token_ttl=ttl, refresh_before_expiry=f"{ahead}s")
    fleet.consent(start_on=0, callback_on=1)
    for r in fleet.replicas:
        eventually(f"{r.name} allows", lambda r=r: r.check().status.code == 0, timeout=15, diagnostics=fleet.tails)

    counts = [allows(r) for r in fleet.replicas]
    leases_before = sum(leases(r, "acquired") for r in fleet.replicas)
    refreshes_before = fleet.refresh_count()
    started = time.monotonic()
    with fleet.traffic(workers=4, pause=0.05) as traffic:
        time.sleep(duration)
    elapsed = time.monotonic() - started
    refreshes = fleet.refresh_count() - refreshes_before
    outcomes = traffic.outcomes
    summary = f"{len(outcomes)} requests in {elapsed:.0f} s, {refreshes} refreshes"

    # Zero denied checks, zero transport errors; every allow carried a valid, unexpired token.
    assert traffic.errors == [], traffic.errors[:5]
    assert len(outcomes) > 200, summary
    refused = [o for o in outcomes if not o.allowed]
    assert refused == [], f"{len(refused)} of {summary} not allowed, e.g. {[str(o) for o in refused[:3]]}\n{fleet.tails()}"
    for o in outcomes:
        fleet.verify.assert_valid(o)
    seen = {o.token for o in outcomes}

    # Several rotations happened, and the backend saw the new tokens.
    assert refreshes >= 3, f"{summary}\n{fleet.tails()}"
    assert len(seen) >= 3, f"only {len(seen)} distinct tokens reached the backend ({summary})"

    # About one refresh per access-token period for the whole fleet (three replicas each refreshing
    # on their own would be three per period).
    assert refreshes <= elapsed / period + 2, f"{summary}: more than one refresh per {period} s period\n{fleet.tails()}"

    # No refresh token was ever sent twice; every refresh spent exactly the token the previous answer
    # gave (one unbroken rotation chain), and the provider refused nothing.
    assert fleet.tap.replays() == {}, fleet.tap.replays()
    assert fleet.tap.errors() == [], [(c.grant_type, c.status, c.answer) for c in fleet.tap.errors()]
    assert fleet.grant_errors() == [], fleet.grant_errors()
    chain = [c for c in fleet.tap.calls if c.grant_type in ("authorization_code", "refresh_token")]
    for prev, nxt in zip(chain, chain[1:]):
        assert nxt.form.get("refresh_token") == prev.answer["refresh_token"], "a refresh did not use the latest rotated token"

    # All three replicas took part, and all three still call the connection connected.
    gained = [allows(r) - c for r, c in zip(fleet.replicas, counts)]
    assert all(g > 0 for g in gained), gained
    for r in fleet.replicas:
        assert r.connection(fleet.connection)["state"] == "connected", r.name

    # What operators see on /metrics: every refresh was made under a lease, and every replica read
    # the shared token from Redis.
    acquired = sum(leases(r, "acquired") for r in fleet.replicas) - leases_before
    assert acquired >= refreshes, (acquired, refreshes)
    for r in fleet.replicas:
        assert metric_sum(r.metrics(), "portcullis_store_operations_total", op="token_get", result="ok") > 0, r.name
