"""Fixtures of the credential manager suite (helpers are in credentials_harness.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from credentials_harness import ADMIN_TOKEN, BIN, STORE_KEY, Portcullis  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _binary():
    if not os.path.exists(BIN):
        pytest.fail(f"portcullis binary not found at {BIN}: run `cargo build` or set PORTCULLIS_BIN")


@pytest.fixture
def start_portcullis(tmp_path):
    """start_portcullis(yaml, env=None, ready=True) -> Portcullis, stopped after the test."""
    started: list[Portcullis] = []

    def start(text: str, env: dict | None = None, ready: bool = True, name: str = "portcullis.yaml") -> Portcullis:
        cfg = tmp_path / name
        cfg.write_text(text)
        p = Portcullis(cfg, {"PORTCULLIS_STORE_KEY": STORE_KEY, "PORTCULLIS_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})})
        started.append(p)
        return p.wait_ready() if ready else p

    yield start
    for p in started:
        p.stop()

