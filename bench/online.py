"""``tgastream bench online``: online learning vs a model frozen at the drift point.

A synthetic log whose users change their favourite categories halfway (``synth --drift-at 0.5``)
is turned into the stream's samples. One learner trains prequentially through the first half; at
the drift point a frozen copy is taken. Through the second half both score every micro-batch
before the online one learns from it, so both are judged on exactly the same samples, side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tgastream.core.settings import Settings

HELP = "online vs frozen model on a stream whose preferences drift halfway (prequential HR@10, AUC)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=1000, help="synthetic users (default: 1000)")
    p.add_argument("--events", type=int, default=40_000, help="synthetic events (default: 40000)")
    p.add_argument("--seed", type=int, default=3, help="synth seed (default: 3)")
    p.add_argument("--drift-at", type=float, default=0.5, help="where preferences change (default: 0.5)")
    p.add_argument("--batch-size", type=int, default=256, help="micro-batch size (default: 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="online learning rate (default: 0.002)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--out", type=Path, default=Path("bench-online"), help="folder for the PNG (default: bench-online)")
    p.add_argument("--json", type=Path, help="write the result as JSON")


def _events(users: int, n: int, seed: int, drift_at: float):
    from tgastream.core.events import BEHAVIORS, Event
    from tgastream.stream.synth import SynthConfig, generate

    cfg = SynthConfig(users=users, events=n, seed=seed, drift_at=drift_at)
    rows = generate(cfg)
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    drift_ts = cfg.start_ts + drift_at * cfg.days * 86400
    return events, drift_ts


def _summary(metrics) -> dict:
    snap = metrics.snapshot()
    return {"hr@10": snap["hr@10"], "auc": snap["auc"], "ndcg@10": snap["ndcg@10"], "logloss": snap["logloss"],
            "retrieval_cases": metrics.retrievals_seen, "conversion_cases": metrics.conversions_seen}


def run(args: argparse.Namespace, settings: Settings) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from tgastream.model.online import OnlineLearner
    from tgastream.model.prequential import RollingMetrics
    from tgastream.state.samples import samples_from_events
    from tgastream.stream.configs import online_config, online_model_config
    from tgastream.stream.plots import save_chart

    events, drift_ts = _events(args.users, args.events, args.seed, args.drift_at)
    samples = samples_from_events(events, settings.max_len, settings.sample_len, settings.conversion_window_s,
                                  final_watermark=events[-1].ts + 2 * settings.conversion_window_s)
    samples.sort(key=lambda s: s.event_ts)  # the order a live stream delivers them (by event time)
    first = [s for s in samples if s.event_ts < drift_ts]
    second = [s for s in samples if s.event_ts >= drift_ts]
    settings = settings.replace(device=args.device, lr=args.lr)
    learner = OnlineLearner(online_model_config(settings), online_config(settings, metric_window=10**9))
    t0 = time.perf_counter()
    bs = args.batch_size
    for k in tqdm(range(0, len(first), bs), desc="first half (online)", unit="batch"):
        learner.step(first[k:k + bs])
    frozen = learner.frozen_copy()
    learner.metrics = RollingMetrics(window=10**9)
    curve: list[tuple[int, float | None, float | None]] = []
    for k in tqdm(range(0, len(second), bs), desc="second half (online vs frozen)", unit="batch"):
        batch = second[k:k + bs]
        frozen.step(batch)
        fh = frozen.batch_hr
        learner.step(batch)
        curve.append((k + len(batch), learner.batch_hr, fh))
    seconds = time.perf_counter() - t0
    result = {"online": _summary(learner.metrics), "frozen": _summary(frozen.metrics), "samples": len(samples),
              "first_half_samples": len(first), "second_half_samples": len(second), "seconds": round(seconds, 1),
              "device": str(learner.device),
              "command": f"tgastream bench online --users {args.users} --events {args.events} --seed {args.seed} "
                         f"--drift-at {args.drift_at}"}
    print(f"\nsecond half after the drift: {len(second):,} samples ({result['online']['retrieval_cases']:,} retrieval, "
          f"{result['online']['conversion_cases']:,} conversion)")
    print(f"{'model':<8}{'HR@10':>8}{'NDCG@10':>9}{'AUC':>8}{'logloss':>9}")
    for name in ("online", "frozen"):
        r = result[name]
        print(f"{name:<8}{_fmt(r['hr@10']):>8}{_fmt(r['ndcg@10']):>9}{_fmt(r['auc']):>8}{_fmt(r['logloss']):>9}")
    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = [c[0] for c in curve]
    for idx, label in ((1, "online"), (2, "frozen at drift")):
        ys = np.array([c[idx] if c[idx] is not None else np.nan for c in curve], dtype=float)
        smooth = np.convolve(np.nan_to_num(ys), np.ones(5) / 5, mode="same")
        ax.plot(xs, smooth, label=label)
    save_chart(fig, ax, args.out / "online_vs_frozen.png", "samples after the drift",
               "prequential HR@10 per batch (5-batch mean)", "Online vs frozen after a preference drift")
    print(f"plot: {args.out / 'online_vs_frozen.png'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
