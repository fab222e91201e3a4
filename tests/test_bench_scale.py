"""`tgastream bench scale` runs end to end on tiny sizes: a row per user count and per id-map
size, with the keys docs/scaling.md reads, and a one-line error for a missing history file."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import shared_data


def test_bench_scale_reports_each_user_count_and_id_map_size(tmp_path):
    histories = shared_data("taobao-users-10k.csv")
    out = tmp_path / "scale.json"
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "scale", "--users", "200,800",
                          "--ids", "20000", "--pool", "30", "--events", "400", "--persist-every", "150",
                          "--rows-at", "5000", "--histories", str(histories), "--json", str(out),
                          "--png", str(tmp_path / "scale.png")], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    workers = result["workers"]
    assert [w["users"] for w in workers] == [200, 800]
    for w in workers:
        assert w["events_per_s"] > 0 and w["update_p99_ms"] >= w["update_p50_ms"] > 0
        assert w["bytes_per_user_compacted"] > 100  # a record of a real-length history, compressed
    assert [m["ids"] for m in result["idmaps"]] == [20000] and result["idmaps"][0]["evicted"] == 10000
    assert result["table_growth"]["rows"] == 5000 and result["table_growth"]["grow_step_s"] > 0
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_bench_scale_refuses_a_missing_history_file_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "scale", "--histories",
                          str(tmp_path / "none.csv")], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr and "none.csv" in res.stderr
