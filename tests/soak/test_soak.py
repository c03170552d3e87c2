"""The short soak (about 50 s of traffic): the same run as `soak.py`, with an event every 10 s —
reload to B, key rotation (add, then remove the old keys 5 s later), token-endpoint flap (5 s),
reload back to A. Every request's outcome is checked as it arrives; this test asserts the totals."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import soak  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    report = tmp_path_factory.mktemp("soak") / "report.md"
    try:
        r = soak.run(soak.Options(duration=50, event_interval=10, rate=120, workers=4, report=report))
    except RuntimeError as e:  # binary or node_modules missing, portcullis did not start
        pytest.fail(str(e))
    r["report"] = report.read_text()
    print(r["report"])
    return r


def test_every_decision_was_right(result):
    # Each class was exercised, so "no wrong decision" means something.
    for cls in soak.MIX:
        assert result["sent"].get(cls, 0) > 0, f"class {cls} was never sent\n{result['report']}"
    assert result["wrong"] == 0, "\n".join(result["wrong_examples"])


def test_no_transport_errors(result):
    assert result["errors"] == 0, "\n".join(result["error_examples"])


def test_every_event_happened_and_held(result):
    assert [r["version"] for r in result["reloads"]] == ["B", "A"], result["report"]
    assert all(r["switch_seconds"] is not None and r["switch_seconds"] < soak.SWITCH_GRACE for r in result["reloads"]), result["reloads"]
    (rot,) = result["rotations"]
    assert (rot["probe_new_key"], rot["removal_probe_new_key"], rot["removal_probe_old_key"]) == \
        ("allow", "allow", "TokenSignatureKeyNotFound"), rot
    (flap,) = result["flaps"]
    assert flap["refused_token_requests"] > 0, "no backend refresh fell into the flap"
    assert flap["answers_with_version"] > 0, "nothing was allowed during the flap"
    assert result["outcomes"]["removed_key"] == {"TokenSignatureKeyNotFound": result["sent"]["removed_key"]}
    assert result["ok"], "\n".join(result["failures"])


def test_rss_and_fds_stay_flat(result):
    res = result["resources"]
    print(f"RSS {res['rss_start']} -> {res['rss_end']} KiB (max {res['rss_max']}), fds {res['fd_start']} -> {res['fd_end']}")
    assert res["rss_end"] <= res["rss_start"] + soak.RSS_SLACK_KIB, res
    assert res["fd_end"] <= res["fd_start"] + soak.FD_SLACK, res


def test_shuts_down_cleanly(result):
    assert result["exit_code"] == 0
