"""The alert rules: each fires on a series that should trip it and stays quiet on a healthy one
(`promtool test rules`), and they name only metrics that some process exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_metrics_exposition import _exported_names

PROMETHEUS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    return promtool


def test_alert_rules_pass_their_promtool_unit_tests():
    res = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_unit_tested_and_names_only_exported_metrics():
    rules = [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    assert {r["alert"] for r in rules} == tested
    used = {m for r in rules for m in re.findall(r"\btgastream_[a-z0-9_]+", r["expr"])}
    assert used and not used - _exported_names(), sorted(used - _exported_names())
