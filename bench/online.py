"""``tgastream bench online``: online learning (each ``--feedback`` mode) vs a frozen copy and
repeat-recent, judged at the click, on a replayed stream.

The stream is either a synthetic log whose users change their favourite categories halfway
(``synth --drift-at 0.5``, the default) or a real behavior log (``--data FILE``) replayed in time
order. It is turned into the stream workers' samples *in the order a worker emits them*: each
event's samples at its time, window-end negatives at an hourly event-time watermark (as the
workers' partition watermarks), the rest at the end. Conversion is judged at the click
(model/clicktime.py): each click's P(buy) is predicted when its CLICK sample arrives, by the model
of that moment, and joined to its label when the window closes.

Per seed, one learner per feedback mode (``wait``, ``fnw``: model/feedback.py) learns through the
whole stream prequentially; a frozen copy of the ``wait`` learner is taken at the end of the
warm-up (the drift point on synthetic data, ``--warmup`` of the samples on a real log). The cases
are the clicks after the warm-up (all labelled by the end) and the retrieval rows after it: every
model is judged on exactly the same ones. Repeat-recent: a next-event target ranked among the
user's distinct context items (most recent first), everything else tied behind; a click scored by
how often the user touched the clicked item in the context (carts and favs count double), so it
has AUC and GAUC but no logloss or ECE (not a probability).

Figures: AUC, GAUC, logloss, ECE (10 equal-mass bins), HR@10; means over seeds, and ``ci``: 95%
intervals of the difference to ``online_wait`` (mean over seeds), from a paired bootstrap over
users (the same resampled users for both models: cases of one user are not independent).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tgastream.core.errors import CommandError
from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = ("online (each conversion-feedback mode) vs frozen vs repeat-recent, judged at the click: AUC, GAUC, "
        "logloss, ECE, HR@10 over seeds (synthetic drift or --data FILE)")
MODES = ("wait", "fnw")
RESAMPLES = 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="replay this behavior log (Taobao CSV, JSON lines, RetailRocket) instead of synthetic data")
    p.add_argument("--warmup", type=float, default=0.5,
                   help="with --data: share of the samples (stream order) learned before the cases start (default: 0.5)")
    p.add_argument("--max-events", type=int, default=0, help="with --data: only the first N events by time (default: all)")
    p.add_argument("--feedback", default="wait,fnw",
                   help=f"conversion-feedback modes to run, comma-separated, from {', '.join(MODES)}; wait is always "
                        "run (the reference), e.g. --feedback wait,fnw (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="model seeds (0..N-1) per mode; figures are means (default: 1)")
    p.add_argument("--users", type=int, default=1000, help="synthetic users (default: 1000)")
    p.add_argument("--events", type=int, default=40_000, help="synthetic events (default: 40000)")
    p.add_argument("--seed", type=int, default=3, help="synth seed (default: 3)")
    p.add_argument("--drift-at", type=float, default=0.5, help="where preferences change (default: 0.5)")
    p.add_argument("--batch-size", type=int, default=256, help="micro-batch size (default: 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="online learning rate (default: 0.002)")
    p.add_argument("--conversion-snapshot-steps", type=int, default=None, metavar="N",
                   help="online learners predict clicks with a copy refreshed every N steps (conversion_snapshot_steps; "
                        "0 = the newest weights; default: the setting's value, 100)")
    p.add_argument("--conversion-prior", action=argparse.BooleanOptionalAction, default=None,
                   help="online learners' conversion head starts as repeat-interest (conversion_prior; default: the "
                        "setting's value, on)")
    p.add_argument("--conversion-base-rate", type=float, default=None, metavar="RATE",
                   help="online learners' conversion head starts predicting about this buy rate (conversion_base_rate; "
                        "default: the setting's value)")
    p.add_argument("--segments", type=int, default=10, help="points of the over-time curves (default: 10)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = cores - 1 (default: 0)")
    p.add_argument("--out", type=Path, default=Path("bench-online"), help="folder for the PNG (default: bench-online)")
    p.add_argument("--json", type=Path, help="write the result as JSON")


def feedback_modes(text: str) -> list[str]:
    """``wait,fnw`` → ["wait", "fnw"] (wait first, always present); a readable error otherwise."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise CommandError(f"--feedback: unknown mode {bad[0]!r}; choose from {', '.join(MODES)} (e.g. --feedback wait,fnw)")
    return ["wait"] + [m for m in dict.fromkeys(modes) if m != "wait"]


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



