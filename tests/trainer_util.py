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


def start_ranks(settings: Settings, data_dir: Path, log_path: Path, nproc: int, *extra: str) -> subprocess.Popen:
    """``tgastream train --nproc N`` (torchrun with N ranks on this machine) as a child process."""
    return start_trainer(settings, data_dir, log_path, "--nproc", str(nproc), *extra)


def produce_identified_samples(settings: Settings, n_events: int, redeliver: int = 0, seed: int = 9) -> list:
    """Samples as a worker stamps them (partition by user, offset, seq) on the samples topic, the
    first ``redeliver`` of every partition sent twice (the second time after the rest)."""
    import zlib

    from tgastream.core.events import BEHAVIORS, Event
    from tgastream.state.samples import samples_from_events
    from tgastream.stream.replay import make_producer
    from tgastream.stream.synth import SynthConfig, generate

    rows = generate(SynthConfig(users=40, events=n_events, items=300, seed=seed))
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    samples = samples_from_events(events, sample_len=20, final_watermark=events[-1].ts + 2 * 86400)
    by_partition: dict[int, list] = {}
    for smp in samples:
        p = zlib.crc32(smp.user_id.encode()) % settings.partitions
        smp.partition, smp.offset = p, len(by_partition.setdefault(p, []))
        by_partition[p].append(smp)
    producer = make_producer(settings.bootstrap)
    for p, smps in by_partition.items():
        for smp in smps + smps[:redeliver]:
            producer.send(settings.samples_topic, key=smp.user_id.encode(), value=smp.to_bytes(), partition=p)
    producer.flush()
    producer.close()
    return samples


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of trainer rank ``rank`` under a ``--nproc`` launcher (by its RANK environment)."""
    for p in process_tree(launcher.pid):
        try:
            with open(f"/proc/{p}/environ", "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"RANK") == str(rank).encode() and b"TORCHELASTIC_RUN_ID" in env:
            with open(f"/proc/{p}/cmdline", "rb") as fh:
                if b"tgastream.stream.cli" in fh.read():
                    return p
    return None
