"""Data-parallel online learning: what ranks exchange so that each computes the gradient one
process would compute on the union of their batches (DESIGN.md §5, scale-out).

A :class:`Group` is the set of ranks (``torch.distributed``: NCCL when the model is on CUDA, gloo
on CPU); :class:`Solo` is the group of one process, whose collectives are identities, so the
single-process learner runs the very same code.

Per step, with ranks r = 0..W-1 holding batches B_r and the union B = B_0 ∪ ... ∪ B_{W-1} (in
rank order):

- **Rows** (:func:`sync_rows`): every rank sends the ids of its batch that have no row yet and
  the rows of those it touched; all ranks assign rows to the *sorted* union of new ids and mark
  every touched row used at the global newest event time max_r t_r, so the id maps (and the
  table growth that follows their capacity) are identical on every rank. Evictions are then
  decided by each rank from the same maps and the same global time, i.e. from the same view.
- **Targets** (:func:`global_view`): the retrieval targets of every rank are gathered (rows,
  category rows, identity keys), so the in-batch negatives of a row are the targets of the union
  batch, and the target frequency counts n_i (logQ) are incremented by the union's targets on
  every rank (an all-gather of the counts' increments, applied in rank order). Uniform negatives
  are drawn from a generator seeded alike on every rank and advanced alike.
- **Loss** (:meth:`model.base.SequenceRecommender.loss` with a :class:`GlobalView`): each rank
  computes its share of the union's loss,

      L = (1/R) Σ_{i ∈ ret(B)} ℓ_ret(i) + w · (1/C) Σ_{i ∈ conv(B)} ℓ_bce(i)
      L_r = (1/R) Σ_{i ∈ ret(B_r)} ℓ_ret(i) + w · (1/C) Σ_{i ∈ conv(B_r)} ℓ_bce(i),   L = Σ_r L_r

  with R and C the union's retrieval and conversion counts, so ∇L = Σ_r ∇L_r.
- **Gradients** (:func:`all_reduce_gradients`): one all-reduce (sum) of every parameter's
  gradient, flattened into one buffer; a rank without samples contributes zeros and still joins.
  Clipping and the Adam step then see the same gradient on every rank and keep the parameters
  identical.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tgastream.model.batching import Batch
from tgastream.state.samples import CONVERSION, RETRIEVAL, Sample

log = logging.getLogger(__name__)


class Group:
    """Ranks that step together. This base class is the group of one process (:class:`Solo`)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (in place, also returned)."""
        return t

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D tensor (lengths may differ), in rank order."""
        return [t]

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's picklable object, in rank order."""
        return [obj]

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> None:
        pass

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class Solo(Group):
    """One process: every collective is the identity."""


class TorchGroup(Group):
    """The default process group of ``torch.distributed`` (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")  # where collectives run

    def _to(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.device]:
        return t.to(self.device), t.device

    def _all_reduce(self, t: torch.Tensor, op: object) -> torch.Tensor:
        """In place on ``t``, wherever it lives (through the collectives' device when that differs)."""
        x, home = self._to(t)
        self.dist.all_reduce(x, op=op)
        if x is not t:
            t.copy_(x.to(home))
        return t

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, self.dist.ReduceOp.SUM)

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, self.dist.ReduceOp.MAX)

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """All-gather of 1-D tensors of any length: lengths first, then the padded tensors."""
        x, home = self._to(t.reshape(-1))
        n = torch.tensor([x.numel()], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        self.dist.all_gather(sizes, n)
        width = max(int(s) for s in sizes)
        padded = torch.cat([x, x.new_zeros(width - x.numel())])
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.dist.all_gather(parts, padded)
        return [p[: int(s)].to(home) for p, s in zip(parts, sizes)]

    def gather_objects(self, obj: object) -> list[object]:
        out: list[object] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> None:
        x, home = self._to(t)
        self.dist.broadcast(x, src)
        if x is not t:
            t.copy_(x.to(home))

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self, barrier_timeout_s: float = 30.0) -> None:
        """Leave the group together: every rank waits for the others (bounded) before any tears
        its side down. A rank that destroys its gloo context (rank 0 also its TCP store) while
        a peer is still finishing its last collective can die with SIGABRT ("terminate called
        without an active exception"), seen once in a full suite run."""
        if not self.dist.is_initialized():
            return
        import datetime

        try:
            if self.dist.get_backend() == "gloo":
                self.dist.monitored_barrier(timeout=datetime.timedelta(seconds=barrier_timeout_s))
            else:
                self.dist.barrier()
        except RuntimeError as exc:  # a peer is gone: tear down anyway
            log.warning("leaving the process group without the other ranks: %s", exc)
        self.dist.destroy_process_group()


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def init_group(device: torch.device, timeout_s: float = 1800.0) -> Group:
    """The group this process belongs to: :class:`Solo` unless started by torchrun with
    WORLD_SIZE > 1, then the default process group over MASTER_ADDR/MASTER_PORT (env://)."""
    _rank, world, _local = env_world()
    if world <= 1:
        return Solo()
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend_for(device), store=_attempt_store(timeout), rank=_rank, world_size=world,
                                timeout=timeout)
    return TorchGroup(device)


