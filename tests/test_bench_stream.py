"""``tgastream bench stream``: report keys and ratios; a small end-to-end run (slow)."""

from __future__ import annotations

import json

import pytest

from tgastream.bench.stream import VariantResult, _report, median_run, render
from tgastream.stream.cli import main
from tgastream.core.settings import Settings

REQUIRED_KEYS = {"events_per_s", "reference_events_per_s", "ratio", "bare_take_events_per_s", "ratio_to_bare",
                 "update_p50_ms", "update_p99_ms", "state_bytes_per_user", "events"}


def _result(variant, eps, **extra):
    return VariantResult(variant, 1000, 1000 / eps, 1.0, extra)


def test_report_has_the_issue_keys_and_ratios_of_the_same_run():
    ours = _result("tgastream", 8000.0, update_p50_ms=400.0, update_p99_ms=900.0, state_bytes_per_user=1500.0,
                   rocksdb_bytes_per_user=700.0, users=10, samples=20, sample_bytes_mean=800.0)
    report = _report({"table": _result("table", 2000.0), "take": _result("take", 5000.0), "tgastream": ours},
                     1000, "x.csv", Settings())
    assert REQUIRED_KEYS <= set(report)
    assert report["ratio"] == 4.0 and report["ratio_to_bare"] == 1.6 and report["events"] == 1000
    text = render(report)
    assert "4.00×" in text and "1.60×" in text and "p50 400 ms" in text


def test_median_run_is_the_middle_one():
    runs = [_result("take", e) for e in (5.0, 1.0, 3.0)]
    assert median_run(runs).events_per_s == pytest.approx(3.0)
    assert median_run(runs[:2]).events_per_s == pytest.approx(1.0)


@pytest.mark.slow
def test_bench_stream_end_to_end_on_a_small_log(broker, tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "stream", "--bootstrap", broker.bootstrap, "--synth-events", "3000", "--synth-users", "100",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(report) and report["events"] == 3000
    assert all(report["variants"][v]["events"] >= 3000 for v in ("table", "take", "tgastream"))
    assert report["events_per_s"] > 0 and report["state_bytes_per_user"] > 0
