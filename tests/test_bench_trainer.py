"""``tgastream bench trainer``: 1 rank and 2 gloo ranks on the same stored stream, side by side in
one run, with the agreed JSON keys and the step split; bad ranks are one readable line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tgastream.bench.trainer import PHASES

TINY = ("--samples", "400", "--users", "40", "--batch-size", "64", "--dim", "16", "--layers", "1", "--heads", "2",
        "--sample-len", "20", "--device", "cpu")


@pytest.mark.slow  # ~30-70 s; the default suite keeps its time budget (make test-slow)
def test_bench_trainer_compares_one_and_two_ranks_on_the_same_stream_and_splits_the_step(tmp_path):
    out = tmp_path / "trainer.json"
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "trainer", *TINY, "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"rows", "ratio_2_to_1", "breakdown", "flops_per_sample", "device"} <= set(result)
    rows = {r["ranks"]: r for r in result["rows"]}
    assert set(rows) == {1, 2} and all(r["threads"] == 1 for r in rows.values())
    assert rows[1]["samples"] == rows[2]["samples"] == 400  # the same stream, split over the ranks
    assert rows[2]["steps"] < rows[1]["steps"]  # two ranks take a step on twice the samples
    assert result["ratio_2_to_1"] == rows[2]["trained_samples_per_s"] / rows[1]["trained_samples_per_s"] > 0
    for split in result["breakdown"].values():
        assert set(split) == set(PHASES) and all(v >= 0 for v in split.values())
    assert result["breakdown"]["2"]["all_reduce"] > 0 and result["flops_per_sample"] > 0
    assert "2 ranks / 1 rank" in res.stdout


def test_bench_trainer_refuses_bad_ranks_in_one_line():
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "trainer", "--ranks", "one,2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--ranks" in res.stderr
