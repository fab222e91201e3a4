"""``tgastream bench TARGET``: benchmarks that print a table and write JSON (``--json PATH``)."""

from __future__ import annotations

import argparse
import importlib

from tgastream.core.settings import Settings

HELP = ("run a benchmark: stream, model, online, freshness, api, index, scale, trainer, skew, guard, era or staleness "
        "(each prints a table; --json writes it)")

BENCHES: dict[str, str] = {
    "stream": "tgastream.bench.stream",
    "model": "tgastream.bench.model",
    "online": "tgastream.bench.online",
    "freshness": "tgastream.bench.freshness",
    "api": "tgastream.bench.api",
    "index": "tgastream.bench.index",
    "scale": "tgastream.bench.scale",
    "trainer": "tgastream.bench.trainer",
    "skew": "tgastream.bench.skew",
    "guard": "tgastream.bench.guard",
    "era": "tgastream.bench.era",
    "staleness": "tgastream.bench.staleness",
}
"""Benchmark name → module defining HELP, add_arguments(parser) and run(args, settings) -> int."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import OneLineParser

    sub = p.add_subparsers(dest="bench", metavar="TARGET", parser_class=OneLineParser, required=True)
    for name, path in BENCHES.items():
        module = importlib.import_module(path)
        q = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(q)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return int(importlib.import_module(BENCHES[args.bench]).run(args, settings) or 0)
