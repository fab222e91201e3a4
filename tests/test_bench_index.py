"""`tgastream bench index` runs end to end on small catalogues: one row per (size, method), exact
and approximate side by side, with the keys docs/scaling.md reads."""

from __future__ import annotations

import json
import subprocess
import sys

KEYS = {"items", "method", "build_s", "updates_per_s", "topk_p50_ms", "topk_p99_ms", "recall@10", "memory_mb"}


def test_bench_index_reports_exact_and_approximate_per_catalogue_size(tmp_path):
    out = tmp_path / "index.json"
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "index", "--items", "2000,5000",
                          "--queries", "16", "--update-s", "0.3", "--ann-exact-below", "1000",
                          "--json", str(out), "--png", str(tmp_path / "index.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["items"], r["method"]) for r in rows] == [(2000, "exact"), (2000, "faiss-ivf"), (5000, "exact"),
                                                         (5000, "faiss-ivf")]
    assert all(KEYS <= set(r) for r in rows)
    assert all(r["topk_p50_ms"] > 0 and r["updates_per_s"] > 0 and r["memory_mb"] > 0 for r in rows)
    assert all(r["recall@10"] == 1.0 for r in rows if r["method"] == "exact")
    assert all(0.5 < r["recall@10"] <= 1.0 for r in rows)
    assert (tmp_path / "index.png").stat().st_size > 0


def test_bench_index_refuses_a_catalogue_smaller_than_k_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "index", "--items", "5"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr


def test_the_sweep_reports_recall_and_latency_per_lists_and_nprobe(tmp_path):
    out = tmp_path / "sweep.json"
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "index", "--sweep", "--items", "20000",
                          "--lists-factors", "2,4", "--nprobes", "1,64", "--queries", "16", "--json", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["lists_factor"], r["nprobe"]) for r in rows] == [(2.0, 1), (2.0, 64), (4.0, 1), (4.0, 64)]
    assert rows[0]["lists"] < rows[2]["lists"]  # the factor sets the lists
    for few, many in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert many["recall@10"] > few["recall@10"]  # one list of hundreds misses most of the true top-10
        assert many["topk_p50_ms"] > 0 and few["topk_p50_ms"] > 0
