"""``tgastream bench staleness``: click-time conversion AUC by the age of the weights that predict.

Why: on the 60k Taobao stream the online learner's click-time AUC (0.57) is below that of a
copy frozen at the end of the warm-up (0.61), the opposite of what online learning is for. This
bench separates the two explanations on the same cases: (a) the score scale drifts between the
versions that predict a window's clicks, so pooled AUC suffers though each version ranks well;
(b) the later weights rank worse. A *snapshot* copy refreshed every K batches predicts K batches
of clicks with one version, so (a) shrinks as K grows while (b) stays; the frozen copy is the
snapshot of K = ∞. And the learner run again with its conversion head frozen at the warm-up's end
(its encoder and tables still trained by retrieval) tells the head's own updates from the moving
states under it.

The stream and the cases are ``bench online``'s (bench/online.py: the workers' samples in emission
order, a warm-up share learned first, every later click judged at the click); the figures are its
``summarize``: means over seeds with paired user-bootstrap intervals against the online learner.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tgastream.bench.report import write_json
from tgastream.core.errors import CommandError
from tgastream.core.settings import Settings

HELP = ("click-time conversion AUC of the online learner vs snapshots of it refreshed every K batches, "
        "the copy frozen after warm-up, and the learner with its conversion head frozen")
ONLINE = "online_wait"  # (bench.online.summarize's reference name, whatever the feedback mode)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None, help="a behavior log (default: the demo's synthetic stream)")
    p.add_argument("--max-events", type=int, default=0, help="with --data: only the first N events by time")
    p.add_argument("--users", type=int, default=500, help="synthetic users (default: the demo's 500)")
    p.add_argument("--events", type=int, default=20_000, help="synthetic events (default: the demo's 20,000)")
    p.add_argument("--seed", type=int, default=7, help="synthetic log seed (default: the demo's 7)")
    p.add_argument("--warmup", type=float, default=0.5, help="share of the samples learned before the cases start (default: 0.5)")
    p.add_argument("--snapshots", default="25,100", help="refresh intervals K in batches, comma-separated (default: 25,100)")
    p.add_argument("--feedback", default="wait", help="conversion_feedback of the learner (default: wait)")
    p.add_argument("--no-head-frozen", action="store_true", help="skip the run with the conversion head frozen")
    p.add_argument("--seeds", type=int, default=3, help="learner seeds (default: 3)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="online learning rate (default: 0.002, as bench online)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--png", type=Path, default=None, help="bar chart of the AUCs here")


def snapshot_due(batch: int, cut_batch: int, every: int) -> bool:
    """Whether a snapshot refreshed every ``every`` batches is taken before ``batch`` (the first at the cut)."""
    return batch >= cut_batch and (batch - cut_batch) % every == 0


def freeze_conversion_head(learner) -> int:
    """Stop training the learner's conversion head (its encoder and tables train on); returns the
    number of parameters frozen (0: the model has no conversion head)."""
    frozen = 0
    for name, p in learner.model.named_parameters():
        if name.startswith("conversion_head."):
            p.requires_grad_(False)  # (no gradient: Adam leaves it alone)
            frozen += 1
    return frozen


def replay(samples: list, cases, settings: Settings, cfg, every: list[int], bs: int, cut: int,
           head_frozen: bool, desc: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One learner through the samples (with its snapshots and frozen copy unless ``head_frozen``);
    each model's click-time P(buy) per case [C] and retrieval ranks [R]."""
    from tqdm import tqdm

    from tgastream.bench.online import _probs
    from tgastream.model.online import OnlineLearner
    from tgastream.stream.configs import online_model_config

    learner = OnlineLearner(online_model_config(settings), cfg)
    learner.clicktime.history = []
    copies: dict[str, object] = {}
    history: dict[str, list] = {f"snapshot_{k}": [] for k in every} | {"frozen": []}
    ranks: dict[str, list] = {name: [] for name in history}
    for k in tqdm(range(0, len(samples), bs), desc=desc, unit="batch", leave=False):
        if k == cut:
            learner.metrics = type(learner.metrics)(window=10**9)
            if head_frozen and not freeze_conversion_head(learner):
                raise CommandError("the model has no conversion head to freeze")
        if not head_frozen:
            for name in history:
                if name == "frozen" and k == cut or name != "frozen" and snapshot_due(k // bs, cut // bs, int(name[9:])):
                    if name in copies:  # the ranks of the snapshot it replaces
                        ranks[name].extend(copies[name].metrics.ranks)
                    copies[name] = learner.frozen_copy()
                    copies[name].clicktime.history = history[name]  # one history across a name's snapshots
        batch = samples[k:k + bs]
        for twin in copies.values():
            twin.step(batch)
        learner.step(batch)
    out = {ONLINE: (_probs(learner.clicktime.history, cases.keys), np.asarray(learner.metrics.ranks))}
    for name in copies:
        ranks[name].extend(copies[name].metrics.ranks)
        out[name] = (_probs(history[name], cases.keys, cases.before_cut), np.asarray(ranks[name]))
    return out


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.bench.era import events_of
    from tgastream.bench.online import Cases, stream_samples, summarize
    from tgastream.stream.configs import online_config

    try:
        every = sorted({int(x) for x in args.snapshots.split(",") if x.strip()})
    except ValueError:
        raise CommandError(f"--snapshots takes comma-separated batch counts, got {args.snapshots!r}") from None
    if any(k < 1 for k in every) or args.seeds < 1 or not 0 < args.warmup < 1:
        raise CommandError("--snapshots must be >= 1 each, --seeds >= 1, --warmup in (0, 1)")
    events, source = events_of(args)
    # the "online" row is the newest weights: the snapshots compared with it are this bench's own
    settings = settings.replace(device=args.device, lr=args.lr, threads=args.threads, conversion_feedback=args.feedback,
                                conversion_snapshot_steps=0)
    samples = stream_samples(events, settings)
    bs = args.batch_size
    cut = int(round(args.warmup * len(samples) / bs)) * bs
    cases = Cases(samples, cut)
    if not len(cases.clicks):
        raise CommandError("no click after the warm-up to judge: a longer stream or a smaller --warmup")
    n_items = len({e.item_id for e in events})
    probs: dict[str, list] = {}
    ranks: dict[str, list] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        cfg = online_config(settings.replace(seed=seed), metric_window=10**9, rank_budget=bs * (n_items + 4096))
        runs = replay(samples, cases, settings, cfg, every, bs, cut, False, f"seed {seed}")
        if not args.no_head_frozen:
            head = replay(samples, cases, settings, cfg, [], bs, cut, True, f"seed {seed} head frozen")
            runs["online_head_frozen"] = head[ONLINE]
        for name, (p, r) in runs.items():
            probs.setdefault(name, []).append(p)
            ranks.setdefault(name, []).append(r)
    order = [ONLINE] + [f"snapshot_{k}" for k in every] + ["frozen"] + (["online_head_frozen"] if not args.no_head_frozen else [])
    result = summarize(cases, {m: probs[m] for m in order}, {m: ranks[m] for m in order}, args.seeds)
    result |= {"source": source, "feedback": args.feedback, "samples": len(samples), "warmup_samples": cut,
               "snapshots_every_batches": every, "batch_size": bs, "seconds": round(time.perf_counter() - t0, 1),
               "clicks": len(cases.clicks), "buys": int(cases.labels.sum())}
    print(f"\n{source}: {len(cases.clicks):,} clicks judged at the click after the warm-up "
          f"({result['buys']:,} bought); feedback {args.feedback}; {args.seeds} seed(s); {result['seconds']:.0f} s")
    print(f"{'model':<22}{'AUC':>8}{'GAUC':>8}{'logloss':>9}{'ECE':>8}   AUC − online [95%]")
    for name, r in result["models"].items():
        ci = (r.get("ci") or {}).get("auc")
        diff = "" if ci is None else f"{r['auc'] - result['models'][ONLINE]['auc']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        print(f"{name.replace(ONLINE, 'online'):<22}{_f(r['auc']):>8}{_f(r['gauc']):>8}{_f(r['logloss']):>9}{_f(r['ece']):>8}   {diff}")
    if args.json:
        write_json(args.json, result)
    if args.png:
        _plot(result, args.png)
    return 0


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _plot(result: dict, path: Path) -> None:
    """AUC of each model (mean over seeds, whiskers: min–max of the seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgastream.stream.plots import save_chart

    names = list(result["models"])
    per = [[s["auc"] for s in result["models"][m]["per_seed"] if s["auc"] is not None] for m in names]
    mean = [float(np.mean(v)) if v else np.nan for v in per]
    lo = [m - min(v) if v else 0 for m, v in zip(mean, per)]
    hi = [max(v) - m if v else 0 for m, v in zip(mean, per)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(names)), mean, yerr=[lo, hi], capsize=4, label="click-time AUC (seeds: min–max)")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(names)), [n.replace(ONLINE, "online") for n in names], rotation=20)
    ax.set_ylim(0.3, 0.8)
    save_chart(fig, ax, path, "model", "AUC", f"click-time AUC by the age of the weights ({result['source']})")
