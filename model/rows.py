"""Embedding rows of an online model: item and category id maps, and the tables that follow them.

Ids get rows as they arrive (persistent :class:`IdMap`); the model's item/category tables, its
item bias and buffers, and their Adam state grow in chunks to the maps' capacity; rows unused
for a while of event time are evicted and re-initialised, so a reused row starts fresh.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from tgastream.model.base import SequenceRecommender
from tgastream.model.batching import Vocabs
from tgastream.state.idmap import IdMap

INIT_STD = 0.05  # std of fresh item/category embedding rows


class _Rows:
    """A :class:`model.vocab.Vocab` view of an :class:`IdMap` that never assigns (peek), under
    the maps' lock (a publishing thread assigns rows while the training thread batches)."""

    def __init__(self, idmap: IdMap, lock: threading.RLock) -> None:
        self.idmap = idmap
        self.lock = lock

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        with self.lock:
            return self.idmap.peek(ids)

    def __len__(self) -> int:
        return self.idmap.capacity


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal draws shaped ``shape`` on ``like``'s device, from ``generator`` when given
    (data-parallel ranks draw fresh rows from one shared generator, so they stay identical)."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _grow_parameter(module: nn.Module, name: str, rows: int, optimizer: torch.optim.Optimizer | None,
                    init_std: float, generator: torch.Generator | None = None) -> None:
    """Grow ``module.<name>`` (a [n, ...] parameter) to ``rows`` rows, with its optimizer state."""
    old: nn.Parameter = getattr(module, name)
    extra = rows - old.shape[0]
    if extra <= 0:
        return
    fresh = _randn((extra, *old.shape[1:]), old, generator) * init_std
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


def _reset_rows(param: nn.Parameter, rows: torch.Tensor, optimizer: torch.optim.Optimizer | None, std: float,
                generator: torch.Generator | None = None) -> None:
    """Re-initialise evicted rows (and zero their optimizer state) so a reused row starts fresh."""
    with torch.no_grad():
        param[rows] = _randn((len(rows), *param.shape[1:]), param, generator) * std
    if optimizer is not None:
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape[:1] == param.shape[:1]:
                value[rows] = 0


class EmbeddingRows:
    """The item and category :class:`IdMap` of a model, and growing/evicting its tables to match.

    ``lock`` (re-entrant) guards the maps where two threads share them: the trainer's publishing
    thread assigns rows (stream/trainer.py) while its training thread batches, grows and evicts.
    Lookups through :meth:`vocabs` take it themselves; a caller that assigns or evicts holds it."""

    def __init__(self, items: IdMap, categories: IdMap) -> None:
        self.items = items
        self.categories = categories
        self.lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> "EmbeddingRows":
        import copy

        with self.lock:
            return EmbeddingRows(copy.deepcopy(self.items, memo), copy.deepcopy(self.categories, memo))

    def peek_items(self, ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The ids of ``ids`` that have an item row, and those rows (under the lock)."""
        with self.lock:
            known = [i for i in ids if i in self.items]
            return known, self.items.peek(known)

    @classmethod
    def new(cls, chunk: int) -> "EmbeddingRows":
        """Empty maps that grow ``chunk`` item rows (and an eighth as many category rows) at a time."""
        return cls(IdMap(chunk), IdMap(max(256, chunk // 8)))

    def vocabs(self) -> Vocabs:
        """Read-only vocabularies for batching: unknown ids map to row 0, nothing is assigned."""
        return Vocabs(_Rows(self.items, self.lock), _Rows(self.categories, self.lock))

    def grow_tables(self, model: SequenceRecommender, optimizer: torch.optim.Optimizer | None,
                    generator: torch.Generator | None = None) -> None:
        """Grow the model's tables, buffers and their optimizer state to the maps' capacity
        (fresh rows drawn from ``generator``, else torch's default one)."""
        n_items, n_cats = self.items.capacity, self.categories.capacity
        if n_items == model.cfg.n_items and n_cats == model.cfg.n_categories:
            return
        _grow_parameter(model.embed.item, "weight", n_items, optimizer, INIT_STD, generator)
        _grow_parameter(model.embed.category, "weight", n_cats, optimizer, INIT_STD, generator)
        if model.item_bias is not None:
            _grow_parameter(model.item_bias, "weight", n_items, optimizer, 0.0, generator)
        extra = n_items - model.item_counts.shape[0]
        if extra > 0:
            model.item_counts = torch.cat([model.item_counts, model.item_counts.new_zeros(extra)])
            model.item_category = torch.cat([model.item_category, model.item_category.new_zeros(extra)])
        model.cfg = dataclasses.replace(model.cfg, n_items=n_items, n_categories=n_cats)

    def evict(self, model: SequenceRecommender, optimizer: torch.optim.Optimizer | None, now: float,
              idle_ttl_s: float, generator: torch.Generator | None = None) -> list[str]:
        """Free the rows unused since ``now - idle_ttl_s`` and re-initialise them in the model
        (from ``generator``, else torch's default one); returns the evicted item ids (the trainer
        deletes their vectors from serving: an item nobody touched for ``idle_ttl_s`` is not
        recommended with a vector its row no longer holds)."""
        device = model.embed.item.weight.device
        gone: list[str] = []
        with self.lock:
            rows = self.items.evict(now, idle_ttl_s, gone)
            crows = self.categories.evict(now, idle_ttl_s)
        if len(rows):
            r = torch.as_tensor(rows, device=device)
            _reset_rows(model.embed.item.weight, r, optimizer, INIT_STD, generator)
            if model.item_bias is not None:
                _reset_rows(model.item_bias.weight, r, optimizer, 0.0, generator)
            model.item_counts[r] = 0
            model.item_category[r] = 0
        if len(crows):
            _reset_rows(model.embed.category.weight, torch.as_tensor(crows, device=device), optimizer, INIT_STD,
                        generator)
        return gone

    def used_items(self, device: torch.device) -> torch.Tensor:
        """[capacity] bool: which item rows hold an item."""
        with self.lock:
            used = torch.zeros(self.items.capacity, dtype=torch.bool, device=device)
            used[torch.as_tensor(self.items.rows(), device=device, dtype=torch.long)] = True
        return used

    def stats(self) -> list[tuple[str, int, int]]:
        """(kind, ids with a row, evictions so far) of each map."""
        return [("item", len(self.items), self.items.evictions),
                ("category", len(self.categories), self.categories.evictions)]

    def to_state(self) -> dict[str, bytes]:
        with self.lock:
            return {"items": self.items.to_bytes(), "categories": self.categories.to_bytes()}

    @classmethod
    def from_state(cls, d: dict) -> "EmbeddingRows":
        return cls(IdMap.from_bytes(d["items"]), IdMap.from_bytes(d["categories"]))

    def sync_to(self, data_dir: Path, step: int) -> None:
        """Mirror both maps to RocksDB (``idmap-items``, ``idmap-categories``) as of ``step``."""
        with self.lock:
            self.items.sync_to(Path(data_dir) / "idmap-items", step)
            self.categories.sync_to(Path(data_dir) / "idmap-categories", step)
