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
  neither side. Test clicks of the log's last conversion window are right-censored (a later buy
  is unseen) and are left out of conversion scoring for every model (:func:`uncensored_clicks`);
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
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from tgastream.model.base import SequenceRecommender
from tgastream.model.batching import EncodedSamples, Vocabs, encode_samples, to_batch
from tgastream.model.config import ModelConfig, TrainConfig
from tgastream.model.device import resolve_device
from tgastream.model.din import DIN
from tgastream.model.covisit import (Covisitation, CovisitConfig, rank_from_scores, recent_distinct,
                                     repeat_covisit_scores)
from tgastream.model.metrics import (auc, bootstrap_interval, bootstrap_user_weights, gauc_of, group_aucs, hit_rate,
                                     ece, logloss, ranking_metrics, ranks_of_targets, weighted_auc)
from tgastream.model.sasrec import SASRec
from tgastream.model.tga import TGA
from tgastream.model.training import finetune_conversion, fit
from tgastream.model.vocab import InMemoryVocab
from tgastream.state.samples import CLICK, CONVERSION, RETRIEVAL, Sample, UserState
from tgastream.core.events import BEHAVIOR_CODE, Event
from tgastream.core.settings import CONVERSION_WINDOW_S, DIM, HEADS, LAYERS, MAX_LEN, SAMPLE_LEN

NEURAL = {"tga": (TGA, True), "tga_nocopy": (TGA, False), "sasrec": (SASRec, False),
          "sasrec_copy": (SASRec, True), "din": (DIN, False)}
"""Neural model keys → (class, pointer on). ``tga_nocopy`` and ``sasrec_copy`` are ablations."""
PRIOR_MODELS = ("tga",)
"""Models fed the transition prior (co-visitation counts as a learned logit term) when ``transition_prior`` > 0."""
BASELINES = ("pop", "repeat", "covisit", "repeat_covisit")
ALL_MODELS = ("tga", "sasrec", "din", "pop", "repeat", "tga_nocopy", "sasrec_copy", "covisit", "repeat_covisit")
METRIC_KEYS = ("auc", "gauc", "logloss", "ece", "hr@10", "hr@10_repeat", "hr@10_novel", "ndcg@10", "mrr", "buy_hr@10",
               "buy_ndcg@10", "train_samples_per_s", "params")
SEED_METRICS = ("auc", "gauc", "logloss", "ece", "hr@10", "hr@10_repeat", "hr@10_novel", "ndcg@10", "mrr", "buy_hr@10",
                "buy_ndcg@10")
"""Metrics averaged over seeds (the top level of a model's JSON) with their sd under ``sd``."""
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
    models: tuple[str, ...] = ("tga", "sasrec", "sasrec_copy", "din", "pop", "repeat", "covisit", "repeat_covisit")
    seeds: int = 0  # 0: one run on train.seed; N: neural models on seeds train.seed + 1 .. + N, mean ± sd
    bootstrap: int = 1000  # user-bootstrap resamples for the 95% intervals (0 = none)
    covisit: CovisitConfig = field(default_factory=CovisitConfig)
    transition_prior: int = 32  # co-visitation candidates per retrieval sample fed to TGA (0 = none)
    conversion_raw: bool = True  # models with both heads: the conversion head also attends over raw embeddings
    # of its own table (ModelConfig.conversion_raw; chosen on the validation share, README "Model quality")
    on_validation: bool = False  # score the validation share instead of the test period (for choosing
    # settings: the test period is never looked at); neural models then train a fixed number of epochs
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
        if self.train.conversion_finetune_epochs < 0:
            raise ValueError(f"conversion_finetune_epochs must be >= 0, got {self.train.conversion_finetune_epochs}")
        if self.seeds < 0 or self.bootstrap < 0 or self.transition_prior < 0:
            raise ValueError("seeds, bootstrap and transition_prior must be >= 0")
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
    event_users: np.ndarray  # [E] user code (0..U-1) of every event
    test_users: np.ndarray  # [S_test] user code of every test sample
    valid_users: np.ndarray  # [S_valid] user code of every validation sample
    split_ts: float
    fit_ts: float
    info: dict


