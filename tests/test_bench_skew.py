"""``tgastream bench skew``: the hold-out split and the scores; the two demo runs end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tgastream.bench.skew import hit_rate, hold_out_last, overlap, skew
from tgastream.core.events import Event

REPO = Path(__file__).resolve().parents[1]


def _ev(user: str, item: str, ts: float) -> Event:
    return Event(user, item, "c", "click", ts)


def test_hold_out_takes_each_users_last_event_after_the_cut_and_replays_the_rest_in_order():
    events = [_ev("a", "1", 10), _ev("b", "2", 11), _ev("a", "3", 50), _ev("c", "4", 90),
              _ev("b", "5", 20), _ev("a", "6", 95), _ev("b", "7", 99)]
    h = hold_out_last(events, 0.5)  # cut: median ts = 50
    assert h.cut_ts == 50
    # a: last at 95 > 50 → held out; b: last at 99 → held out; c: its only event, no history → replayed
    assert {u: e.item_id for u, e in h.targets.items()} == {"a": "6", "b": "7"}
    assert [e.item_id for e in h.replayed] == ["1", "2", "3", "4", "5"]
    # a user whose last event is before the cut is no target
    assert "a" not in hold_out_last([_ev("a", "1", 1), _ev("a", "2", 2), _ev("b", "3", 3), _ev("b", "4", 9)], 0.5).targets


def test_hit_rate_counts_a_user_without_a_list_as_a_miss_and_overlap_only_users_with_both():
    targets = {"a": _ev("a", "x", 1), "b": _ev("b", "y", 1), "c": _ev("c", "z", 1)}
    served = {"a": ["x", "q"], "b": ["q", "r"]}
    recomputed = {"a": ["x", "r"], "c": ["z", "s"]}
    assert hit_rate(targets, served) == pytest.approx(1 / 3)
    assert hit_rate(targets, recomputed) == pytest.approx(2 / 3)
    assert overlap(served, recomputed, 2) == pytest.approx(0.5)  # only a: {x} of 2
    assert overlap({"a": ["x"]}, {"b": ["x"]}, 1) is None


def test_skew_reports_oldest_median_and_share_at_the_current_version():
    s = skew([3, 10, 10, 7], 10)
    assert (s["oldest"], s["median"], s["lag_oldest"], s["lag_median"], s["current_share"]) == (3, 8.5, 7, 1.5, 0.5)
    assert skew([], 5)["oldest"] is None


@pytest.mark.slow
def test_bench_skew_runs_both_demos_and_the_sweep_brings_served_vectors_to_the_current_model(tmp_path: Path):
    out = tmp_path / "skew.json"
    res = subprocess.run(
        [sys.executable, "-m", "tgastream.stream.cli", "bench", "skew", "--events", "1500", "--users", "40",
         "--rate", "1500", "--dim", "16", "--heads", "2", "--layers", "1", "--batch-size", "128",
         "--timeout", "400", "--out", str(tmp_path / "runs"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["targets"] > 0 and set(result["runs"]) == {"before", "after"}
    assert (tmp_path / "runs" / "skew.png").stat().st_size > 1000
    before, after = result["runs"]["before"], result["runs"]["after"]
    for r in (before, after):
        for key in ("hr@10_served", "hr@10_recomputed", "overlap@10", "trained_share", "freshness_p99_s"):
            assert key in r
        assert 0.0 <= r["hr@10_served"] <= 1.0 and 0.0 <= r["hr@10_recomputed"] <= 1.0
        assert r["users_served"] == result["targets"]  # every target user has history, so a vector
        assert r["checkpoint_version"] == r["model_version"] > 0  # nothing trained after the read
        assert r["trained_share"] == 1.0
    assert before["republish_rate"] == 0 and before["republished_by_read"] == 0
    assert before["user_versions"]["lag_oldest"] > 0  # without the sweep, served vectors are older
    assert after["republished_by_read"] > 0
    assert after["user_versions"]["current_share"] == 1.0 and after["item_versions"]["current_share"] == 1.0
    assert after["overlap@10"] >= 0.9  # served = recomputed up to float near-ties
