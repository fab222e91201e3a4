"""``tgastream bench api`` end to end, small: a real serve process under load while the store changes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_bench_api_small_run_has_no_server_errors(tmp_path: Path):
    out = tmp_path / "api.json"
    proc = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "api", "--requests", "300",
                           "--clients", "10", "--items", "500", "--users", "200", "--seed", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "requests/s" in proc.stdout and "recommendations" in proc.stdout
    r = json.loads(out.read_text())
    for key in ("requests", "p50_ms", "p99_ms", "server_errors", "client_errors", "transport_errors",
                "requests_per_s", "by_route", "clients", "items", "users"):
        assert key in r, key
    assert r["requests"] == 300 and (r["clients"], r["items"], r["users"]) == (10, 500, 200)
    assert r["server_errors"] == 0 and r["transport_errors"] == 0, r
    assert set(r["by_route"]) == {"embedding", "recommendations", "score"}
    assert sum(s["requests"] for s in r["by_route"].values()) == 300
    assert all(set(s) >= {"requests", "p50_ms", "p99_ms", "server_errors"} for s in r["by_route"].values())
    assert 0 < r["p50_ms"] <= r["p99_ms"] and r["requests_per_s"] > 0
    assert r["client_errors"] < 300 * 0.2  # the unknown users' 404s only (5 % of embedding + recommendations)
    assert r["server_counted"] == {k: v for k, v in {"2xx": r["ok"], "4xx": r["client_errors"]}.items() if v}
    assert r["writer"]["batches"] >= 0 and r["writer"]["last_model_version"] >= 1


def test_bench_api_against_a_topic_fed_replica_has_no_server_errors_and_its_writes_arrive(tmp_path: Path):
    """--replica topic: the server materializes an embedded broker's embeddings topic into its own
    store (pre-filled and bound to the topic, as a restarted replica's is) while the writer
    publishes to the topic; the replica applies the writes (its model version follows them)."""
    out = tmp_path / "api.json"
    proc = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "api", "--replica", "topic",
                           "--requests", "300", "--clients", "10", "--items", "500", "--users", "200", "--seed", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["replica"] == "topic" and r["requests"] == 300
    assert r["server_errors"] == 0 and r["transport_errors"] == 0 and r["server_tracebacks"] == 0, r
    assert r["statuses"]["score"] == {"200": r["by_route"]["score"]["requests"]}
    assert r["client_errors"] < 300 * 0.2  # the unknown users' 404s only
    health = r["server_health_at_end"]  # (waited for: the replica applied every batch the writer published)
    assert health["caught_up_s"] is not None and health["model_version"] == r["writer"]["last_model_version"]
    assert health["source"]["error"] is None


def test_bench_api_rejects_bad_flags():
    proc = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "bench", "api", "--clients", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--clients must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # ~30-70 s; the default suite keeps its time budget (make test-slow)
def test_bench_api_stops_the_server_on_ctrl_c(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-m", "tgastream.stream.cli", "bench", "api", "--requests", "1000000",
                             "--clients", "4", "--items", "200", "--users", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:  # "serving on http://127.0.0.1:PORT (pid N); ..."
            if m := re.search(r"\(pid (\d+)\)", line):
                server = int(m.group(1))
                break
            assert time.monotonic() < deadline
        else:
            raise AssertionError("the bench never started a server")
        time.sleep(1)  # under load now (or still loading the checkpoint: either way it must stop)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            pass
        else:
            raise AssertionError(f"tgastream serve (pid {server}) outlived the bench")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