# -- the stream, in emission order ----------------------------------------------------------------


def stream_samples(events, settings: Settings, watermark_s: float = 3600.0) -> list:
    """The workers' samples in the order they are emitted: each event's at its time; every
    ``watermark_s`` of event time, the negatives of windows that ended (a partition watermark);
    at the end, the windows still open (the final watermark)."""
    from tgastream.state.samples import UserState

    states: dict = {}
    out: list = []
    window, slen = settings.conversion_window_s, settings.sample_len
    next_mark = events[0].ts + watermark_s if events else 0.0
    for ev in events:
        if ev.ts >= next_mark:
            for st in states.values():
                out.extend(st.expire(ev.ts, window, slen))
            next_mark = ev.ts + watermark_s
        st = states.get(ev.user_id)
        if st is None:
            st = states[ev.user_id] = UserState.new(ev.user_id, settings.max_len)
        out.extend(st.apply(ev, None, window, slen))
    for st in states.values():
        out.extend(st.expire(float("inf"), window, slen))
    return out


# -- the run --------------------------------------------------------------------------------------


class Cases:
    """The judged cases after the warm-up: clicks (key, user, label, stream position) and retrieval
    rows (user, stream position), and the users coded 0..U-1 for the bootstrap."""

    def __init__(self, samples: list, cut: int) -> None:
        from tgastream.state.samples import CLICK, CONVERSION, RETRIEVAL

        # a key (user, item, click time) may recur once its window closed (day-resolution logs): the
        # n-th click of a key goes with its n-th label, so cases are (key, occurrence)
        labels: dict = {}
        for s in samples:
            if s.kind == CONVERSION:
                labels.setdefault(s.click_key, []).append(float(s.label))
        seen: dict = {}
        self.before_cut: dict = {}
        clicks = []
        for j, s in enumerate(samples):
            if j == cut:
                self.before_cut = {k: n + 1 for k, n in seen.items()}  # clicks of each key in the warm-up
            if s.kind == CLICK:
                n = seen[s.click_key] = seen.get(s.click_key, -1) + 1
                if j >= cut and n < len(labels.get(s.click_key, [])):
                    clicks.append((s, n, j - cut))
        after = samples[cut:]
        self.clicks = [s for s, _n, _j in clicks]
        self.keys = [(s.click_key, n) for s, n, _j in clicks]
        self.labels = np.asarray([labels[k][n] for k, n in self.keys])  # [C]
        self.click_at = np.asarray([j for _s, _n, j in clicks])  # [C]
        pos = {id(s): cut + j for j, s in enumerate(after)}
        self.retrievals = [s for s in after if s.kind == RETRIEVAL]
        self.rank_at = np.asarray([pos[id(s)] - cut for s in self.retrievals])  # [R]
        users = sorted({s.user_id for s in self.clicks} | {s.user_id for s in self.retrievals})
        code = {u: k for k, u in enumerate(users)}
        self.click_user = np.asarray([code[s.user_id] for s in self.clicks], dtype=np.int64)  # [C]
        self.rank_user = np.asarray([code[s.user_id] for s in self.retrievals], dtype=np.int64)  # [R]
        self.n_users = len(users)
        self.n_after = len(after)


def _probs(history: list, keys: list, skipped: dict | None = None) -> np.ndarray:
    """Each case's (key, occurrence) click-time prediction from a store's history; ``skipped``:
    occurrences of each key before the model started predicting (a frozen copy's warm-up)."""
    by_key: dict = {}
    for k, _v, row in history:
        by_key.setdefault(k, []).append(row[0])
    skipped = skipped or {}
    out = []
    for k, n in keys:
        got, m = by_key.get(k, ()), n - skipped.get(k, 0)
        out.append(got[m] if 0 <= m < len(got) else np.nan)
    return np.asarray(out)


def _weighted_ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int = 10) -> float | None:
    """ECE over ``bins`` equal-mass bins where case i weighs w[i] (w = 1: model.metrics.ece)."""
    keep = w > 0
    y, p, w = y[keep], p[keep], w[keep]
    if not len(p):
        return None
    order = np.argsort(p, kind="mergesort")
    y, p, w = y[order], p[order], w[order]
    cum = np.cumsum(w) - w  # weight before each case
    b = np.minimum((cum / w.sum() * bins).astype(int), bins - 1)  # [C] bin of each case
    tot = np.bincount(b, weights=w, minlength=bins)
    gap = np.abs(np.bincount(b, weights=w * p, minlength=bins) - np.bincount(b, weights=w * y, minlength=bins))
    return float(gap.sum() / tot.sum())


