"""``tgastream synth``: write a seeded synthetic behavior log (Taobao CSV)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tgastream.core.settings import Settings

HELP = "generate a seeded, realistic multi-behavior log in Taobao UserBehavior CSV format"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=2000, help="number of users (default: 2000)")
    p.add_argument("--events", type=int, default=200_000, help="number of events (default: 200000)")
    p.add_argument("--seed", type=int, default=7, help="random seed: same seed, same file (default: 7)")
    p.add_argument("--items", type=int, default=0, help="catalogue size (default: events/10)")
    p.add_argument("--categories", type=int, default=0, help="number of categories (default: items/40)")
    p.add_argument("--days", type=float, default=9.0, help="time span in days (default: 9)")
    p.add_argument("--drift-at", type=float, default=0.0,
                   help="fraction of the span at which every user's favourite categories change (default: 0 = none)")
    p.add_argument("-o", "--output", type=Path, required=True, help="CSV file to write")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.core.errors import CommandError
    from tgastream.stream.synth import SynthConfig, write_file

    cfg = SynthConfig(users=args.users, events=args.events, seed=args.seed, items=args.items,
                      categories=args.categories, days=args.days, drift_at=args.drift_at)
    try:
        cfg.validate()
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    t0 = time.monotonic()
    n = write_file(cfg, args.output)
    print(f"wrote {n:,} events of {cfg.users:,} users ({cfg.n_items:,} items, {cfg.n_categories:,} categories) "
          f"to {args.output} in {time.monotonic() - t0:.1f}s")
    return 0
