"""``tgastream bench online``: online learning vs a frozen copy, prequential, on a replayed stream.

The stream is either a synthetic log whose users change their favourite categories halfway
(``synth --drift-at 0.5``, the default) or a real behavior log (``--data FILE``) replayed in time
order. Either is turned into the stream workers' samples, sorted by event time (the order a live
stream delivers them). One learner trains prequentially through a warm-up share (the drift point
on synthetic data, ``--warmup`` of the samples on a real log); then a frozen copy is taken. After
it, every micro-batch is scored by the online model, the frozen copy and repeat-recent *before*
the online model learns from it, so all three are judged on exactly the same samples.

Repeat-recent, scored the same way: a next-event target is ranked among the user's distinct
context items (most recent first), everything else tied behind; a conversion click is scored by
how often the user touched the clicked item in the context (carts and favs count double).
Every retrieval row is ranked over the whole catalogue the learner holds (no sampled rows).
"""

from __future__ import annotations

import argparse
import time
from itertools import islice
from pathlib import Path

import numpy as np

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "online vs frozen model (and repeat-recent), prequential HR@10 and AUC over time (synthetic drift or --data FILE)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="replay this behavior log (Taobao CSV, JSON lines, RetailRocket) instead of synthetic data")
    p.add_argument("--warmup", type=float, default=0.5,
                   help="with --data: share of the samples (time order) learned before the frozen copy (default: 0.5)")
    p.add_argument("--max-events", type=int, default=0, help="with --data: only the first N events by time (default: all)")
    p.add_argument("--users", type=int, default=1000, help="synthetic users (default: 1000)")
    p.add_argument("--events", type=int, default=40_000, help="synthetic events (default: 40000)")
    p.add_argument("--seed", type=int, default=3, help="synth seed (default: 3)")
    p.add_argument("--drift-at", type=float, default=0.5, help="where preferences change (default: 0.5)")
    p.add_argument("--batch-size", type=int, default=256, help="micro-batch size (default: 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="online learning rate (default: 0.002)")
    p.add_argument("--segments", type=int, default=10, help="points of the over-time curves (default: 10)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--out", type=Path, default=Path("bench-online"), help="folder for the PNG (default: bench-online)")
    p.add_argument("--json", type=Path, help="write the result as JSON")


def _synthetic(users: int, n: int, seed: int, drift_at: float):
    from tgastream.core.events import BEHAVIORS, Event
    from tgastream.stream.synth import SynthConfig, generate

    cfg = SynthConfig(users=users, events=n, seed=seed, drift_at=drift_at)
    rows = generate(cfg)
    events = [Event(str(u + 1), str(i + 1), str(c + 1), BEHAVIORS[b], float(ts)) for ts, u, i, c, b in rows]
    drift_ts = cfg.start_ts + drift_at * cfg.days * 86400
    return events, drift_ts


def _real(path: Path, max_events: int):
    from tgastream.core.events import load_events

    events = sorted(load_events(path), key=lambda e: e.ts)  # stable: a user's equal-time events keep file order
    return events[:max_events] if max_events else events


# -- the run --------------------------------------------------------------------------------------


class Outcomes:
    """Per-sample prequential outcomes of one scorer, in stream order."""

    def __init__(self) -> None:
        self.ranks: list[float] = []
        self.rank_at: list[int] = []  # stream position (samples after the warm-up) of each rank
        self.labels: list[float] = []
        self.probs: list[float] = []
        self.prob_at: list[int] = []

    def take_from(self, metrics, seen: tuple[int, int], at: int) -> tuple[int, int]:
        """Append what a learner's rolling metrics gained since ``seen`` (its lengths then)."""
        r = list(islice(metrics.ranks, seen[0], None))
        p = list(islice(metrics.conv_scores, seen[1], None))
        y = list(islice(metrics.conv_labels, seen[1], None))
        self.ranks += r
        self.rank_at += [at] * len(r)
        self.probs += p
        self.labels += y
        self.prob_at += [at] * len(p)
        return len(metrics.ranks), len(metrics.conv_scores)

    def summary(self, k: int = 10) -> dict:
        from tgastream.model.metrics import auc, logloss, ranking_metrics

        rm = ranking_metrics(np.asarray(self.ranks), k)
        y, p = np.asarray(self.labels), np.asarray(self.probs)
        return {"hr@10": rm["hr"], "ndcg@10": rm["ndcg"], "auc": auc(y, p), "logloss": logloss(y, p),
                "retrieval_cases": len(self.ranks), "conversion_cases": len(self.probs),
                "conversion_positives": int((y > 0).sum()) if len(y) else 0}

    def curve(self, edges: np.ndarray, k: int = 10) -> list[dict]:
        """HR@k and AUC of the samples in each [edges[j], edges[j + 1]) stretch of the stream."""
        from tgastream.model.metrics import auc

        ra, r = np.asarray(self.rank_at), np.asarray(self.ranks)
        pa, y, p = np.asarray(self.prob_at), np.asarray(self.labels), np.asarray(self.probs)
        out = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sr, sp = (ra >= lo) & (ra < hi), (pa >= lo) & (pa < hi)
            out.append({"hr@10": float((r[sr] <= k).mean()) if sr.any() else None,
                        "auc": auc(y[sp], p[sp]) if sp.any() else None,
                        "retrieval_cases": int(sr.sum()), "conversion_cases": int(sp.sum())})
        return out


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from tgastream.model.online import OnlineLearner
    from tgastream.model.shadow import repeat_interest, repeat_rank  # the trainer's shadow scores the same
    from tgastream.state.samples import CONVERSION, RETRIEVAL, samples_from_events
    from tgastream.stream.configs import online_config, online_model_config

    if args.data is not None:
        events = _real(args.data, args.max_events)
        source = f"{args.data} ({len(events):,} events{' , capped' if args.max_events else ''})"
    else:
        events, drift_ts = _synthetic(args.users, args.events, args.seed, args.drift_at)
        source = f"synthetic, drift at {args.drift_at}"
    samples = samples_from_events(events, settings.max_len, settings.sample_len, settings.conversion_window_s,
                                  final_watermark=events[-1].ts + 2 * settings.conversion_window_s)
    samples.sort(key=lambda s: s.event_ts)  # the order a live stream delivers them (by event time)
    if args.data is not None:
        cut = int(args.warmup * len(samples))
        first, second = samples[:cut], samples[cut:]
    else:
        first = [s for s in samples if s.event_ts < drift_ts]
        second = [s for s in samples if s.event_ts >= drift_ts]
    n_items = len({e.item_id for e in events})
    settings = settings.replace(device=args.device, lr=args.lr)
    bs = args.batch_size
    # rank every retrieval row of a batch over the whole catalogue (no sampled rows)
    learner = OnlineLearner(online_model_config(settings),
                            online_config(settings, metric_window=10**9, rank_budget=bs * (n_items + 4096)))
    t0 = time.perf_counter()
    for k in tqdm(range(0, len(first), bs), desc="warm-up (online)", unit="batch"):
        learner.step(first[k:k + bs])
    frozen = learner.frozen_copy()
    learner.metrics = type(learner.metrics)(window=10**9)
    outs = {"online": Outcomes(), "frozen": Outcomes(), "repeat": Outcomes()}
    seen_items = {s.item_id for s in first} | {it for s in first for it in s.graph.item_ids}
    pos = {"online": (0, 0), "frozen": (0, 0)}
    for k in tqdm(range(0, len(second), bs), desc="after warm-up (online vs frozen vs repeat)", unit="batch"):
        batch = second[k:k + bs]
        for s in batch:  # repeat-recent, before this batch's items count as seen
            if s.kind == RETRIEVAL:
                outs["repeat"].ranks.append(repeat_rank(s, len(seen_items)))
                outs["repeat"].rank_at.append(k)
            elif s.kind == CONVERSION:
                outs["repeat"].probs.append(repeat_interest(s))
                outs["repeat"].labels.append(float(s.label))
                outs["repeat"].prob_at.append(k)
        frozen.step(batch)
        pos["frozen"] = outs["frozen"].take_from(frozen.metrics, pos["frozen"], k)
        learner.step(batch)
        pos["online"] = outs["online"].take_from(learner.metrics, pos["online"], k)
        seen_items.update(s.item_id for s in batch)
    seconds = time.perf_counter() - t0
    edges = np.linspace(0, len(second), args.segments + 1).round().astype(int)
    edges[-1] = len(second) + 1
    result = {name: o.summary() for name, o in outs.items()}
    result["repeat"]["logloss"] = None  # its conversion score is a count, not a probability
    result["curve"] = {"samples_at": edges[1:].tolist(), **{name: o.curve(edges) for name, o in outs.items()}}
    cmd = (f"tgastream bench online --data {args.data} --warmup {args.warmup}"
           + (f" --max-events {args.max_events}" if args.max_events else "") if args.data is not None else
           f"tgastream bench online --users {args.users} --events {args.events} --seed {args.seed} "
           f"--drift-at {args.drift_at}")
    result |= {"source": source, "samples": len(samples), "first_half_samples": len(first),
               "second_half_samples": len(second), "items": n_items, "seconds": round(seconds, 1),
               "device": str(learner.device), "command": cmd}
    after = "the warm-up" if args.data is not None else "the drift"
    print(f"\nafter {after}: {len(second):,} samples ({result['online']['retrieval_cases']:,} next events ranked over "
          f"up to {n_items:,} items, {result['online']['conversion_cases']:,} conversion clicks, "
          f"{result['online']['conversion_positives']:,} bought)")
    print(f"{'model':<8}{'HR@10':>8}{'NDCG@10':>9}{'AUC':>8}{'logloss':>9}")
    for name in ("online", "frozen", "repeat"):
        r = result[name]
        print(f"{name:<8}{_fmt(r['hr@10']):>8}{_fmt(r['ndcg@10']):>9}{_fmt(r['auc']):>8}{_fmt(r['logloss']):>9}")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "online_vs_frozen.png"
    _plot(result, png, f"Prequential quality after {after}: {source}")
    print(f"plot: {png}")
    write_json(args.json, result)
    return 0


def _plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = result["curve"]["samples_at"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "hr@10", "HR@10 (next event, full catalogue)"), (axes[1], "auc", "conversion AUC")):
        for name, style in (("online", "-o"), ("frozen", "-s"), ("repeat", "--^")):
            ys = [np.nan if c[key] is None else c[key] for c in result["curve"][name]]
            ax.plot(xs, ys, style, label=f"{name} ({_fmt(result[name][key])})", markersize=4)
        ax.set_xlabel("samples after the warm-up")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
