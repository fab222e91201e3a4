"""Collate graphs of different lengths into padded tensors with masks.

Two steps, so the offline harness and the online trainer share one code path:

1. :func:`encode_samples` turns :class:`state.samples.Sample` objects (or bare
   :class:`state.graph.GraphArrays`) into :class:`EncodedSamples`: compact numpy arrays,
   right-padded (node ``k`` of a graph stays at index ``k``, so predecessor indices need no
   shifting), with external ids already mapped to embedding rows by a :class:`model.vocab.Vocab`.
2. :func:`to_batch` slices some rows, trims the padding to the longest graph among them and makes
   a :class:`Batch` of torch tensors on a device.

:func:`collate` does both for a list of samples (the trainer's micro-batch).

Identity keys: besides embedding rows, every node and target carries an integer *key* naming the
item (0 = padding). Keys decide "is this node the same item as that candidate" for the retrieval
pointer and the conversion head, and they must stay distinct even for items without an embedding
row (all unknown items share row 0). Offline evaluation uses catalogue indices as keys, so copy
scores land on the right column of a full ranking; the trainer can use per-batch keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from tgastream.model.config import SELF_EDGE_TYPE
from tgastream.model.vocab import BatchKeys, Vocab
from tgastream.state.graph import GraphArrays, arrays_of
from tgastream.state.samples import Sample


@dataclass(frozen=True)
class Vocabs:
    """Row mappings of items and categories (the model's embedding tables)."""

    items: Vocab
    categories: Vocab


@dataclass
class EncodedSamples:
    """Samples as right-padded numpy arrays (S samples, L = longest graph)."""

    items: np.ndarray  # [S, L] int32 item rows
    cats: np.ndarray  # [S, L] int32 category rows
    keys: np.ndarray  # [S, L] int32 item identity keys, 0 = padding
    behaviors: np.ndarray  # [S, L] int8
    gaps: np.ndarray  # [S, L] int8 time-gap buckets
    nbr: np.ndarray  # [S, L, 3] int32 local index of the item/category/neighbor predecessor, -1 none
    etype: np.ndarray  # [S, L, 3] int8 transition type, -1 none
    lengths: np.ndarray  # [S] int32 nodes per graph
    kind: np.ndarray  # [S] int8 RETRIEVAL or CONVERSION
    target_item: np.ndarray  # [S] int32 row of the target / candidate item
    target_cat: np.ndarray  # [S] int32
    target_key: np.ndarray  # [S] int32
    target_behavior: np.ndarray  # [S] int8
    label: np.ndarray  # [S] float32
    event_ts: np.ndarray  # [S] float64
    # optional transition prior (model/retrieval_head.py): per sample the P best co-visitation
    # candidates as item keys (0 = none) and their scores; None when not computed
    prior_keys: np.ndarray | None = None  # [S, P] int32
    prior_vals: np.ndarray | None = None  # [S, P] float32

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, idx: np.ndarray) -> "EncodedSamples":
        return EncodedSamples(**{f.name: _take(getattr(self, f.name), idx) for f in fields(self)})

    @staticmethod
    def concat(parts: Sequence["EncodedSamples"]) -> "EncodedSamples":
        """Stack parts, padding every graph to the longest one (a prior only when every part has one)."""
        width = max((p.items.shape[1] for p in parts), default=0)
        out = {}
        for f in fields(EncodedSamples):
            arrays = [getattr(p, f.name) for p in parts]
            if f.name in PRIOR_FIELDS:
                out[f.name] = None if not arrays or any(a is None for a in arrays) else np.concatenate(arrays)
                continue
            if arrays and arrays[0].ndim >= 2:
                fill = -1 if f.name in ("nbr", "etype") else 0
                arrays = [_pad_to(a, width, fill) for a in arrays]
            out[f.name] = np.concatenate(arrays) if arrays else np.zeros(0)
        return EncodedSamples(**out)


PRIOR_FIELDS = ("prior_keys", "prior_vals")


def _take(a: np.ndarray | None, idx):
    return None if a is None else a[idx]


def _pad_to(a: np.ndarray, width: int, fill: int) -> np.ndarray:
    if a.shape[1] == width:
        return a
    pad = [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad, constant_values=fill)


