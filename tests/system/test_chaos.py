"""Prove nothing is lost: workers, the trainer and the broker fail on a seeded schedule while a
log with bad records flows; the verifier finds every record where it belongs (see chaos.py)."""

from __future__ import annotations

import pytest

from tests.system.chaos import VERDICT_OK, ChaosConfig, run_chaos

SHORT = ChaosConfig(events=8000, users=120, days=3.0, rate=250.0, workers=2, faults=3,
                    kinds=("kill9_worker", "kill9_trainer", "pause_broker"), pause_s=(5.0, 5.0), seed=7,
                    settle_s=120.0, drain_s=240.0)
FULL = ChaosConfig()  # 50,000 events at 200/s, 3 workers, 12 faults of every kind, 15–30 s broker pauses


def _check(outcome) -> None:
    assert outcome.verdict == VERDICT_OK, outcome.report()
    assert outcome.lost == 0 and outcome.trained_twice == 0, outcome.report()


def test_chaos_short(tmp_path, chaos_json, capsys):
    """In the default suite: kill -9 a worker, kill -9 the trainer, a 5 s broker pause over 8,000
    events: nothing lost, nothing trained twice. Quiet unless it fails (the report is the message)."""
    lines: list[str] = []
    outcome = run_chaos(SHORT, tmp_path / "run", chaos_json, say=lines.append)
    with capsys.disabled():
        print(f"\nchaos short: {outcome.verdict}; faults {outcome.faults}, events {outcome.events}, lost {outcome.lost}, "
              f"duplicate samples {outcome.duplicate_samples}, trained twice {outcome.trained_twice} ({chaos_json})")
        for line in outcome.figures["unexpected exits (restarted)"]:
            print(f"chaos short: unexpected: {line}")
    assert outcome.faults == 3
    _check(outcome)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chaos_full(tmp_path, chaos_json, capsys):
    """4 partitions, 3 workers and the trainer, 50,000 events at a steady rate, 12 seeded faults."""
    with capsys.disabled():
        print()
        outcome = run_chaos(FULL, tmp_path / "run", chaos_json)
    assert outcome.faults >= 10
    _check(outcome)
