"""``python -m tgastream.bench.profile_step``: the trainer's step profiled on either stream."""

from __future__ import annotations

import json

import pytest

from tgastream.bench.profile_step import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_profile_of_the_demo_stream_reports_cpu_per_step(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["2", "--demo-stream", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stream"] == "demo" and result["steps"] == 2 and result["cpu_ms_per_step"] > 0
    assert "demo stream" in capsys.readouterr().out
