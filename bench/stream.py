"""``tgastream bench stream``: events/s of one worker process on the full path, against two faust
references measured in the same run on the same events.

1. The input (``--input FILE``, or a seeded synthetic log) is replayed once into a fresh events
   topic on the broker (``--bootstrap``, or an embedded Tansu broker).
2. Three child processes, one after the other, each a fresh consumer group reading that topic
   from the beginning with the same faust settings:

   - ``table``: a plain faust agent counting events per user in a table, one event at a time
     (``counts[key] += 1``: the idiomatic faust table agent), on faust's default in-memory store
     with its changelog (the faster of faust's stores: the conservative reference);
     ``table-rocksdb`` (optional) is the same agent on faust's RocksDB store;
   - ``take``: a bare faust agent, ``async for batch in stream.take(2000, within=1)``, doing no
     work at all: faust's own per-event ceiling;
   - ``tgastream``: the stream worker (consume, validate, graph update, samples, features,
     RocksDB + changelog, offsets acknowledged only when durable).

   Each child times from its first record to its last (for the worker: to the last record being
   durable) and reports events/s, CPU seconds and, for the worker, the state update latency and
   the bytes of state per user.
3. A table is printed; ``--json PATH`` writes the figures (ratios are of the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "events/s of a stream worker vs. a per-event faust table agent and a bare faust take() agent"

VARIANTS = ("table", "take", "tgastream", "table-rocksdb")
DEFAULT_VARIANTS = ("table", "take", "tgastream")
TAKE_N = 2000


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS, add_setting_flags

    p.add_argument("--input", type=Path, help="event log to replay (Taobao CSV, JSON lines, ...); "
                   "default: a seeded synthetic log of --synth-events events")
    p.add_argument("--synth-events", type=int, default=200_000, help="events of the synthetic log (default: 200000)")
    p.add_argument("--synth-users", type=int, default=2000, help="users of the synthetic log (default: 2000)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N records of the input (default: all)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"which to run, comma-separated, of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the variants this many times, interleaved, and report each one's median (default: 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per variant (default: 900)")
    p.add_argument("--json", type=Path, help="write the figures as JSON to this path")
    p.add_argument("--work-dir", type=Path, help="where children keep their state (default: a temp dir)")
    add_setting_flags(p, "bootstrap", "partitions", "worker_batch", "worker_flush_s", *KAFKA_SECURITY_SETTINGS)


@dataclass
class VariantResult:
    variant: str
    events: int
    seconds: float
    cpu_s: float
    extra: dict

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def run(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile

    from tqdm import tqdm

    from tgastream.stream.broker import connect_with, install_sigterm_handler
    from tgastream.core.errors import CommandError

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise CommandError(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.repeat < 1:
        raise CommandError("--repeat must be >= 1")
    if args.input is not None and not args.input.is_file():
        raise CommandError(f"no such file: {args.input}")
    install_sigterm_handler()
    tag = uuid.uuid4().hex[:8]
    with connect_with(settings) as broker, tempfile.TemporaryDirectory(prefix="tgabench-") as tmp:
        work = args.work_dir or Path(tmp)
        settings = settings.replace(bootstrap=broker.bootstrap, events_topic=f"bench-{tag}-events",
                             dlq_topic=f"bench-{tag}-dlq", samples_topic=f"bench-{tag}-samples",
                             features_topic=f"bench-{tag}-features", embeddings_topic=f"bench-{tag}-emb",
                             data_dir=work / "data")
        source, label = _input(args, work)
        print(f"broker {broker.bootstrap}{' (embedded)' if broker.embedded else ''}; input {label}", file=sys.stderr)
        n = _load(settings, source, args.limit)
        runs: dict[str, list[VariantResult]] = {v: [] for v in variants}
        plan = [(i, v) for i in range(args.repeat) for v in variants]  # interleaved: load drifts hit all alike
        for i, variant in tqdm(plan, desc="runs", unit="run", file=sys.stderr):
            r = _run_child(variant, settings, n, work / f"{variant}-{i}", args.timeout)
            runs[variant].append(r)
            tqdm.write(f"  {variant:<14} {r.events:>9,} events in {r.seconds:6.1f} s = {r.events_per_s:>9,.0f}/s",
                       file=sys.stderr)
    results = {v: median_run(rs) for v, rs in runs.items()}
    report = _report(results, n, label, settings)
    for v, rs in runs.items():
        report["variants"][v]["runs_events_per_s"] = [round(r.events_per_s, 1) for r in rs]
    print(render(report))
    write_json(args.json, report)
    return 0


def median_run(runs: list[VariantResult]) -> VariantResult:
    """The run with the median events/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.events_per_s)
    return ordered[(len(ordered) - 1) // 2]


def _input(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    if args.input is not None:
        return args.input, args.input.name
    from tgastream.stream.synth import SynthConfig, write_file

    cfg = SynthConfig(users=args.synth_users, events=args.synth_events, seed=7)
    path = work / "synth.csv"
    write_file(cfg, path)
    return path, f"synth {cfg.events:,} events / {cfg.users:,} users (seed {cfg.seed})"


def _load(settings: Settings, path: Path, limit: int) -> int:
    """Replay the input into the bench's events topic; the number of records there."""
    from tgastream.stream.app import worker_topics
    from tgastream.stream.replay import ReplayConfig, replay_file
    from tgastream.stream.topics import ensure_topics

    ensure_topics(settings.bootstrap, worker_topics(settings), settings.partitions, security=settings.kafka_security)
    summary = replay_file(settings.bootstrap, settings, ReplayConfig(path=path, order="time", limit=limit))
    return summary.sent


def _run_child(variant: str, settings: Settings, n: int, work: Path, timeout: float) -> VariantResult:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tgastream.bench.stream", variant, "--records", str(n),
           "--settings", json.dumps({**_settings_dict(settings), "data_dir": str(work)})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or "").splitlines()[-15:])
        raise RuntimeError(f"bench child {variant} failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(lines[-1])
    return VariantResult(variant, out.pop("events"), out.pop("seconds"), out.pop("cpu_s"), out)


def _settings_dict(settings: Settings) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.__dict__.items()}


