"""Online learning of TGA on a stream of samples: prequential test-then-train (DESIGN.md §5).

For every micro-batch :meth:`OnlineLearner.step`:

1. gives every item and category in the batch an embedding row (persistent :class:`IdMap`; the
   tables and their Adam state grow in chunks; rows unused for ``idle_ttl_s`` of event time are
   evicted and re-initialised),
2. scores the batch with the current model *before* learning from it (the online metric): the
   conversion probability of each conversion sample, the full-catalogue rank of each retrieval
   target,
3. takes one optimizer step on the batch mixed with ``replay_share`` older samples drawn from a
   bounded reservoir (limits forgetting),
4. returns the refreshed vectors of the batch's users (their graph *including* the newest event)
   and items, for the trainer to publish.

No Kafka here: the trainer (stream/trainer.py), the online-vs-frozen benchmark and tests drive it
with lists of :class:`Sample`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from tgastream.model.batching import Vocabs, collate
from tgastream.model.config import ModelConfig
from tgastream.model.learner import StepOutput
from tgastream.model.device import cpu_threads, resolve_device
from tgastream.model.prequential import RollingMetrics, hit_and_ndcg
from tgastream.model.tga import TGA
from tgastream.state.graph import UserGraph
from tgastream.state.idmap import IdMap
from tgastream.state.samples import CONVERSION, RETRIEVAL, Sample
from tgastream.core.events import BEHAVIOR_CODE
from tgastream.core.settings import Settings

BUY = BEHAVIOR_CODE["buy"]


class _Rows:
    """A :class:`model.vocab.Vocab` view of an :class:`IdMap` that never assigns (peek)."""

    def __init__(self, idmap: IdMap) -> None:
        self.idmap = idmap

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        return self.idmap.peek(ids)

    def __len__(self) -> int:
        return self.idmap.capacity


@dataclass(frozen=True)
class OnlineConfig:
    """Knobs of online learning that are not model shape (those are in ModelConfig)."""

    lr: float = 1e-3
    replay_share: float = 0.25
    reservoir: int = 20_000
    idle_ttl_s: float = 7 * 86400.0  # evict id rows unused for this long (event time)
    evict_every: int = 200  # steps between eviction sweeps
    chunk: int = 4096  # id map / table growth step
    metric_window: int = 5000
    rank_budget: int = 2_000_000  # prequential ranking: (retrieval rows × catalogue items) per step at most
    train: bool = True  # False: a frozen model that only scores (the benchmark's baseline)
    seed: int = 0

    @classmethod
    def from_settings(cls, s: Settings) -> "OnlineConfig":
        return cls(lr=s.lr, replay_share=s.replay_share, seed=s.seed)


def model_config_from_settings(s: Settings, n_items: int, n_categories: int) -> ModelConfig:
    return ModelConfig(n_items=n_items, n_categories=n_categories, dim=s.dim, layers=s.layers, heads=s.heads,
                       dropout=0.0)


def _grow_parameter(module: nn.Module, name: str, rows: int, optimizer: torch.optim.Optimizer | None,
                    init_std: float) -> None:
    """Grow ``module.<name>`` (a [n, ...] parameter) to ``rows`` rows, with its optimizer state."""
    old: nn.Parameter = getattr(module, name)
    extra = rows - old.shape[0]
    if extra <= 0:
        return
    fresh = torch.randn(extra, *old.shape[1:], device=old.device, dtype=old.dtype) * init_std
    new = nn.Parameter(torch.cat([old.detach(), fresh]))
    setattr(module, name, new)
    if isinstance(module, nn.Embedding):
        module.num_embeddings = rows
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape[:1] == old.shape[:1]:
                state[key] = torch.cat([value, value.new_zeros(extra, *value.shape[1:])])
        optimizer.state[new] = state


def _reset_rows(param: nn.Parameter, rows: torch.Tensor, optimizer: torch.optim.Optimizer | None, std: float) -> None:
    """Re-initialise evicted rows (and zero their optimizer state) so a reused row starts fresh."""
    with torch.no_grad():
        param[rows] = torch.randn(len(rows), *param.shape[1:], device=param.device) * std
    if optimizer is not None:
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape[:1] == param.shape[:1]:
                value[rows] = 0


class IncompatibleCheckpoint(ValueError):
    """A checkpoint written by a model of another shape or version than this process builds."""


class OnlineLearner:
    """TGA plus its id maps, optimizer, replay reservoir and rolling prequential metrics."""

    def __init__(self, settings: Settings, online: OnlineConfig | None = None) -> None:
        self.settings = settings
        self.cfg = online or OnlineConfig.from_settings(settings)
        self.device = resolve_device(settings.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(settings.threads))
        torch.manual_seed(self.cfg.seed)
        self.rng = random.Random(self.cfg.seed)
        self.items = IdMap(self.cfg.chunk)
        self.categories = IdMap(max(256, self.cfg.chunk // 8))
        self.model = TGA(model_config_from_settings(settings, self.items.capacity, self.categories.capacity)).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.metrics = RollingMetrics(window=self.cfg.metric_window)
        self.reservoir: list[Sample] = []
        self.seen = 0  # samples offered to the reservoir
        self.version = 0  # optimizer steps taken
        self.last_loss = float("nan")
        self.batch_hr: float | None = None  # HR@10 of the last batch alone (not rolling)

    # -- rows --------------------------------------------------------------------------------

    def _vocabs(self) -> Vocabs:
        return Vocabs(_Rows(self.items), _Rows(self.categories))

    def _assign_rows(self, samples: Sequence[Sample], now: float) -> None:
        """Give every item/category of the batch a row; grow the tables to the maps' capacity."""
        if not self.cfg.train:
            return  # a frozen model knows only the rows it was trained with
        items: list[str] = []
        cats: list[str] = []
        for s in samples:
            items.extend(s.graph.item_ids)
            cats.extend(s.graph.category_ids)
            items.append(s.item_id)
            cats.append(s.category_id)
        self.items.lookup(list(dict.fromkeys(items)), now)  # distinct ids, first-seen order
        self.categories.lookup(list(dict.fromkeys(cats)), now)
        self._grow_tables()

    def _grow_tables(self) -> None:
        m = self.model
        n_items, n_cats = self.items.capacity, self.categories.capacity
        if n_items == m.cfg.n_items and n_cats == m.cfg.n_categories:
            return
        _grow_parameter(m.embed.item, "weight", n_items, self.optimizer, 0.05)
        _grow_parameter(m.embed.category, "weight", n_cats, self.optimizer, 0.05)
        if m.item_bias is not None:
            _grow_parameter(m.item_bias, "weight", n_items, self.optimizer, 0.0)
        extra = n_items - m.item_counts.shape[0]
        if extra > 0:
            m.item_counts = torch.cat([m.item_counts, m.item_counts.new_zeros(extra)])
            m.item_category = torch.cat([m.item_category, m.item_category.new_zeros(extra)])
        m.cfg = dataclasses.replace(m.cfg, n_items=n_items, n_categories=n_cats)

    def _evict(self, now: float) -> None:
        m = self.model
        rows = self.items.evict(now, self.cfg.idle_ttl_s)
        if len(rows):
            r = torch.as_tensor(rows, device=self.device)
            _reset_rows(m.embed.item.weight, r, self.optimizer, 0.05)
            if m.item_bias is not None:
                _reset_rows(m.item_bias.weight, r, self.optimizer, 0.0)
            m.item_counts[r] = 0
            m.item_category[r] = 0
        crows = self.categories.evict(now, self.cfg.idle_ttl_s)
        if len(crows):
            _reset_rows(m.embed.category.weight, torch.as_tensor(crows, device=self.device), self.optimizer, 0.05)

    # -- one micro-batch ---------------------------------------------------------------------

    def vectors(self, samples: Sequence[Sample]) -> StepOutput:
        """Give the batch's ids rows, and compute the vectors to publish with the model as it is:
        each user's graph *including* its newest event, and every item the batch touches."""
        now = max(s.event_ts for s in samples)
        self._assign_rows(samples, now)
        users, contexts, bought = self.user_vectors(samples)
        touched = {s.item_id: s.category_id for s in samples}  # targets and candidates ...
        for s in samples:  # ... and each context's newest node (a user's first item is never a target)
            if len(s.graph):
                touched.setdefault(s.graph.item_ids[-1], s.graph.category_ids[-1])
        items = self.item_vectors_of(touched)
        arrivals = [s.arrival_ts for s in samples if s.kind == RETRIEVAL and s.arrival_ts > 0]  # one per event
        # users whose vector comes from a conversion sample's context, which ends at an older click
        from_clicks = set(users) - {s.user_id for s in samples if s.kind == RETRIEVAL}
        return StepOutput(users=users, items=items, loss=float("nan"), bought=bought, contexts=contexts,
                          arrivals=arrivals, from_clicks=from_clicks)

    def step(self, samples: Sequence[Sample], train_limit: int = 0, score_limit: int = 0) -> StepOutput:
        """Vectors, then prequential scoring, then learning: the trainer's order, in one call.

        With ``train_limit`` > 0 a larger batch is trained on a random ``train_limit`` of it, and
        with ``score_limit`` > 0 scored on a random ``score_limit`` of it."""
        out = self.vectors(samples)
        self.score(samples, score_limit)  # still the model before this step's update: prequential
        out.loss = self.learn(samples, train_limit)
        return out

    @torch.no_grad()
    def score(self, samples: Sequence[Sample], score_limit: int = 0) -> None:
        """Score the new samples (a random ``score_limit`` of them) with the model as it is:
        prequential test-then-train, into the rolling metrics."""
        vocabs = self._vocabs()
        scored = list(samples)
        if 0 < score_limit < len(scored):
            scored = self.rng.sample(scored, score_limit)
        # keys = item rows: the pointer's hits land on catalogue columns (row r ↔ column r - 1)
        new = collate(scored, vocabs, self.device, keys=vocabs.items)
        self.model.eval()
        self._score(new, self.model.encode(new))

    def learn(self, samples: Sequence[Sample], train_limit: int = 0) -> float:
        """One optimizer step on the samples (a random ``train_limit`` of them) plus
        ``replay_share`` drawn from the reservoir. Uses only the model's public API (``encode``,
        heads, ``loss``), so encoders can change beneath it."""
        if not self.cfg.train:
            return float("nan")
        vocabs = self._vocabs()
        train = list(samples)
        if 0 < train_limit < len(train):
            train = self.rng.sample(train, train_limit)
        k = 0
        if self.reservoir:
            k = int(round(len(train) * self.cfg.replay_share / (1 - self.cfg.replay_share)))
        replay = self.rng.sample(self.reservoir, min(k, len(self.reservoir))) if k else []
        batch = collate(train + replay, vocabs, self.device, keys=vocabs.items)
        self.model.train()
        loss = self.model.loss(batch).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        self.version += 1
        self._remember(samples)
        self.last_loss = float(loss.detach())
        if self.version % self.cfg.evict_every == 0:
            self._evict(max(s.event_ts for s in samples))
        return self.last_loss

    def _score(self, batch, states: torch.Tensor) -> None:
        """Prequential scores into the rolling metrics: P(buy) of conversion rows, and the rank of
        retrieval targets among every item that has a row (full catalogue, pointer included); on a
        large catalogue a random subset of the rows, ``rank_budget`` / catalogue size of them."""
        m = self.model
        conv = (batch.kind == CONVERSION).nonzero().squeeze(1)
        if len(conv):
            probs = torch.sigmoid(m.conversion_logits(batch.select(conv), states[conv]))
            self.metrics.add_conversion(probs.float().cpu().numpy(), batch.label[conv].cpu().numpy())
        ret = (batch.kind == RETRIEVAL).nonzero().squeeze(1)
        n = m.cfg.n_items
        cap = max(16, self.cfg.rank_budget // n)  # full ranking costs O(catalogue) per row: bound it
        if len(ret) > cap:
            ret = ret[torch.as_tensor(sorted(self.rng.sample(range(len(ret)), cap)), device=ret.device)]
        if len(ret):
            sub = batch.select(ret)
            rows = torch.arange(1, n, device=self.device)  # catalogue column c = row c + 1
            vectors, bias = m.item_vectors(rows, m.item_category[rows])
            scores = m.score_catalogue(sub, vectors, bias, states[ret])  # [R, n - 1]
            unused = torch.ones(n, dtype=torch.bool, device=self.device)
            unused[torch.as_tensor(self.items.rows(), device=self.device, dtype=torch.long)] = False
            scores = scores.masked_fill(unused[1:].unsqueeze(0), float("-inf"))  # only rows that hold an item
            target = (sub.target_item - 1).clamp(min=0)
            t_score = scores.gather(1, target.unsqueeze(1))  # [R, 1]
            ranks = (scores > t_score).sum(1)
            ranks = torch.where(sub.target_item > 0, ranks, torch.full_like(ranks, n))  # no row: a miss
            self.metrics.add_ranks(ranks.cpu().numpy())
            hit, _ = hit_and_ndcg(ranks.cpu().numpy(), self.metrics.k)
            self.batch_hr = float(hit.mean())

    def _remember(self, samples: Sequence[Sample]) -> None:
        """Reservoir sampling: every sample seen has the same chance to be in the buffer."""
        for s in samples:
            self.seen += 1
            if len(self.reservoir) < self.cfg.reservoir:
                self.reservoir.append(s)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.cfg.reservoir:
                    self.reservoir[j] = s

    # -- vectors ---------------------------------------------------------------------------

    @staticmethod
    def current_graphs(samples: Sequence[Sample]) -> dict[str, tuple[UserGraph, float]]:
        """Each user's newest graph in the batch, *including* the event its sample targets:
        user → (graph, newest event ts). Retrieval samples are preferred (their context plus
        target is the whole graph); a conversion sample's context ends at its click."""
        best: dict[str, tuple[tuple[bool, float], Sample]] = {}
        for s in samples:
            key = (s.kind == RETRIEVAL, s.event_ts)
            if s.user_id not in best or key >= best[s.user_id][0]:
                best[s.user_id] = (key, s)
        out = {}
        for uid, (_key, s) in best.items():
            g = s.graph.copy()
            if s.kind == RETRIEVAL:
                g.append(s.item_id, s.category_id, s.behavior, s.event_ts)
            out[uid] = (g, s.event_ts)
        return out

    @torch.no_grad()
    def user_vectors(self, samples: Sequence[Sample]) -> tuple[dict, dict[str, bytes], dict[str, list[str]]]:
        graphs = self.current_graphs(samples)
        if not graphs:
            return {}, {}, {}
        uids = list(graphs)
        pseudo = [Sample(RETRIEVAL, u, graphs[u][0], "", "", 0, 1.0, graphs[u][1]) for u in uids]
        self.model.eval()
        batch = collate(pseudo, self._vocabs(), self.device)
        vecs = self.model.user_vectors(batch).float().cpu().numpy()  # [U, d]
        users = {u: (vecs[k], graphs[u][1]) for k, u in enumerate(uids)}
        contexts = {u: graphs[u][0].tail(self.settings.sample_len).to_bytes() for u in uids}
        bought = {}
        for u in uids:
            a = graphs[u][0].to_arrays()
            b = [a.items[i] for i in np.flatnonzero(a.behaviors == BUY)]
            if b:
                bought[u] = b
        return users, contexts, bought

    @torch.no_grad()
    def item_vectors_of(self, items: dict[str, str]) -> dict[str, np.ndarray]:
        """Item tower vectors [d] of items (id → category id) that have rows."""
        ids = [i for i in items if i in self.items]
        if not ids:
            return {}
        rows = torch.as_tensor(self.items.peek(ids), device=self.device)
        cats = torch.as_tensor(self.categories.peek([items[i] for i in ids]), device=self.device)
        vecs, _bias = self.model.item_vectors(rows, cats)
        arr = vecs.float().cpu().numpy()
        return {i: arr[k] for k, i in enumerate(ids)}

    @torch.no_grad()
    def conversion_proba(self, context: UserGraph, candidates: Sequence[tuple[str, str]]) -> list[float]:
        """P(buy) of each candidate (item id, category id) given a user's context graph."""
        if not candidates:
            return []
        samples = [Sample(CONVERSION, "", context, i, c, 0, 0.0, 0.0) for i, c in candidates]
        self.model.eval()
        batch = collate(samples, self._vocabs(), self.device, keys=self._vocabs().items)
        return self.model.conversion_proba(batch).float().cpu().tolist()

    def online_metrics(self) -> dict[str, float | None]:
        """Rolling prequential metrics, plus the last batch's own HR@10 (``batch_hr@10``)."""
        return {**self.metrics.snapshot(), "batch_hr@10": self.batch_hr}

    def idmap_stats(self) -> list[tuple[str, int, int]]:
        return [("item", len(self.items), self.items.evictions), ("category", len(self.categories), self.categories.evictions)]

    def frozen_copy(self) -> "OnlineLearner":
        """A copy that scores but never learns or assigns rows (the benchmark's frozen model)."""
        twin = copy.copy(self)
        twin.cfg = dataclasses.replace(self.cfg, train=False)
        twin.model = copy.deepcopy(self.model)
        twin.items, twin.categories = copy.deepcopy(self.items), copy.deepcopy(self.categories)
        twin.optimizer = None
        twin.metrics = RollingMetrics(window=self.cfg.metric_window)
        twin.reservoir = []
        return twin

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        buf = io.BytesIO()
        torch.save(self.model.state_dict(), buf)
        return {
            "model": buf.getvalue(), "optimizer": self.optimizer.state_dict(),
            "items": self.items.to_bytes(), "categories": self.categories.to_bytes(),
            "version": self.version, "seen": self.seen,
            "reservoir": [s.to_bytes() for s in self.reservoir],
            "metrics": {"conv_scores": list(self.metrics.conv_scores), "conv_labels": list(self.metrics.conv_labels),
                        "ranks": list(self.metrics.ranks), "conversions_seen": self.metrics.conversions_seen,
                        "retrievals_seen": self.metrics.retrievals_seen},
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),  # uniform negatives: a resumed run draws the same ones
        }

    def load_state_dict(self, d: dict) -> None:
        self.items = IdMap.from_bytes(d["items"])
        self.categories = IdMap.from_bytes(d["categories"])
        # tables sized exactly as the saved id maps (whatever chunk this process would have used)
        self.model = TGA(dataclasses.replace(self.model.cfg, n_items=self.items.capacity,
                                             n_categories=self.categories.capacity)).to(self.device)
        try:
            self.model.load_state_dict(torch.load(io.BytesIO(d["model"]), map_location=self.device))
        except RuntimeError as exc:  # torch lists every mismatching tensor; the first says enough
            detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
            raise IncompatibleCheckpoint(f"written by another model version or shape ({detail})") from None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.optimizer.load_state_dict(d["optimizer"])
        self.version, self.seen = d["version"], d["seen"]
        self.reservoir = [Sample.from_bytes(b) for b in d["reservoir"]]
        m = d["metrics"]
        self.metrics.conv_scores.extend(m["conv_scores"])
        self.metrics.conv_labels.extend(m["conv_labels"])
        self.metrics.ranks.extend(m["ranks"])
        self.metrics.conversions_seen, self.metrics.retrievals_seen = m["conversions_seen"], m["retrievals_seen"]
        self.rng.setstate(d["rng"])
        if "torch_rng" in d:
            torch.set_rng_state(d["torch_rng"])

    def after_checkpoint(self, data_dir: Path, step: int) -> None:
        """Mirror the id maps to RocksDB as of the checkpoint just written."""
        self.items.sync_to(Path(data_dir) / "idmap-items", step)
        self.categories.sync_to(Path(data_dir) / "idmap-categories", step)

    def warm_start(self, path: Path) -> None:
        """Initialise from a learner state saved earlier (``state_dict()`` written with torch.save)."""
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
