"""``tgastream bench guard``: a poisoned stretch of the stream, online with the guard, without it, frozen.

A synthetic log becomes the workers' samples in event-time order. After a warm-up, a stretch of
the stream is poisoned (a broken join upstream): a ``--poison-share`` of its samples get another
sample's target (retrieval targets shuffled) or a flipped label (conversion). Three models see the
same stream after the warm-up:

- ``with_guard``: the online learner with the trainer's guardrails (model/guardrails.py): shadow
  baseline, guard, rollback, registry, checkpoints every ``--checkpoint-every`` steps in a temp dir;
- ``without_guard``: the same learner, same start, no guard;
- ``frozen``: a copy frozen where the stretch begins.

Every micro-batch is first scored by what each one *serves* (the guarded trainer serves the good
model while rolled back) on the clean version of the batch (the true targets and labels, which
the learners never see during the stretch), then the learners learn from the poisoned batch.
In-process, no Kafka (like ``bench online``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from tgastream.bench.report import write_json
from tgastream.core.settings import Settings

HELP = "a poisoned stretch: online with the guard (rollback), without it, and frozen; HR@10 and AUC over time"

RUNS = ("with_guard", "without_guard", "frozen")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=300, help="synthetic users (default: 300)")
    p.add_argument("--events", type=int, default=12_000, help="synthetic events (default: 12000)")
    p.add_argument("--seed", type=int, default=5, help="synth and model seed (default: 5)")
    p.add_argument("--warmup", type=float, default=0.4, help="share of the samples before the stretch (default: 0.4)")
    p.add_argument("--stretch", type=float, default=0.25, help="share of the samples poisoned (default: 0.25)")
    p.add_argument("--poison-share", type=float, default=1.0,
                   help="share of the stretch's samples with wrong targets / flipped labels (default: 1.0)")
    p.add_argument("--poison", choices=("spam", "shuffled"), default="spam",
                   help="wrong targets: spam (five items) or shuffled (another sample's) (default: spam)")
    p.add_argument("--batch-size", type=int, default=128, help="micro-batch size (default: 128)")
    p.add_argument("--lr", type=float, default=0.003, help="online learning rate (default: 0.003; at 0.05 this model "
                   "stops ranking well even on a clean stream: docs/conversion.md, 'The lr 0.05 regression')")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (default: 10)")
    p.add_argument("--eval-share", type=float, default=0.5, help="share of each batch scored for the curves (default: 0.5)")
    p.add_argument("--segments", type=int, default=12, help="points of the over-time curves (default: 12)")
    p.add_argument("--dim", type=int, default=32, help="model width (default: 32)")
    p.add_argument("--out", type=Path, default=Path("bench-guard"), help="folder for the PNG (default: bench-guard)")
    p.add_argument("--json", type=Path, help="write the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from tgastream.stream.cli import add_setting_flags

    add_setting_flags(p, "guard_margin", "guard_window", "guard_min_retrievals", "guard_min_positives", "shadow_share")
    # the configuration README documents (a small stream: a guard window that fills within it)
    for action in p._actions:
        if action.dest in BENCH_SETTINGS:
            action.default = BENCH_SETTINGS[action.dest]
            action.help = f"{action.help.rsplit(' (default', 1)[0]} (default here: {action.default})"


BENCH_SETTINGS = {"setting_shadow_share": "0.5", "setting_guard_window": "1000", "setting_guard_min_retrievals": "300",
                  "setting_guard_min_positives": "10"}


def poison(samples: list, share: float, rng: random.Random, kind: str = "spam") -> list:
    """A broken stretch: ``share`` of the samples get a wrong retrieval target and a flipped
    conversion label; the rest are returned unchanged (same objects). Targets ``shuffled``: another
    poisoned sample's; ``spam``: one of five items (a bot, or a join that falls back to a few
    defaults), which a fast-learning model learns and then ranks first for everyone."""
    from tgastream.state.samples import RETRIEVAL

    chosen = [k for k in range(len(samples)) if rng.random() < share]
    ret = [k for k in chosen if samples[k].kind == RETRIEVAL]
    targets = [(samples[k].item_id, samples[k].category_id) for k in ret]
    rng.shuffle(targets)
    if kind == "spam":
        few = targets[:5]
        targets = [few[rng.randrange(len(few))] for _ in targets] if few else targets
    out = list(samples)
    for k, (item, cat) in zip(ret, targets):
        out[k] = dataclasses.replace(samples[k], item_id=item, category_id=cat)
    for k in chosen:
        if samples[k].kind != RETRIEVAL:
            out[k] = dataclasses.replace(samples[k], label=1.0 - samples[k].label)
    return out


class Curve:
    """Per-batch outcomes of one served model on the clean samples, in stream order."""

    def __init__(self) -> None:
        self.hits: list[tuple[int, float]] = []  # (position, hit)
        self.conv: list[tuple[int, float, float]] = []  # (position, label, prob)

    def add(self, at: int, ranks: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> None:
        self.hits += [(at, float(r <= 10)) for r in ranks]
        self.conv += [(at, float(y), float(p)) for y, p in zip(labels, probs)]

    def summary(self, lo: int, hi: int) -> dict:
        from tgastream.model.metrics import auc

        h = [x for a, x in self.hits if lo <= a < hi]
        c = [(y, p) for a, y, p in self.conv if lo <= a < hi]
        y = np.asarray([v for v, _ in c])
        p = np.asarray([v for _, v in c])
        return {"hr@10": float(np.mean(h)) if h else None, "auc": auc(y, p) if len(c) else None,
                "retrieval_cases": len(h), "conversion_cases": len(c), "conversion_positives": int((y > 0.5).sum())}


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from tgastream.bench.online import _synthetic
    from tgastream.model.guardrails import Guardrails
    from tgastream.model.online import OnlineLearner
    from tgastream.model.shadow import score_outcomes
    from tgastream.state.checkpoint import save_checkpoint
    from tgastream.state.samples import CONVERSION, RETRIEVAL, samples_from_events
    from tgastream.stream.configs import guardrails_config, online_config, online_model_config

    t0 = time.perf_counter()
    events, _ = _synthetic(args.users, args.events, args.seed, 0.0)
    clean = samples_from_events(events, settings.max_len, settings.sample_len, settings.conversion_window_s,
                                final_watermark=events[-1].ts + 2 * settings.conversion_window_s)
    clean.sort(key=lambda s: s.event_ts)
    bs = args.batch_size
    n = len(clean)
    start = int(args.warmup * n) // bs * bs
    end = start + int(args.stretch * n) // bs * bs
    rng = random.Random(args.seed)
    stream = clean[:start] + poison(clean[start:end], args.poison_share, rng, args.poison) + clean[end:]
    settings = settings.replace(lr=args.lr, dim=args.dim, heads=2, layers=1, device="cpu", seed=args.seed, guard=True)
    learner = OnlineLearner(online_model_config(settings), online_config(settings))
    tmp = tempfile.TemporaryDirectory(prefix="bench-guard-")
    ckpt = Path(tmp.name)
    guard = Guardrails(guardrails_config(settings), learner, ckpt)
    guard.start(None)
    steps = [0]
    history: list[dict] = []

    def guarded_step(batch: list, at: int) -> None:
        learner.vectors(batch)
        learner.score(batch, score_limit=bs)
        guard.before_learn(batch)
        learner.learn(batch)
        steps[0] += 1
        event = guard.after_step()
        if event is not None:
            history.append({"at": at, "step": steps[0], "event": event.kind, "version": event.version,
                            "detail": event.detail})
        if steps[0] % args.checkpoint_every == 0:
            path = save_checkpoint(ckpt, steps[0], {"learner": learner.state_dict()}, protect=guard.protected_files())
            guard.after_checkpoint(path, steps[0], learner.online_metrics())

    batches = [(k, stream[k:k + bs], clean[k:k + bs]) for k in range(0, n, bs)]
    warm = [b for b in batches if b[0] < start]
    rest = [b for b in batches if b[0] >= start]
    for k, batch, _ in tqdm(warm, desc="warm-up (with guard)", unit="batch", disable=args.quiet):
        guarded_step(batch, k)
    unguarded = copy.deepcopy(learner)
    frozen = learner.frozen_copy()
    curves = {name: Curve() for name in RUNS}
    served_versions: list[tuple[int, int, str]] = []
    eval_rng = random.Random(args.seed + 1)
    for k, batch, truth in tqdm(rest, desc="stretch and after (3 models)", unit="batch", disable=args.quiet):
        unguarded.vectors(batch)
        pick = [s for s in truth if eval_rng.random() < args.eval_share]
        conv = [s for s in pick if s.kind == CONVERSION]
        ret = [s for s in pick if s.kind == RETRIEVAL]
        labels = np.asarray([s.label for s in conv])
        learner.vectors(batch)  # rows for the batch's new ids, before anyone scores it
        served = guard.serving
        served_versions.append((k, served.version, guard.state))
        for name, m in (("with_guard", served), ("without_guard", unguarded), ("frozen", frozen)):
            out = score_outcomes(m.model, m.rows, m.device, conv, ret)
            curves[name].add(k - start, out.ranks, labels, out.probs)
        guarded_step(batch, k)
        unguarded.score(batch, score_limit=bs)
        unguarded.learn(batch)
    tmp.cleanup()
    span = (0, end - start)
    after = (end - start, n - start + 1)
    result: dict = {"rollbacks": guard.rollbacks}
    for name in RUNS:
        result[name] = curves[name].summary(*span)
        result[name]["after_stretch"] = curves[name].summary(*after)
    edges = np.linspace(0, n - start, args.segments + 1).round().astype(int)
    edges[-1] += 1
    result["curve"] = {"samples_at": edges[1:].tolist(),
                       **{name: [curves[name].summary(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])] for name in RUNS}}
    result["events"] = history
    result["stretch"] = {"from_sample": start, "to_sample": end, "poison": args.poison, "poison_share": args.poison_share}
    result["served_versions"] = served_versions
    result |= {"samples": n, "seconds": round(time.perf_counter() - t0, 1),
               "guard": {"margin": settings.guard_margin, "window": settings.guard_window,
                         "min_retrievals": settings.guard_min_retrievals, "min_positives": settings.guard_min_positives,
                         "shadow_share": settings.shadow_share},
               "command": f"tgastream bench guard --users {args.users} --events {args.events} --seed {args.seed} "
                          f"--warmup {args.warmup} --stretch {args.stretch} --poison {args.poison} --poison-share {args.poison_share} "
                          f"--lr {args.lr} --batch-size {bs} --shadow-share {settings.shadow_share} "
                          f"--guard-window {settings.guard_window} --guard-min-retrievals {settings.guard_min_retrievals} "
                          f"--guard-min-positives {settings.guard_min_positives}"}
    print(f"\n{n:,} samples; poisoned stretch: samples {start:,}-{end:,} ({args.poison_share:.0%} of them); "
          f"rollbacks {guard.rollbacks}")
    print(f"{'model':<15}{'HR@10 stretch':>15}{'AUC stretch':>13}{'HR@10 after':>13}{'AUC after':>11}")
    for name in RUNS:
        r = result[name]
        print(f"{name:<15}{_fmt(r['hr@10']):>15}{_fmt(r['auc']):>13}{_fmt(r['after_stretch']['hr@10']):>13}"
              f"{_fmt(r['after_stretch']['auc']):>11}")
    for e in history:
        print(f"  step {e['step']:>4} (sample {e['at']:,}): {e['event']} version {e['version']} {e['detail']}")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "guard.png"
    _plot(result, png, (0, end - start))
    print(f"plot: {png}")
    write_json(args.json, result)
    return 0


def _plot(result: dict, path: Path, stretch: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = result["curve"]["samples_at"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in ((axes[0], "hr@10"), (axes[1], "auc")):
        ax.axvspan(*stretch, color="red", alpha=0.08, label="poisoned stretch")
        for name, style in (("with_guard", "-o"), ("without_guard", "-s"), ("frozen", "--^")):
            ys = [np.nan if c[key] is None else c[key] for c in result["curve"][name]]
            ax.plot(xs, ys, style, label=f"{name} ({_fmt(result[name][key])} in the stretch)", markersize=4)
        for e in result["events"]:
            if e["event"] == "rollback":
                ax.axvline(e["at"] - result["stretch"]["from_sample"], color="grey", lw=0.6)
        ax.set_xlabel("samples after the warm-up (grey lines: rollbacks)")
        ax.set_ylabel(f"{key} of the served model (clean samples)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Poisoned stretch: guard ({result['rollbacks']} rollbacks) vs none vs frozen", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
