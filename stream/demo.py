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
    trainer_ranks: int = 1  # data-parallel trainer ranks (tgastream train --nproc N when > 1)


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
# Once the trainer has caught up, how long the run waits for the re-publish sweep to bring every
# vector to the newest weights (version lag 0) before it stops anyway and reports the lag.
SWEEP_WAIT_S = 20.0


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

    for folder, allowed in ((data_dir, {"worker", "trainer", "api"}), (logs, None)):
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
        ranks = ["--nproc", str(opts.trainer_ranks)] if opts.trainer_ranks > 1 else []  # rank r: metrics t_port + r
        api_port = settings.api_port if settings.api_port and not port_open(f"127.0.0.1:{settings.api_port}") else free_port()
        procs = [
            spawn("worker", ["worker", *_common(settings), "--data-dir", str(data_dir / "worker"),
                             "--metrics-port", str(w_port), "--quiet"], logs, _child_env(settings)),
            spawn("trainer", ["train", *_common(settings), "--data-dir", str(data_dir / "trainer"),
                              "--metrics-port", str(t_port), "--quiet", "--device", settings.device,
                              "--batch-size", str(settings.batch_size), "--dim", str(settings.dim),
                              "--layers", str(settings.layers), "--heads", str(settings.heads),
                              "--sample-len", str(settings.sample_len), "--train-policy", settings.train_policy,
                              "--republish-rate", str(settings.republish_rate),
                              "--conversion-feedback", settings.conversion_feedback, *ranks],
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
                                       "--ui-trainer-metrics",  # every rank's (rank r: t_port + r)
                                       ",".join(f"http://127.0.0.1:{t_port + r}/metrics" for r in range(opts.trainer_ranks))],
                                 logs, _child_env(settings)))
            return _drive(settings, opts, log_path, procs, w_port, [t_port + r for r in range(opts.trainer_ranks)],
                          api_port, say, on_settled)
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


