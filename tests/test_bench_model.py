"""``tgastream bench model``: rows carry the agreed keys; the command runs end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tgastream.bench.model import STEPS, format_tables, measure, measure_refresh, step_jobs

ROW_KEYS = {"model", "seq_len", "train_samples_per_s", "infer_ms", "peak_mem_mb"}
SPEC = {"batch": 2, "dim": 16, "layers": 1, "heads": 2, "ffn_mult": 1, "items": 300, "min_steps": 1,
        "min_seconds": 0.0, "device": "cpu", "length": 24}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_measure_rows_have_the_agreed_keys():
    rows = [measure({**SPEC, "model": m, "label": m}) for m in ("tga", "sasrec")]
    rows += measure_refresh(SPEC)
    for r in rows:
        assert ROW_KEYS <= set(r)
    assert rows[0]["train_samples_per_s"] > 0 and rows[0]["infer_ms"] > 0
    assert {r["model"] for r in rows if r["refresh_ms"] is not None} == {
        "tga-incremental", "tga-full-recompute", "sasrec-full-recompute"}
    table = format_tables({"device": "cpu", "rows": rows, "steps": [], "config": SPEC})
    assert "tga" in table and "refresh" in table


@pytest.mark.slow
def test_bench_model_command_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "model", "--lengths", "20,40", "--batch", "2",
                          "--dim", "16", "--items", "300", "--min-steps", "1", "--min-seconds", "0",
                          "--refresh-lengths", "20", "--steps-length", "20", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert {"device", "rows"} <= set(result)
    assert {(r["model"], r["seq_len"]) for r in result["rows"] if r["train_samples_per_s"]} == {
        ("tga", 20), ("sasrec", 20), ("tga", 40), ("sasrec", 40)}
    assert len(result["steps"]) == 4


def test_a_gpu_run_skips_the_cpu_only_fused_step_and_names_it():
    cpu_jobs, cpu_skipped = step_jobs({"length": 8}, "cpu")
    gpu_jobs, gpu_skipped = step_jobs({"length": 8}, "cuda")
    assert [j["impl"] for j in cpu_jobs] == [impl for _, impl, _ in STEPS] and cpu_skipped == []
    assert "fused" not in [j["impl"] for j in gpu_jobs] and len(gpu_jobs) == len(STEPS) - 1
    assert gpu_skipped == [label for _, impl, label in STEPS if impl == "fused"]
