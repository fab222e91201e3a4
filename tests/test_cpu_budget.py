"""``python -m tgastream.bench.cpu_budget``: CPU seconds of the stream's processes, from /proc."""

from __future__ import annotations

import json
import sys

import pytest

from tgastream.bench.cpu_budget import cpu_seconds, main, role_of


def test_processes_are_named_by_their_tgastream_subcommand_or_as_the_broker():
    assert role_of("/venv/bin/python -m tgastream.stream.cli train --bootstrap x --train-policy all") == "train"
    assert role_of("python -m tgastream.stream.cli worker --partitions 4") == "worker"
    assert role_of("/tmp/x/bin/tansu broker --listener-url tcp://127.0.0.1:9092") == "broker"
    assert role_of("python -m tgastream.stream.cli demo") == "other"
    assert role_of("/usr/bin/postgres -D /data") is None


def test_cpu_seconds_are_user_plus_system_time_of_a_stat_line():
    # pid (comm with a space) state ppid ... utime=250 stime=50 (fields 14 and 15)
    stat = "42 (python x) R 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 10"
    assert cpu_seconds(stat, 100) == pytest.approx(3.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_process_is_charged_about_the_cpu_it_used(tmp_path, capsys):
    out = tmp_path / "budget.json"
    code = ("import time  # tgastream worker\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.6: pass\n"
            f"open({str(tmp_path / 'own.txt')!r}, 'w').write(str(time.process_time()))\n"
            "time.sleep(0.3)\n")
    assert main(["--json", str(out), "--every", "0.05", "--", sys.executable, "-c", code]) == 0
    own = float((tmp_path / "own.txt").read_text())
    seen = [p for p in json.loads(out.read_text())["processes"] if p["role"] == "worker"]
    assert len(seen) == 1 and 0.8 * own <= seen[0]["cpu_s"] <= own + 0.05
    assert "worker" in capsys.readouterr().out
