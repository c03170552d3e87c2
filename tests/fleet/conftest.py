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
        fleet = start_fleet(tmp_path, **options)
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        fleet.close()
