"""The one-machine demo: broker, stream worker, trainer and API as real processes, a paced replay,
live progress, and a report (``report.json`` + PNG plots) built from what the processes measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tgastream.stream.broker import connect_with, die_with_parent, free_port, port_open
from tgastream.stream.plots import save_chart
from tgastream.stream.promscrape import scrape, total
from tgastream.stream.replay import ReplayConfig, ReplaySummary, replay_file
from tgastream.core.settings import Settings
from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS
from tgastream.stream.synth import SynthConfig, write_file
from tgastream.stream.topics import ensure_app_topics


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    data: Path | None = None
    events: int = 20_000
    users: int = 500
    seed: int = 7
    rate: float = 1000.0
    timeout_s: float = 900.0
    quiet: bool = False


@dataclass(frozen=True)
class Live:
    """The running demo at the moment the trainer has trained every sample (before it is stopped),
    for a caller that reads what is served then: ``run_demo(..., on_settled=fn)`` calls ``fn(live)``."""

    settings: Settings  # this run's: bootstrap, topics, data dir (trainer/, api/ below it)
    trainer_port: int  # the trainer's /metrics
    api_port: int  # the API replica's HTTP port
    started: float  # wall-clock start of the replay


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def tail(self, n: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log = log_dir / f"{name}.log"
    fh = open(log, "ab")
    popen = subprocess.Popen([sys.executable, "-m", "tgastream.stream.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                             preexec_fn=die_with_parent if sys.platform == "linux" else None)
    fh.close()
    return Proc(name, popen, log)


@dataclass
class Series:
    """What the progress loop saw, once a second."""

    rows: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows.append(row)


DEFAULTS = Settings()


def _common(settings: Settings) -> list[str]:
    """Flags every child process gets: the broker, and its TLS/SASL settings (the password
    itself travels in the environment, see :func:`_child_env`, never on a command line)."""
    flags = ["--bootstrap", settings.bootstrap, "--partitions", str(settings.partitions)]
    for name in KAFKA_SECURITY_SETTINGS:
        value = getattr(settings, name)
        if value != getattr(DEFAULTS, name):
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _child_env(settings: Settings) -> dict[str, str]:
    """Environment additions of the children: a SASL password given in the config file."""
    return {"TGASTREAM_SASL_PASSWORD": settings.sasl_password} if settings.sasl_password else {}


def _metric(value: float | None) -> str:
    """A rolling metric for the progress line; "–" while it is undefined (e.g. AUC with one class)."""
    return "  –  " if value is None else f"{value:.3f}"


def _clear_previous_run(data_dir: Path, logs: Path, say) -> None:
    """A demo is one fresh run: state, checkpoints and logs of an earlier run in the same folder
    belong to another broker's offsets (an embedded broker keeps nothing) and must not be resumed.
    Only folders laid out by a demo are removed; anything else stops the demo."""
    from tgastream.core.errors import CommandError

    for folder, allowed in ((data_dir, {"worker", "trainer"}), (logs, None)):
        if not folder.exists():
            continue
        names = {p.name for p in folder.iterdir()}
        if allowed is not None and not names <= allowed or allowed is None and any(not n.endswith(".log") for n in names):
            raise CommandError(f"{folder} exists and was not written by a demo: choose another --out")
        say(f"removing the previous demo run's {folder}")
        shutil.rmtree(folder)


def run_demo(settings: Settings, opts: DemoConfig, say=print, on_settled: Callable[[Live], None] | None = None) -> dict:
    """Run everything, wait until the trainer has consumed every sample, write the report.
    ``on_settled`` is called then, while every process still runs (not after a timeout)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    logs = opts.out / "logs"
    data_dir = opts.out / "data"
    _clear_previous_run(data_dir, logs, say)
    logs.mkdir()
    with connect_with(settings) as broker:
        settings = settings.replace(bootstrap=broker.bootstrap, data_dir=data_dir)
        say(f"broker: {broker.bootstrap}{' (embedded, memory only)' if broker.embedded else ''}")
        ensure_app_topics(broker.bootstrap, settings)
        log_path = opts.data
        if log_path is None:
            log_path = opts.out / "events.csv"
            n = write_file(SynthConfig(users=opts.users, events=opts.events, seed=opts.seed), log_path)
            say(f"generated {n:,} events of {opts.users:,} users → {log_path}")
        w_port, t_port = free_port(), free_port()
        api_port = settings.api_port if settings.api_port and not port_open(f"127.0.0.1:{settings.api_port}") else free_port()
        procs = [
            spawn("worker", ["worker", *_common(settings), "--data-dir", str(data_dir / "worker"),
                             "--metrics-port", str(w_port), "--quiet"], logs, _child_env(settings)),
            spawn("trainer", ["train", *_common(settings), "--data-dir", str(data_dir / "trainer"),
                              "--metrics-port", str(t_port), "--quiet", "--device", settings.device,
                              "--batch-size", str(settings.batch_size), "--dim", str(settings.dim),
                              "--layers", str(settings.layers), "--heads", str(settings.heads),
                              "--sample-len", str(settings.sample_len), "--train-policy", settings.train_policy,
                              "--republish-rate", str(settings.republish_rate)],
                  logs, _child_env(settings)),
        ]
        try:
            _wait_up(procs, [w_port, t_port])
            # the API as a replica would run anywhere: its own data dir, fed by the embeddings topic,
            # scoring with the newest checkpoint in the trainer's checkpoint directory
            procs.append(spawn("api", ["serve", *_common(settings), "--data-dir", str(data_dir / "api"),
                                       "--checkpoint-dir", str(data_dir / "trainer" / "checkpoints"),
                                       "--api-port", str(api_port), "--device", "cpu",
                                       "--ui-worker-metrics", f"http://127.0.0.1:{w_port}/metrics",
                                       "--ui-trainer-metrics", f"http://127.0.0.1:{t_port}/metrics"],
                                 logs, _child_env(settings)))
            return _drive(settings, opts, log_path, procs, w_port, t_port, api_port, say, on_settled)
        finally:
            for p in reversed(procs):
                p.stop()


