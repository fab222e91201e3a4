"""Read another process's Prometheus /metrics (the demo's progress, tests watching workers)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Every sample of ``http://host:port/metrics`` as ``name{k=v,...}`` → value; {} when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → ``name{k=v,...}`` → value (labels sorted)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def total(metrics: dict[str, float], name: str) -> float:
    """Sum of ``name`` over all its label sets."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))
