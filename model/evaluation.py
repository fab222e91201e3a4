"""Offline evaluation: a time-ordered split, every model trained on the past and tested on the future.

Protocol (no future leakage):

- events are ordered by time; ``split_ts`` is the time of the first event of the last 20% (so
  "train on the first 80% of time" means the first 80% of events); the last ``valid_share`` of
  the training period (``fit_ts`` .. ``split_ts``) is held out for early stopping;
- samples are exactly what the stream workers emit (:class:`state.samples.UserState`), and each
  one is used for training only once its label was known: a retrieval sample at its event, a
  conversion click when its window closed (click + 24 h, bought or not, so positives are not
  over-represented near the cut). Training uses labels known before ``fit_ts``; validation labels
  known in ``[fit_ts, split_ts)``; test every sample whose event (retrieval target, conversion
  click) is at or after ``split_ts``. Clicks of the last window before the split are used by
  neither side;
- the item/category vocabulary (embedding rows) comes from the training period only: items first
  seen later have no row and fall back to their category embedding (the pointer can still point
  at them through node states);
- test contexts hold every event before the target (the stream sees them too); retrieval ranks
  the target among *all* items that exist at that time, i.e. seen in the log before it (mid-rank
  on ties), no sampled negatives. Items that first appear later are not candidates: ranking
  them would leak that they are about to be interacted with (their missing embedding row would
  single them out). A target seen for the first time can't be ranked and counts as a miss.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from tgastream.model.base import SequenceRecommender
from tgastream.model.batching import EncodedSamples, Vocabs, encode_samples, to_batch
from tgastream.model.config import ModelConfig, TrainConfig
from tgastream.model.device import resolve_device
from tgastream.model.din import DIN
from tgastream.model.metrics import auc, logloss, ranking_metrics, ranks_of_targets
from tgastream.model.sasrec import SASRec
from tgastream.model.tga import TGA
from tgastream.model.training import fit
from tgastream.model.vocab import InMemoryVocab
from tgastream.state.samples import CONVERSION, RETRIEVAL, Sample, UserState
from tgastream.core.events import BEHAVIOR_CODE, Event
from tgastream.core.settings import CONVERSION_WINDOW_S, DIM, HEADS, LAYERS, MAX_LEN, SAMPLE_LEN

NEURAL = {"tga": (TGA, True), "tga_nocopy": (TGA, False), "sasrec": (SASRec, False),
          "sasrec_copy": (SASRec, True), "din": (DIN, False)}
"""Neural model keys → (class, pointer on). ``tga_nocopy`` and ``sasrec_copy`` are ablations."""
ALL_MODELS = ("tga", "sasrec", "din", "pop", "repeat", "tga_nocopy", "sasrec_copy")
METRIC_KEYS = ("auc", "logloss", "hr@10", "ndcg@10", "mrr", "buy_hr@10", "buy_ndcg@10",
               "train_samples_per_s", "params")
BUY = BEHAVIOR_CODE["buy"]


@dataclass(frozen=True)
class EvalConfig:
    split: float = 0.8
    valid_share: float = 0.1
    max_len: int = MAX_LEN
    sample_len: int = SAMPLE_LEN
    window_s: float = CONVERSION_WINDOW_S  # click → buy conversion window
    pop_window_s: float = 86_400.0  # most-popular baseline: events counted over the last day
    k: int = 10
    models: tuple[str, ...] = ("tga", "sasrec", "din", "pop", "repeat")
    dim: int = DIM
    layers: int = LAYERS
    heads: int = HEADS
    ffn_mult: int = 1
    dropout: float = 0.2
    model_overrides: tuple[tuple[str, object], ...] = ()  # extra ModelConfig fields, e.g. (("logq", False),)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    eval_batch: int = 512
    max_test_cases: int = 0  # 0 = every test sample; else a seeded subsample of each kind

    def validate(self) -> "EvalConfig":
        if not 0.0 < self.split < 1.0:
            raise ValueError(f"split must be in (0, 1), got {self.split}")
        if not 0.0 <= self.valid_share < 1.0:
            raise ValueError(f"valid_share must be in [0, 1), got {self.valid_share}")
        unknown = [m for m in self.models if m not in ALL_MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
        if self.sample_len > self.max_len:
            raise ValueError("sample_len must be <= max_len")
        return self


@dataclass
class EvalData:
    """Encoded train/valid/test samples plus what ranking needs."""

    train: EncodedSamples
    valid: EncodedSamples
    test: EncodedSamples
    vocabs: Vocabs
    catalogue_rows: np.ndarray  # [C] embedding row of every item of the log (0 = no row)
    catalogue_cats: np.ndarray  # [C] category row of every item of the log
    event_ts: np.ndarray  # [E] every event's time, sorted
    event_keys: np.ndarray  # [E] catalogue key (index + 1) of every event's item
    first_seen: np.ndarray  # [C] time of each item's first event: it is a candidate strictly after
    split_ts: float
    fit_ts: float
    info: dict


class _Encoder:
    """Collects samples and encodes them in chunks (keeps memory flat on big logs)."""

    def __init__(self, vocabs: Vocabs, keys: InMemoryVocab, chunk: int = 8192) -> None:
        self.vocabs, self.keys, self.chunk = vocabs, keys, chunk
        self.pending: list[Sample] = []
        self.parts: list[EncodedSamples] = []

    def add(self, s: Sample) -> None:
        self.pending.append(s)
        if len(self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.parts.append(encode_samples(self.pending, self.vocabs, self.keys))
            self.pending = []

    def result(self) -> EncodedSamples:
        self.flush()
        if not self.parts:
            return encode_samples([], self.vocabs, self.keys)
        return EncodedSamples.concat(self.parts)


def build_data(events: Sequence[Event], cfg: EvalConfig, progress: bool = True) -> EvalData:
    """Split a log by time and turn it into encoded samples (see the module docstring)."""
    if len(events) < 10:
        raise ValueError(f"need at least 10 events to split, got {len(events)}")
    events = sorted(events, key=lambda e: e.ts)  # stable: a user's equal-time events keep file order
    ts = np.fromiter((e.ts for e in events), dtype=np.float64, count=len(events))
    n = len(events)
    split_ts = float(ts[min(int(cfg.split * n), n - 1)])
    fit_ts = float(ts[int(cfg.split * (1 - cfg.valid_share) * n)]) if cfg.valid_share else split_ts
    catalogue = InMemoryVocab(e.item_id for e in events)
    category_of: dict[str, str] = {}
    for e in events:
        category_of.setdefault(e.item_id, e.category_id)
    fit_events = [e for e in events if e.ts < fit_ts]
    vocabs = Vocabs(InMemoryVocab(e.item_id for e in fit_events), InMemoryVocab(e.category_id for e in fit_events))
    items = catalogue.ids()
    catalogue_rows = vocabs.items.lookup(items)
    catalogue_cats = vocabs.categories.lookup([category_of[i] for i in items])
    out = {name: _Encoder(vocabs, catalogue) for name in ("train", "valid", "test")}
    states: dict[str, UserState] = {}

    def route(s: Sample) -> None:
        if len(s.graph) == 0:
            return  # the click left the graph window before its label closed: no context
        if s.event_ts >= split_ts:
            out["test"].add(s)
            return
        # a label is known once its window has closed: a retrieval target at its event, a
        # conversion click at click + window whether bought or not (so both labels are complete)
        known_at = s.event_ts if s.kind == RETRIEVAL else s.event_ts + cfg.window_s
        if known_at < fit_ts:
            out["train"].add(s)
        elif known_at < split_ts and (s.kind != RETRIEVAL or s.event_ts >= fit_ts):
            out["valid"].add(s)

    for ev in tqdm(events, desc="samples", disable=None if progress else True, unit="ev", mininterval=1.0, leave=False):
        st = states.get(ev.user_id)
        if st is None:
            st = states[ev.user_id] = UserState.new(ev.user_id, cfg.max_len)
        for s in st.apply(ev, None, cfg.window_s, cfg.sample_len):
            route(s)
    for st in states.values():  # end of the log: every open window closes (label as observed)
        for s in st.expire(math.inf, cfg.window_s, cfg.sample_len):
            route(s)
    enc = {name: e.result() for name, e in out.items()}
    test = enc["test"]
    info = {
        "events": n, "users": len(states), "items": len(catalogue) - 1,
        "items_with_row": len(vocabs.items) - 1, "split_ts": split_ts, "fit_ts": fit_ts,
        "train_samples": len(enc["train"]), "valid_samples": len(enc["valid"]),
        "conversion_positives": int((test.label[test.kind == CONVERSION] > 0).sum()),
    }
    event_keys = catalogue.lookup([e.item_id for e in events])
    first_seen = np.full(len(items), np.inf)
    np.minimum.at(first_seen, event_keys - 1, ts)
    return EvalData(enc["train"], enc["valid"], test, vocabs, catalogue_rows, catalogue_cats, ts, event_keys,
                    first_seen, split_ts, fit_ts, info)


# -- neural models ------------------------------------------------------------------------------


def build_model(name: str, cfg: EvalConfig, data: EvalData) -> SequenceRecommender:
    cls, copy = NEURAL[name]
    mc = ModelConfig(n_items=len(data.vocabs.items), n_categories=len(data.vocabs.categories), dim=cfg.dim,
                     layers=cfg.layers, heads=cfg.heads, ffn_mult=cfg.ffn_mult, dropout=cfg.dropout, copy=copy,
                     max_positions=max(cfg.sample_len, 8), **dict(cfg.model_overrides))
    return cls(mc)


@torch.no_grad()
def retrieval_ranks(model: SequenceRecommender, data: EvalData, enc: EncodedSamples, idx: np.ndarray,
                    device: torch.device, batch: int) -> np.ndarray:
    """Mid-ranks of the targets of rows ``idx`` among every item seen before the target's time."""
    model.eval()
    rows = torch.from_numpy(data.catalogue_rows).to(device)
    cats = torch.from_numpy(data.catalogue_cats).to(device)
    first_seen = torch.from_numpy(data.first_seen).to(device)
    vectors, bias = model.item_vectors(rows, cats)  # [C, d], [C]
    ranks = []
    for start in range(0, len(idx), batch):
        sel = idx[start:start + batch]
        b = to_batch(enc, sel, device)
        z = model.score_catalogue(b, vectors, bias)  # [B, C]
        ts = torch.from_numpy(enc.event_ts[sel]).to(device)
        ranks.append(ranks_of_targets(z, b.target_key - 1, first_seen < ts.unsqueeze(1)).cpu().numpy())
    return np.concatenate(ranks) if ranks else np.zeros(0)


