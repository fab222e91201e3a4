"""Every process's /metrics passes `promtool check metrics`; the Grafana dashboard names only real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tgastream.stream.metrics import WorkerMetrics
from tgastream.stream.serve import ApiMetrics
from tgastream.stream.trainer import TrainerMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "tgastream.json"


def _registries() -> dict[str, CollectorRegistry]:
    worker = WorkerMetrics()
    worker.rejected.labels("not_json").inc()
    trainer = TrainerMetrics()
    trainer.freshness.observe(0.3)
    trainer.online.labels("online", "hr@10").set(0.2)
    api = ApiMetrics(CollectorRegistry())
    api.requests.labels("/healthz", "200").inc()
    return {"worker": worker.registry, "trainer": trainer.registry, "api": api.registry}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "summary": ("_count", "_sum", "")}


def _exported_names() -> set[str]:
    """Series names each family exports (also families whose labelled children are not created yet)."""
    names = set()
    for registry in _registries().values():
        for family in registry.collect():
            names.update(family.name + sfx for sfx in SUFFIXES.get(family.type, ("",)))
    return names


def test_dashboard_parses_and_names_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\btgastream_[a-z0-9_]+", e)}
    assert used, "dashboard queries no metric"
    missing = used - _exported_names()
    assert not missing, f"dashboard names metrics no process exports: {sorted(missing)}"


@pytest.mark.parametrize("process", ["worker", "trainer", "api"])
def test_metrics_pass_promtool(process):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    text = generate_latest(_registries()[process])
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
