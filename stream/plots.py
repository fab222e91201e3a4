"""The one way our reports finish a matplotlib chart (labels, legend, grid, PNG)."""

from __future__ import annotations

from pathlib import Path


def save_chart(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label, legend and grid ``ax``, write ``fig`` as a PNG at ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
