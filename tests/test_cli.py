"""The command line: --help everywhere, bad input ends in one readable line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tgastream.stream.broker import free_port
from tgastream.stream.cli import COMMANDS


def tgastream(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tgastream.stream.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command):
    res = tgastream(command, "--help")
    assert res.returncode == 0 and "usage: tgastream" in res.stdout


@pytest.mark.parametrize("args,fragment", [
    (["replay", "x.csv", "--rate", "fast"], "invalid float value"),
    (["replay", "x.csv", "--bogus"], "unrecognized arguments"),
    (["replay", "/nonexistent/log.csv"], "no such file"),
    (["replay", "x.csv", "--partitions", "0"], "partitions must be > 0"),
    (["synth", "--users", "10", "--events", "5", "-o", "/tmp/x.csv"], "events >= users"),
    (["nosuch"], "invalid choice"),
    (["bench", "freshness", "--compare-guard", "-1"], "--compare-guard must be >= 0"),
])
def test_bad_input_is_one_line_and_nonzero(args, fragment):
    res = tgastream(*args)
    assert res.returncode != 0
    assert fragment in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_unreachable_broker_is_one_line(tmp_path: Path):
    log = tmp_path / "x.csv"
    log.write_text("1,2,3,pv,100\n")
    res = tgastream("replay", str(log), "--bootstrap", f"127.0.0.1:{free_port()}")
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "no Kafka broker answers" in res.stderr


def test_synth_then_replay_on_a_running_broker(broker, tmp_path: Path):
    out = tmp_path / "x.csv"
    assert tgastream("synth", "--users", "30", "--events", "900", "--seed", "4", "-o", str(out)).returncode == 0
    summary = tmp_path / "s.json"
    res = tgastream("replay", str(out), "--bootstrap", broker.bootstrap, "--quiet", "--json", str(summary),
                    "--events-topic", "cli-events", "--dlq-topic", "cli-dlq")
    assert res.returncode == 0, res.stderr
    import json

    data = json.loads(summary.read_text())
    assert data["sent"] == 900 and data["rejected"] == {} and data["events_per_s"] > 0


def test_building_the_command_line_does_not_import_torch():
    # every process start and --help pays for what the CLI imports: command modules import the
    # model layer inside run(), not at the top (a top-level import here once cost 2 s per start)
    code = ("import sys; from tgastream.stream.cli import build_parser; build_parser(); "
            "sys.exit('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr or "building the parser imported torch"