def figures(cases: Cases, probs: np.ndarray | None, ranks: np.ndarray, calibrated: bool,
            w_user: np.ndarray | None = None, aucs=None) -> dict[str, float | None]:
    """AUC, GAUC, logloss, ECE of the click cases and HR@10 of the retrieval rows, with users
    weighted by ``w_user`` [U] (a bootstrap draw; default 1)."""
    from tgastream.model.metrics import gauc_of, group_aucs, weighted_auc

    w = np.ones(cases.n_users) if w_user is None else w_user
    out: dict[str, float | None] = {"auc": None, "gauc": None, "logloss": None, "ece": None, "hr@10": None}
    if probs is not None and len(probs):
        y, wc = cases.labels, w[cases.click_user]
        out["auc"] = weighted_auc(y, probs, wc)
        aucs = aucs if aucs is not None else group_aucs(y, probs, cases.click_user)
        out["gauc"] = gauc_of(aucs[0], aucs[1], w[: len(aucs[0])])
        if calibrated:
            p = np.clip(probs, 1e-7, 1 - 1e-7)
            out["logloss"] = float((wc * -(y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / wc.sum())
            out["ece"] = _weighted_ece(y, probs, wc)
    if len(ranks):
        wr = w[cases.rank_user]
        out["hr@10"] = float((wr * (ranks <= 10)).sum() / wr.sum()) if wr.sum() > 0 else None
    return out


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from tgastream.model.metrics import reliability
    from tgastream.model.online import OnlineLearner
    from tgastream.model.shadow import repeat_interest, repeat_rank  # the trainer's shadow scores the same
    from tgastream.stream.configs import online_config, online_model_config

    modes = feedback_modes(args.feedback)
    if args.seeds < 1:
        raise CommandError("--seeds must be >= 1")
    given = {name: value for name, value in (("conversion_prior", args.conversion_prior),
                                             ("conversion_base_rate", args.conversion_base_rate),
                                             ("conversion_snapshot_steps", args.conversion_snapshot_steps))
             if value is not None}  # (Settings.validate refuses a bad value in one line)
    settings = settings.replace(device=args.device, lr=args.lr, threads=args.threads, **given)
    if args.data is not None:
        events = _real(args.data, args.max_events)
        source = f"{args.data} ({len(events):,} events{', capped' if args.max_events else ''})"
    else:
        events, drift_ts = _synthetic(args.users, args.events, args.seed, args.drift_at)
        source = f"synthetic, drift at {args.drift_at}"
    samples = stream_samples(events, settings)
    bs = args.batch_size
    if args.data is not None:
        cut = int(round(args.warmup * len(samples) / bs)) * bs
    else:
        cut = next((j for j, s in enumerate(samples) if s.event_ts >= drift_ts), len(samples)) // bs * bs
    cases = Cases(samples, cut)
    n_items = len({e.item_id for e in events})
    t0 = time.perf_counter()
    probs: dict[str, list[np.ndarray | None]] = {f"online_{m}": [] for m in modes} | {"frozen": [], "repeat": []}
    ranks: dict[str, list[np.ndarray]] = {k: [] for k in probs}
    seen_items = {s.item_id for s in samples[:cut]} | {it for s in samples[:cut] for it in s.graph.item_ids}
    rep = []
    for s in cases.retrievals:  # repeat-recent: the catalogue seen before each row's batch (approximately: before it)
        rep.append(repeat_rank(s, len(seen_items)))
        seen_items.add(s.item_id)
    rep_ranks = np.asarray(rep)
    rep_probs = np.asarray([repeat_interest(s) for s in cases.clicks], dtype=float)
    for seed in range(args.seeds):
        for mode in modes:
            # rank every retrieval row of a batch over the whole catalogue (no sampled rows)
            cfg = online_config(settings.replace(seed=seed, conversion_feedback=mode), metric_window=10**9,
                                rank_budget=bs * (n_items + 4096))
            learner = OnlineLearner(online_model_config(settings), cfg)
            learner.clicktime.history = []
            frozen = None
            for k in tqdm(range(0, len(samples), bs), desc=f"seed {seed} online_{mode}", unit="batch", leave=False):
                if k == cut:
                    learner.metrics = type(learner.metrics)(window=10**9)  # ranks after the warm-up only
                    if mode == "wait":
                        frozen = learner.frozen_copy()
                        frozen.clicktime.history = []
                if frozen is not None:
                    frozen.step(samples[k:k + bs])
                learner.step(samples[k:k + bs])
            probs[f"online_{mode}"].append(_probs(learner.clicktime.history, cases.keys))
            ranks[f"online_{mode}"].append(np.asarray(learner.metrics.ranks))
            if frozen is not None:
                probs["frozen"].append(_probs(frozen.clicktime.history, cases.keys, cases.before_cut))
                ranks["frozen"].append(np.asarray(frozen.metrics.ranks))
        probs["repeat"].append(rep_probs)
        ranks["repeat"].append(rep_ranks)
    seconds = time.perf_counter() - t0
    result = summarize(cases, probs, ranks, args.seeds)
    edges = np.linspace(0, cases.n_after, args.segments + 1).round().astype(int)
    edges[-1] = cases.n_after + 1
    result["curve"] = {"samples_at": edges[1:].tolist(),
                       **{m: curve(cases, probs[m], edges, m != "repeat", ranks[m]) for m in probs}}
    result["reliability"] = {m: reliability(cases.labels, np.nanmean(np.stack(probs[m]), 0), 10)
                             for m in probs if m != "repeat"}
    cmd = (f"tgastream bench online --data {args.data} --warmup {args.warmup}"
           + (f" --max-events {args.max_events}" if args.max_events else "") if args.data is not None else
           f"tgastream bench online --users {args.users} --events {args.events} --seed {args.seed} "
           f"--drift-at {args.drift_at}") + f" --feedback {','.join(modes)} --seeds {args.seeds} --lr {args.lr}"
    cmd += f" --conversion-snapshot-steps {settings.conversion_snapshot_steps}"
    cmd += " --conversion-prior" if settings.conversion_prior else " --no-conversion-prior"
    cmd += f" --conversion-base-rate {settings.conversion_base_rate:g}"
    result |= {"source": source, "samples": len(samples), "warmup_samples": cut, "after_samples": cases.n_after,
               "items": n_items, "seconds": round(seconds, 1), "device": str(settings.device), "command": cmd,
               "judged": "at the click: each click's P(buy) by the model when its CLICK sample arrived"}
    after = "the warm-up" if args.data is not None else "the drift"
    print(f"\nafter {after}: {cases.n_after:,} samples: {len(cases.retrievals):,} next events ranked over up to "
          f"{n_items:,} items, {len(cases.clicks):,} clicks judged at the click ({int(cases.labels.sum()):,} bought); "
          f"{args.seeds} seed(s)")
    print(f"{'model':<14}{'AUC':>8}{'GAUC':>8}{'logloss':>9}{'ECE':>8}{'HR@10':>8}   95% CI of AUC / logloss vs online_wait")
    for name, r in result["models"].items():
        ci = r.get("ci", {})
        print(f"{name:<14}{_fmt(r['auc']):>8}{_fmt(r['gauc']):>8}{_fmt(r['logloss']):>9}{_fmt(r['ece']):>8}"
              f"{_fmt(r['hr@10']):>8}   {_ci(ci.get('auc'))} / {_ci(ci.get('logloss'))}")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "online_clicktime.png"
    _plot(result, png, f"Judged at the click, after {after}: {source}")
    print(f"plot: {png}")
    write_json(args.json, result)
    return 0


def summarize(cases: Cases, probs: dict, ranks: dict, seeds: int) -> dict:
    """Per model: figures averaged over seeds, case counts, and paired bootstrap intervals of the
    difference to online_wait (the same user draws for every model and seed)."""
    from tgastream.model.metrics import bootstrap_user_weights, group_aucs

    draws = bootstrap_user_weights(np.arange(cases.n_users), RESAMPLES, seed=0)  # [B, U]
    keys = ("auc", "gauc", "logloss", "ece", "hr@10")

    def per_seed(m: str, w: np.ndarray | None) -> list[dict]:
        out = []
        for s in range(len(probs[m])):
            p = probs[m][s]
            ok = p is not None and not np.isnan(p).any()
            aucs = group_aucs(cases.labels, p, cases.click_user) if ok else None
            out.append(figures(cases, p if ok else None, ranks[m][s], m != "repeat", w, aucs))
        return out

    def mean(rows: list[dict], k: str) -> float | None:
        vals = [r[k] for r in rows if r[k] is not None]
        return float(np.mean(vals)) if vals else None

    # group AUCs do not depend on the draw: computed once per model and seed
    cache = {m: [group_aucs(cases.labels, p, cases.click_user) if p is not None and not np.isnan(p).any() else None
                 for p in probs[m]] for m in probs}
    boot = {m: [] for m in probs}
    for w in draws:
        for m in probs:
            rows = [figures(cases, p if a is not None else None, ranks[m][s], m != "repeat", w, a)
                    for s, (p, a) in enumerate(zip(probs[m], cache[m]))]
            boot[m].append({k: mean(rows, k) for k in keys})
    models = {}
    for m in probs:
        rows = per_seed(m, None)
        entry: dict = {k: mean(rows, k) for k in keys}
        entry |= {"clicks": len(cases.clicks), "buys": int(cases.labels.sum()), "retrieval_cases": len(cases.retrievals),
                  "seeds": len(rows), "per_seed": rows}
        if m != "online_wait":
            ci = {}
            for k in keys:
                diffs = [b[k] - r[k] for b, r in zip(boot[m], boot["online_wait"]) if b[k] is not None and r[k] is not None]
                ci[k] = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))] if diffs else None
            entry["ci"] = ci
        models[m] = entry
    return {"models": models, "ci_method": f"paired bootstrap over users ({RESAMPLES} draws), difference to online_wait "
                                           "of the mean over seeds, 2.5-97.5 percentiles"}


