"""The offline training loop shared by every neural model of the evaluation (same budget for all)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from tgastream.model.base import SequenceRecommender
from tgastream.model.batching import EncodedSamples, to_batch
from tgastream.model.config import TrainConfig
from tgastream.state.samples import CONVERSION, RETRIEVAL


@dataclass
class FitResult:
    epochs: int  # epochs run
    best_epoch: int  # the epoch whose weights were kept (by validation)
    samples: int  # training samples processed
    seconds: float  # time in training steps (batching included, validation excluded)
    best_head_epoch: int = 0  # the epoch whose conversion head was kept, when chosen on its own (fit's validate_head)
    history: list[dict] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it: the default per-tensor loop costs ~40 ms a step on
    a 40k-row embedding table on CPU, the fused kernel ~3 ms."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def usable_rows(model: SequenceRecommender, data: EncodedSamples) -> np.ndarray:
    """Indices of the samples this model learns from (DIN: conversion only)."""
    keep = np.zeros(len(data), dtype=bool)
    if model.does_retrieval:
        keep |= data.kind == RETRIEVAL
    if model.does_conversion:
        keep |= data.kind == CONVERSION
    return np.flatnonzero(keep)


def fit(model: SequenceRecommender, train: EncodedSamples, cfg: TrainConfig, device: torch.device,
        validate: Callable[[SequenceRecommender], float] | None = None, desc: str = "",
        progress: bool = True, validate_head: Callable[[SequenceRecommender], float] | None = None) -> FitResult:
    """Train with AdamW for up to ``cfg.epochs``; with ``validate`` (lower is better), stop after
    ``cfg.patience`` epochs without improvement and restore the best weights. With ``validate_head``
    too, the conversion head (:func:`conversion_parameters`) is then overlaid with its own best
    epoch by that score: the two heads' checkpoints are chosen separately
    (``FitResult.best_head_epoch``)."""
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    return _epochs(model, train, usable_rows(model, train), opt, cfg, cfg.epochs, device, validate, desc, progress,
                   lambda m: m.train(), validate_head=validate_head)


HEAD_PREFIXES = ("conversion_head.", "conversion_embed.")
"""State-dict keys of what :func:`conversion_parameters` returns."""


def _head_state(model: SequenceRecommender) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}


def conversion_modules(model: SequenceRecommender) -> list[torch.nn.Module]:
    """The conversion head and its own raw table (if any): what the conversion fine-tune trains."""
    return [m for m in (model.conversion_head, model.conversion_embed) if m is not None]


def conversion_parameters(model: SequenceRecommender) -> list[torch.nn.Parameter]:
    """The parameters of :func:`conversion_modules`."""
    return [p for m in conversion_modules(model) for p in m.parameters()]


def finetune_conversion(model: SequenceRecommender, train: EncodedSamples, cfg: TrainConfig, device: torch.device,
                        validate: Callable[[SequenceRecommender], float] | None = None, desc: str = "",
                        progress: bool = True) -> FitResult:
    """The conversion stage after retrieval training: up to ``cfg.conversion_finetune_epochs`` over
    the conversion samples, training only :func:`conversion_parameters` (a fresh AdamW at
    ``cfg.lr``) on top of the frozen encoder and item tower, which run in eval mode (no dropout),
    so the head learns the very states it is scored on; with ``validate`` (lower is better,
    typically conversion logloss alone) early-stopped and the best head kept.

    Why a stage of its own: one joint validation score picks one checkpoint for two heads (on an
    earlier 60k run the 30× conversion logloss, rising in epoch 2, decided it for both), and with
    ``conversion_grad`` 0 the head trains on states that keep moving under it. Here the retrieval
    checkpoint is chosen by retrieval, then the head by conversion."""
    params = conversion_parameters(model)
    if not params:
        return FitResult(0, 0, 0, 0.0)
    head = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in head and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    rows = np.flatnonzero(train.kind == CONVERSION)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def head_mode(m: SequenceRecommender) -> None:
        m.eval()
        for part in conversion_modules(m):
            part.train()

    try:
        return _epochs(model, train, rows, opt, cfg, cfg.conversion_finetune_epochs, device, validate, desc, progress,
                       head_mode, from_start=True)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _epochs(model: SequenceRecommender, train: EncodedSamples, rows: np.ndarray, opt: torch.optim.Optimizer,
            cfg: TrainConfig, epochs: int, device: torch.device, validate: Callable[[SequenceRecommender], float] | None,
            desc: str, progress: bool, mode: Callable[[SequenceRecommender], None], from_start: bool = False,
            validate_head: Callable[[SequenceRecommender], float] | None = None) -> FitResult:
    """The epoch loop: ``rows`` shuffled (at most ``cfg.max_train_samples`` an epoch), ``mode`` sets
    train/eval modes before each epoch; early stopping and restoring the best state as in :func:`fit`.
    ``from_start``: the weights before the first epoch compete too (best epoch 0 = no epoch helped,
    the starting weights are restored), so a stage that only hurts validation is undone.
    ``validate_head``: see :func:`fit`."""
    rng = np.random.default_rng(cfg.seed)
    result = FitResult(0, 0, 0, 0.0)
    best, best_state, stale = math.inf, None, 0
    best_head, best_head_state = math.inf, None
    if validate is not None and from_start:
        model.eval()
        best, best_state = validate(model), copy.deepcopy(model.state_dict())
        result.history.append({"epoch": 0, "valid": best})
    per_epoch = min(len(rows), cfg.max_train_samples) if cfg.max_train_samples else len(rows)
    params = [p for group in opt.param_groups for p in group["params"]]
    for epoch in range(1, epochs + 1):
        mode(model)
        order = rng.permutation(rows)[:per_epoch]
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{desc} epoch {epoch}/{epochs}",
                   disable=None if progress else True, leave=False, unit="batch", mininterval=1.0)
        t0 = time.perf_counter()
        losses: list[float] = []
        for start in bar:
            batch = to_batch(train, order[start:start + cfg.batch_size], device)
            out = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            losses.append(float(out.loss.detach()))
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        result.seconds += time.perf_counter() - t0
        result.samples += len(order)
        result.epochs = epoch
        entry = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        if validate is not None:
            model.eval()
            score = validate(model)
            entry["valid"] = score
            if score < best - 1e-4:
                best, best_state, stale, result.best_epoch = score, copy.deepcopy(model.state_dict()), 0, epoch
            else:
                stale += 1
        else:
            result.best_epoch = epoch
        if validate_head is not None:
            model.eval()
            entry["valid_head"] = head_score = validate_head(model)
            if head_score < best_head - 1e-4:
                best_head, best_head_state, result.best_head_epoch = head_score, _head_state(model), epoch
        result.history.append(entry)
        if progress:
            tqdm.write(f"{desc} epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch"))
        if validate is not None and stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if best_head_state is not None:
        model.load_state_dict(best_head_state, strict=False)
    model.eval()
    return result
