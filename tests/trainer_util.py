"""Run ``tgastream train`` as a real child process in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tgastream.stream.broker import die_with_parent, free_port
from tgastream.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = ("--dim", "16", "--heads", "2", "--layers", "1", "--device", "cpu")


def start_trainer(settings: Settings, data_dir: Path, log_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tgastream.stream.cli", "train", "--bootstrap", settings.bootstrap,
           "--partitions", str(settings.partitions), "--samples-topic", settings.samples_topic,
           "--embeddings-topic", settings.embeddings_topic, "--data-dir", str(data_dir),
           "--metrics-port", str(free_port()), "--quiet", *SMALL_MODEL, *extra]
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)
    log.close()
    return proc


def history(data_dir: Path) -> list[dict]:
    path = data_dir / "trainer-history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stats(data_dir: Path) -> dict:
    return json.loads((data_dir / "trainer-stats.json").read_text())
