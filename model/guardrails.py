"""Continuous training you can trust: shadow evaluation, the guard, rollback and the registry, as
the few hooks the trainer calls (stream/trainer.py) and the guard benchmark drives in-process.

- :meth:`Guardrails.start`: after the trainer restored its checkpoint: baseline = the last good
  version; a pinned version, a restored version marked bad, or a rollback in force are honoured.
- :meth:`Guardrails.before_learn`: the step's new samples, before the optimizer step: the shadow
  scores online, baseline and repeat-recent on the same share of them.
- :meth:`Guardrails.after_step`: the decision: a hand pin, the guard (online below the baseline by
  the margin, beyond chance) → rollback; a window held up → candidates become good (and the newest
  good becomes the baseline), a rolled-back trainer goes live again. Returns what happened.
- :meth:`Guardrails.after_checkpoint`: the checkpoint becomes a candidate version in the registry.
- :attr:`Guardrails.serving`: the model to publish from: the online learner when live, the good
  (or pinned) model while rolled back or pinned.

With several trainer ranks (``group``, model/distributed.py) there is one decision, made on the
evidence of all ranks: every rank scores its own samples in the shadow and the scored outcomes
are all-gathered, so every rank's shadow holds the same pooled cases; rank 0 alone reads and
writes the registry and decides; its :class:`Decision` (the event, the serving state, the
baseline version) goes to every rank, and the others take it: the same rollback or pin (the same
good weights grafted the same way onto the same id maps, so the ranks' models stay equal, each
rank taking its own part's replay reservoir), the same baseline, the same serving state. Every
hook is therefore a collective with ranks: each rank calls each hook at the same point of the
same step.

Registry writes go through :func:`state.registry.editing` (a lock shared with ``tgastream
rollback``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tgastream.model.distributed import Group, Solo
from tgastream.model.guard import GuardConfig, Verdict, decide, stream_shifted
from tgastream.model.online import OnlineLearner, Reservoir
from tgastream.model.prequential import RollingMetrics
from tgastream.model.inference import load_model
from tgastream.model.rollback import graft_model, rollback_learner
from tgastream.model.shadow import Cases, Outcomes, Scored, Shadow, ShadowConfig
from tgastream.state.checkpoint import load_checkpoint
from tgastream.state.rank_checkpoint import part_path
from tgastream.state.registry import ModelVersion, Registry, RegistryError, editing

log = logging.getLogger("tgastream.guard")

LIVE, PINNED, ROLLED_BACK = "live", "pinned", "rolled_back"


@dataclass(frozen=True)
class GuardrailsConfig:
    enabled: bool = True
    guard: GuardConfig = GuardConfig()
    shadow: ShadowConfig = ShadowConfig()


@dataclass(frozen=True)
class Event:
    """What :meth:`Guardrails.after_step` did: ``kind`` rollback | pin | hold | recovered | promoted."""

    kind: str
    version: int | None
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    """Rank 0's decision of one step, as every rank takes it."""

    event: Event | None
    state: str
    baseline: ModelVersion | None  # the good (or pinned) version in use; its file on the shared checkpoint dir
    parent: int | None
    rollbacks: int
    verdict: Verdict
    stream_shifted: bool


class GoodModel:
    """A good (or pinned) checkpoint's model, scored and served on the online learner's *current*
    id maps: grafted as a rollback would (model/rollback.py), so an item that arrived since has a
    row (a fresh one) and the pointer can still point at it. Judging the baseline on its own, older
    maps would count every new item as unknown and handicap it; this is what a rollback serves."""

    def __init__(self, learner: OnlineLearner, state: dict, entry: ModelVersion) -> None:
        self.learner = learner
        self.entry = entry  # its registry entry
        self.version = entry.version
        self.model, self.rows = load_model(state, learner.model.cfg, learner.device)
        self._key: tuple | None = None
        self._twin: OnlineLearner | None = None

    def aligned(self) -> OnlineLearner:
        """An inference-only learner (never learns or assigns rows) with the good weights on the
        online learner's current rows; rebuilt when those rows change."""
        L = self.learner
        with L.rows.lock:  # (a publishing thread may assign rows meanwhile: built on one state of the maps)
            if hasattr(L, "grow_tables"):
                L.grow_tables()  # tables as large as the maps, as the graft's
            return self._aligned(L)

    def _aligned(self, L: OnlineLearner) -> OnlineLearner:
        """Rebuilt when the tables grow or rows are evicted. Ids that only got rows since are
        already right in the last graft: a row the good model lacks holds the seeded fresh value
        of its row number, whatever id it got (rebuilding on every new id cost a graft, O(ids) of
        Python and a model's initialisation, per trainer step). The catalogue's categories follow
        the online model's at every call."""
        key = (id(L.model), id(L.rows), L.rows.items.capacity, L.rows.items.evictions,
               L.rows.categories.capacity, L.rows.categories.evictions)
        if self._twin is not None and key == self._key:
            self._twin.model.item_category.copy_(L.model.item_category)
        else:
            twin = copy.copy(L)
            twin.cfg = dataclasses.replace(L.cfg, train=False)
            twin.model = graft_model(self.model, self.rows, L.model, L.rows, L.device)
            twin.optimizer = None
            twin.metrics = RollingMetrics(window=L.cfg.metric_window)
            twin.reservoir = Reservoir(0)
            twin.version = self.version
            twin.batch_hr = None
            self._twin, self._key = twin, key
        return self._twin


