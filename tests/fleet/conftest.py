"""Fixtures of the fleet suite (the topology is in fleet_harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_harness import Fleet, start_fleet  # noqa: E402


@pytest.fixture
def fleet_factory(tmp_path):
    """start(**options) -> Fleet (see fleet_harness.start_fleet); everything is stopped after the test."""
    started: list[Fleet] = []

    def start(**options) -> Fleet:
        # Setting a fleet up starts an IdP, Redis, three replicas and Envoy on a 2-core machine. A
        # setup that fails once (a process slower to start than its timeout, a port taken between
        # picking and binding) is retried once, in a fresh directory, and the first failure is
        # printed. Only the setup is retried; the test's own checks run once.
        for attempt in (1, 2):
            workdir = tmp_path / f"fleet{len(started)}-attempt{attempt}"
            workdir.mkdir()
            try:
                fleet = start_fleet(workdir, **options)
            except (AssertionError, RuntimeError, OSError) as e:
                if attempt == 2:
                    raise
                print(f"fleet setup failed, retrying once: {e}", file=sys.stderr)
                continue
            started.append(fleet)
            return fleet
        raise AssertionError("unreachable")

    yield start
    for fleet in started:
        fleet.close()
