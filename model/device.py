"""Where the model runs: CUDA when there is one (or when asked), else CPU."""

from __future__ import annotations

import os

import torch


class DeviceUnavailable(ValueError):
    """A device was asked for that this machine (or this torch build) does not have."""


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error
    (:class:`DeviceUnavailable`: the CLI shows it as one line)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {setting!r} requested but torch sees no CUDA device "
                                f"(torch {torch.__version__}: {'a CPU build' if torch.version.cuda is None else 'no GPU visible'})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {setting!r} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def describe(device: torch.device) -> str:
    """One line naming the device, for logs and benchmark JSON."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def cpu_threads(setting: int, ranks: int = 1) -> int:
    """Torch CPU threads of one process: ``setting`` when > 0, else (auto) the cores shared by the
    ``ranks`` processes on this machine, one left for the trainer's publishing thread and Kafka
    I/O: cores // ranks - 1, at least one.

    Oversubscribed OpenMP threads spin against each other: measured here, a trainer step with 2
    threads beside a busy worker ran 12x slower than with 1."""
    if setting > 0:
        return setting
    return max(1, (os.cpu_count() or 1) // max(1, ranks) - 1)
