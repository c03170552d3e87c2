"""REGRESSION WITNESS for issue 14: the deployment that breaks.

Three replicas, each with its own embedded store (`store.path`, redb), the same refresh token seeded
into each (the only way such a fleet could share a connection), the provider rotating refresh tokens.
The first replica's refresh spends the token the others still hold; they replay it, the provider
answers `invalid_grant` (and oidc-provider's reuse detection revokes the grant), and checks are
denied with 503 `BackendCredentialUnavailable`. A consent started on one replica cannot complete on
another either.

This test asserts that the breakage HAPPENS, so that the shared-store tests next to it are known to
exercise the situation they claim to fix. It must keep passing as long as `store.path` is per replica;
if it ever stops producing a replay, the fleet tests lost their witness (look at the topology, not at
the assertion).
"""

from __future__ import annotations

from credentials_harness import drive_consent
from fleet_harness import check_denial, check_token, eventually


def test_embedded_stores_replay_rotated_refresh_tokens_and_deny(fleet_factory):
    fleet = fleet_factory(store="embedded", seeded=True, access_token_ttl=20, refresh_before_expiry="10s")

    # Every replica needs an access token, so every replica redeems the seeded refresh token (at
    # start, or at the latest on its first check). Ask each one directly, so none is left out.
    answers = {}
    for r in fleet.replicas:
        resp = r.check("/crm/witness")
        answers[r.name] = check_token(resp) if resp.status.code == 0 else check_denial(resp)
    eventually("all three replicas sent their refresh token", lambda: len(fleet.tap.refreshes()) >= 3, timeout=30,
               diagnostics=fleet.tails)

    # The bug, as the provider sees it: one refresh token sent by more than one replica, answered
    # with invalid_grant.
    assert fleet.tap.replays(), f"no refresh token was sent twice:\n{fleet.tails()}"
    assert any(c.error == "invalid_grant" for c in fleet.tap.errors()), fleet.tails()
    assert any("invalid_grant" in line for line in fleet.grant_errors()), fleet.idp.stderr

    # The bug, as users see it: denied with 503 BackendCredentialUnavailable. At least the two
    # replicas that replayed deny (directly, and through Envoy, which spreads over all three).
    denied = [name for name, a in answers.items() if isinstance(a, tuple)]
    for r in fleet.replicas:
        if r.name not in denied:
            resp = r.check("/crm/witness-again")
            if resp.status.code != 0:
                denied.append(r.name)
                answers[r.name] = check_denial(resp)
    assert len(denied) >= 2, (answers, fleet.tails())
    assert all(answers[n] == (14, 503, "BackendCredentialUnavailable") for n in denied), answers

    through_envoy = [fleet.get() for _ in range(12)]
    refused = [o for o in through_envoy if not o.allowed]
    assert refused, "every check through Envoy was allowed"
    assert all(o.status == 503 and o.reason == "BackendCredentialUnavailable" for o in refused), [str(o) for o in refused]
    for o in through_envoy:
        if o.allowed:
            fleet.verify.assert_valid(o)

    # The replayed connection is lost, as the admin API of a replica that replayed says.
    states = {r.name: (r.connection("default") or {}).get("state") for r in fleet.replicas}
    assert any(s in ("needs_consent", "error") for s in states.values()), states

    # A consent started on one replica's admin API is unknown to the others: the provider's
    # redirect cannot be completed on a second replica.
    redirect = drive_consent(fleet.idp, fleet.start_consent(0), fleet.redirect_uri)
    status, text = fleet.callback(redirect, 2)
    assert 400 <= status < 500, (status, text)
