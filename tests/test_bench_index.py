"""`tgastream bench index` runs end to end on small catalogues and reports every size asked."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_index_reports_each_catalogue_size(tmp_path):
    out = tmp_path / "index.json"
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "index", "--items", "500,2000",
                          "--queries", "5", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["items"] for r in rows] == [500, 2000]
    assert all(r["topk_p50_ms"] > 0 and r["build_items_per_s"] > 0 for r in rows)