def _attempt_store(timeout) -> "torch.distributed.Store":
    """The rendezvous store (MASTER_ADDR:MASTER_PORT) under a prefix of this attempt's own.

    Where torchrun's agent hosts the store (one machine), it outlives a group restart, so its
    keys are prefixed by the restart count: the ranks must not read the addresses the previous
    attempt's ranks left there (they would connect to dead ports). Where rank 0 hosts it (a
    multi-node rendezvous: ``launcher_env`` in stream/commands/train.py), every attempt has a new
    store at a new port, and the restart counts differ between machines (a node started again
    after a kill -9 counts from 0, its surviving peer from 1): one prefix for all attempts."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                          int(os.environ.get("WORLD_SIZE", "1")), is_master=rank == 0 and not agent_hosts,
                          timeout=timeout)
    return dist.PrefixStore(attempt_prefix(os.environ), store)


def attempt_prefix(environ: Mapping[str, str]) -> str:
    """The store prefix of this attempt (see :func:`_attempt_store`)."""
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return f"tgastream/attempt-{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return "tgastream/attempt"


def rank_device(setting: str, local_rank: int) -> str:
    """One GPU per rank: ``cuda`` (or ``auto`` on a CUDA machine) becomes ``cuda:<local rank>``."""
    if setting in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return setting


# -- id rows -----------------------------------------------------------------------------------


def batch_ids(samples: Sequence[Sample]) -> tuple[list[str], list[str]]:
    """Distinct item and category ids of the samples (graph nodes and targets)."""
    items: dict[str, None] = {}
    cats: dict[str, None] = {}
    for s in samples:
        items.update(dict.fromkeys(s.graph.item_ids))
        cats.update(dict.fromkeys(s.graph.category_ids))
        items[s.item_id] = None
        cats[s.category_id] = None
    return list(items), list(cats)


def sync_rows(group: Group, rows, samples: Sequence[Sample]) -> float:
    """Give every id of every rank's batch a row, identically on every rank (``rows`` is a
    :class:`model.rows.EmbeddingRows`); returns the global newest event time (-inf: no samples).

    Each rank sends its newest event time, its new ids (no row yet) and the rows of the known ids
    it touched, in one all-gather; new ids get rows in sorted order (so the result does not depend
    on how a batch is split across ranks) and every touched row is marked used at the global
    newest event time max_r t_r."""
    items, cats = batch_ids(samples)
    maps = (rows.items, rows.categories)
    mine = [max((s.event_ts for s in samples), default=float("-inf"))]
    for idmap, ids in zip(maps, (items, cats)):
        mine.append([e for e in ids if e not in idmap])  # new
        mine.append(idmap.peek([e for e in ids if e in idmap]))  # rows of known ids
    everyone = group.gather_objects(mine) if group.distributed else [mine]
    t = max(float(m[0]) for m in everyone)
    if not np.isfinite(t):
        return t
    for k, idmap in enumerate(maps):
        new = sorted(set().union(*(m[1 + 2 * k] for m in everyone)))
        idmap.lookup(new, t)
        idmap.touch(np.concatenate([np.asarray(m[2 + 2 * k], dtype=np.int64) for m in everyone]), t)
    return t


# -- the global batch ----------------------------------------------------------------------------


@dataclass
class GlobalView:
    """What a rank's loss needs of the union batch: its retrieval targets, its counts, the
    shared uniform negatives, and what :meth:`SequenceRecommender.observe` records of it."""

    target_item: torch.Tensor  # [R] retrieval targets' item rows, rank order
    target_cat: torch.Tensor  # [R] their category rows
    target_key: torch.Tensor  # [R] their identity keys
    offset: int  # this rank's first retrieval row in [R]
    n_retrieval: int  # R (union)
    n_conversion: int  # C (union)
    uniform: torch.Tensor  # [U] uniform negative item rows (identical on every rank)
    nodes: torch.Tensor  # [2, M] item rows and category rows of every graph node of the union (rank order)
    targets: torch.Tensor  # [2, B] item rows and category rows of every target of the union (rank order)

    @classmethod
    def local(cls, batch: Batch, uniform: torch.Tensor) -> "GlobalView":
        """The view of one process: the union is its own batch."""
        ret = batch.kind == RETRIEVAL
        return cls(batch.target_item[ret], batch.target_cat[ret], batch.target_key[ret], 0, int(ret.sum()),
                   int((batch.kind == CONVERSION).sum()), uniform,
                   torch.stack([batch.items[batch.mask], batch.cats[batch.mask]]),
                   torch.stack([batch.target_item, batch.target_cat]))


def global_view(group: Group, batch: Batch | None, n_items: int, n_uniform: int,
                generator: torch.Generator, device: torch.device) -> GlobalView:
    """Gather what the loss needs of every rank's batch (``batch`` None: this rank has none this
    step, and still joins), in one all-gather. Uniform negatives: ``n_uniform`` rows in
    [1, n_items) from the shared ``generator`` when the union has a retrieval row (drawn on every
    rank alike)."""
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if batch is None:
        mine = GlobalView(empty, empty, empty, 0, 0, 0, empty, empty.view(2, 0), empty.view(2, 0))
    else:
        mine = GlobalView.local(batch, empty)
    if group.distributed:
        r, m, b = mine.n_retrieval, mine.nodes.shape[1], mine.targets.shape[1]
        packed = torch.cat([torch.tensor([r, m, b, mine.n_conversion], device=device),  # header [4]
                            mine.target_item, mine.target_cat, mine.target_key,  # [3 R_r]
                            mine.nodes.reshape(-1), mine.targets.reshape(-1)]).cpu()  # [2 M_r], [2 B_r]
        ret, nodes, targets, n_conv = [], [], [], 0
        for p in group.gather(packed):
            r, m, b, c = (int(x) for x in p[:4])
            ret.append(p[4:4 + 3 * r].view(3, r))
            nodes.append(p[4 + 3 * r:4 + 3 * r + 2 * m].view(2, m))
            targets.append(p[4 + 3 * r + 2 * m:4 + 3 * r + 2 * m + 2 * b].view(2, b))
            n_conv += c
        offset = sum(x.shape[1] for x in ret[: group.rank])
        t = torch.cat(ret, 1).to(device)  # [3, R]
        mine = GlobalView(t[0], t[1], t[2], offset, t.shape[1], n_conv, empty, torch.cat(nodes, 1).to(device),
                          torch.cat(targets, 1).to(device))
    n_uni = n_uniform if mine.n_retrieval else 0
    mine.uniform = torch.randint(1, max(n_items, 2), (n_uni,), generator=generator,
                                 device=generator.device).to(device)  # [U]
    return mine


def all_reduce_gradients(group: Group, params: Sequence[nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient over ranks, and ``extra`` (e.g. the loss shares) with them,
    in one all-reduce; returns the summed ``extra``.

    A gradient missing on a rank counts as zeros; one missing on *every* rank stays missing
    (None), as it would be in one process on the union batch, so the optimizer skips that
    parameter there too (Adam with a zero gradient would still move it)."""
    if not group.distributed:
        return extra
    dtype = params[0].dtype
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=params[0].device)  # [P]
    flat = torch.cat([g.reshape(-1) for g in grads] + [present, extra.reshape(-1).to(dtype)])  # [Σ numel + P + E]
    group.all_sum(flat)
    off = sum(g.numel() for g in grads)
    anywhere = flat[off:off + len(params)] > 0  # [P]
    pos = 0
    for k, (p, g) in enumerate(zip(params, grads)):
        n = g.numel()
        if not anywhere[k]:
            p.grad = None
        elif p.grad is None:
            p.grad = flat[pos:pos + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[pos:pos + n].view_as(p))
        pos += n
    return flat[off + len(params):].to(extra.dtype)


def broadcast_module(group: Group, module: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s (at start or after a restore)."""
    if not group.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            group.broadcast_(t.data, src)
