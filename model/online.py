"""Online learning of TGA on a stream of samples: prequential test-then-train (DESIGN.md §5).

For every micro-batch the trainer calls, in this order:

1. :meth:`OnlineLearner.vectors`: gives every item and category in the batch an embedding row
   (:class:`model.rows.EmbeddingRows`) and returns the vectors of the batch's users (their graph
   *including* the newest event) and items, for the trainer to publish;
2. :meth:`OnlineLearner.score`: scores the batch with the current model *before* learning from it
   (the online metric, :class:`model.prequential.RollingMetrics`): P(buy) of each click at click
   time (its CLICK sample), kept until its label arrives with the conversion sample and judged
   then (model/clicktime.py), counted in click-time order once every older click has its label
   (model/prequential.py); the full-catalogue mid-rank of each retrieval target;
3. :meth:`OnlineLearner.learn`: one optimizer step on the batch (what of it is trained depends on
   ``conversion_feedback``, model/feedback.py) mixed with ``replay_share`` older samples drawn
   from a bounded reservoir (limits forgetting); now and then evicts idle rows.

No Kafka here: the trainer (stream/trainer.py), the online-vs-frozen benchmark and tests drive it
with lists of :class:`Sample`.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from tgastream.model.batching import collate
from tgastream.model.vocab import RowKeys
from tgastream.model.clicktime import ClickTimeStore, Predictions
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.device import cpu_threads, resolve_device
from tgastream.model.feedback import check_mode, training_samples
from tgastream.model.distributed import Group, Solo, all_reduce_gradients, broadcast_module, global_view, sync_rows
from tgastream.model.inference import conversion_proba, load_model, model_state
from tgastream.model.learner import StepOutput
from tgastream.model.metrics import ranking_metrics
from tgastream.model.prequential import RollingMetrics
from tgastream.model.rows import EmbeddingRows
from tgastream.model.shadow import Outcomes, catalogue_ranks, conversion_probs, score_outcomes
from tgastream.model.tga import TGA
from tgastream.state.checkpoint import load_checkpoint
from tgastream.state.graph import UserGraph
from tgastream.state.samples import CLICK, CONVERSION, RETRIEVAL, Sample
from tgastream.core.events import BEHAVIOR_CODE

BUY = BEHAVIOR_CODE["buy"]


def online_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam of the online learner, torch's fused kernel where it runs (one pass over all
    parameters instead of a Python loop of ~20 tensor ops per parameter: ~19 → ~3 ms a step on
    CPU); the same update rule, so checkpoints of either load in the other."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def has_dropout(model: nn.Module) -> bool:
    """Whether any dropout of ``model`` would change a training forward (p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def inference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference: same weights (copied), no gradients, eval mode."""
    grads = {p: p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    try:
        twin = copy.deepcopy(model)
    finally:
        for p, g in grads.items():
            p.grad = g
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


class Reservoir:
    """Reservoir sampling: every sample offered has the same chance to be in the bounded buffer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.samples: list[Sample] = []
        self.seen = 0  # samples offered so far

    def offer(self, samples: Sequence[Sample], rng: random.Random) -> None:
        for s in samples:
            self.seen += 1
            if len(self.samples) < self.capacity:
                self.samples.append(s)
            else:
                j = rng.randrange(self.seen)
                if j < self.capacity:
                    self.samples[j] = s

    def load(self, blobs: Sequence[bytes], seen: int | None = None) -> None:
        """Restore the buffer from serialized samples (a learner state's or a rank part's
        ``reservoir``) and the count offered so far (default: the buffer's length)."""
        self.samples = [Sample.from_bytes(b) for b in blobs]
        self.seen = int(seen) if seen is not None else len(self.samples)

    def draw(self, k: int, rng: random.Random) -> list[Sample]:
        """``k`` distinct samples at random (fewer when the buffer holds fewer)."""
        return rng.sample(self.samples, min(k, len(self.samples))) if k else []


class OnlineLearner:
    """TGA plus its embedding rows, optimizer, replay reservoir and rolling prequential metrics.

    ``model_cfg`` gives the model's shape; its ``n_items`` / ``n_categories`` are not used: the
    tables are sized by the id maps (``cfg.chunk`` rows to start with) and grow with them.

    ``group``: the data-parallel ranks this learner steps with (model/distributed.py); every
    rank calls :meth:`vectors` and :meth:`learn` together, each with its own samples (possibly
    none), and all keep the same id maps and parameters. Default: one process."""

    def __init__(self, model_cfg: ModelConfig, cfg: OnlineConfig = OnlineConfig(), group: Group | None = None) -> None:
        if model_cfg.conversion_raw:
            raise ValueError("conversion_raw is offline only: the online rows do not grow the conversion head's own table")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg.threads))
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.group = group or Solo()
        # draws every rank must make alike (uniform negatives, fresh and evicted rows): one
        # generator, seeded alike, advanced alike; dropout and sampling stay per rank
        self.shared_gen = torch.Generator(device=self.device)
        self.shared_gen.manual_seed(cfg.seed)
        self.rows = EmbeddingRows.new(cfg.chunk)
        self.model = TGA(dataclasses.replace(model_cfg, n_items=self.rows.items.capacity,
                                             n_categories=self.rows.categories.capacity)).to(self.device)
        broadcast_module(self.group, self.model)
        self.optimizer: torch.optim.Optimizer | None = online_adam(self.model.parameters(), cfg.lr)
        self.metrics = RollingMetrics(window=cfg.metric_window)
        self.reservoir = Reservoir(cfg.reservoir)
        check_mode(cfg.conversion_feedback)
        self.clicktime = ClickTimeStore(cfg.pending_predictions)  # click-time P(buy) awaiting labels
        # made by the publishing forward (another thread's: deque appends and pops are atomic), not yet in the store
        self._handed: deque[Predictions] = deque()
        self.clicks_in_step = 0  # clicks predicted by their training step (none handed over for them)
        self.clicks_by_snapshot = 0  # clicks predicted by the conversion snapshot (cfg.conversion_snapshot_steps)
        self._snapshot: OnlineLearner | None = None  # cfg.conversion_snapshot_steps > 0: the copy that predicts clicks
        self._snapshot_batch: list[Sample] = []  # the clicks it predicted last (not again in the same step)
        self.version = 0  # optimizer steps taken
        self.last_loss = float("nan")
        self.last_replayed = 0  # reservoir samples in the last step
        self.batch_hr: float | None = None  # HR@10 of the last batch alone (not rolling)
        self.last_cases: Outcomes | None = None  # the shadow cases' outcomes of the last learn(cases=...)
        self.evicted_items: list[str] = []  # item ids evicted since the last take_evicted_items()

    # -- one micro-batch ---------------------------------------------------------------------

    def vectors(self, samples: Sequence[Sample], clicks_later: bool = False) -> StepOutput:
        """Give the batch's ids rows, and compute the vectors to publish with the model as it is:
        each user's graph *including* its newest event, and every item the batch touches; from
        the same forward, the click-time P(buy) of the batch's clicks (``StepOutput.clicks``: the
        model serving at the click predicts it, model/clicktime.py), for the caller to hand to
        the learner that will train them (:meth:`note_predictions`): its step then needs no row
        for them (:meth:`step` does so). ``clicks_later``: only the clicks that are their user's
        newest sample (they share the user's row) are predicted here; the others are left in
        ``StepOutput.later_clicks`` for :meth:`click_predictions` once the vectors are out. With
        ``conversion_snapshot_steps`` no click is predicted here (the snapshot judges them).

        With ranks, every rank calls this together (``samples`` may be empty): the rows are
        assigned from the union of the ranks' ids (:func:`model.distributed.sync_rows`)."""
        if self.cfg.train:  # a frozen model knows only the rows it was trained with
            self.assign_rows(samples)
        if not samples:
            return StepOutput(users={}, items={}, loss=float("nan"))
        # (none with a conversion snapshot: it predicts the clicks, :meth:`_snapshot_predictions`)
        predicts = self.model.conversion_head is not None and not self.cfg.conversion_snapshot_steps
        clicks = [s for s in samples if s.kind == CLICK] if predicts else []
        users, contexts, bought, done, probs = self.user_vectors(samples, clicks, clicks_later)
        predictions = Predictions(done, probs, self.version) if done else None
        predicted = {id(d) for d in done}
        later = [c for c in clicks if id(c) not in predicted] if clicks_later else []
        touched = {s.item_id: s.category_id for s in samples}  # targets and candidates ...
        for s in samples:  # ... and each context's newest node (a user's first item is never a target)
            if len(s.graph):
                touched.setdefault(s.graph.item_ids[-1], s.graph.category_ids[-1])
        items = self.item_vectors_of(touched)
        arrivals = [s.arrival_ts for s in samples if s.kind == RETRIEVAL and s.arrival_ts > 0]  # one per event
        # users whose vector comes from a conversion sample's context, which ends at an older click
        from_clicks = {u for u, s in self.newest_samples(samples).items() if s.kind == CONVERSION}
        return StepOutput(users=users, items=items, loss=float("nan"), bought=bought, contexts=contexts,
                          arrivals=arrivals, from_clicks=from_clicks,
                          item_categories={i: touched[i] for i in items}, clicks=predictions,
                          later_clicks=later)

    def click_predictions(self, clicks: Sequence[Sample]) -> Predictions | None:
        """Click-time P(buy) of ``clicks`` with the model as it is, in a forward of their own
        (the ``later_clicks`` of :meth:`vectors`)."""
        if not clicks:
            return None
        _vecs, probs = self._publishing_forward(list(clicks), 0, list(range(len(clicks))))
        return Predictions(list(clicks), probs, self.version)

    def note_predictions(self, predictions: Predictions | None) -> None:
        """Click-time predictions made by a publishing forward (:meth:`vectors` of this learner
        or of its inference copy, from another thread), for the next step to put in the store
        before it meets their clicks. Thread-safe. Ignored with ``conversion_snapshot_steps``:
        the clicks are then predicted by the snapshot (:meth:`_snapshot_predictions`)."""
        if self.cfg.conversion_snapshot_steps:
            return
        if predictions is not None and predictions.clicks:
            self._handed.append(predictions)

    def _take_predictions(self) -> None:
        """The handed-over predictions into the click-time store (training thread)."""
        while self._handed:
            p = self._handed.popleft()
            self.clicktime.predict(p.clicks, p.probs, p.version)

    def _snapshot_predictions(self, samples: Sequence[Sample]) -> None:
        """With ``conversion_snapshot_steps`` N > 0, the batch's clicks not yet predicted get their
        click-time P(buy) from a copy of the learner taken at most N steps ago (its weights,
        tables and id maps as they were: an id new since has no row there), stamped with that
        copy's version, instead of from the newest weights; retrieval, vectors and training are
        unchanged. Why: on the 60k Taobao validation prefix the newest weights rank the later
        clicks worse than older ones (click-time AUC 0.46, 0.58 from a copy refreshed every 100
        steps; `tgastream bench staleness`, docs/conversion.md). The copy is not checkpointed:
        after a restart it is taken again at the first step."""
        every = self.cfg.conversion_snapshot_steps
        if not every or not self.cfg.train or self.model.conversion_head is None:
            return
        # every click of the batch, a repeat of a pending one included (the newest counts, as from
        # the publishing forward), once: score() and learn() of one step both come here
        done = {id(s) for s in self._snapshot_batch}
        clicks = [s for s in samples if s.kind == CLICK and id(s) not in done]
        if not clicks:
            return
        self._snapshot_batch = clicks  # (held: their ids cannot be reused meanwhile)
        if self._snapshot is None or self.version - self._snapshot.version >= every:
            self._snapshot = None  # (the old copy's memory first)
            with self.rows.lock:  # (the trainer's publishing thread assigns rows meanwhile)
                self._snapshot = self.frozen_copy()
        p = self._snapshot.click_predictions(clicks)
        self.clicktime.predict(p.clicks, p.probs, p.version)
        self.clicks_by_snapshot += len(clicks)

    def forget_snapshot(self) -> None:
        """Drop the conversion snapshot: the weights were replaced (a restore, a rollback), and the
        next clicks are judged by a copy of the new ones."""
        self._snapshot = None

    def _unpredicted(self, clicks: Sequence[Sample]) -> list[Sample]:
        """The clicks with no pending prediction: the step predicts them from its own forward."""
        return [c for c in clicks if not self.clicktime.has(c)]

    def take_evicted_items(self) -> list[str]:
        """The item ids whose rows were evicted since the last call (their vectors are stale)."""
        gone, self.evicted_items = self.evicted_items, []
        return gone

    def assign_rows(self, samples: Sequence[Sample]) -> None:
        """Give every id of the batch a row (with ranks: of every rank's batch, a collective) and
        grow the tables to the maps. The trainer's publishing thread assigns rows itself, under
        ``rows.lock`` (stream/trainer.py); :meth:`learn` grows the tables to whatever it finds."""
        with self.rows.lock:
            sync_rows(self.group, self.rows, samples)
            self.rows.grow_tables(self.model, self.optimizer, self.shared_gen)

    def grow_tables(self) -> None:
        """Grow the tables (and their optimizer state) to the id maps: rows assigned by another
        thread since (stream/trainer.py's publishing thread) get their table rows."""
        with self.rows.lock:
            self.rows.grow_tables(self.model, self.optimizer, self.shared_gen)

    def step(self, samples: Sequence[Sample], train_limit: int = 0, score_limit: int = 0) -> StepOutput:
        """Vectors (and the clicks' click-time predictions from their forward), then prequential
        scoring, then learning: the trainer's order, in one call.

        With ``train_limit`` > 0 a larger batch is trained on a random ``train_limit`` of it, and
        with ``score_limit`` > 0 scored on a random ``score_limit`` of it. Scoring comes from the
        training forward (:meth:`learn` with ``score_limit``) where that pass is the model as it
        is (:meth:`scores_from_training`), else from a pass of its own (:meth:`score`)."""
        out = self.vectors(samples)
        self.note_predictions(out.clicks)
        if self.scores_from_training(train_limit, len(samples)):
            out.loss = self.learn(samples, train_limit, score_limit=score_limit)
        else:
            self.score(samples, score_limit)  # still the model before this step's update: prequential
            out.loss = self.learn(samples, train_limit)
        return out

    def scores_from_training(self, train_limit: int = 0, n_samples: int = 0) -> bool:
        """Whether :meth:`learn` can score the new samples from its own forward pass: it learns,
        trains on every new sample (no ``train_limit`` below their number), and its model has no
        active dropout, so the training forward is the eval forward (the online model's dropout is
        0: stream/configs.py). With dropout the scores come from a separate eval pass."""
        return (self.cfg.train and self.optimizer is not None and not (0 < train_limit < n_samples)
                and not has_dropout(self.model))

    @torch.no_grad()
    def score(self, samples: Sequence[Sample], score_limit: int = 0) -> None:
        """Score the new samples with the model as it is (prequential test-then-train): every
        click's P(buy), kept until its label arrives; a random ``score_limit`` of the retrieval
        targets; then the labels that arrived join their clicks' predictions, into the rolling
        metrics."""
        vocabs = self.rows.vocabs()
        self._take_predictions()
        self._snapshot_predictions(samples)
        # each label will look for its click: all of them, unless the publishing forward predicted it
        clicks = self._unpredicted([s for s in samples if s.kind == CLICK])
        rest = [s for s in samples if s.kind == RETRIEVAL]
        if 0 < score_limit < len(rest):
            rest = self.rng.sample(rest, score_limit)
        scored = clicks + rest
        if scored:
            # keys = item rows: the pointer's hits land on catalogue columns (row r ↔ column r - 1)
            new = collate(scored, vocabs, self.device, keys=RowKeys(vocabs.items))
            self.model.eval()
            states = self.model.encode(new)
            self._score_conversions(new, states, clicks)
            self._score_retrievals(new, states)
        self._judge_conversions(samples)

    def learn(self, samples: Sequence[Sample], train_limit: int = 0, score_limit: int | None = None,
              cases: tuple[Sequence[Sample], Sequence[Sample]] | None = None) -> float:
        """One optimizer step on the samples (a random ``train_limit`` of them) plus
        ``replay_share`` drawn from the reservoir. Uses only the model's public API (``encode``,
        heads, ``loss``), so encoders can change beneath it.

        ``score_limit`` not None: the new samples are scored prequentially from this step's own
        forward pass, whose node states are those of the model before the update (one forward per
        step instead of a separate eval pass): every click's P(buy), kept until its label arrives
        (under ``wait`` the clicks ride in the batch as rows the loss ignores), and a random
        ``score_limit`` (0 = all) of the retrieval targets; the step's labels then join their
        clicks' predictions. The
        catalogue's item categories are taken as they were before the step observed its targets,
        as the separate pass sees them. Where that pass is not the eval pass
        (:meth:`scores_from_training` False: dropout, ``train_limit``) the scoring is a pass of
        its own (:meth:`score`), first.

        ``cases`` (conversion, retrieval samples among ``samples``: the guard's shadow cases,
        model/shadow.py) are scored from the same pass too, into :attr:`last_cases` (P(buy) of
        each conversion case, the full-catalogue mid-rank of each retrieval case).

        With ranks, every rank calls this together with its own samples (possibly none): the
        step is taken on the union of the ranks' batches (model/distributed.py), or by no rank
        when the union is empty; the loss returned is the union's."""
        self.last_cases = None
        self._take_predictions()
        self._snapshot_predictions(samples)
        if score_limit is not None and samples and not self.scores_from_training(train_limit, len(samples)):
            self.score(samples, score_limit)
            score_limit = None
        if cases is not None and (score_limit is None or not self.cfg.train):  # scored in a pass of their own
            self.last_cases = score_outcomes(self.model, self.rows, self.device, cases[0], cases[1])
            cases = None
        if not self.cfg.train or self.optimizer is None:
            return float("nan")
        scoring = score_limit is not None
        mode = self.cfg.conversion_feedback
        # each trained row with the sample it came from (under fnw a click trains as a negative copy)
        pairs = [(row, s) for s in samples for row in training_samples([s], mode)]
        if 0 < train_limit < len(pairs):
            pairs = self.rng.sample(pairs, train_limit)
        train = [row for row, _ in pairs]
        # rows only scored, never trained: under wait, the clicks the publishing forward did not
        # predict (the loss ignores CLICK rows; a predicted click needs no row at all)
        watch = self._unpredicted([s for s in samples if s.kind == CLICK]) if scoring and mode == "wait" else []
        sources = [s for _, s in pairs] + watch
        k = 0
        if self.reservoir.samples and train:
            k = int(round(len(train) * self.cfg.replay_share / (1 - self.cfg.replay_share)))
        replay = self.reservoir.draw(k, self.rng)
        rows = train + watch + replay
        # [trained rows in the largest batch, rows, newest event time] over ranks: whether anyone steps
        head = self.group.all_max(torch.tensor([len(train) + len(replay), len(rows),
                                                max((s.event_ts for s in samples), default=float("-inf"))],
                                               dtype=torch.float64))
        if head[0] == 0:  # nobody trains: the scores (if asked) from an eval pass of their own, no step
            if scoring:
                self.score(samples, score_limit)
                if cases is not None:
                    self.last_cases = score_outcomes(self.model, self.rows, self.device, cases[0], cases[1])
            return float("nan")
        self.last_replayed = len(replay)
        with self.rows.lock:  # rows a publishing thread assigned since: tables grown to them first
            self.rows.grow_tables(self.model, self.optimizer, self.shared_gen)
            vocabs = self.rows.vocabs()
            batch = collate(rows, vocabs, self.device, keys=RowKeys(vocabs.items)) if rows else None
        self.model.train()
        view = global_view(self.group, batch, self.model.cfg.n_items, self.model.cfg.uniform_negatives,
                           self.shared_gen, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if batch is not None:
            categories = self.model.item_category.clone() if scoring else None  # [n_items], before observe
            out = self.model.loss(batch, view, feedback=self.cfg.conversion_feedback, keep_states=scoring)
            loss = out.loss
            if scoring:
                with torch.no_grad():
                    states = out.states.detach()
                    self._score_from(batch, states, sources, score_limit or 0, categories)
                    if cases is not None:
                        self.last_cases = self._case_outcomes(batch, states, sources, cases, categories)
            if loss.requires_grad:  # (only scored rows here: nothing of this rank's to learn from)
                loss.backward()
            share = loss.detach().reshape(1)
        else:  # nothing here this step: observe the union like every rank, contribute zeros
            self.model.observe(view)
            share = torch.zeros(1, device=self.device)
            if cases is not None:  # (no row here: no click or retrieval case either)
                self.last_cases = Outcomes(np.zeros(0), np.zeros(0))
        if scoring:  # the labels that arrived join their clicks' predictions (made above or before)
            self._judge_conversions(samples)
        total = all_reduce_gradients(self.group, list(self.model.parameters()), share)
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # (no gradients kept between steps: lighter copies)
        self.version += 1
        self.reservoir.offer(training_samples(samples, mode), self.rng)
        self.last_loss = float(total[0])
        if self.version % self.cfg.evict_every == 0:
            self.evicted_items += self.rows.evict(self.model, self.optimizer, float(head[2]), self.cfg.idle_ttl_s,
                                                  self.shared_gen)
        return self.last_loss

    def _score_from(self, batch, states: torch.Tensor, sources: list[Sample], score_limit: int,
                    categories: torch.Tensor) -> None:
        """Prequential scores of the batch's first ``len(sources)`` rows (the new samples, each
        row's source sample in ``sources``; the rest is replay) from the training forward's node
        states [B, N, d], with the catalogue's item categories ``categories`` as they were before
        this step: every click's P(buy) (kept until its label arrives) and a random
        ``score_limit`` of the retrieval targets."""
        clicks = [k for k, s in enumerate(sources) if s.kind == CLICK and not self.clicktime.has(s)]
        ret = [k for k, s in enumerate(sources) if s.kind == RETRIEVAL]
        if 0 < score_limit < len(ret):
            ret = self.rng.sample(ret, score_limit)
        if clicks:
            at = torch.as_tensor(clicks, dtype=torch.long, device=states.device)
            probs = conversion_probs(self.model, batch.select(at), states[at])  # [V]
            self.clicktime.predict([sources[k] for k in clicks], probs, self.version)
            self.clicks_in_step += len(clicks)
        if ret:
            at = torch.as_tensor(ret, dtype=torch.long, device=states.device)
            self._score_retrievals(batch.select(at), states[at], categories)

    def _case_outcomes(self, batch, states: torch.Tensor, sources: list[Sample],
                       cases: tuple[Sequence[Sample], Sequence[Sample]], categories: torch.Tensor) -> Outcomes:
        """The shadow cases' outcomes from the training forward (as :func:`model.shadow.score_outcomes`
        computes them in a pass of its own): P(buy) [C] of the picked clicks (their click-time
        predictions: the store's, made by the publishing forward or by this step) and
        full-catalogue mid-ranks [R] of the picked retrieval targets."""
        at = {id(s): k for k, s in enumerate(sources)}
        ret = torch.as_tensor([at[id(s)] for s in cases[1]], dtype=torch.long, device=states.device)
        probs, ranks = np.zeros(0), np.zeros(0)
        if len(cases[0]):
            probs = self.clicktime.peek(cases[0])  # [C] (every click of the step is predicted by now)
        if len(ret):
            ranks = catalogue_ranks(self.model, self.rows, batch.select(ret), states[ret], categories)  # [R]
        return Outcomes(probs, ranks)

    def _score_conversions(self, batch, states: torch.Tensor, clicks: Sequence[Sample] = ()) -> None:
        """P(buy) of the click rows (the batch's CLICK samples, ``clicks`` in row order), kept with
        this model version until their labels arrive (:meth:`_judge_conversions`)."""
        rows = (batch.kind == CLICK).nonzero().squeeze(1)
        if len(rows):
            self.clicktime.predict(clicks, conversion_probs(self.model, batch.select(rows), states[rows]), self.version)
            self.clicks_in_step += len(rows)

    def _judge_conversions(self, samples: Sequence[Sample]) -> None:
        """The labels that arrived (conversion samples) with their clicks' click-time predictions,
        into the rolling metrics' maturing buffer; the cases whose clicks are older than every
        click still awaiting its label (the store's horizon) enter the window, in click-time
        order (model/prequential.py). A label whose prediction was lost is counted, not scored."""
        joined = self.clicktime.join([s for s in samples if s.kind == CONVERSION])
        if len(joined):
            self.metrics.add_conversion(joined.labels, joined.probs[:, 0], joined.users, joined.click_ts)
        self.metrics.mature(self.clicktime.horizon())

    def _score_retrievals(self, batch, states: torch.Tensor, categories: torch.Tensor | None = None) -> None:
        """Mid-rank of each retrieval target among every item that has a row (full catalogue,
        pointer included) into the rolling metrics; on a large catalogue a random subset of the
        rows, ``rank_budget`` / catalogue size of them. ``categories``: the items' categories to
        score with (default the model's own)."""
        ret = (batch.kind == RETRIEVAL).nonzero().squeeze(1)
        cap = max(16, self.cfg.rank_budget // self.model.cfg.n_items)  # full ranking costs O(catalogue) per row: bound it
        if len(ret) > cap:
            ret = ret[torch.as_tensor(sorted(self.rng.sample(range(len(ret)), cap)), device=ret.device)]
        if not len(ret):
            return
        ranks = catalogue_ranks(self.model, self.rows, batch.select(ret), states[ret], categories)  # [R]; no row: a miss
        self.metrics.add_ranks(ranks)
        self.batch_hr = ranking_metrics(ranks, self.metrics.k)["hr"]

    # -- vectors ---------------------------------------------------------------------------

    @staticmethod
    def newest_samples(samples: Sequence[Sample]) -> dict[str, Sample]:
        """Each user's sample whose graph ends at the user's newest event in the batch: by event
        time, then batch order (an event's CLICK sample follows its retrieval sample, and its
        context already includes the click); a conversion sample, whose context ends at an older
        click, only for a user with nothing else in the batch."""
        best: dict[str, tuple[tuple[bool, float, int], Sample]] = {}
        for k, s in enumerate(samples):
            key = (s.kind != CONVERSION, s.event_ts, k)
            if s.user_id not in best or key > best[s.user_id][0]:
                best[s.user_id] = (key, s)
        return {u: s for u, (_key, s) in best.items()}

    @staticmethod
    def graph_of(s: Sample) -> UserGraph:
        """The graph up to and including the sample's event: a retrieval sample's context with
        its target appended (a copy), a click's or a conversion's context as it is."""
        if s.kind != RETRIEVAL:
            return s.graph
        g = s.graph.copy()
        g.append(s.item_id, s.category_id, s.behavior, s.event_ts)
        return g

    def user_vectors(self, samples: Sequence[Sample], clicks: Sequence[Sample] = (), shared_only: bool = False
                     ) -> tuple[dict, dict[str, bytes], dict[str, list[str]], list[Sample], np.ndarray]:
        """Vector [d] and newest event ts, published context and bought items of each user, and
        P(buy) [C] of ``clicks`` from the same forward (a click that is its user's newest
        sample shares the user's row; ``shared_only``: only those), with the clicks predicted."""
        newest = self.newest_samples(samples)
        uids = list(newest)
        rows = [s if s.kind == CLICK else Sample(RETRIEVAL, u, self.graph_of(s), "", "", 0, 1.0, s.event_ts)
                for u, s in newest.items()]
        at = {id(s): k for k, s in enumerate(newest.values()) if s.kind == CLICK}
        for c in clicks:  # a click that is not its user's newest: a row of its own
            if id(c) not in at and not shared_only:
                at[id(c)] = len(rows)
                rows.append(c)
        done = [c for c in clicks if id(c) in at]
        vecs, probs = self._publishing_forward(rows, len(uids), [at[id(c)] for c in done])
        users = {u: (vecs[k], newest[u].event_ts) for k, u in enumerate(uids)}
        contexts = {u: rows[k].graph.tail(self.cfg.sample_len).to_bytes() for k, u in enumerate(uids)}
        bought = {}
        for k, u in enumerate(uids):
            a = rows[k].graph.to_arrays()
            b = [a.items[i] for i in np.flatnonzero(a.behaviors == BUY)]
            if b:
                bought[u] = b
        return users, contexts, bought, done, probs

    def user_vectors_of(self, graphs: dict[str, tuple[UserGraph, float]]) -> dict[str, tuple[np.ndarray, float]]:
        """Vector [d] of each user's graph (user → (graph, newest event ts)), with the model as it is."""
        if not graphs:
            return {}
        uids = list(graphs)
        rows = [Sample(RETRIEVAL, u, graphs[u][0], "", "", 0, 1.0, graphs[u][1]) for u in uids]
        vecs, _ = self._publishing_forward(rows, len(rows), [])
        return {u: (vecs[k], graphs[u][1]) for k, u in enumerate(uids)}

    @torch.no_grad()
    def _publishing_forward(self, rows: list[Sample], n_users: int, click_rows: list[int]
                            ) -> tuple[np.ndarray, np.ndarray]:
        """One eval-mode forward over ``rows``: the vectors [U, d] of the first ``n_users`` rows
        (each a user's graph) and P(buy) [C] of the rows ``click_rows`` (CLICK samples: a click's
        context is its graph up to and including the click, state/samples.py)."""
        if not rows:
            return np.zeros((0, self.model.cfg.dim), np.float32), np.zeros(0)
        self.model.eval()
        vocabs = self.rows.vocabs()
        # keys = item rows, as the training step's batches (the conversion head compares them)
        batch = collate(rows, vocabs, self.device, keys=RowKeys(vocabs.items))
        states = self.model.encode(batch)  # [R, N, d]
        vecs = np.zeros((0, self.model.cfg.dim), np.float32)
        if n_users:
            own = (batch, states)
            if n_users < len(rows):
                at = torch.arange(n_users, device=states.device)
                own = (batch.select(at), states[at])
            vecs = self.model.user_vectors(*own).float().cpu().numpy()  # [U, d]
        probs = np.zeros(0)
        if click_rows:
            at = torch.as_tensor(click_rows, dtype=torch.long, device=states.device)
            probs = conversion_probs(self.model, batch.select(at), states[at])  # [C]
        return vecs, probs

    @torch.no_grad()
    def item_vectors_of(self, items: dict[str, str]) -> dict[str, np.ndarray]:
        """Item tower vectors [d] of items (id → category id) that have rows."""
        ids, item_rows = self.rows.peek_items(list(items))
        if not ids:
            return {}
        rows = torch.as_tensor(item_rows, device=self.device)
        cats = torch.as_tensor(self.rows.vocabs().categories.lookup([items[i] for i in ids]), device=self.device)
        vecs, _bias = self.model.item_vectors(rows, cats)
        arr = vecs.float().cpu().numpy()  # [M, d]
        return {i: arr[k] for k, i in enumerate(ids)}

    def conversion_proba(self, context: UserGraph, candidates: Sequence[tuple[str, str]]) -> list[float]:
        """P(buy) of each candidate (item id, category id) given a user's context graph."""
        return conversion_proba(self.model, self.rows, self.device, context, candidates)

    def online_metrics(self) -> dict[str, float | None]:
        """Rolling prequential metrics (conversion: click-time predictions joined to their labels),
        plus the last batch's own HR@10 (``batch_hr@10``) and the click-time store's counts
        (``clicktime_*``: pending, evicted, unmatched, ...)."""
        return {**self.metrics.snapshot(), "batch_hr@10": self.batch_hr,
                **{f"clicktime_{k}": v for k, v in self.clicktime.counts().items()},
                "clicktime_in_step": self.clicks_in_step, "clicktime_snapshot": self.clicks_by_snapshot}

    def idmap_stats(self) -> list[tuple[str, int, int]]:
        return self.rows.stats()

    def inference_copy(self, version: int | None = None) -> "OnlineLearner":
        """A copy to publish vectors with while this learner trains (stream/trainer.py): its own
        model (a copy of the weights now, no gradients), this learner's id maps (shared, behind
        their lock), no optimizer; it never learns and never assigns rows itself."""
        twin = copy.copy(self)
        twin.cfg = dataclasses.replace(self.cfg, train=False)
        twin.model = inference_model(self.model)
        twin.optimizer = None
        twin.version = self.version if version is None else version
        twin._handed = deque()  # (never takes the learner's)
        return twin

    def frozen_copy(self) -> "OnlineLearner":
        """A copy that scores but never learns or assigns rows (the benchmark's frozen model; the
        learner's conversion snapshot)."""
        twin = copy.copy(self)
        twin.cfg = dataclasses.replace(self.cfg, train=False, conversion_snapshot_steps=0)
        twin.model = copy.deepcopy(self.model)
        twin.rows = copy.deepcopy(self.rows)
        twin.optimizer = None
        twin.metrics = RollingMetrics(window=self.cfg.metric_window)
        twin.reservoir = Reservoir(0)
        twin.clicktime = ClickTimeStore(self.cfg.pending_predictions)
        twin._handed = deque()
        twin._snapshot = None
        twin._snapshot_batch = []
        return twin

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a restart needs: the model part (:func:`model.inference.model_state`),
        optimizer, counters, reservoir, rolling metrics and random states."""
        return {
            **model_state(self.model, self.rows),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "version": self.version, "seen": self.reservoir.seen,
            "reservoir": [s.to_bytes() for s in self.reservoir.samples],
            "metrics": self.metrics.state_dict(),
            "clicktime": self.clicktime.state_dict(),  # pending click-time predictions: a restart keeps them
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "shared_rng": self.shared_gen.get_state(),  # uniform negatives, fresh rows: a resumed run draws the same
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a :meth:`state_dict`; raises :class:`IncompatibleCheckpoint` when its model
        has another shape than this learner's."""
        # tables sized exactly as the saved id maps (whatever chunk this process would have used)
        self.model, self.rows = load_model(d, self.model.cfg, self.device)
        self.forget_snapshot()
        self.optimizer = online_adam(self.model.parameters(), self.cfg.lr)
        if d["optimizer"] is not None:
            self.optimizer.load_state_dict(d["optimizer"])
        self.version = d["version"]
        self.reservoir.load(d["reservoir"], d["seen"])
        self.metrics.load_state_dict(d["metrics"])
        self._load_clicktime(d)
        self.rng.setstate(d["rng"])
        torch.set_rng_state(d["torch_rng"])
        if "shared_rng" in d:  # (checkpoints before data-parallel ranks: the seed's state)
            self.shared_gen.set_state(d["shared_rng"])

    RANK_KEYS = ("seen", "reservoir", "metrics", "clicktime", "rng", "torch_rng")

    def _load_clicktime(self, d: dict) -> None:
        """The pending click-time predictions of a state (none in a checkpoint older than them)."""
        self.clicktime = ClickTimeStore(self.cfg.pending_predictions)
        if "clicktime" in d:
            self.clicktime.load_state_dict(d["clicktime"])

    def rank_state_dict(self) -> dict:
        """What differs between data-parallel ranks (reservoir, rolling metrics, random states):
        each rank's part of a checkpoint; the rest (:meth:`state_dict`) is the same on every rank."""
        d = self.state_dict()
        return {k: d[k] for k in self.RANK_KEYS}

    def load_rank_state_dict(self, d: dict) -> None:
        """Restore a rank's part (after :meth:`load_state_dict` of the shared part)."""
        self.reservoir.load(d["reservoir"], d["seen"])
        self.metrics.load_state_dict(d["metrics"])
        self._load_clicktime(d)
        self.rng.setstate(d["rng"])
        torch.set_rng_state(d["torch_rng"])

    def after_checkpoint(self, data_dir: Path, step: int) -> None:
        """Mirror the id maps to RocksDB as of the checkpoint just written."""
        self.rows.sync_to(data_dir, step)

    def warm_start(self, path: Path) -> None:
        """Initialise from a learner state saved earlier (``state_dict()`` written with torch.save);
        plain data only, like a checkpoint (a file that could run code is refused)."""
        self.load_state_dict(load_checkpoint(path, self.device))
