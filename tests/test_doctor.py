"""`tgastream doctor` in a real process: which paths run, and when it fails the installation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tgastream.stream.broker import free_port


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TGASTREAM_")}
    return subprocess.run([sys.executable, "-m", "tgastream.stream.cli", "doctor", *args], env={**full, **env},
                          capture_output=True, text=True, timeout=120)


def line(res: subprocess.CompletedProcess, name: str) -> str:
    (found,) = [ln for ln in res.stdout.splitlines() if ln[7:].startswith(name)]
    return found


@pytest.fixture
def nowhere() -> str:
    return f"127.0.0.1:{free_port()}"


def test_without_a_compiler_it_reports_the_reference_path_and_require_fused_fails(tmp_path: Path, nowhere: str):
    env = {"CC": "/bin/false", "TGA_KERNEL_CACHE": str(tmp_path / "kernels")}
    plain = doctor("--bootstrap", nowhere, "--data-dir", str(tmp_path / "data"), **env)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "reference torch path runs: compiling it with /bin/false failed" in line(plain, "fused kernel")
    assert plain.stdout.rstrip().endswith("usable")

    strict = doctor("--require-fused", "--bootstrap", nowhere, "--data-dir", str(tmp_path / "data"), **env)
    assert strict.returncode == 1
    assert line(strict, "fused kernel").startswith("  FAIL")
    assert strict.stdout.rstrip().endswith("NOT usable: fused kernel")


@pytest.mark.skipif(not shutil.which("gcc") and not shutil.which("cc"), reason="no C compiler")
def test_with_a_compiler_the_fused_kernel_is_available_and_everything_is_named(tmp_path: Path, nowhere: str):
    res = doctor("--require-fused", "--bootstrap", nowhere, "--data-dir", str(tmp_path),
                 TGA_KERNEL_CACHE=str(tmp_path / "kernels"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert line(res, "fused kernel").startswith("  ok") and str(tmp_path / "kernels") in res.stdout
    assert "torch 2." in line(res, "compute") and ("cpu" in line(res, "compute") or "cuda" in line(res, "compute"))
    for package in ("tgastream", "torch", "faust-streaming", "aiokafka", "kafka-python", "rocksdict"):
        assert f"{package} " in line(res, "packages")
    assert line(res, "data dir") == f"  ok   data dir      {tmp_path}: writable"


def test_an_unreachable_broker_is_reported_and_fails_only_when_required(tmp_path: Path, nowhere: str):
    res = doctor("--bootstrap", nowhere, "--data-dir", str(tmp_path))
    assert res.returncode == 0 and f"{nowhere} unreachable: nothing listens there" in line(res, "broker")
    required = doctor("--require-broker", "--bootstrap", nowhere, "--data-dir", str(tmp_path))
    assert required.returncode == 1 and line(required, "broker").startswith("  FAIL")


def test_a_running_broker_is_reported_reachable(tmp_path: Path, broker):
    res = doctor("--require-broker", "--bootstrap", broker.bootstrap, "--data-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert line(res, "broker") == f"  ok   broker        {broker.bootstrap} answers (Kafka metadata)"


def test_a_data_dir_that_cannot_be_written_makes_it_unusable(tmp_path: Path, nowhere: str):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    res = doctor("--bootstrap", nowhere, "--data-dir", str(blocker))
    assert res.returncode == 1 and "exists and is not a directory" in line(res, "data dir")
    assert res.stdout.rstrip().endswith("NOT usable: data dir")