def _drive(settings: Settings, opts: DemoConfig, log_path: Path, procs: list[Proc], w_port: int, t_ports: list[int],
           api_port: int, say, on_settled: Callable[[Live], None] | None = None) -> dict:
    worker, trainer, api = procs
    t_port = t_ports[0]
    _wait_up([api], [api_port], up=_healthy)
    say(f"worker metrics :{w_port}/metrics   trainer metrics :{t_port}/metrics")
    say(f"API: http://127.0.0.1:{api_port}  (try /v1/users/<id>/recommendations?k=10)")
    say(f"live page: http://127.0.0.1:{api_port}/ui")

    result: dict = {}
    replay_done = threading.Event()

    def replay() -> None:
        try:
            result["replay"] = replay_file(settings.bootstrap, settings,
                                           ReplayConfig(path=log_path, rate=opts.rate, watermark=True,
                                                        watermark_every_s=3600.0), progress=False)
        except Exception as exc:  # surfaced below; the demo must still stop its processes
            result["error"] = exc
        finally:
            replay_done.set()

    start = time.time()
    threading.Thread(target=replay, daemon=True, name="replay").start()
    series = Series()
    settled = 0
    caught_up_at: float | None = None
    last_line = 0.0
    while True:
        time.sleep(1.0)
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} died:\n{p.tail()}")
        wm, tm = scrape(w_port), scrape(t_port)
        tms = [tm] + [scrape(p) for p in t_ports[1:]]  # every trainer rank's counters (rank 0's gauges)
        row = {
            "t": time.time() - start,
            "events_applied": total(wm, "tgastream_events_applied_total"),
            "events_consumed": total(wm, "tgastream_events_consumed_total"),
            "worker_rejected": total(wm, "tgastream_events_rejected_total"),
            "samples_emitted": total(wm, "tgastream_samples_emitted_total"),
            "lag": total(wm, "tgastream_partition_lag"),
            "trainer_samples": sum(total(m, "tgastream_trainer_samples_total") for m in tms),
            "trainer_trained": sum(total(m, "tgastream_trainer_samples_trained_total") for m in tms),
            "train_seconds": max(total(m, "tgastream_trainer_train_seconds_total") for m in tms),
            "replaying": not replay_done.is_set(),
            "steps": total(tm, "tgastream_trainer_steps_total"),
            "hr@10": tm.get("tgastream_online_metric{metric=hr@10,model=online}"),
            "auc": tm.get("tgastream_online_metric{metric=auc,model=online}"),
            "freshness_count": tm.get("tgastream_freshness_seconds_count", 0.0),
            "version_lag": max(total(m, "tgastream_published_version_lag") for m in tms),
        }
        series.add(row)
        if not opts.quiet and time.monotonic() - last_line >= 2.0:
            last_line = time.monotonic()
            say(f"[{row['t']:6.0f}s] events {row['events_applied']:>8,.0f}  samples {row['samples_emitted']:>8,.0f}  "
                f"published {row['trainer_samples']:>8,.0f}  trained {row['trainer_trained']:>8,.0f}  "
                f"steps {row['steps']:>6,.0f}  "
                f"HR@10 {_metric(row['hr@10'])}  AUC@click {_metric(row['auc'])}  lag {row['lag']:,.0f}")
        if "error" in result:
            raise result["error"]
        if replay_done.is_set():
            summary: ReplaySummary = result["replay"]
            caught_up = (row["events_applied"] >= summary.sent and row["samples_emitted"] > 0
                         and row["trainer_samples"] >= row["samples_emitted"]
                         and (settings.train_policy == "bounded" or row["trainer_trained"] >= row["samples_emitted"]))
            caught_up_at = (caught_up_at or time.monotonic()) if caught_up else None
            # ... and the re-publish sweep has re-sent what older weights made (bounded wait)
            swept = row["version_lag"] <= 0 or (caught_up_at is not None
                                                and time.monotonic() - caught_up_at >= SWEEP_WAIT_S)
            settled = settled + 1 if caught_up and swept else 0
            if settled >= 3:
                if on_settled is not None:
                    on_settled(Live(settings, t_port, api_port, start))
                break
        if time.time() - start > opts.timeout_s:
            say("timeout: stopping before the trainer caught up (figures below are partial)")
            break
    trainer.stop()  # checkpoint + final stats
    stats_path = Path(settings.data_dir) / "trainer" / ("rank-0" if opts.trainer_ranks > 1 else "") / "trainer-stats.json"
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
        "online": online_report(trainer_stats),
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
        **capacity(series.rows, settings.batch_size),
        "trainer_ranks": opts.trainer_ranks,
        "publishing": trainer_stats.get("publishing"),
        "published_version_lag_max": trainer_stats.get("published_version_lag_max"),
        "device": trainer_stats.get("device"),
        "seconds": round(time.time() - start, 1),
        "api": f"http://127.0.0.1:{api_port}",
    }
    write_report(opts.out, report, series, Path(settings.data_dir) / "trainer" / "trainer-history.jsonl")
    return report


def online_report(trainer_stats: dict) -> dict:
    """The online figures of report.json: conversion judged at the click (each click's P(buy) by
    the model of that moment, joined to its label when the window closed; model/clicktime.py)
    over the trainer's rolling window of the latest mature clicks by click time
    (model/prequential.py), with the cases it rests on and the click times they span
    (``auc_click_from``, ``auc_click_to``: event-time seconds), and HR@10."""
    on = trainer_stats.get("online", {})
    return {"auc": on.get("auc"), "auc_clicks": on.get("auc_clicks"), "auc_buys": on.get("auc_buys"),
            "auc_click_from": on.get("auc_click_from"), "auc_click_to": on.get("auc_click_to"),
            "gauc": on.get("gauc"), "logloss": on.get("logloss"), "ece": on.get("ece"), "hr@10": on.get("hr@10"),
            "clicks_unjudged": on.get("clicktime_unmatched"), "clicks_pending": on.get("clicktime_pending"),
            "clicks_maturing": on.get("auc_maturing"),
            "reliability": trainer_stats.get("reliability", []),
            "judged": ("at the click: the conversion window's label joined to the P(buy) made when the click arrived; "
                       "the window holds the latest clicks by click time whose era is fully labelled "
                       "(every older click has its label), so positives and negatives are of the same era")}