class _Encoder:
    """Collects samples and encodes them in chunks (keeps memory flat on big logs)."""

    def __init__(self, vocabs: Vocabs, keys: InMemoryVocab, chunk: int = 8192, prior_width: int = 0) -> None:
        self.vocabs, self.keys, self.chunk, self.prior_width = vocabs, keys, chunk, prior_width
        self.pending: list[Sample] = []
        self.priors: list[tuple[np.ndarray, np.ndarray] | None] = []
        self.parts: list[EncodedSamples] = []
        self.users: list[str] = []  # user of every sample added, in order

    def add(self, s: Sample, prior: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.pending.append(s)
        self.priors.append(prior)
        self.users.append(s.user_id)
        if len(self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            enc = encode_samples(self.pending, self.vocabs, self.keys)
            if self.prior_width:
                n, p = len(self.pending), self.prior_width
                enc.prior_keys, enc.prior_vals = np.zeros((n, p), np.int32), np.zeros((n, p), np.float32)
                for row, prior in enumerate(self.priors):
                    if prior is not None:
                        enc.prior_keys[row, :len(prior[0])], enc.prior_vals[row, :len(prior[1])] = prior
            self.parts.append(enc)
            self.pending, self.priors = [], []

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
    out = {name: _Encoder(vocabs, catalogue, prior_width=cfg.transition_prior) for name in ("train", "valid", "test")}
    states: dict[str, UserState] = {}
    # transition prior: co-visitation counted online, so a sample only sees transitions before it;
    # frozen at fit_ts for validation samples and at split_ts for test samples (= the baseline's counts)
    cov_fit, cov_split = Covisitation(cfg.covisit), Covisitation(cfg.covisit)
    history: dict[str, list[int]] = {}

    def prior_of(s: Sample, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        if not cfg.transition_prior or s.kind != RETRIEVAL:
            return None
        recent = recent_distinct(s.graph.to_arrays().items)[:cfg.covisit.recent]
        cov = cov_split if split == "test" else cov_fit
        return cov.top(catalogue.lookup(recent).tolist()[::-1], cfg.transition_prior)

    def route(s: Sample) -> None:
        if len(s.graph) == 0:
            return  # the click left the graph window before its label closed: no context
        if s.event_ts >= split_ts:
            out["test"].add(s, prior_of(s, "test"))
            return
        # a label is known once its window has closed: a retrieval target at its event, a
        # conversion click at click + window whether bought or not (so both labels are complete)
        known_at = s.event_ts if s.kind == RETRIEVAL else s.event_ts + cfg.window_s
        if known_at < fit_ts:
            out["train"].add(s, prior_of(s, "train"))
        elif known_at < split_ts and (s.kind != RETRIEVAL or s.event_ts >= fit_ts):
            out["valid"].add(s, prior_of(s, "valid"))

    for ev in tqdm(events, desc="samples", disable=None if progress else True, unit="ev", mininterval=1.0, leave=False):
        st = states.get(ev.user_id)
        if st is None:
            st = states[ev.user_id] = UserState.new(ev.user_id, cfg.max_len)
        for s in st.apply(ev, None, cfg.window_s, cfg.sample_len):
            if s.kind != CLICK:  # (offline, a click is judged by its conversion sample, whose label is known)
                route(s)
        if cfg.transition_prior and ev.ts < split_ts:  # count the event after its own samples are routed
            past, key = history.setdefault(ev.user_id, []), int(catalogue.lookup([ev.item_id])[0])
            cov_split.add(past, key)
            if ev.ts < fit_ts:
                cov_fit.add(past, key)
            past.append(key)
            del past[:-cfg.covisit.window]
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
    user_code = {u: k for k, u in enumerate(states)}
    event_users = np.fromiter((user_code[e.user_id] for e in events), dtype=np.int64, count=n)
    test_users = np.array([user_code[u] for u in out["test"].users], dtype=np.int64)
    valid_users = np.array([user_code[u] for u in out["valid"].users], dtype=np.int64)
    return EvalData(enc["train"], enc["valid"], test, vocabs, catalogue_rows, catalogue_cats, ts, event_keys,
                    first_seen, event_users, test_users, valid_users, split_ts, fit_ts, info)


# -- neural models ------------------------------------------------------------------------------


def build_model(name: str, cfg: EvalConfig, data: EvalData) -> SequenceRecommender:
    """The neural model ``name`` shaped by ``cfg``; ``cfg.model_overrides`` win over everything else."""
    cls, copy = NEURAL[name]
    fields = dict(n_items=len(data.vocabs.items), n_categories=len(data.vocabs.categories), dim=cfg.dim,
                  layers=cfg.layers, heads=cfg.heads, ffn_mult=cfg.ffn_mult, dropout=cfg.dropout, copy=copy,
                  max_positions=max(cfg.sample_len, 8), conversion_raw=cfg.conversion_raw)
    if name in PRIOR_MODELS and cfg.transition_prior:
        fields["transition_prior"] = True
    return cls(ModelConfig(**(fields | dict(cfg.model_overrides))))


def candidates(first_seen: torch.Tensor, ts: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, C] bool: the items a target at time ``ts`` [B] is ranked among: every item first seen
    before ``ts`` (first_seen [C]) and every item of the row's own context (keys [B, N], catalogue
    index + 1, 0 = none). The context matters where times tie: on a log with day-resolution times
    (Tmall) an item first seen earlier the same day is in the context, already seen, and ranked by
    repeat-recent; leaving it out of the model's candidates counted ~5% of Tmall's next events as
    misses for every model but repeat-recent."""
    cand = first_seen.unsqueeze(0) < ts.unsqueeze(1)  # [B, C]
    own = (keys - 1).clamp(min=0)  # [B, N]
    return cand.scatter(1, own, cand.gather(1, own) | (keys > 0))


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
        ranks.append(ranks_of_targets(z, b.target_key - 1, candidates(first_seen, ts, b.keys)).cpu().numpy())
    return np.concatenate(ranks) if ranks else np.zeros(0)


@torch.no_grad()
def conversion_probs(model: SequenceRecommender, enc: EncodedSamples, idx: np.ndarray, device: torch.device,
                     batch: int) -> np.ndarray:
    model.eval()
    out = [model.conversion_proba(to_batch(enc, idx[s:s + batch], device)).cpu().numpy()
           for s in range(0, len(idx), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def _validation_score(data: EvalData, device: torch.device, batch: int, cap: int = 0, seed: int = 0,
                      retrieval: bool = True, conversion: bool = True):
    """Early-stopping score on the validation samples (at most ``cap`` of each kind, seeded); the
    ``retrieval`` / ``conversion`` terms can be left out (the two stages of a conversion fine-tune
    are each chosen by their own head)."""
    ret = _subsample(np.flatnonzero(data.valid.kind == RETRIEVAL), cap, seed)
    conv = _subsample(np.flatnonzero(data.valid.kind == CONVERSION), cap, seed)

    def score(model: SequenceRecommender) -> float:
        """Lower is better: -MRR of full ranking (what retrieval is judged by) + conversion logloss."""
        total = 0.0
        if retrieval and model.does_retrieval and len(ret):
            ranks = retrieval_ranks(model, data, data.valid, ret, device, batch)
            total -= ranking_metrics(ranks)["mrr"]
        if conversion and model.does_conversion and len(conv):
            p = conversion_probs(model, data.valid, conv, device, batch)
            total += logloss(data.valid.label[conv], p) or 0.0
        return total

    return score


@dataclass
class ModelOutput:
    """One model's test outcomes on one seed, aligned with the run's :class:`TestCases`."""

    row: dict  # the metrics of this run (plus params, speed, epochs)
    ranks: np.ndarray | None = None  # [R] mid-ranks of the retrieval targets (None: no retrieval)
    probs: np.ndarray | None = None  # [K] conversion probabilities of the clicks (None: no conversion)


@dataclass
class TestCases:
    """The test samples every model is judged on, and the user of each (for GAUC and the bootstrap)."""

    ret: np.ndarray  # [R] test rows of next-event (retrieval) cases
    conv: np.ndarray  # [K] test rows of conversion clicks
    buy: np.ndarray  # [R] bool: the next event is a buy
    repeat: np.ndarray  # [R] bool: the target item is already in the user's context
    ret_users: np.ndarray  # [R] user codes
    conv_users: np.ndarray  # [K] user codes
    labels: np.ndarray  # [K] conversion labels
    n_users: int  # user codes are 0 .. n_users - 1
    censored: int = 0  # conversion clicks left out: their window was still open at the log's end

    @classmethod
    def of(cls, data: EvalData, ret: np.ndarray, conv: np.ndarray) -> "TestCases":
        t = data.test
        repeat = np.array([t.target_key[i] in t.keys[i, :t.lengths[i]] for i in ret], dtype=bool)
        return cls(ret, conv, t.target_behavior[ret] == BUY, repeat, data.test_users[ret], data.test_users[conv],
                   t.label[conv], int(data.event_users.max()) + 1)

    def counts(self) -> dict:
        return {"retrieval": int(len(self.ret)), "buy": int(self.buy.sum()), "conversion": int(len(self.conv)),
                "retrieval_repeat": int(self.repeat.sum()), "retrieval_novel": int((~self.repeat).sum()),
                "conversion_positives": int((self.labels > 0).sum()),
                "conversion_censored_excluded": int(self.censored),
                "users": int(len(np.unique(np.concatenate([self.ret_users, self.conv_users])))),
                "conversion_users": int(len(np.unique(self.conv_users)))}


def evaluate_neural(name: str, cfg: EvalConfig, data: EvalData, device: torch.device, cases: TestCases,
                    seed: int, progress: bool = True) -> ModelOutput:
    """Train ``name`` on seed ``seed`` (early-stopped on the validation share) and score the test cases."""
    torch.manual_seed(seed)
    model = build_model(name, cfg, data).to(device)
    staged = cfg.train.conversion_finetune_epochs > 0 and model.does_retrieval and model.does_conversion
    can_validate = len(data.valid) > 0 and not cfg.on_validation

    def validation(retrieval: bool, conversion: bool):
        return (_validation_score(data, device, cfg.eval_batch, cfg.max_test_cases, cfg.train.seed, retrieval,
                                  conversion) if can_validate else None)

    train_cfg = replace(cfg.train, seed=seed)
    # staged: the encoder's epoch is chosen by retrieval, the conversion head's by conversion logloss, then the
    # head is fine-tuned on that encoder (early-stopped against the head it starts from)
    res = fit(model, data.train, train_cfg, device, validation(True, not staged), desc=f"{name} s{seed}",
              progress=progress, validate_head=validation(False, True) if staged else None)
    tuned = (finetune_conversion(model, data.train, train_cfg, device, validation(False, True),
                                 desc=f"{name} s{seed} conversion", progress=progress) if staged else None)
    out = ModelOutput(_empty_row())
    if model.does_retrieval:
        out.ranks = retrieval_ranks(model, data, data.test, cases.ret, device, cfg.eval_batch)
    if model.does_conversion and len(cases.conv):
        out.probs = conversion_probs(model, data.test, cases.conv, device, cfg.eval_batch)
    out.row.update(_case_row(out, cases, cfg.k))
    out.row.update(params=sum(p.numel() for p in model.parameters()), train_samples_per_s=round(res.samples_per_s, 1),
                   epochs=res.epochs, best_epoch=res.best_epoch, train_seconds=round(res.seconds, 1),
                   valid_history=res.history)
    if model.does_retrieval and model.retrieval_head.repeat_coefficients is not None:
        out.row["repeat_prior"] = model.retrieval_head.repeat_coefficients  # the learned a, β, γ
    if tuned is not None:
        out.row.update(best_head_epoch=res.best_head_epoch, finetune_epochs=tuned.epochs,
                       finetune_best_epoch=tuned.best_epoch,
                       finetune_seconds=round(tuned.seconds, 1), finetune_history=tuned.history)
    return out


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
        n_cand += int((data.first_seen[distinct - 1] >= data.test.event_ts[i]).sum())  # see candidates()
        if len(hit):
            out[o] = hit[0] + 1.0
        elif data.first_seen[data.test.target_key[i] - 1] < data.test.event_ts[i]:
            out[o] = 1.0 + nd + (n_cand - nd - 1) / 2.0
        else:
            out[o] = n_cand + 1.0
    return out




def covisitation_of(data: EvalData, cfg: CovisitConfig) -> Covisitation:
    """Co-visitation counted on the training period only (every event before ``split_ts``)."""
    before = data.event_ts < data.split_ts
    users, keys = data.event_users[before], data.event_keys[before].astype(np.int64)
    order = np.argsort(users, kind="mergesort")  # per user, time order kept
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    return Covisitation(cfg).fit(part.tolist() for part in np.split(keys[order], bounds) if len(part))


def covisit_ranks(data: EvalData, idx: np.ndarray, covisit: Covisitation, blend: bool = False) -> np.ndarray:
    """Co-visitation baseline (``blend``: repeat-recent first, co-visitation fills) as full-catalogue
    mid-ranks of the targets of test rows ``idx``."""
    seen_order = np.sort(data.first_seen)
    t = data.test
    out = np.empty(len(idx))
    for o, i in enumerate(idx):
        ctx = t.keys[i, :t.lengths[i]].tolist()
        scores = repeat_covisit_scores(ctx, covisit) if blend else covisit.scores(ctx)
        ts = t.event_ts[i]
        target = int(t.target_key[i])
        own = set(ctx) - {0}  # the context is already seen, whatever its items' times (see candidates())
        late = sum(1 for key in own if data.first_seen[key - 1] >= ts)
        out[o] = rank_from_scores(scores, target, int(np.searchsorted(seen_order, ts, side="left")) + late,
                                  bool(data.first_seen[target - 1] < ts or target in own),
                                  lambda key: data.first_seen[key - 1] < ts or key in own)
    return out


def baseline_output(name: str, cfg: EvalConfig, data: EvalData, cases: TestCases) -> ModelOutput:
    if name == "pop":
        ranks = popularity_ranks(data, cases.ret, cfg.pop_window_s)
    elif name == "repeat":
        ranks = repeat_ranks(data, cases.ret)
    else:
        ranks = covisit_ranks(data, cases.ret, covisitation_of(data, cfg.covisit), blend=name == "repeat_covisit")
    out = ModelOutput(_empty_row(), ranks=ranks)
    out.row.update(_case_row(out, cases, cfg.k))
    return out


# -- the run ------------------------------------------------------------------------------------


def _empty_row() -> dict:
    return {key: None for key in METRIC_KEYS}


def _ranking_row(ranks: np.ndarray, buy: np.ndarray, k: int) -> dict:
    a, b = ranking_metrics(ranks, k), ranking_metrics(ranks[buy], k)
    return {f"hr@{k}": a["hr"], f"ndcg@{k}": a["ndcg"], "mrr": a["mrr"], f"buy_hr@{k}": b["hr"], f"buy_ndcg@{k}": b["ndcg"]}


def _case_row(out: ModelOutput, cases: TestCases, k: int) -> dict:
    """Every per-run metric of one model's outcomes."""
    row: dict = {}
    if out.ranks is not None:
        row.update(_ranking_row(out.ranks, cases.buy, k))
        row[f"hr@{k}_repeat"] = ranking_metrics(out.ranks[cases.repeat], k)["hr"]
        row[f"hr@{k}_novel"] = ranking_metrics(out.ranks[~cases.repeat], k)["hr"]
    if out.probs is not None:
        row["auc"], row["logloss"] = auc(cases.labels, out.probs), logloss(cases.labels, out.probs)
        row["ece"] = ece(cases.labels, out.probs, 10)  # 10 equal-mass bins
        row["gauc"] = gauc_of(*_group_aucs(out.probs, cases))
    return row


def _group_aucs(probs: np.ndarray, cases: TestCases) -> tuple[np.ndarray, np.ndarray]:
    """Per-user AUC and click count [n_users] (users without clicks: NaN, 0)."""
    aucs, counts = np.full(cases.n_users, np.nan), np.zeros(cases.n_users)
    if len(probs):
        a, c = group_aucs(cases.labels, probs, cases.conv_users)
        aucs[:len(a)], counts[:len(c)] = a, c
    return aucs, counts


def uncensored_clicks(click_ts: np.ndarray, window_s: float, log_end: float) -> np.ndarray:
    """Bool mask [K]: clicks whose conversion window closed before the log ends.

    A click in the last ``window_s`` of the log gets the label observed at the log's end: a buy
    after the end is unseen, so its negative label is right-censored (on the 10k slice, context
    length alone scored AUC 0.26 on such clicks). The evaluation leaves these clicks out of
    conversion scoring, for every model alike, and reports how many it left out."""
    return click_ts + window_s <= log_end


def _subsample(idx: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if not limit or len(idx) <= limit:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))


def validation_as_test(data: EvalData) -> EvalData:
    """The data with the validation share in place of the test period (choosing settings without
    ever scoring the test period); co-visitation then counts events before ``fit_ts`` only."""
    return replace(data, test=data.valid, test_users=data.valid_users, split_ts=data.fit_ts,
                   info=data.info | {"scored": "validation share [fit_ts, split_ts)"})


def seeds_of(cfg: EvalConfig) -> list[int]:
    """Training seeds of the neural models: ``train.seed`` alone, or ``train.seed + 1 .. + seeds``."""
    return [cfg.train.seed] if cfg.seeds <= 0 else [cfg.train.seed + k for k in range(1, cfg.seeds + 1)]


def _mean(vals: list) -> float | None:
    return None if not vals or any(v is None for v in vals) else float(np.mean(vals))


def _sd(vals: list) -> float | None:
    return None if not vals or any(v is None for v in vals) else float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def _statistics(outs: list[ModelOutput], cases: TestCases, k: int) -> dict:
    """Bootstrap statistics (user weights [U] → figure, mean over seeds) of one model's outputs."""
    stats = {}
    ranks = [o.ranks for o in outs if o.ranks is not None]
    probs = [o.probs for o in outs if o.probs is not None]
    if ranks:
        stats[f"hr@{k}"] = lambda w: _mean([hit_rate(r, k, w[cases.ret_users]) for r in ranks])
        nov = ~cases.repeat
        stats[f"hr@{k}_novel"] = lambda w: _mean([hit_rate(r[nov], k, w[cases.ret_users[nov]]) for r in ranks])
    if probs and len(cases.conv):
        groups = [_group_aucs(p, cases) for p in probs]
        stats["auc"] = lambda w: _mean([weighted_auc(cases.labels, p, w[cases.conv_users]) for p in probs])
        stats["gauc"] = lambda w: _mean([gauc_of(a, c, w) for a, c in groups])
    return stats


COMPARISONS = (("auc", "tga", "din", "diff"), ("gauc", "tga", "din", "diff"), ("hr@10", "tga", "repeat", "ratio"),
               ("hr@10", "tga", "sasrec_copy", "ratio"), ("hr@10_novel", "tga", "covisit", "diff"),
               ("hr@10", "tga", "repeat_covisit", "ratio"))
"""Paired comparisons reported when both models ran: (metric, a, b, a - b or a / b)."""


def _combine(a, b, op: str) -> float | None:
    if a is None or b is None:
        return None
    if op == "diff":
        return a - b
    return a / b if b > 0 else None


def summarise(outputs: dict[str, list[ModelOutput]], cases: TestCases, cfg: EvalConfig, seeds: list[int]
              ) -> tuple[dict, dict]:
    """Per model: seed means at the top level, ``sd``, per-seed rows under ``seeds`` and user-bootstrap
    95% intervals under ``ci``; plus the paired comparisons (same resampled users for both models)."""
    weights = (bootstrap_user_weights(np.arange(cases.n_users), cfg.bootstrap, cfg.train.seed)
               if cfg.bootstrap else np.zeros((0, cases.n_users)))
    models, stats = {}, {}
    for name, outs in outputs.items():
        rows = [o.row for o in outs]
        m = _empty_row() | {key: _mean([r[key] for r in rows]) for key in SEED_METRICS}
        for key in ("params", "train_samples_per_s", "epochs", "best_epoch", "train_seconds"):
            if rows[0].get(key) is not None:
                m[key] = rows[0][key] if key == "params" else _mean([r[key] for r in rows])
        m["sd"] = {key: _sd([r[key] for r in rows]) for key in SEED_METRICS if m[key] is not None}
        stats[name] = _statistics(outs, cases, cfg.k)
        m["ci"] = {key: bootstrap_interval(f, weights) for key, f in stats[name].items()} if len(weights) else {}
        m["seeds"] = [{"seed": s} | {key: r[key] for key in SEED_METRICS if r.get(key) is not None}
                      | {key: r[key] for key in ("best_epoch", "valid_history", "best_head_epoch", "repeat_prior",
                                                 "train_seconds",
                                                 "finetune_best_epoch", "finetune_history") if key in r}
                      for s, r in zip(seeds if name in NEURAL else [None], rows)]
        models[name] = m
    comparisons = {}
    for key, a, b, op in COMPARISONS:
        if key in stats.get(a, {}) and key in stats.get(b, {}):
            fa, fb = stats[a][key], stats[b][key]
            label = f"{key}: {a} {'-' if op == 'diff' else '/'} {b}"
            ci = (bootstrap_interval(lambda w: _combine(fa(w), fb(w), op), weights) if len(weights) else None)
            comparisons[label] = {"value": _combine(models[a][key], models[b][key], op), "ci": ci,
                                  "paired": "same resampled users for both models"}
    return models, comparisons


def run(events: Sequence[Event], cfg: EvalConfig, progress: bool = True) -> dict:
    """Build the split, train and test every model (neural ones on every seed); JSON-ready result."""
    cfg.validate()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    data = build_data(events, cfg, progress)
    if cfg.on_validation:
        data = validation_as_test(data)
    test_ret = _subsample(np.flatnonzero(data.test.kind == RETRIEVAL), cfg.max_test_cases, cfg.train.seed)
    all_conv = np.flatnonzero(data.test.kind == CONVERSION)
    closed = uncensored_clicks(data.test.event_ts[all_conv], cfg.window_s, float(data.event_ts[-1]))
    test_conv = _subsample(all_conv[closed], cfg.max_test_cases, cfg.train.seed)
    cases = TestCases.of(data, test_ret, test_conv)
    cases.censored = int((~closed).sum())
    seeds = seeds_of(cfg)
    if progress:
        print(f"{data.info['events']:,} events, {data.info['users']:,} users, {data.info['items']:,} items; "
              f"train {data.info['train_samples']:,} / valid {data.info['valid_samples']:,} samples; test: "
              f"{len(test_ret):,} next events ({int(cases.buy.sum())} buys, {int(cases.repeat.sum())} repeats), "
              f"{len(test_conv):,} clicks ({int((cases.labels > 0).sum())} bought; {cases.censored:,} censored clicks "
              f"of the log's last {cfg.window_s / 3600:.0f} h left out); seeds {seeds}; device {device}",
              flush=True)
    outputs: dict[str, list[ModelOutput]] = {}
    for name in cfg.models:
        t1 = time.perf_counter()
        if name in NEURAL:
            outputs[name] = [evaluate_neural(name, cfg, data, device, cases, s, progress) for s in seeds]
        else:
            outputs[name] = [baseline_output(name, cfg, data, cases)]
        if progress:
            print(f"  {name}: done in {time.perf_counter() - t1:.1f}s", flush=True)
    models, comparisons = summarise(outputs, cases, cfg, seeds)
    return {
        "models": models,
        "comparisons": comparisons,
        "test_cases": cases.counts(),
        "seeds": seeds,
        "data": {**data.info, "conversion_positives": int((cases.labels > 0).sum())},
        "config": _jsonable(asdict(cfg)) | {"device": str(device)},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _jsonable(d: dict) -> dict:
    return {k: (_jsonable(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# -- reporting ----------------------------------------------------------------------------------


def _cell(m: dict, key: str, ci: bool = False) -> str:
    """``mean`` (± sd when several seeds) and ``[lo, hi]`` (the 95% interval) of one figure."""
    v = m.get(key)
    if v is None:
        return "-"
    text = f"{v:.3f}"
    sd = m.get("sd", {}).get(key)
    if sd and len(m.get("seeds", [])) > 1:
        text += f"±{sd:.3f}"
    if ci and m.get("ci", {}).get(key):
        lo, hi = m["ci"][key]
        text += f" [{lo:.3f},{hi:.3f}]"
    return text


def format_table(result: dict) -> str:
    """The results as a fixed-width text table (one row per model: seed mean ± sd [95% interval]),
    then the paired comparisons and the case counts."""
    cols = [("auc", "AUC", True), ("gauc", "GAUC", True), ("logloss", "logloss", False), ("ece", "ECE", False),
            ("hr@10", "HR@10", True), ("hr@10_repeat", "HR@10 rep", False),
            ("hr@10_novel", "HR@10 novel", True), ("buy_hr@10", "buy HR@10", False), ("ndcg@10", "NDCG@10", False),
            ("mrr", "MRR", False)]
    rows = [["model"] + [c[1] for c in cols] + ["params"]]
    for name, m in result["models"].items():
        rows.append([name] + [_cell(m, key, ci) for key, _, ci in cols]
                    + ["-" if m.get("params") is None else f"{m['params']:,}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for label, c in result.get("comparisons", {}).items():
        ci = "" if not c["ci"] else f"  95% paired interval [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]"
        lines.append(f"{label}: {'-' if c['value'] is None else format(c['value'], '.3f')}{ci}")
    tc = result["test_cases"]
    seeds = result.get("seeds", [])
    lines.append(f"test cases: {tc['retrieval']:,} next events (full ranking over {result['data']['items']:,} items; "
                 f"{tc.get('retrieval_repeat', 0):,} repeat / {tc.get('retrieval_novel', 0):,} novel targets), "
                 f"{tc['buy']:,} buy targets, {tc['conversion']:,} conversion clicks "
                 f"({result['data']['conversion_positives']:,} bought; "
                 f"{tc.get('conversion_censored_excluded', 0):,} censored clicks left out) of {tc.get('users', 0):,} users; "
                 f"neural models: mean ± sd over seeds {seeds}; [95% user-bootstrap interval]")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """README-ready Markdown: one row per model (seed mean ± sd, 95% interval below the figure
    where there is one), the paired comparisons, and the case counts."""
    cols = [("auc", "conversion AUC"), ("gauc", "GAUC"), ("hr@10", "HR@10"), ("hr@10_repeat", "HR@10 repeat"),
            ("hr@10_novel", "HR@10 novel"), ("buy_hr@10", "HR@10 buys"), ("ndcg@10", "NDCG@10"), ("mrr", "MRR")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in result["models"].items():
        cells = []
        for key, _ in cols:
            if m.get(key) is None:
                cells.append("–")
                continue
            text = f"{m[key]:.3f}"
            sd = m.get("sd", {}).get(key)
            if sd and len(m.get("seeds", [])) > 1:
                text += f" ± {sd:.3f}"
            ci = m.get("ci", {}).get(key)
            if ci:
                text += f"<br>[{ci[0]:.3f}, {ci[1]:.3f}]"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("comparisons"):
        lines += ["", "| paired comparison (same resampled users) | value | 95% interval |", "|---|---:|---:|"]
        for label, c in result["comparisons"].items():
            v = "–" if c["value"] is None else f"{c['value']:.3f}"
            ci = "–" if not c["ci"] else f"[{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]"
            lines.append(f"| {label} | {v} | {ci} |")
    tc = result["test_cases"]
    lines += ["", f"{tc['retrieval']:,} next events ranked over {result['data']['items']:,} items "
              f"({tc.get('retrieval_repeat', 0):,} repeat / {tc.get('retrieval_novel', 0):,} novel targets, "
              f"{tc['buy']:,} buys); {tc['conversion']:,} conversion clicks ({result['data']['conversion_positives']:,} "
              f"bought; {tc.get('conversion_censored_excluded', 0):,} clicks of the log's last conversion window "
              f"left out as right-censored) of {tc.get('users', 0):,} users. Neural models: mean ± sd over seeds {result.get('seeds')}; "
              f"[95% user-bootstrap interval, {result['config'].get('bootstrap')} resamples]."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Metrics of every model side by side (one panel per metric, 95% intervals as error bars) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("hr@10", "HR@10 (all next events)"), ("hr@10_novel", "HR@10 (novel targets)"),
               ("buy_hr@10", "HR@10 (buy targets)"), ("auc", "conversion AUC"), ("gauc", "conversion GAUC")]
    names = list(result["models"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.8))
    for ax, (key, title) in zip(axes, metrics):
        ms = [result["models"][n] for n in names]
        xs = [i for i, m in enumerate(ms) if m.get(key) is not None]
        vals = [ms[i][key] for i in xs]
        err = np.zeros((2, len(xs)))
        for j, i in enumerate(xs):
            ci = ms[i].get("ci", {}).get(key)
            if ci:
                err[:, j] = [max(vals[j] - ci[0], 0.0), max(ci[1] - vals[j], 0.0)]
        bars = ax.bar([names[i] for i in xs], vals, yerr=err, capsize=3,
                      color=["tab:red" if names[i].startswith("tga") else "tab:gray" for i in xs])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        if key in ("auc", "gauc"):
            ax.set_ylim(0.3, 0.9)
    tc = result["test_cases"]
    fig.suptitle(f"time-ordered split: {tc['retrieval']:,} next events, {tc['buy']} buys, {tc['conversion']:,} "
                 f"conversion clicks; seeds {result.get('seeds')}; bars 95% user-bootstrap intervals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
