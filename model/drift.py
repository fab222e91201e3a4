"""Drift on the live stream: ADWIN (River) over the training loss of each optimizer step.

ADWIN keeps a window of recent values and cuts it where two sub-windows' means differ by more
than chance allows (confidence ``delta``), so a change in what the stream teaches the model (a
broken producer, a new catalogue, a shift in behaviour) shows up as a detected change a few
dozen steps after it starts, while a stationary loss rarely trips it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from river import drift


@dataclass
class LossDrift:
    """Feed one loss per step; ``update`` says whether a change was detected at this step."""

    delta: float = 0.002
    detections: int = 0
    _adwin: drift.ADWIN = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._adwin = drift.ADWIN(delta=self.delta)

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        self._adwin.update(loss)
        if self._adwin.drift_detected:
            self.detections += 1
            return True
        return False

    @property
    def mean(self) -> float:
        """Mean loss over ADWIN's current window (since the last change)."""
        return float(self._adwin.estimation)
