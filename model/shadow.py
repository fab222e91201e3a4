"""Shadow evaluation: the online model, a baseline and repeat-recent scored on the same samples.

The baseline is an inference-only copy of the last good checkpoint, grafted onto the online
model's current id maps as a rollback would be (model/guardrails.py ``GoodModel``): an item
first seen after it gets a fresh row, so the baseline is judged as what a rollback would serve.
Every step, a random ``share`` of the step's new samples (chosen once, for all three) is scored
prequentially, before the online model learns from them:

- conversion clicks: P(buy) of each model *at the click* (its CLICK sample), kept until the
  label arrives (the conversion sample) and judged then, so all three are judged on what they
  said when the click happened (model/clicktime.py); the baseline's only while it is the same
  baseline (a case predicted by the one before is judged for the online model and repeat only);
- retrieval rows: the target's mid-rank over each model's own catalogue (every item with a row),
  a bounded number of rows per step (``rank_budget`` / catalogue, as the learner's own scoring);
- repeat-recent on the same retrieval rows: the user's distinct context items, most recent first.

The per-model rolling conversion metrics count a judged click only once every older click the
shadow predicted has its label (its store's horizon), in click-time order, as the learner's own
(model/prequential.py): positives and negatives of the same click era. The guard's paired window
(model/guard.py) takes the cases as their labels arrive, unchanged: each pair there compares two
models on the *same* click, so the era does not bias it.

The paired outcomes feed the guard (model/guard.py); rolling AUC and HR@10 per model feed
``tgastream_online_metric{model=...}``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from tgastream.model.batching import collate
from tgastream.model.vocab import RowKeys
from tgastream.model.clicktime import ClickTimeStore
from tgastream.model.conversion_head import STRONG_BEHAVIORS
from tgastream.model.guard import PairedWindow
from tgastream.model.metrics import ranks_of_targets
from tgastream.model.prequential import RollingMetrics
from tgastream.model.rows import EmbeddingRows
from tgastream.model.tga import TGA
from tgastream.state.samples import CLICK, CONVERSION, RETRIEVAL, Sample

K = 10


@dataclass(frozen=True)
class ShadowConfig:
    share: float = 0.25  # of each step's new samples, scored by all three
    rank_budget: int = 2_000_000  # (retrieval rows × catalogue items) per model per step at most
    window: int = 2000  # rolling window of the per-model metrics
    seed: int = 0
    pending: int = 100_000  # click-time predictions awaiting their label


@dataclass
class Outcomes:
    """One model's outcomes on a scored subset: conversion P(buy) [C] and retrieval ranks [R]."""

    probs: np.ndarray
    ranks: np.ndarray


def repeat_rank(sample: Sample, n_candidates: int) -> float:
    """1-based mid-rank of a next-event target under repeat-recent: the user's distinct context
    items, most recent first, then every other candidate tied."""
    distinct = list(dict.fromkeys(reversed(sample.graph.item_ids)))
    if sample.item_id in distinct:
        return distinct.index(sample.item_id) + 1.0
    nd = len(distinct)
    return 1.0 + nd + max(n_candidates - nd - 1, 0) / 2.0


def repeat_interest(sample: Sample) -> float:
    """Conversion score of a click under repeat-recent: touches of the clicked item in the
    context, carts and favs counting double."""
    strong = set(STRONG_BEHAVIORS)
    beh = sample.graph.to_arrays().behaviors
    return float(sum(1 + (int(b) in strong) for it, b in zip(sample.graph.item_ids, beh) if it == sample.item_id))


@torch.no_grad()
def score_outcomes(model: TGA, rows: EmbeddingRows, device: torch.device, conv: Sequence[Sample],
                   ret: Sequence[Sample]) -> Outcomes:
    """P(buy) of the conversion samples and the mid-rank of each retrieval target among every
    item the model has a row for (an unknown target is a miss)."""
    vocabs = rows.vocabs()
    model.eval()
    probs = np.zeros(0)
    if conv:
        batch = collate(list(conv), vocabs, device, keys=RowKeys(vocabs.items))
        probs = conversion_probs(model, batch, model.encode(batch))
    ranks = np.zeros(0)
    if ret:
        batch = collate(list(ret), vocabs, device, keys=RowKeys(vocabs.items))
        ranks = catalogue_ranks(model, rows, batch, model.encode(batch))
    return Outcomes(probs, ranks)