def _healthy(port: int) -> bool:
    """The API answers /healthz (open without the token, unlike its /metrics)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _wait_up(procs: list[Proc], ports: list[int], timeout_s: float = 120.0, up: Callable[[int], object] = scrape) -> None:
    deadline = time.monotonic() + timeout_s
    for proc, port in zip(procs, ports):
        while not up(port):
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited at start:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not come up:\n{proc.tail()}")
            time.sleep(0.3)


def _drive(settings: Settings, opts: DemoConfig, log_path: Path, procs: list[Proc], w_port: int, t_port: int,
           api_port: int, say, on_settled: Callable[[Live], None] | None = None) -> dict:
    worker, trainer, api = procs
    _wait_up([api], [api_port], up=_healthy)
    say(f"worker metrics :{w_port}/metrics   trainer metrics :{t_port}/metrics")
    say(f"API: http://127.0.0.1:{api_port}  (try /v1/users/<id>/recommendations?k=10)")
    say(f"live page: http://127.0.0.1:{api_port}/ui")

    result: dict = {}
    replay_done = threading.Event()

    def replay() -> None:
        try:
            result["replay"] = replay_file(settings.bootstrap, settings,
                                           ReplayConfig(path=log_path, rate=opts.rate, watermark=True), progress=False)
        except Exception as exc:  # surfaced below; the demo must still stop its processes
            result["error"] = exc
        finally:
            replay_done.set()

    start = time.time()
    threading.Thread(target=replay, daemon=True, name="replay").start()
    series = Series()
    settled = 0
    last_line = 0.0
    while True:
        time.sleep(1.0)
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} died:\n{p.tail()}")
        wm, tm = scrape(w_port), scrape(t_port)
        row = {
            "t": time.time() - start,
            "events_applied": total(wm, "tgastream_events_applied_total"),
            "events_consumed": total(wm, "tgastream_events_consumed_total"),
            "worker_rejected": total(wm, "tgastream_events_rejected_total"),
            "samples_emitted": total(wm, "tgastream_samples_emitted_total"),
            "lag": total(wm, "tgastream_partition_lag"),
            "trainer_samples": total(tm, "tgastream_trainer_samples_total"),
            "trainer_trained": total(tm, "tgastream_trainer_samples_trained_total"),
            "steps": total(tm, "tgastream_trainer_steps_total"),
            "hr@10": tm.get("tgastream_online_metric{metric=hr@10,model=online}"),
            "auc": tm.get("tgastream_online_metric{metric=auc,model=online}"),
            "freshness_count": tm.get("tgastream_freshness_seconds_count", 0.0),
        }
        series.add(row)
        if not opts.quiet and time.monotonic() - last_line >= 2.0:
            last_line = time.monotonic()
            say(f"[{row['t']:6.0f}s] events {row['events_applied']:>8,.0f}  samples {row['samples_emitted']:>8,.0f}  "
                f"published {row['trainer_samples']:>8,.0f}  trained {row['trainer_trained']:>8,.0f}  "
                f"steps {row['steps']:>6,.0f}  "
                f"HR@10 {_metric(row['hr@10'])}  AUC {_metric(row['auc'])}  lag {row['lag']:,.0f}")
        if "error" in result:
            raise result["error"]
        if replay_done.is_set():
            summary: ReplaySummary = result["replay"]
            done = (row["events_applied"] >= summary.sent and row["samples_emitted"] > 0
                    and row["trainer_samples"] >= row["samples_emitted"]
                    and (settings.train_policy == "bounded" or row["trainer_trained"] >= row["samples_emitted"]))
            settled = settled + 1 if done else 0
            if settled >= 3:
                if on_settled is not None:
                    on_settled(Live(settings, t_port, api_port, start))
                break
        if time.time() - start > opts.timeout_s:
            say("timeout: stopping before the trainer caught up (figures below are partial)")
            break
    trainer.stop()  # checkpoint + final stats
    stats_path = Path(settings.data_dir) / "trainer" / "trainer-stats.json"
    trainer_stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    replay_summary: ReplaySummary = result["replay"]
    final = series.rows[-1]
    rejected = sum(replay_summary.rejected.values()) + int(final["worker_rejected"])
    report = {
        "events_replayed": replay_summary.sent + sum(replay_summary.rejected.values()),
        "events_processed": int(final["events_applied"]),
        "rejected": rejected,
        "samples": int(final["samples_emitted"]),
        "train_steps": int(trainer_stats.get("steps", final["steps"])),
        "online": {"auc": trainer_stats.get("online", {}).get("auc"), "hr@10": trainer_stats.get("online", {}).get("hr@10")},
        "freshness_p50_s": trainer_stats.get("freshness_p50_s"),
        "freshness_p99_s": trainer_stats.get("freshness_p99_s"),
        "events_per_s": round(replay_summary.events_per_s, 1),
        "trainer_samples": int(trainer_stats.get("samples", final["trainer_samples"])),
        "trained": int(trainer_stats.get("trained", final["trainer_trained"])),
        "trained_share": trainer_stats.get("trained_share"),
        "train_policy": settings.train_policy,
        "version_lag": trainer_stats.get("version_lag"),
        "trainer_samples_per_s": _busy_rate(series.rows, "trainer_samples"),
        "trained_samples_per_s": _busy_rate(series.rows, "trainer_trained"),
        "device": trainer_stats.get("device"),
        "seconds": round(time.time() - start, 1),
        "api": f"http://127.0.0.1:{api_port}",
    }
    write_report(opts.out, report, series, Path(settings.data_dir) / "trainer" / "trainer-history.jsonl")
    return report


def _busy_rate(rows: list[dict], key: str) -> float:
    """Per-second rate of a counter over the seconds it was rising (its busy time)."""
    busy = [(b[key] - a[key], b["t"] - a["t"]) for a, b in zip(rows, rows[1:]) if b[key] > a[key]]
    seconds = sum(dt for _, dt in busy)
    return round(sum(dv for dv, _ in busy) / seconds, 1) if seconds else 0.0


def write_report(out: Path, report: dict, series: Series, history_path: Path) -> None:
    """report.json, series.json and the PNG plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "series.json").write_text(json.dumps(series.rows) + "\n")
    rows = series.rows
    t = [r["t"] for r in rows]

    fig, ax = plt.subplots(figsize=(8, 4))
    history = [json.loads(x) for x in history_path.read_text().splitlines()] if history_path.exists() else []
    if history:
        t0 = history[0]["time"]
        ht = [h["time"] - t0 for h in history]
        for key in ("hr@10", "auc"):
            ax.plot(ht, [h.get(key) if h.get(key) is not None else float("nan") for h in history], label=f"online {key} (rolling)")
    save_chart(fig, ax, out / "online_metrics.png", "trainer time (s)", "prequential metric", "Online metrics (test-then-train)")

    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label in (("events_applied", "events applied/s (worker)"),
                       ("trainer_samples", "samples published/s (trainer head)"),
                       ("trainer_trained", "samples trained/s (new, each once)")):
        vals = [r[key] for r in rows]
        rate = [0.0] + [(b - a) / max(t2 - t1, 1e-6) for a, b, t1, t2 in zip(vals, vals[1:], t, t[1:])]
        ax.plot(t, rate, label=label)
    save_chart(fig, ax, out / "throughput.png", "demo time (s)", "per second", "Throughput")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [r["lag"] for r in rows], label="worker lag (records)")
    ax.plot(t, [max(0.0, r["samples_emitted"] - r["trainer_samples"]) for r in rows], label="samples not yet published")
    ax.plot(t, [max(0.0, r["samples_emitted"] - r["trainer_trained"]) for r in rows], label="samples not yet trained")
    title = (f"Freshness: p50 {report['freshness_p50_s'] or float('nan'):.2f}s, "
             f"p99 {report['freshness_p99_s'] or float('nan'):.2f}s (event arrival → vector published)")
    save_chart(fig, ax, out / "freshness.png", "demo time (s)", "records / samples behind", title)