def curve(cases: Cases, probs: list, edges: np.ndarray, calibrated: bool, ranks: list) -> list[dict]:
    """Click-time AUC, logloss and ECE (mean prediction over seeds) and HR@10 (mean over seeds of
    the model's ``ranks`` [R] per seed) per stretch of the stream."""
    from tgastream.model.metrics import auc, ece, logloss

    p = np.nanmean(np.stack([x for x in probs if x is not None]), 0) if probs else np.zeros(0)
    hits = np.stack([np.asarray(r) <= 10 for r in ranks]).astype(float)  # [S, R]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sp = (cases.click_at >= lo) & (cases.click_at < hi)
        sr = (cases.rank_at >= lo) & (cases.rank_at < hi)
        y = cases.labels[sp]
        out.append({"auc": auc(y, p[sp]) if sp.any() else None,
                    "logloss": logloss(y, p[sp]) if calibrated and sp.any() else None,
                    "ece": ece(y, p[sp]) if calibrated and sp.any() else None,
                    "clicks": int(sp.sum()), "buys": int(y.sum()),
                    "hr@10": float(hits[:, sr].mean()) if sr.any() else None,
                    "next_events": int(sr.sum())})
    return out


def _plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = result["curve"]["samples_at"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = ["-o", "-D", "-v", "-x"]
    names = list(result["models"])
    for ax, key, label in ((axes[0], "auc", "click-time conversion AUC"), (axes[1], "logloss", "click-time logloss")):
        for j, name in enumerate(names):
            ys = [np.nan if c[key] is None else c[key] for c in result["curve"][name]]
            if all(np.isnan(ys)):
                continue
            ax.plot(xs, ys, "--^" if name == "repeat" else styles[j % len(styles)],
                    label=f"{name} ({_fmt(result['models'][name][key])})", markersize=4)
        ax.set_xlabel("samples after the warm-up")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    top = 0.0
    for j, (name, rows) in enumerate(result["reliability"].items()):
        mp, rate = [r["mean_prob"] for r in rows], [r["rate"] for r in rows]
        top = max(top, *mp, *rate) if rows else top
        ax.plot(mp, rate, styles[j % len(styles)], label=f"{name} (ECE {_fmt(result['models'][name]['ece'])})",
                markersize=4)
    ax.plot([0, top or 1], [0, top or 1], ":", color="grey", label="calibrated")
    ax.set_xlabel("mean predicted P(buy) (10 equal-mass bins)")
    ax.set_ylabel("observed buy rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _ci(c: list[float] | None) -> str:
    return "" if not c else f"[{c[0]:+.4f}, {c[1]:+.4f}]"