def conversion_probs(model: TGA, batch, states: torch.Tensor) -> np.ndarray:
    """P(buy) [C] of the batch's rows from their node states [C, N, d]."""
    return torch.sigmoid(model.conversion_logits(batch, states)).float().cpu().numpy()


def catalogue_ranks(model: TGA, rows: EmbeddingRows, batch, states: torch.Tensor,
                    categories: torch.Tensor | None = None) -> np.ndarray:
    """Mid-rank [R] of each row's retrieval target among every item that has a row (the full
    catalogue, pointer included; an unknown target is a miss), from the rows' node states
    [R, N, d]; ``categories`` [n_items]: the items' categories to score with (default: the
    model's own, as of now)."""
    n = model.cfg.n_items
    items = torch.arange(1, n, device=states.device)  # catalogue column c = row c + 1
    cats = model.item_category if categories is None else categories
    vectors, bias = model.item_vectors(items, cats[items])
    scores = model.score_catalogue(batch, vectors, bias, states)  # [R, n - 1]
    holds = rows.used_items(states.device)[1:n].unsqueeze(0).expand_as(scores)  # [R, n - 1] (maps may be ahead)
    return ranks_of_targets(scores, batch.target_item - 1, holds).cpu().numpy()  # [R]


@dataclass
class Cases:
    """One step's picked shadow cases, scored by every model but the online one: the online
    model's outcomes come from its training step (model/online.py ``learn(cases=...)``)."""

    conv: list[Sample]  # picked clicks: predicted now, judged when their labels arrive
    ret: list[Sample]  # picked retrieval targets: ranked now
    repeat_interest: np.ndarray  # [C] repeat-recent's P(buy) of the clicks
    repeat_ranks: np.ndarray  # [R]
    baseline: Outcomes | None
    baseline_version: int  # -1 without a baseline
    labelled: list[Sample]  # the step's conversion samples: labels for earlier clicks


@dataclass
class Scored:
    """One step's shadow cases: labels [C] (of clicks whose label arrived this step) and each
    model's outcomes on the same cases; ``paired`` [C]: the baseline's prediction came from the
    current baseline (only those cases count for it)."""

    labels: np.ndarray
    online: Outcomes
    repeat: Outcomes
    baseline: Outcomes | None  # None without a baseline
    paired: np.ndarray | None = None
    click_ts: np.ndarray | None = None  # [C] the clicks' event times (None: unknown, enter the windows at once)
    horizon: float = math.inf  # the earliest click still awaiting its label in this shadow's store, after the join


class Baseline(Protocol):
    """The baseline: ``aligned()`` gives a model, its id maps and device to score with."""

    version: int

    def aligned(self): ...