@torch.no_grad()
def conversion_probs(model: SequenceRecommender, enc: EncodedSamples, idx: np.ndarray, device: torch.device,
                     batch: int) -> np.ndarray:
    model.eval()
    out = [model.conversion_proba(to_batch(enc, idx[s:s + batch], device)).cpu().numpy()
           for s in range(0, len(idx), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def _validation_score(data: EvalData, device: torch.device, batch: int, cap: int = 0, seed: int = 0):
    """Early-stopping score on the validation samples (at most ``cap`` of each kind, seeded)."""
    ret = _subsample(np.flatnonzero(data.valid.kind == RETRIEVAL), cap, seed)
    conv = _subsample(np.flatnonzero(data.valid.kind == CONVERSION), cap, seed)

    def score(model: SequenceRecommender) -> float:
        """Lower is better: -MRR of full ranking (what retrieval is judged by) + conversion logloss."""
        total = 0.0
        if model.does_retrieval and len(ret):
            ranks = retrieval_ranks(model, data, data.valid, ret, device, batch)
            total -= ranking_metrics(ranks)["mrr"]
        if model.does_conversion and len(conv):
            p = conversion_probs(model, data.valid, conv, device, batch)
            total += logloss(data.valid.label[conv], p) or 0.0
        return total

    return score


def evaluate_neural(name: str, cfg: EvalConfig, data: EvalData, device: torch.device, test_ret: np.ndarray,
                    test_conv: np.ndarray, progress: bool = True) -> dict:
    torch.manual_seed(cfg.train.seed)
    model = build_model(name, cfg, data).to(device)
    validate = (_validation_score(data, device, cfg.eval_batch, cfg.max_test_cases, cfg.train.seed)
                if len(data.valid) else None)
    res = fit(model, data.train, cfg.train, device, validate, desc=name, progress=progress)
    row = _empty_row()
    row["params"] = sum(p.numel() for p in model.parameters())
    row["train_samples_per_s"] = round(res.samples_per_s, 1)
    row["epochs"] = res.epochs
    row["best_epoch"] = res.best_epoch
    row["train_seconds"] = round(res.seconds, 1)
    if model.does_retrieval:
        ranks = retrieval_ranks(model, data, data.test, test_ret, device, cfg.eval_batch)
        row.update(_ranking_row(ranks, data.test.target_behavior[test_ret] == BUY, cfg.k))
    if model.does_conversion and len(test_conv):
        p = conversion_probs(model, data.test, test_conv, device, cfg.eval_batch)
        y = data.test.label[test_conv]
        row["auc"], row["logloss"] = auc(y, p), logloss(y, p)
    return row


# -- non-neural baselines -----------------------------------------------------------------------


def popularity_ranks(data: EvalData, idx: np.ndarray, window_s: float, refresh_s: float = 3600.0) -> np.ndarray:
    """Most-popular baseline: items ranked by event count in [t0 - window, t0), t0 = the start of
    the target's hour (counts refreshed hourly, only events strictly before t0)."""
    ts = data.test.event_ts[idx]
    target = data.test.target_key[idx].astype(np.int64) - 1
    seen_order = np.sort(data.first_seen)
    ranks = np.empty(len(idx))
    hours = np.floor(ts / refresh_s)
    for h in np.unique(hours):
        t0 = h * refresh_s
        lo, hi = np.searchsorted(data.event_ts, [t0 - window_s, t0], side="left")
        counts = np.bincount(data.event_keys[lo:hi] - 1, minlength=len(data.first_seen))  # [C]
        ordered = np.sort(counts[data.first_seen < t0])  # candidates at t0
        sel = np.flatnonzero(hours == h)
        c = counts[target[sel]]
        above = len(ordered) - np.searchsorted(ordered, c, side="right")
        ties = np.searchsorted(ordered, c, side="right") - np.searchsorted(ordered, c, side="left")
        # items first seen in [t0, t) are candidates too, with count 0
        new = np.searchsorted(seen_order, ts[sel], side="left") - np.searchsorted(seen_order, t0, side="left")
        ties = ties + np.where(c == 0, new, 0) - 1
        rank = 1.0 + above + ties / 2.0
        n_cand = np.searchsorted(seen_order, ts[sel], side="left")
        ranks[sel] = np.where(data.first_seen[target[sel]] < ts[sel], rank, n_cand + 1.0)
    return ranks


def repeat_ranks(data: EvalData, idx: np.ndarray) -> np.ndarray:
    """Repeat-recent baseline: the user's distinct items in the context, most recent first;
    every other candidate tied after them."""
    seen_order = np.sort(data.first_seen)
    out = np.empty(len(idx))
    for o, i in enumerate(idx):
        keys = data.test.keys[i, :data.test.lengths[i]][::-1]
        _, first = np.unique(keys, return_index=True)
        distinct = keys[np.sort(first)]  # most recent first
        hit = np.flatnonzero(distinct == data.test.target_key[i])
        nd = len(distinct)
        n_cand = np.searchsorted(seen_order, data.test.event_ts[i], side="left")
        if len(hit):
            out[o] = hit[0] + 1.0
        elif data.first_seen[data.test.target_key[i] - 1] < data.test.event_ts[i]:
            out[o] = 1.0 + nd + (n_cand - nd - 1) / 2.0
        else:
            out[o] = n_cand + 1.0
    return out


# -- the run ------------------------------------------------------------------------------------


def _empty_row() -> dict:
    return {key: None for key in METRIC_KEYS}


def _ranking_row(ranks: np.ndarray, buy: np.ndarray, k: int) -> dict:
    a, b = ranking_metrics(ranks, k), ranking_metrics(ranks[buy], k)
    return {f"hr@{k}": a["hr"], f"ndcg@{k}": a["ndcg"], "mrr": a["mrr"], f"buy_hr@{k}": b["hr"], f"buy_ndcg@{k}": b["ndcg"]}


def _subsample(idx: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if not limit or len(idx) <= limit:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))


def run(events: Sequence[Event], cfg: EvalConfig, progress: bool = True) -> dict:
    """Build the split, train and test every model; returns the JSON-ready result."""
    cfg.validate()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    data = build_data(events, cfg, progress)
    test_ret = _subsample(np.flatnonzero(data.test.kind == RETRIEVAL), cfg.max_test_cases, cfg.train.seed)
    test_conv = _subsample(np.flatnonzero(data.test.kind == CONVERSION), cfg.max_test_cases, cfg.train.seed)
    buy = data.test.target_behavior[test_ret] == BUY
    if progress:
        print(f"{data.info['events']:,} events, {data.info['users']:,} users, {data.info['items']:,} items; "
              f"train {data.info['train_samples']:,} / valid {data.info['valid_samples']:,} samples; test: "
              f"{len(test_ret):,} next events ({int(buy.sum())} buys), {len(test_conv):,} clicks "
              f"({int((data.test.label[test_conv] > 0).sum())} bought); device {device}", flush=True)
    models: dict[str, dict] = {}
    for name in cfg.models:
        t1 = time.perf_counter()
        if name in NEURAL:
            models[name] = evaluate_neural(name, cfg, data, device, test_ret, test_conv, progress)
        else:
            row = _empty_row()
            ranks = (popularity_ranks(data, test_ret, cfg.pop_window_s) if name == "pop"
                     else repeat_ranks(data, test_ret))
            row.update(_ranking_row(ranks, buy, cfg.k))
            models[name] = row
        if progress:
            print(f"  {name}: done in {time.perf_counter() - t1:.1f}s", flush=True)
    return {
        "models": models,
        "test_cases": {"retrieval": int(len(test_ret)), "buy": int(buy.sum()), "conversion": int(len(test_conv))},
        "data": {**data.info, "conversion_positives": int((data.test.label[test_conv] > 0).sum())},
        "config": _jsonable(asdict(cfg)) | {"device": str(device)},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _jsonable(d: dict) -> dict:
    return {k: (_jsonable(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# -- reporting ----------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """The results as a fixed-width text table (one row per model)."""
    cols = [("model", "{}"), ("auc", "{:.4f}"), ("logloss", "{:.4f}"), ("hr@10", "{:.4f}"), ("ndcg@10", "{:.4f}"),
            ("mrr", "{:.4f}"), ("buy_hr@10", "{:.4f}"), ("buy_ndcg@10", "{:.4f}"),
            ("train_samples_per_s", "{:,.0f}"), ("params", "{:,}")]
    header = ["model", "AUC", "logloss", "HR@10", "NDCG@10", "MRR", "buy HR@10", "buy NDCG@10", "train samples/s", "params"]
    rows = [header]
    for name, m in result["models"].items():
        rows.append([name] + [("-" if m.get(k) is None else f.format(m[k])) for k, f in cols[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    tc = result["test_cases"]
    lines.append(f"test cases: {tc['retrieval']:,} next events (full ranking over {result['data']['items']:,} items), "
                 f"{tc['buy']:,} buy targets, {tc['conversion']:,} conversion clicks "
                 f"({result['data']['conversion_positives']:,} bought)")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Metrics of every model side by side (one panel per metric) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("hr@10", "HR@10 (all next events)"), ("ndcg@10", "NDCG@10"), ("buy_hr@10", "HR@10 (buy targets)"),
               ("auc", "conversion AUC")]
    names = list(result["models"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, (key, title) in zip(axes, metrics):
        vals = [result["models"][n].get(key) for n in names]
        xs = [i for i, v in enumerate(vals) if v is not None]
        bars = ax.bar([names[i] for i in xs], [vals[i] for i in xs],
                      color=["tab:red" if names[i].startswith("tga") else "tab:gray" for i in xs])
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        if key == "auc":
            ax.set_ylim(0.4, 1.0)
    tc = result["test_cases"]
    fig.suptitle(f"time-ordered split: {tc['retrieval']:,} next events, {tc['buy']} buys, "
                 f"{tc['conversion']:,} conversion clicks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