def _report(results: dict[str, VariantResult], n: int, label: str, settings: Settings) -> dict[str, Any]:
    ours, table, take = results.get("tgastream"), results.get("table"), results.get("take")

    def ratio(a: VariantResult | None, b: VariantResult | None) -> float | None:
        return round(a.events_per_s / b.events_per_s, 3) if a and b and b.events_per_s else None

    extra = ours.extra if ours else {}
    return {
        "events_per_s": round(ours.events_per_s, 1) if ours else None,
        "reference_events_per_s": round(table.events_per_s, 1) if table else None,
        "ratio": ratio(ours, table),
        "bare_take_events_per_s": round(take.events_per_s, 1) if take else None,
        "ratio_to_bare": ratio(ours, take),
        "update_p50_ms": extra.get("update_p50_ms"),
        "update_p99_ms": extra.get("update_p99_ms"),
        "state_bytes_per_user": extra.get("state_bytes_per_user"),
        "events": n,
        "input": label,
        "partitions": settings.partitions,
        "worker_batch": settings.worker_batch,
        "worker_flush_s": settings.worker_flush_s,
        "variants": {v: {"events": r.events, "seconds": round(r.seconds, 3),
                         "events_per_s": round(r.events_per_s, 1), "cpu_s": round(r.cpu_s, 2), **r.extra}
                     for v, r in results.items()},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def render(report: dict[str, Any]) -> str:
    rows = [("variant", "events", "seconds", "events/s", "CPU s", "vs table", "vs take")]
    variants = report["variants"]
    names = {"table": "faust table agent (per event)", "take": f"faust bare take({TAKE_N})",
             "tgastream": "tgastream worker (full path)", "table-rocksdb": "faust table agent, RocksDB store"}
    base_table = variants.get("table", {}).get("events_per_s")
    base_take = variants.get("take", {}).get("events_per_s")
    for v, r in variants.items():
        eps = r["events_per_s"]
        rows.append((names[v], f"{r['events']:,}", f"{r['seconds']:.1f}", f"{eps:,.0f}", f"{r['cpu_s']:.1f}",
                     f"{eps / base_table:.2f}×" if base_table else "-", f"{eps / base_take:.2f}×" if base_take else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ours = variants.get("tgastream")
    lines.append("")
    lines.append(f"input: {report['input']}, {report['events']:,} events, {report['partitions']} partitions")
    if ours:
        lines.append(f"state update latency (arrival → durable) p50 {ours['update_p50_ms']:.0f} ms, "
                     f"p99 {ours['update_p99_ms']:.0f} ms; state {ours['state_bytes_per_user']:,.0f} B/user "
                     f"({ours['users']:,} users; RocksDB on disk {ours['rocksdb_bytes_per_user']:,.0f} B/user); "
                     f"{ours['samples']:,} samples, {ours['sample_bytes_mean']:,.0f} B/sample")
    return "\n".join(lines)


# -- child processes ------------------------------------------------------------------------

def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tgastream.bench.stream")
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("--records", type=int, required=True)
    p.add_argument("--settings", required=True)
    a = p.parse_args(argv)
    raw = json.loads(a.settings)
    raw["data_dir"] = Path(raw["data_dir"])
    settings = Settings(**raw).validate()
    import asyncio
    import logging

    from tgastream.stream.worker import configure_logging, tune_gc

    configure_logging(logging.WARNING)
    tune_gc()
    cpu0 = time.process_time()
    if a.variant == "tgastream":
        out = asyncio.run(_child_tgastream(settings, a.records))
    else:
        out = asyncio.run(_child_reference(a.variant, settings, a.records))
    out["cpu_s"] = time.process_time() - cpu0
    print(json.dumps(out), flush=True)
    return 0


async def _child_tgastream(settings: Settings, n: int) -> dict[str, Any]:
    from tgastream.stream.worker import WorkerConfig, run_worker

    settings = settings.replace(worker_group=f"bench-tgastream-{uuid.uuid4().hex[:6]}")
    totals = await run_worker(settings, WorkerConfig(data_dir=settings.data_dir, progress_s=0, stop_after_records=n,
                                               serve_metrics=False))
    seconds = (totals.last_durable_at or 0) - (totals.first_record_at or 0)
    users, value_bytes, disk = _state_size(settings.data_dir / "state")
    return {"events": totals.records, "seconds": seconds,
            "update_p50_ms": round(1e3 * (totals.latency.percentile(0.5) or 0), 1),
            "update_p99_ms": round(1e3 * (totals.latency.percentile(0.99) or 0), 1),
            "state_bytes_per_user": round(value_bytes / users, 1) if users else None,
            "rocksdb_bytes_per_user": round(disk / users, 1) if users else None,
            "users": users, "samples": totals.samples,
            "sample_bytes_mean": round(totals.sample_bytes / totals.samples, 1) if totals.samples else None,
            "persists": totals.persists, "user_writes": totals.users_written}


def _state_size(root: Path) -> tuple[int, int, int]:
    """Users, total bytes of their encoded records, and RocksDB bytes after a flush (on disk)."""
    from tgastream.state.store import StateStore

    store = StateStore(root, "user-state")
    users = value_bytes = disk = 0
    try:
        for path in sorted(root.glob("user-state-*.db")):
            db = store.partition(int(path.name[len("user-state-"):-3]))
            for _, value in db.items():
                users += 1
                value_bytes += len(value)
            db.db.flush()
            db.db.compact_range(None, None)
            disk += db.stats().bytes
    finally:
        store.close()
    return users, value_bytes, disk


async def _child_reference(variant: str, settings: Settings, n: int) -> dict[str, Any]:
    """A plain faust app: the per-event table agent or the bare take() agent."""
    import asyncio

    import faust

    from tgastream.stream.app import faust_config
    from tgastream.stream.topics import ensure_topics

    group = f"bench-{variant}-{uuid.uuid4().hex[:6]}"
    conf = faust_config(settings, settings.data_dir / "faust")
    conf["store"] = "rocksdb://" if variant == "table-rocksdb" else "memory://"
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(group, **conf)
    topic = app.topic(settings.events_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", partitions=settings.partitions)
    state = {"n": 0, "t0": None, "t1": None}
    done = asyncio.Event()
    if variant.startswith("table"):
        ensure_topics(settings.bootstrap, {f"{group}-counts-changelog": {"cleanup.policy": "compact"}}, settings.partitions,
                      security=settings.kafka_security)
        counts = app.Table("counts", default=int, partitions=settings.partitions, key_type=bytes, value_type=int)

        @app.agent(topic)
        async def count_per_user(stream: Any) -> None:
            async for event in stream.events():
                if state["t0"] is None:
                    state["t0"] = time.monotonic()
                counts[event.key] += 1
                state["n"] += 1
                if state["n"] >= n:
                    state["t1"] = time.monotonic()
                    done.set()
    else:
        @app.agent(topic)
        async def take_batches(stream: Any) -> None:
            async for batch in stream.take(TAKE_N, within=1):
                if state["t0"] is None:
                    state["t0"] = time.monotonic()
                state["n"] += len(batch)
                if state["n"] >= n and state["t1"] is None:
                    state["t1"] = time.monotonic()
                    done.set()
    await app.start()
    try:
        await done.wait()
    finally:
        await app.stop()
    return {"events": state["n"], "seconds": state["t1"] - state["t0"]}


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