class Shadow:
    """Scores online, baseline and repeat-recent on the same share of each step's samples."""

    MODELS = ("online", "baseline", "repeat")

    def __init__(self, cfg: ShadowConfig, paired_window: int, keep_positives: int = 60) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.baseline: Baseline | None = None
        self.rolling = {m: RollingMetrics(window=cfg.window, k=K) for m in self.MODELS}
        self.paired = PairedWindow(window=paired_window, keep_positives=keep_positives)
        # click-time scores [online, repeat, baseline (NaN without one)], version = the baseline's (-1 none)
        self.pending = ClickTimeStore(cfg.pending, width=3)

    def set_baseline(self, baseline: Baseline | None) -> None:
        """A new baseline: the paired window restarts (outcomes against the old one do not count)."""
        self.baseline = baseline
        self.paired.clear()
        self.rolling["baseline"] = RollingMetrics(window=self.cfg.window, k=K)

    def pick(self, samples: Sequence[Sample], catalogue: int) -> tuple[list[Sample], list[Sample]]:
        """The subset all models score: clicks (at click time), retrieval rows (bounded for ranking)."""
        n = min(len(samples), max(1, math.ceil(self.cfg.share * len(samples))))
        chosen = self.rng.sample(list(samples), n) if n < len(samples) else list(samples)
        conv = [s for s in chosen if s.kind == CLICK]
        ret = [s for s in chosen if s.kind == RETRIEVAL]
        cap = max(16, self.cfg.rank_budget // max(catalogue, 1))
        return conv, ret[:cap]

    def evaluate(self, samples: Sequence[Sample], model: TGA, rows: EmbeddingRows,
                 device: torch.device) -> Scored | None:
        """Score the online model (``model``, ``rows``: as it is, before it learns from these
        samples), the baseline and repeat-recent on the same subset of ``samples``: the picked
        clicks are predicted and kept; the step's labels join the predictions of their clicks
        (None when there is nothing to judge). Plain arrays: ranks pool them (model/guardrails.py)."""
        cases = self.prepare(samples, model.cfg.n_items, rows)
        if cases is None:
            return None
        return self.complete(cases, score_outcomes(model, rows, device, cases.conv, cases.ret))

    def prepare(self, samples: Sequence[Sample], catalogue: int, rows: EmbeddingRows) -> Cases | None:
        """Pick the step's cases and score them with repeat-recent and the baseline (None without
        samples); the online model's outcomes are added by :meth:`complete`, which also joins the
        step's labels to earlier clicks' predictions (so cases come back even when none is picked)."""
        if not samples:
            return None
        conv, ret = self.pick(samples, catalogue)
        n_items = max(len(rows.items), 1)
        rep_ranks = np.asarray([repeat_rank(s, n_items) for s in ret])
        base, base_version = None, -1
        if self.baseline is not None:
            b = self.baseline.aligned()
            base, base_version = score_outcomes(b.model, b.rows, b.device, conv, ret), self.baseline.version
        labelled = [s for s in samples if s.kind == CONVERSION]
        return Cases(conv, ret, np.asarray([repeat_interest(s) for s in conv], dtype=float), rep_ranks, base,
                     base_version, labelled)

    def complete(self, cases: Cases, online: Outcomes) -> Scored | None:
        """The cases with the online model's outcomes (P(buy) [C] of the picked clicks, ranks [R],
        in the cases' order): the clicks' predictions of every model are kept until their labels
        arrive; the labels of this step join the clicks predicted before (None: nothing to judge)."""
        conv, base = cases.conv, cases.baseline
        if conv:
            cols = [online.probs, cases.repeat_interest,
                    base.probs if base is not None else np.full(len(conv), np.nan)]
            self.pending.predict(conv, np.stack(cols, 1), cases.baseline_version)  # [C, 3]
        # only a share of clicks was predicted: the other labels are not this shadow's cases
        joined = self.pending.join([s for s in cases.labelled if s.click_key in self.pending.pending])
        if not len(joined) and not cases.ret:
            return None
        paired = joined.versions == cases.baseline_version if base is not None else np.zeros(len(joined), bool)
        return Scored(joined.labels, Outcomes(joined.probs[:, 0], online.ranks), Outcomes(joined.probs[:, 1], cases.repeat_ranks),
                      None if base is None else Outcomes(joined.probs[:, 2], base.ranks), paired, joined.click_ts,
                      self.pending.horizon())

    def note(self, scored: Scored, horizon: float | None = None) -> None:
        """Add scored outcomes to the rolling metrics (conversion cases mature up to ``horizon``,
        default the scored's own: with ranks, the earliest over every rank's store) and, with a
        baseline, the paired window."""
        ts = scored.click_ts
        self._note("online", scored.labels, scored.online, ts)
        self._note("repeat", scored.labels, scored.repeat, ts)
        if scored.baseline is not None and self.baseline is not None:
            ok = scored.paired if scored.paired is not None else np.ones(len(scored.labels), bool)
            base = Outcomes(scored.baseline.probs[ok], scored.baseline.ranks)
            self._note("baseline", scored.labels[ok], base, None if ts is None else ts[ok])
            self.paired.add(scored.online.ranks <= K, scored.baseline.ranks <= K, scored.labels[ok],
                            scored.online.probs[ok], base.probs)
        for r in self.rolling.values():
            r.mature(scored.horizon if horizon is None else horizon)

    def _note(self, name: str, labels: np.ndarray, out: Outcomes, click_ts: np.ndarray | None) -> None:
        if len(out.probs):
            self.rolling[name].add_conversion(labels, out.probs, click_ts=click_ts)
        if len(out.ranks):
            self.rolling[name].add_ranks(out.ranks)

    def metrics(self) -> dict[str, dict[str, float | None]]:
        """Rolling AUC and HR@10 of each model over the shadow's subset (None without cases)."""
        out = {}
        for name, r in self.rolling.items():
            snap = r.snapshot()
            out[name] = {"auc": snap["auc"], "hr@10": snap[f"hr@{K}"]}
        return out
