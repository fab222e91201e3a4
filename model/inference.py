"""The model part of an online learner's state, and inference with it alone.

A learner's checkpoint holds far more than serving needs (optimizer, replay reservoir, rolling
metrics, random states); :class:`InferenceModel` loads only the model, its configuration and its
id maps, in eval mode, to compute P(buy) of candidates for the API.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import torch

from tgastream.model.config import ModelConfig
from tgastream.model.batching import collate
from tgastream.model.vocab import RowKeys
from tgastream.model.rows import EmbeddingRows
from tgastream.model.tga import TGA
from tgastream.state.graph import UserGraph
from tgastream.state.samples import CONVERSION, Sample


class IncompatibleCheckpoint(ValueError):
    """A checkpoint written by a model of another shape or version than this process builds."""


def model_state(model: TGA, rows: EmbeddingRows) -> dict:
    """The model part of a learner state: weights, configuration and id maps."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return {"model": buf.getvalue(), "model_config": dataclasses.asdict(model.cfg), **rows.to_state()}


def saved_model_config(d: dict) -> ModelConfig:
    """The configuration of the model saved in a learner state."""
    try:
        # a checkpoint from before the repeat prior has no such field and no such weights; one from
        # before the pointer bound was trained unbounded and is served unbounded
        return ModelConfig(**({"repeat_prior": False, "pointer_bound": 0.0} | d["model_config"]))
    except (KeyError, TypeError):
        raise IncompatibleCheckpoint("written by another model version (no model configuration it can read)") from None


def load_model(d: dict, cfg: ModelConfig, device: torch.device) -> tuple[TGA, EmbeddingRows]:
    """A model built with ``cfg`` (tables sized as the saved id maps) holding the saved weights."""
    rows = EmbeddingRows.from_state(d)
    model = TGA(dataclasses.replace(cfg, n_items=rows.items.capacity, n_categories=rows.categories.capacity))
    model = model.to(device)
    try:
        model.load_state_dict(torch.load(io.BytesIO(d["model"]), map_location=device, weights_only=True))
    except RuntimeError as exc:  # torch lists every mismatching tensor; the first says enough
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise IncompatibleCheckpoint(f"written by another model version or shape ({detail})") from None
    return model, rows


@torch.no_grad()
def conversion_proba(model: TGA, rows: EmbeddingRows, device: torch.device, context: UserGraph,
                     candidates: Sequence[tuple[str, str]]) -> list[float]:
    """P(buy) of each candidate (item id, category id) given a user's context graph."""
    if not candidates:
        return []
    samples = [Sample(CONVERSION, "", context, i, c, 0, 0.0, 0.0) for i, c in candidates]
    model.eval()
    vocabs = rows.vocabs()
    batch = collate(samples, vocabs, device, keys=RowKeys(vocabs.items))
    return model.conversion_proba(batch).float().cpu().tolist()  # [K]


class InferenceModel:
    """A saved model and its id maps in eval mode: no optimizer, reservoir or metrics."""

    def __init__(self, model: TGA, rows: EmbeddingRows, device: torch.device) -> None:
        self.model = model.eval()
        self.rows = rows
        self.device = device

    @classmethod
    def from_state(cls, d: dict, device: torch.device) -> "InferenceModel":
        """Load the model part of a learner state (``OnlineLearner.state_dict()``)."""
        model, rows = load_model(d, saved_model_config(d), device)
        return cls(model, rows, device)

    def conversion_proba(self, context: UserGraph, candidates: Sequence[tuple[str, str]]) -> list[float]:
        return conversion_proba(self.model, self.rows, self.device, context, candidates)
