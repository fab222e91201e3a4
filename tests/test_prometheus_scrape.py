"""A real Prometheus (Debian's) scrapes a running demo (worker, trainer, API) for at least 30 s,
with the alert rules loaded; its HTTP API then answers for the key series."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tgastream.stream.broker import die_with_parent, free_port

REPO = Path(__file__).resolve().parents[1]
SERIES = ("tgastream_freshness_seconds_count", "tgastream_partition_lag", "tgastream_trainer_trained_share",
          "tgastream_trainer_backlog", 'tgastream_online_metric{model="online"}',
          'tgastream_online_metric{model="repeat"}', "tgastream_trainer_rollbacks_total",
          "tgastream_api_requests_total")


def _lines(proc: subprocess.Popen, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)


def _query(base: str, expr: str) -> list:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_prometheus_scrapes_every_process_of_a_running_demo(broker, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (.ci/run installs Debian's prometheus package)")
    demo = subprocess.Popen(
        [sys.executable, "-m", "tgastream.stream.cli", "demo", "--out", str(tmp_path / "demo"), "--events", "3000",
         "--users", "40", "--rate", "70", "--quiet", "--bootstrap", broker.bootstrap, "--dim", "16", "--heads", "2",
         "--layers", "1", "--batch-size", "64", "--partitions", "4", "--api-port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
    seen: list[str] = []
    threading.Thread(target=_lines, args=(demo, seen), daemon=True).start()
    prom = None
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("API: http") for line in seen):
            assert demo.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
            time.sleep(0.2)
        ports = next(line for line in seen if line.startswith("worker metrics")).replace("/metrics", "").split(":")[1:]
        worker_port, trainer_port = (p.split()[0] for p in ports)
        api = next(line for line in seen if line.startswith("API: http")).split()[1].replace("http://", "")
        (tmp_path / "alerts.yml").write_text((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
            "rule_files: [alerts.yml]\n"
            "scrape_configs:\n"
            f"  - {{job_name: worker, static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]}}\n"
            f"  - {{job_name: trainer, static_configs: [{{targets: ['127.0.0.1:{trainer_port}']}}]}}\n"
            f"  - {{job_name: api, static_configs: [{{targets: ['{api}']}}]}}\n")
        port = free_port()
        prom = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        base = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        httpx.get(f"http://{api}/v1/users/1/embedding", timeout=5)  # one request, so the API has a series
        missing = list(SERIES)
        while missing or time.monotonic() - started < 30:  # at least 30 s of scraping, and every series
            assert prom.poll() is None and time.monotonic() - started < 150, f"no series for {missing}"
            time.sleep(2)
            try:
                missing = [s for s in SERIES if not _query(base, s)]
            except httpx.HTTPError:
                pass
        up = {r["metric"]["job"]: r["value"][1] for r in _query(base, "up")}
        assert up == {"worker": "1", "trainer": "1", "api": "1"}
        rules = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"TgastreamFreshnessSLO", "TgastreamTrainerStalled",
                                                                      "TgastreamRollback"}
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(10)
        demo.terminate()
        demo.wait(60)
