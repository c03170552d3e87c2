"""pytest setup for the adversarial suites: the end-to-end harness (tests/e2e) is importable, and the
differential suite's counts are printed at the end of the run."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent / "e2e"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def pytest_terminal_summary(terminalreporter):
    mod = sys.modules.get("adversarial_topology")
    SUMMARY = getattr(mod, "SUMMARY", None)
    if SUMMARY:
        terminalreporter.section("adversarial: differential counts")
        for key in sorted(SUMMARY):
            terminalreporter.write_line(f"{' / '.join(key)}: {SUMMARY[key]}")
