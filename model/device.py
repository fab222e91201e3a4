"""Where the model runs: CUDA when there is one (or when asked), else CPU."""

from __future__ import annotations

import os

import torch


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} requested but torch sees no CUDA device")
    return device


def describe(device: torch.device) -> str:
    """One line naming the device, for logs and benchmark JSON."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def cpu_threads(setting: int) -> int:
    """Torch CPU threads: ``setting`` when > 0, else all cores but one (at least one).

    Oversubscribed OpenMP threads spin against each other: measured here, a trainer step with 2
    threads beside a busy worker ran 12x slower than with 1."""
    if setting > 0:
        return setting
    return max(1, (os.cpu_count() or 1) - 1)