def capacity(rows: list[dict], batch_size: int) -> dict:
    """The trainer against the stream while the replay ran (from the first sample to the first
    second after the replay ended): samples produced per second, samples trained per second of
    training (the training thread's busy time: what it could train), their ratio
    ``trainer_capacity_ratio`` (≥ 1: the trainer keeps pace), the share of the produced samples
    trained by then, and ``trained_lag_at_stream_end`` (produced, not yet trained, in samples)."""
    live = [r for r in rows if r["samples_emitted"] > 0]
    end = next((r for r in live if not r.get("replaying", True)), live[-1] if live else None)
    if end is None or not live or end["t"] <= live[0]["t"]:
        return {"trainer_capacity_ratio": None, "trained_lag_at_stream_end": None}
    first = live[0]
    produced = end["samples_emitted"] / max(end["t"] - first["t"] + 1.0, 1e-9)  # (first second: partial)
    busy = end["train_seconds"] - first.get("train_seconds", 0.0)
    trained = end["trainer_trained"] - first["trainer_trained"]
    train_rate = trained / busy if busy > 0 else None
    lag = int(end["samples_emitted"] - end["trainer_trained"])
    return {"produced_samples_per_s_during_replay": round(produced, 1),
            "trained_samples_per_busy_s": None if train_rate is None else round(train_rate, 1),
            "trainer_capacity_ratio": None if train_rate is None else round(train_rate / produced, 3),
            "trained_share_at_stream_end": round(end["trainer_trained"] / end["samples_emitted"], 3),
            "trained_lag_at_stream_end": lag, "trained_lag_at_stream_end_batches": round(lag / batch_size, 2)}


def _busy_rate(rows: list[dict], key: str) -> float:
    """Per-second rate of a counter over the seconds it was rising (its busy time)."""
    busy = [(b[key] - a[key], b["t"] - a["t"]) for a, b in zip(rows, rows[1:]) if b[key] > a[key]]
    seconds = sum(dt for _, dt in busy)
    return round(sum(dv for dv, _ in busy) / seconds, 1) if seconds else 0.0


def online_metrics_plot(history: list[dict], online: dict, path: Path) -> None:
    """Rolling HR@10 and click-time AUC over trainer time; click-time logloss and ECE; and the
    reliability of the click-time P(buy) at the end (10 equal-mass bins)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if history:
        t0 = history[0]["time"]
        ht = [h["time"] - t0 for h in history]
        for ax, keys in ((axes[0], (("hr@10", "HR@10"), ("auc", "conversion AUC at the click (mature clicks, click-time order)"))),
                         (axes[1], (("logloss", "logloss at the click"), ("ece", "ECE at the click")))):
            for key, label in keys:
                ax.plot(ht, [h.get(key) if h.get(key) is not None else float("nan") for h in history],
                        label=f"{label} (rolling)")
            ax.set_xlabel("trainer time (s)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":")
    rows = online.get("reliability") or []
    if rows:
        mp, rate = [r["mean_prob"] for r in rows], [r["rate"] for r in rows]
        top = max(*mp, *rate, 1e-3)
        axes[2].plot(mp, rate, "-o", label=f"online (ECE {online.get('ece') or float('nan'):.4f})")
        axes[2].plot([0, top], [0, top], ":", color="grey", label="calibrated")
        axes[2].legend(fontsize=8)
    axes[2].set_xlabel("mean predicted P(buy) at the click")
    axes[2].set_ylabel("observed buy rate")
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"Online metrics (test-then-train; conversion judged at the click: AUC "
                 f"{online.get('auc') or float('nan'):.3f} on {online.get('auc_clicks') or 0} clicks, "
                 f"{online.get('auc_buys') or 0} bought)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, report: dict, series: Series, history_path: Path) -> None:
    """report.json, series.json and the PNG plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "series.json").write_text(json.dumps(series.rows) + "\n")
    rows = series.rows
    t = [r["t"] for r in rows]

    history = [json.loads(x) for x in history_path.read_text().splitlines()] if history_path.exists() else []
    online_metrics_plot(history, report.get("online", {}), out / "online_metrics.png")

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
