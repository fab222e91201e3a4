"""What an online learner gives the trainer, and what the trainer needs of a learner.

The trainer (``stream/trainer.py``) moves bytes; a learner (``model/online.py``) learns. This module
is the contract between them, declared in the lower layer so that nothing here imports ``stream``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from tgastream.model.clicktime import Predictions
from tgastream.state.graph import UserGraph
from tgastream.state.samples import Sample


@dataclass
class StepOutput:
    """The vectors of one micro-batch, for the trainer to publish."""

    users: dict[str, tuple[np.ndarray, float]]  # user → (vector [d], newest event ts)
    items: dict[str, np.ndarray]  # item → vector [d]
    loss: float
    bought: dict[str, list[str]] = field(default_factory=dict)
    contexts: dict[str, bytes] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)  # arrival ts at a worker of every event in the batch
    from_clicks: set[str] = field(default_factory=set)  # users whose context ends at an older click
    item_categories: dict[str, str] = field(default_factory=dict)  # item → category, of ``items``
    clicks: Predictions | None = None  # click-time P(buy) of the batch's clicks, from the same forward
    later_clicks: list[Sample] = field(default_factory=list)  # clicks left for a forward of their own (vectors(clicks_later=True))


class Learner(Protocol):
    """The members the trainer uses: vectors, prequential scoring, learning, persistence."""

    device: torch.device
    version: int  # optimizer steps taken (the model version of published vectors)
    last_loss: float
    last_replayed: int  # reservoir samples mixed into the last step

    def vectors(self, samples: Sequence[Sample]) -> StepOutput: ...

    def note_predictions(self, predictions: Predictions | None) -> None: ...

    def user_vectors_of(self, graphs: dict[str, tuple[UserGraph, float]]) -> dict[str, tuple[np.ndarray, float]]: ...

    def item_vectors_of(self, items: dict[str, str]) -> dict[str, np.ndarray]: ...

    def score(self, samples: Sequence[Sample], score_limit: int = 0) -> None: ...

    def learn(self, samples: Sequence[Sample], train_limit: int = 0, score_limit: int | None = None,
              cases: tuple[Sequence[Sample], Sequence[Sample]] | None = None) -> float: ...

    def grow_tables(self) -> None: ...

    def inference_copy(self, version: int | None = None) -> "Learner": ...

    def online_metrics(self) -> dict[str, float | None]: ...

    def idmap_stats(self) -> list[tuple[str, int, int]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...

    def after_checkpoint(self, data_dir: Path, step: int) -> None: ...