def encode_graphs(graphs: Sequence[GraphArrays], vocabs: Vocabs, keys: Vocab | None = None,
                  targets: Sequence[Sample] | None = None) -> EncodedSamples:
    """Encode graphs (and, when given, the samples' targets) into padded arrays.

    ``keys`` maps item ids to identity keys (default: keys local to this call).
    """
    keys = keys if keys is not None else BatchKeys()
    s = len(graphs)
    width = max((len(g) for g in graphs), default=0)
    lengths = np.fromiter((len(g) for g in graphs), dtype=np.int32, count=s)
    all_items = [i for g in graphs for i in g.items]
    all_cats = [c for g in graphs for c in g.categories]
    valid = np.arange(width)[None, :] < lengths[:, None]  # [S, L]
    out = EncodedSamples(
        items=np.zeros((s, width), np.int32), cats=np.zeros((s, width), np.int32),
        keys=np.zeros((s, width), np.int32), behaviors=np.zeros((s, width), np.int8),
        gaps=np.zeros((s, width), np.int8), nbr=np.full((s, width, 3), -1, np.int32),
        etype=np.full((s, width, 3), -1, np.int8), lengths=lengths,
        kind=np.zeros(s, np.int8), target_item=np.zeros(s, np.int32), target_cat=np.zeros(s, np.int32),
        target_key=np.zeros(s, np.int32), target_behavior=np.zeros(s, np.int8),
        label=np.zeros(s, np.float32), event_ts=np.zeros(s, np.float64),
    )
    if all_items:
        out.items[valid] = vocabs.items.lookup(all_items)
        out.cats[valid] = vocabs.categories.lookup(all_cats)
        out.keys[valid] = keys.lookup(all_items)
        out.behaviors[valid] = np.concatenate([g.behaviors for g in graphs if len(g)])
        out.gaps[valid] = np.concatenate([g.gap_buckets for g in graphs if len(g)])
        out.nbr[valid] = np.concatenate([g.neighbors for g in graphs if len(g)])
        out.etype[valid] = np.concatenate([g.edge_types for g in graphs if len(g)])
    if targets is not None:
        out.kind[:] = [t.kind for t in targets]
        out.target_item[:] = vocabs.items.lookup([t.item_id for t in targets])
        out.target_cat[:] = vocabs.categories.lookup([t.category_id for t in targets])
        out.target_key[:] = keys.lookup([t.item_id for t in targets])
        out.target_behavior[:] = [t.behavior for t in targets]
        out.label[:] = [t.label for t in targets]
        out.event_ts[:] = [t.event_ts for t in targets]
    return out


def encode_samples(samples: Sequence[Sample], vocabs: Vocabs, keys: Vocab | None = None) -> EncodedSamples:
    """Encode training/evaluation samples: their context graphs and their targets."""
    return encode_graphs(arrays_of([s.graph for s in samples]), vocabs, keys, samples)


@dataclass
class Batch:
    """Padded tensors of B graphs of up to N nodes (right-padded) and their targets."""

    items: torch.Tensor  # [B, N] long item rows (0 = padding/unknown)
    cats: torch.Tensor  # [B, N] long category rows
    keys: torch.Tensor  # [B, N] long item identity keys (0 = padding)
    behaviors: torch.Tensor  # [B, N] long
    gaps: torch.Tensor  # [B, N] long
    mask: torch.Tensor  # [B, N] bool, True on real nodes
    lengths: torch.Tensor  # [B] long
    nbr: torch.Tensor  # [B, N, 4] long local index: item/category/neighbor predecessor, self; -1 none
    etype: torch.Tensor  # [B, N, 4] long transition type (self = 48), -1 none
    kind: torch.Tensor  # [B] long
    target_item: torch.Tensor  # [B] long
    target_cat: torch.Tensor  # [B] long
    target_key: torch.Tensor  # [B] long
    target_behavior: torch.Tensor  # [B] long
    label: torch.Tensor  # [B] float
    prior_keys: torch.Tensor | None = None  # [B, P] long co-visitation candidates' keys (0 = none), optional
    prior_vals: torch.Tensor | None = None  # [B, P] float their scores

    @property
    def size(self) -> int:
        return self.items.shape[0]

    @property
    def width(self) -> int:
        return self.items.shape[1]

    def select(self, idx: torch.Tensor) -> "Batch":
        """The sub-batch of rows ``idx`` (same width)."""
        return Batch(**{f.name: _take(getattr(self, f.name), idx) for f in fields(self)})

    @cached_property
    def flat_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Predecessors as rows of the flattened [B*N] node axis, shared by every layer:
        (nbr [B*N, 3] long, -1 none; etype [B*N, 3] long, -1 none)."""
        b, n = self.items.shape
        pred = self.nbr[..., :3]  # [B, N, 3]
        offset = (torch.arange(b, device=pred.device) * n).view(b, 1, 1)
        flat = torch.where(pred >= 0, pred + offset, pred).reshape(b * n, 3).contiguous()
        return flat, self.etype[..., :3].reshape(b * n, 3).contiguous()

    @cached_property
    def last_index(self) -> torch.Tensor:
        """[B] index of each graph's newest node (0 for an empty graph)."""
        return (self.lengths - 1).clamp(min=0)


