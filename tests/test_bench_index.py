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