class Guardrails:
    """Shadow evaluation, the guard's decision, rollbacks and the registry of one trainer."""

    def __init__(self, cfg: GuardrailsConfig, learner: OnlineLearner, checkpoint_dir: Path,
                 group: Group | None = None) -> None:
        self.cfg = cfg
        self.learner = learner
        self.dir = Path(checkpoint_dir)
        self.group = group or Solo()
        self.leader = self.group.rank == 0  # reads and writes the registry, decides
        self.shadow = Shadow(cfg.shadow, cfg.guard.window, keep_positives=2 * cfg.guard.min_positives)
        self.baseline: GoodModel | None = None
        self.state = LIVE
        self.parent: int | None = None  # the version the next checkpoint descends from
        self.rollbacks = 0
        self.last_verdict = Verdict(False)
        self._scored = 0  # retrieval + conversion cases the shadow scored so far
        self._candidates: list[tuple[int, int]] = []  # (version, cases scored when it was saved)
        self._tripped_since_reset = False
        self._unpinnable: int | None = None  # a pinned version whose checkpoint did not load (not retried)
        self._anchor: float | None = None  # repeat-recent HR@10 when the baseline was judged
        self._anchor_n = 0  # cases it was measured on
        self._shifted_cases = 0  # repeat-recent's retrieval count when the stream started to look shifted
        self.stream_shifted = False
        self._broken_stretch_ended = False  # the stream looked broken and is normal again: drop what was learned

    # -- registry ------------------------------------------------------------------------------

    def registry(self) -> Registry:
        """The registry as saved (read-only; changes go through :func:`editing`)."""
        return Registry.load(self.dir)

    def _load_state(self, v: ModelVersion) -> dict:
        return load_checkpoint(self.dir / v.file, self.learner.device)["learner"]

    def _set_baseline(self, v: ModelVersion | None, state: dict | None = None) -> bool:
        """Make ``v`` the baseline; False (baseline unchanged) when its checkpoint cannot be read."""
        if v is None:
            self.baseline = None
        else:
            try:
                state = state if state is not None else self._load_state(v)
            except (OSError, ValueError, KeyError) as exc:  # pruned, truncated or refused: keep the old one
                log.warning("model version %d cannot be the baseline: %s", v.version, exc)
                return False
            self.baseline = GoodModel(self.learner, state, v)
        self.shadow.set_baseline(self.baseline)
        self._tripped_since_reset = False
        return True

    @property
    def serving_version(self) -> int:
        """The model version of what is published now (no graft needed to know it)."""
        return self.baseline.version if self.state != LIVE and self.baseline is not None else self.learner.version

    @property
    def serving(self) -> OnlineLearner:
        """The learner whose vectors are published now."""
        return self.baseline.aligned() if self.state != LIVE and self.baseline is not None else self.learner

    # -- hooks -----------------------------------------------------------------------------------

    def start(self, restored_version: int | None) -> Event | None:
        """After the trainer restored (``restored_version``: the checkpoint's learner version, None
        for a fresh start): baseline, and a pin / bad checkpoint / rollback in force."""
        self.parent = restored_version
        if not self.cfg.enabled:
            return None
        event = None
        if self.leader:
            with editing(self.dir) as reg:
                event = self._start(reg, restored_version)
        return self._shared(event)

    def _start(self, reg: Registry, restored_version: int | None) -> Event | None:
        good = reg.last_good()
        self._set_baseline(good)
        pinned = reg.pinned()
        if pinned is not None:
            return self._pin(pinned, reg)
        restored = next((v for v in reg.versions if v.version == restored_version), None)
        if restored is not None and restored.status == "bad" and good is not None:
            return self._rollback(reg, good, "the restored checkpoint is marked bad")
        if reg.serving.get("state") == ROLLED_BACK and good is not None and reg.serving.get("version") == good.version:
            self.state = ROLLED_BACK  # still held: publish from the good model until the online one holds up
        for v in reg.versions:
            if v.status == "candidate":
                self._candidates.append((v.version, 0))
        return None

    def before_learn(self, samples: list) -> None:
        """Score the step's new samples (before the online model learns from them), the online
        model in a pass of its own. With ranks every rank calls it every step (with or without
        samples): the scored cases are pooled."""
        if not self.cfg.enabled or (not samples and not self.group.distributed):
            return
        self._note_scored(self.shadow.evaluate(samples, self.learner.model, self.learner.rows, self.learner.device))

    def cases(self, samples: list) -> Cases | None:
        """The step's shadow cases, scored by the baseline and repeat-recent (before the online
        model learns); the online model scores them in its training step (``learn(cases=...)``)
        and :meth:`note_cases` takes its outcomes. None: nothing to score."""
        if not self.cfg.enabled or not samples:
            return None
        return self.shadow.prepare(samples, self.learner.model.cfg.n_items, self.learner.rows)

    def note_cases(self, cases: Cases | None, online: Outcomes | None) -> None:
        """The cases of :meth:`cases` with the online outcomes of the step, into the shadow's
        metrics and the guard's window. With ranks every rank calls it every step (a collective)."""
        if not self.cfg.enabled or (cases is None and not self.group.distributed):
            return
        scored = None if cases is None or online is None else self.shadow.complete(cases, online)
        self._note_scored(scored)

    def _note_scored(self, scored: Scored | None) -> None:
        pooled = self.group.gather_objects(scored) if self.group.distributed else [scored]
        online = self.shadow.rolling["online"]
        before = online.retrievals_seen + online.conversions_seen
        # conversion cases mature up to the earliest click awaiting its label on any rank (a rank
        # without a part this step: unknown, so nothing matures until the next step)
        horizon = min((-math.inf if part is None else part.horizon for part in pooled), default=-math.inf)
        for part in pooled:  # in rank order: every rank's shadow holds the same cases
            if part is not None:
                self.shadow.note(part, horizon)
        self._scored += online.retrievals_seen + online.conversions_seen - before

    def after_step(self) -> Event | None:
        """A hand pin, the guard's verdict (rollback) or a window held up (promotion, recovery)."""
        if not self.cfg.enabled:
            return None
        event = None
        if self.leader:
            with editing(self.dir) as reg:
                event = self._decide(reg)
        return self._shared(event)

    def _decide(self, reg: Registry) -> Event | None:
        pinned = reg.pinned()
        if pinned is not None and pinned.version != self._unpinnable and (
                self.state != PINNED or self.baseline is None or self.baseline.version != pinned.version):
            return self._pin(pinned, reg)
        if pinned is None and self.state == PINNED:
            self.state = LIVE  # released by hand
            reg.set_serving(LIVE, self.learner.version)
            return Event("recovered", self.learner.version, "pin released")
        if self.baseline is None:
            return self._promote_first(reg)
        if self._stream_looks_shifted():
            self.shadow.paired.clear()  # no verdict on a broken stream; judged again once it is normal
            self.last_verdict = Verdict(False, reason="stream shifted")
            if self.state == LIVE:  # a model learning from a broken stream is not published meanwhile
                return self._hold(reg)
            return None
        if self._broken_stretch_ended:
            self._broken_stretch_ended = False
            good = reg.last_good()
            if good is not None and self.state != PINNED:  # what it learned from the broken stretch goes
                return self._rollback(reg, good, "it learned from a stretch of the stream that looked broken")
        verdict = decide(self.shadow.paired, self.cfg.guard)
        self.last_verdict = verdict
        if verdict.trip and self.state != PINNED:
            good = reg.last_good()
            if good is not None:
                return self._rollback(reg, good, verdict.reason)
        margin = self.cfg.guard.margin
        if verdict.evaluable and not verdict.trip and all(d is None or d <= margin / 2 for d in verdict.deficit.values()):
            return self._held_up(reg)  # well within the margin: a model on its way down is not vouched for
        return None

    def after_checkpoint(self, path: Path, step: int, metrics: dict) -> ModelVersion | None:
        """Record the checkpoint just written as a candidate version (parent: the lineage). With
        ranks only rank 0 calls it, once the checkpoint is complete."""
        if not self.cfg.enabled:
            return None
        with editing(self.dir) as reg:
            try:
                entry = reg.add(self.learner.version, self.parent, step, Path(path).name, metrics)
            except RegistryError as exc:  # e.g. resumed from an older checkpoint than the newest registered
                log.warning("checkpoint %s not registered: %s", Path(path).name, exc)
                return None
        if entry.status == "candidate" and not self.stream_shifted \
                and not any(v == entry.version for v, _ in self._candidates):  # (trained on a broken stream: never good)
            self._candidates.append((entry.version, self._scored))
        self.parent = entry.version
        return entry

    # -- ranks: rank 0 decides, every rank takes the decision ------------------------------------

    def _shared(self, event: Event | None) -> Event | None:
        """Rank 0's decision on every rank (a collective); one process: ``event`` as it is."""
        if not self.group.distributed:
            return event
        mine = Decision(event, self.state, self.baseline.entry if self.baseline is not None else None, self.parent,
                        self.rollbacks, self.last_verdict, self.stream_shifted) if self.leader else None
        decision = self.group.gather_objects(mine)[0]
        assert isinstance(decision, Decision)
        if not self.leader:
            self._take(decision)
        return decision.event

    def _take(self, d: Decision) -> None:
        """Follow rank 0: its rollback or pin (same weights onto the same id maps), its baseline,
        its serving state."""
        mine = self.baseline.version if self.baseline is not None else None
        if d.event is not None and d.event.kind in ("rollback", "pin") and d.baseline is not None:
            state = self._load_state(d.baseline)  # rank 0 just loaded it: it exists
            rollback_learner(self.learner, state, reservoir=self._own_reservoir(d.baseline))
            self._set_baseline(d.baseline, state)
        elif d.baseline is None and mine is not None:
            self._set_baseline(None)
        elif d.baseline is not None and d.baseline.version != mine and not self._set_baseline(d.baseline):
            log.error("rank %d cannot load baseline version %d; it scores without one", self.group.rank,
                      d.baseline.version)
        self.state, self.parent, self.rollbacks = d.state, d.parent, d.rollbacks
        self.last_verdict, self.stream_shifted = d.verdict, d.stream_shifted

    def _own_reservoir(self, v: ModelVersion) -> dict:
        """For a rollback on rank r > 0: the replay reservoir of rank r's own part of the good
        checkpoint (the model file holds rank 0's); an empty one when that part is gone."""
        path = part_path(self.dir, v.step, self.group.rank, self.group.world)
        try:
            part = load_checkpoint(path, self.learner.device)["learner_rank"]
            return {"reservoir": part["reservoir"], "seen": int(part["seen"])}
        except (OSError, ValueError, KeyError) as exc:
            log.warning("rank %d: no reservoir from %s (%s): replay starts empty", self.group.rank, path.name, exc)
            return {"reservoir": [], "seen": 0}

    def protected_files(self) -> set[str]:
        """Checkpoint files retention must keep (the last good, a pinned one)."""
        return self.registry().protected_files() if self.cfg.enabled else set()

    # -- decisions -------------------------------------------------------------------------------

    def _recent_repeat_hits(self, n: int) -> np.ndarray:
        """Repeat-recent's hits on the latest ``n`` retrieval cases (none while fewer)."""
        ranks = self.shadow.rolling["repeat"].ranks
        tail = list(ranks)[-n:] if len(ranks) >= n else []
        return np.asarray(tail) <= 10

    def _anchor_now(self) -> None:
        """Repeat-recent's level over the whole window, when the baseline is judged good."""
        hits = self._recent_repeat_hits(min(len(self.shadow.rolling["repeat"].ranks), self.cfg.guard.window))
        self._anchor = float(hits.mean()) if len(hits) >= self.cfg.guard.min_retrievals else None
        self._anchor_n = len(hits)

    def _stream_looks_shifted(self) -> bool:
        """Repeat-recent (no model) fell far below its level when the baseline was judged: the
        stream broke (or drifted). Comparisons and promotions pause; after four windows of it the
        new level is accepted as normal (a lasting drift, not a broken stretch)."""
        if self._anchor is None:
            self._anchor_now()
            return False
        shifted = stream_shifted(self._recent_repeat_hits(self.cfg.guard.min_retrievals), self._anchor,
                                 self._anchor_n, self.cfg.guard)
        seen = self.shadow.rolling["repeat"].retrievals_seen
        if shifted and not self.stream_shifted:
            self._shifted_cases = seen
            log.warning("the stream looks unlike the one the baseline was judged on (repeat-recent HR@10 fell from "
                        "%.3f): guard comparisons and promotions pause", self._anchor)
        elif not shifted and self.stream_shifted:
            log.info("the stream looks normal again: guard comparisons resume")
            self._broken_stretch_ended = True
        self.stream_shifted = shifted
        if shifted and seen - self._shifted_cases > 4 * self.cfg.guard.window:
            log.warning("the stream stayed shifted for four windows: its new level is the normal one now")
            self._anchor_now()
            self.stream_shifted = False
            return False
        return shifted

    def _cases_needed(self) -> int:
        return self.cfg.guard.min_retrievals

    def _promote_first(self, reg: Registry) -> Event | None:
        """No baseline yet: the oldest candidate that has a window of scored cases after it is
        the first good version (nothing to compare against: the starting point)."""
        for version, at in self._candidates:
            if self._scored - at >= self._cases_needed():
                try:
                    v = reg.get(version)
                except ValueError:
                    v = None
                if v is None or not reg.exists(v):  # pruned before it could be judged
                    self._candidates = [(x, a) for x, a in self._candidates if x != version]
                    return None
                if not self._set_baseline(v):
                    self._candidates = [(x, a) for x, a in self._candidates if x != version]
                    return None
                v.status = "good"
                self._candidates = [(x, a) for x, a in self._candidates if x > version]
                self._anchor_now()
                log.info("model version %d is good (first baseline)", version)
                return Event("promoted", version, "first baseline")
        return None

    def _held_up(self, reg: Registry) -> Event | None:
        """A full window without a trip: candidates saved before it become good (the newest one
        the baseline); a rolled-back trainer publishes from the online model again."""
        ready = [(v, at) for v, at in self._candidates if self._scored - at >= self._cases_needed()]
        event = None
        if self.state == ROLLED_BACK:
            self.state = LIVE
            reg.set_serving(LIVE, self.learner.version)
            log.info("the online model held up against version %d over a window: publishing from it again",
                     self.baseline.version if self.baseline else -1)
            event = Event("recovered", self.learner.version)
        if ready:
            newest = None
            for version, _ in ready:
                try:
                    v = reg.get(version)
                except ValueError:
                    continue
                if reg.exists(v):  # one pruned before it was judged cannot be rolled back to: left a candidate
                    v.status = "good"
                    newest = v
            done = {v for v, _ in ready}
            self._candidates = [(v, a) for v, a in self._candidates if v not in done]
            if newest is not None and self._set_baseline(newest):
                self._anchor_now()
                log.info("model version %d is good (held up over a window); it is the baseline now", newest.version)
                event = event or Event("promoted", newest.version)
        return event

    def _rollback(self, reg: Registry, good: ModelVersion, reason: str) -> Event:
        """Mark the versions since ``good`` bad, put its weights into the online learner, and
        publish from it until the online model holds up again."""
        for v in reg.versions:
            if v.version > good.version and v.status == "candidate":
                v.status = "bad"
        self._candidates = []
        try:
            state = self._load_state(good)
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot roll back to model version %d: %s", good.version, exc)
            self.shadow.paired.clear()
            return Event("rollback_failed", good.version, str(exc))
        rollback_learner(self.learner, state)
        self._set_baseline(good, state)
        self.state = ROLLED_BACK
        self.parent = good.version
        self.rollbacks += 1
        reg.set_serving(ROLLED_BACK, good.version)
        log.warning("rollback %d to model version %d: %s (the online model keeps learning from version %d's "
                    "weights; vectors come from version %d until it holds up)", self.rollbacks, good.version,
                    reason, good.version, good.version)
        return Event("rollback", good.version, reason)

    def _hold(self, reg: Registry) -> Event:
        """Publish from the good model while the stream looks broken; the online model keeps
        learning and is judged (rolled back, or live again) once the stream is normal."""
        self.state = ROLLED_BACK
        reg.set_serving(ROLLED_BACK, self.baseline.version if self.baseline else None)
        log.warning("publishing from good version %s while the stream looks broken",
                    self.baseline.version if self.baseline else None)
        return Event("hold", self.baseline.version if self.baseline else None, "the stream looks broken")

    def _pin(self, pinned: ModelVersion, reg: Registry) -> Event | None:
        """A version pinned by hand: its weights into the learner, publish from it until released."""
        try:
            state = self._load_state(pinned)
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot pin model version %d: %s", pinned.version, exc)
            self._unpinnable = pinned.version
            return None
        rollback_learner(self.learner, state)
        self._set_baseline(pinned, state)
        self.state = PINNED
        self.parent = pinned.version
        self._candidates = []
        reg.set_serving(PINNED, pinned.version)
        log.warning("model version %d is pinned by hand: publishing from it", pinned.version)
        return Event("pin", pinned.version)