def to_batch(enc: EncodedSamples, idx: np.ndarray | None = None, device: torch.device | str = "cpu",
             width: int | None = None) -> Batch:
    """Tensors of rows ``idx`` (default all), trimmed to their longest graph (or padded to ``width``)."""
    if idx is not None:
        enc = enc.take(idx)
    n = int(enc.lengths.max(initial=0)) if width is None else width
    n = max(n, 1)
    enc = enc if enc.items.shape[1] == n else _resize(enc, n)
    b = len(enc)

    def t(a: np.ndarray, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype, non_blocking=True)

    pos = np.arange(n, dtype=np.int64)
    mask = pos[None, :] < enc.lengths[:, None]  # [B, N]
    nbr = np.empty((b, n, 4), np.int64)  # [B, N, 4]
    nbr[..., :3] = enc.nbr
    nbr[..., 3] = np.where(mask, pos[None, :], -1)
    etype = np.empty((b, n, 4), np.int64)  # [B, N, 4]
    etype[..., :3] = enc.etype
    etype[..., 3] = np.where(mask, SELF_EDGE_TYPE, -1)
    return Batch(
        items=t(enc.items), cats=t(enc.cats), keys=t(enc.keys), behaviors=t(enc.behaviors), gaps=t(enc.gaps),
        mask=t(mask, torch.bool), lengths=t(enc.lengths), nbr=t(nbr), etype=t(etype), kind=t(enc.kind),
        target_item=t(enc.target_item), target_cat=t(enc.target_cat), target_key=t(enc.target_key),
        target_behavior=t(enc.target_behavior), label=t(enc.label, torch.float32),
        prior_keys=None if enc.prior_keys is None else t(enc.prior_keys),
        prior_vals=None if enc.prior_vals is None else t(enc.prior_vals, torch.float32),
    )


def _resize(enc: EncodedSamples, n: int) -> EncodedSamples:
    cur = enc.items.shape[1]
    if cur > n:
        out = {f.name: getattr(enc, f.name) for f in fields(enc)}
        for name in ("items", "cats", "keys", "behaviors", "gaps", "nbr", "etype"):
            out[name] = out[name][:, :n]
        return EncodedSamples(**out)
    return EncodedSamples.concat([enc]) if cur == n else _pad_all(enc, n)


def _pad_all(enc: EncodedSamples, n: int) -> EncodedSamples:
    out = {f.name: getattr(enc, f.name) for f in fields(enc)}
    for name in ("items", "cats", "keys", "behaviors", "gaps", "nbr", "etype"):
        out[name] = _pad_to(out[name], n, -1 if name in ("nbr", "etype") else 0)
    return EncodedSamples(**out)


def collate(samples: Sequence[Sample], vocabs: Vocabs, device: torch.device | str = "cpu",
            keys: Vocab | None = None) -> Batch:
    """A micro-batch of samples as padded tensors (what the online trainer calls)."""
    return to_batch(encode_samples(samples, vocabs, keys), device=device)
