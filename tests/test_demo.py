"""`tgastream demo` end to end with small settings: real processes, a report built from the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_and_reports_what_it_measured(tmp_path: Path, broker):
    out = tmp_path / "report"
    res = subprocess.run(
        [sys.executable, "-m", "tgastream.stream.cli", "demo", "--out", str(out), "--events", "1500", "--users", "40",
         "--rate", "1500", "--quiet", "--bootstrap", broker.bootstrap, "--dim", "16", "--heads", "2", "--layers", "1",
         "--batch-size", "128", "--timeout", "400", "--partitions", "4", "--api-port", "0"],  # 0: a free port (parallel tests)
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for png in ("online_metrics.png", "throughput.png", "freshness.png"):
        assert (out / png).stat().st_size > 1000
    assert report["events_replayed"] == 1500
    assert report["events_processed"] == report["events_replayed"] - report["rejected"]
    assert report["samples"] > 0 and report["trainer_samples"] == report["samples"]
    assert report["trained"] == report["samples"] and report["trained_share"] == 1.0  # every sample trained once
    assert report["train_steps"] > 0 and report["events_per_s"] > 0
    assert report["version_lag"] == 0  # the demo waited for the sweep: every vector from the newest weights
    assert 0.0 <= report["online"]["hr@10"] <= 1.0
    on = report["online"]  # conversion judged at the click, with the cases it rests on
    assert {"auc", "auc_clicks", "auc_buys", "logloss", "ece", "reliability"} <= set(on)
    assert on["auc_clicks"] >= on["auc_buys"] >= 0 and on["clicks_unjudged"] == 0
    assert report["freshness_p50_s"] is not None and 0 < report["freshness_p50_s"] <= report["freshness_p99_s"]
    series = json.loads((out / "series.json").read_text())
    assert series[-1]["events_applied"] == report["events_processed"]
    assert "API: http://127.0.0.1:" in res.stdout


def test_a_rerun_clears_the_previous_demo_state_but_never_a_folder_it_did_not_write(tmp_path: Path):
    from tgastream.stream.demo import _clear_previous_run
    from tgastream.core.errors import CommandError

    data, logs = tmp_path / "data", tmp_path / "logs"
    (data / "trainer" / "checkpoints").mkdir(parents=True)
    (data / "worker").mkdir()
    (data / "api" / "api-serving").mkdir(parents=True)  # the demo's API replica writes here too
    logs.mkdir()
    (logs / "trainer.log").write_text("old run")
    said = []
    _clear_previous_run(data, logs, said.append)
    assert not data.exists() and not logs.exists() and len(said) == 2

    (data / "photos").mkdir(parents=True)  # not a demo's layout: refused, nothing removed
    with pytest.raises(CommandError, match="not written by a demo"):
        _clear_previous_run(data, logs, said.append)
    assert (data / "photos").is_dir()
