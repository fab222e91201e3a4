"""``tgastream bench era``: the rolling click-time conversion window, ordered by label arrival
(before) and by click time over mature clicks (model/prequential.py), on the same cases.

Why: under ``conversion_feedback wait`` a positive's label arrives at the buy, minutes after its
click, and a negative's at the window's end, a day later. A window of the latest labels to
*arrive* therefore compares positives of recent clicks with negatives of clicks about a day
older, each scored by the model version of its own click; when the score scale drifts between
those versions (it does, a lot, early in a stream), the window's AUC measures the drift, not the
ranking, and can fall far below 0.5 while every click era ranks better than chance. The trainer's
window now takes a case only when every older click has its label and keeps the latest clicks
by click time, so its positives and negatives are of the same era.

The stream: the demo's synthetic log (``tgastream demo``'s defaults: 500 users, 20,000 events,
seed 7) or ``--data FILE``, turned into the workers' samples in emission order with hourly
event-time watermarks (bench/online.py ``stream_samples``), learned by one online learner per
seed in micro-batches (prequential, the trainer's own scoring). Both windows are fed the very
same joined cases (label + click-time P(buy)): ``arrival`` as they arrive, ``click`` is the
learner's own rolling metrics. Printed: both windows' AUC at evenly spaced points of the second
half of the stream, with the mean click-time gap between the window's positives and negatives
(the era mismatch); the AUC of all the stream's clicks grouped by click day (what each era's
ranking really is) and pooled. Means over seeds, with min–max.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path

import numpy as np

from tgastream.bench.report import write_json
from tgastream.core.errors import CommandError
from tgastream.core.settings import Settings

HELP = ("the rolling click-time conversion AUC with the window ordered by label arrival vs by click time "
        "over mature clicks, on the same cases (the demo's stream or --data FILE)")
DAY = 86400.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None, help="replay this behavior log instead of the demo's synthetic one")
    p.add_argument("--max-events", type=int, default=0, help="with --data: only the first N events by time")
    p.add_argument("--users", type=int, default=500, help="synthetic users (default: the demo's 500)")
    p.add_argument("--events", type=int, default=20_000, help="synthetic events (default: the demo's 20,000)")
    p.add_argument("--seed", type=int, default=7, help="synthetic log seed (default: the demo's 7)")
    p.add_argument("--window", type=int, default=5000, help="rolling window in cases (default: the trainer's 5000)")
    p.add_argument("--points", type=int, default=6, help="rows of the table over the second half (default: 6)")
    p.add_argument("--seeds", type=int, default=3, help="learner seeds (default: 3)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--png", type=Path, default=None, help="plot both windows' AUC over the stream here")


def events_of(args: argparse.Namespace):
    """The events of ``--data`` (its first ``--max-events``) or of the synthetic log of
    ``--users``/``--events``/``--seed``, and a line saying which (bench era, bench staleness)."""
    from tgastream.bench.online import _real, _synthetic

    if args.data is not None:
        cap = f" (first {args.max_events:,} events)" if args.max_events else ""
        return _real(args.data, args.max_events), f"{args.data}{cap}"
    events, _ = _synthetic(args.users, args.events, args.seed, 0.0)
    return events, f"synthetic ({args.users} users, {args.events:,} events, seed {args.seed})"


def replay(samples: list, settings: Settings, window: int, batch_size: int, seed: int) -> dict:
    """One learner through the samples; after every batch both windows' AUC and case counts, and
    the arrival window's mean click-time gap positives − negatives (s). Returns the points and
    every joined case (click time, label, click-time P(buy)) for the per-day figures."""
    from tqdm import tqdm

    from tgastream.model.online import OnlineLearner
    from tgastream.model.prequential import RollingMetrics
    from tgastream.model.shadow import repeat_interest
    from tgastream.state.samples import CLICK, CONVERSION
    from tgastream.stream.configs import online_config, online_model_config

    learner = OnlineLearner(online_model_config(settings), online_config(settings.replace(seed=seed),
                                                                         metric_window=window))
    learner.clicktime.history = []
    arrival = RollingMetrics(window=window)
    arrival_ts: deque = deque(maxlen=window)  # the arrival window's click times, label-arrival order
    predicted: dict = {}
    repeat: dict = {}  # click key → repeat-recent's score of the click (the shadow's)
    read, now = 0, -np.inf
    points, cases = [], []
    for k in tqdm(range(0, len(samples), batch_size), desc=f"seed {seed}", unit="batch", leave=False):
        batch = samples[k:k + batch_size]
        learner.step(batch)
        now = max([now] + [s.event_ts for s in batch if s.kind != CONVERSION])  # (a label's event_ts is its click's)
        repeat.update((s.click_key, repeat_interest(s)) for s in batch if s.kind == CLICK)
        for key, _v, probs in learner.clicktime.history[read:]:
            predicted[key] = probs[0]
        read = len(learner.clicktime.history)
        conv = [s for s in batch if s.kind == CONVERSION and s.click_key in predicted]  # (as the learner's join)
        if conv:
            arrival.add_conversion(np.asarray([s.label for s in conv]), np.asarray([predicted[s.click_key] for s in conv]))
            arrival_ts.extend((s.event_ts, s.label) for s in conv)
            cases.extend((s.event_ts, s.label, predicted[s.click_key], repeat[s.click_key]) for s in conv)
        a, c = arrival.snapshot(), learner.metrics.snapshot()
        pos = [t for t, y in arrival_ts if y > 0.5]
        neg = [t for t, y in arrival_ts if y <= 0.5]
        points.append({"samples": k + len(batch), "stream_ts": now,
                       "arrival_auc": a["auc"], "arrival_clicks": a["auc_clicks"], "arrival_buys": a["auc_buys"],
                       "arrival_gap_s": float(np.mean(pos) - np.mean(neg)) if pos and neg else None,
                       "click_auc": c["auc"], "click_clicks": c["auc_clicks"], "click_buys": c["auc_buys"],
                       "click_from": c["auc_click_from"], "click_to": c["auc_click_to"], "maturing": c["auc_maturing"]})
    return {"points": points, "cases": np.asarray(cases, dtype=np.float64).reshape(-1, 4)}


def by_click_day(cases: np.ndarray) -> tuple[list[dict], float | None]:
    """AUC of the cases [n, 4] (click ts, label, P(buy), repeat-recent's score) grouped by click
    day (days with both labels; ``repeat_auc``: repeat-recent's on the same clicks), and pooled."""
    from tgastream.model.metrics import auc

    if not len(cases):
        return [], None
    t0 = cases[:, 0].min()
    day = ((cases[:, 0] - t0) // DAY).astype(int)
    out = []
    for d in range(int(day.max()) + 1):
        w = cases[day == d]
        if len(w) and 0 < w[:, 1].sum() < len(w):
            out.append({"day": d, "auc": auc(w[:, 1], w[:, 2]), "repeat_auc": auc(w[:, 1], w[:, 3]), "clicks": len(w),
                        "buys": int(w[:, 1].sum()), "mean_p": float(w[:, 2].mean())})
    return out, auc(cases[:, 1], cases[:, 2])


def _repeat_auc(cases: np.ndarray) -> float | None:
    from tgastream.model.metrics import auc

    return auc(cases[:, 1], cases[:, 3]) if len(cases) else None


def _stat(vals: list) -> dict:
    v = [x for x in vals if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "min": float(np.min(v)) if v else None,
            "max": float(np.max(v)) if v else None, "n": len(v)}


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.bench.online import stream_samples

    if args.seeds < 1 or args.window < 1 or args.points < 1:
        raise CommandError("--seeds, --window and --points must be >= 1")
    events, source = events_of(args)
    if not events:
        raise CommandError("no events to replay")
    samples = stream_samples(events, settings)
    settings = settings.replace(device=args.device, threads=args.threads)
    t0 = time.perf_counter()
    runs = [replay(samples, settings, args.window, args.batch_size, seed) for seed in range(args.seeds)]
    seconds = time.perf_counter() - t0
    n = len(runs[0]["points"])
    at = np.unique(np.linspace(n // 2, n - 1, args.points).round().astype(int)).tolist()
    table = []
    for j in at:
        row = {"samples": runs[0]["points"][j]["samples"]}
        for key in ("arrival_auc", "arrival_gap_s", "click_auc", "arrival_clicks", "arrival_buys", "click_clicks",
                    "click_buys"):
            row[key] = _stat([r["points"][j][key] for r in runs])
        row["click_lag_s"] = _stat([r["points"][j]["stream_ts"] - r["points"][j]["click_to"]
                                    if r["points"][j]["click_to"] is not None else None for r in runs])
        table.append(row)
    days = [by_click_day(r["cases"]) for r in runs]
    day_rows = [{"day": d["day"], "auc": _stat([next((x["auc"] for x in dd if x["day"] == d["day"]), None)
                                                for dd, _ in days]),
                 "repeat_auc": d["repeat_auc"], "clicks": d["clicks"], "buys": d["buys"],
                 "mean_p": _stat([next((x["mean_p"] for x in dd if x["day"] == d["day"]), None) for dd, _ in days])}
                for d in days[0][0]]
    cmd = (f"tgastream bench era {'--data ' + str(args.data) if args.data else ''} --window {args.window} "
           f"--seeds {args.seeds} --batch-size {args.batch_size} --threads {args.threads}").replace("  ", " ")
    result = {"source": source, "samples": len(samples), "cases": int(len(runs[0]["cases"])),
              "buys": int(runs[0]["cases"][:, 1].sum()) if len(runs[0]["cases"]) else 0, "window": args.window,
              "seeds": args.seeds, "table": table, "by_click_day": day_rows, "pooled_auc": _stat([p for _, p in days]),
              "pooled_repeat_auc": _repeat_auc(runs[0]["cases"]),
              "seconds": round(seconds, 1), "command": cmd,
              "curves": [{"samples": [p["samples"] for p in r["points"]], "arrival_auc": [p["arrival_auc"] for p in r["points"]],
                          "click_auc": [p["click_auc"] for p in r["points"]]} for r in runs]}
    print(f"\n{source}: {len(samples):,} samples, {result['cases']:,} clicks judged ({result['buys']:,} bought), "
          f"window {args.window:,}, {args.seeds} seed(s), {seconds:.0f} s")
    print(f"{'samples':>8}  {'AUC by arrival':>16}  {'pos-neg click gap':>18}  {'AUC by click time':>18}  "
          f"{'its clicks/buys':>16}  {'its lag':>9}")
    for row in table:
        print(f"{row['samples']:>8,}  {_ms(row['arrival_auc']):>16}  {_fs(row['arrival_gap_s']['mean']):>18}  "
              f"{_ms(row['click_auc']):>18}  {_fs(row['click_clicks']['mean'], 0)}/{_fs(row['click_buys']['mean'], 0):>8}"
              f"  {_fs(row['click_lag_s']['mean']):>9}")
    print("all cases by click day (AUC, mean over seeds [min-max]; repeat-recent's AUC on the same clicks; "
          "clicks, buys, mean P(buy)):")
    for d in day_rows:
        print(f"  day {d['day']}: {_ms(d['auc'])}  repeat {_fs(d['repeat_auc'], 3)}  {d['clicks']:,} clicks, "
              f"{d['buys']:,} bought, mean P(buy) {_fs(d['mean_p']['mean'], 3)}")
    print(f"pooled: {_ms(result['pooled_auc'])}  (repeat-recent {_fs(result['pooled_repeat_auc'], 3)})")
    if args.png is not None:
        _plot(result, args.png)
        print(f"plot: {args.png}")
    write_json(args.json, result)
    return 0


def _ms(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.3f}" + (f" [{s['min']:.2f}-{s['max']:.2f}]" if s["n"] > 1 else "")


def _fs(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for j, c in enumerate(result["curves"]):
        nan = [np.nan if v is None else v for v in c["arrival_auc"]]
        ax.plot(c["samples"], nan, color="tab:red", alpha=0.7, label="window by label arrival" if j == 0 else None)
        nan = [np.nan if v is None else v for v in c["click_auc"]]
        ax.plot(c["samples"], nan, color="tab:blue", alpha=0.7,
                label="window by click time, mature clicks" if j == 0 else None)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("samples of the stream learned")
    ax.set_ylabel(f"rolling click-time AUC ({result['window']:,} cases)")
    ax.set_title(f"{result['source']}: pooled AUC {_ms(result['pooled_auc'])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
