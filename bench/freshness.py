"""``tgastream bench freshness``: event-to-embedding freshness at a sustained replay rate.

Runs the demo's real processes (embedded broker unless --bootstrap, one stream worker, the
trainer, the API) and replays a log at ``--rate`` events/s; freshness is measured by the trainer
for every published user vector: publish time minus the wall-clock time the worker received the
newest event behind it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tgastream.core.settings import Settings
from tgastream.bench.report import write_json

HELP = "event-to-embedding freshness (p50/p99) at a sustained replay rate, worker + trainer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags

    p.add_argument("--rate", type=float, default=2000.0, help="replay rate, events/s (default: 2000)")
    p.add_argument("--data", type=Path, help="log to replay (default: a generated one)")
    p.add_argument("--events", type=int, default=60_000, help="generated events (default: 60000 = 30 s at 2000/s)")
    p.add_argument("--users", type=int, default=2000, help="generated users (default: 2000)")
    p.add_argument("--out", type=Path, default=Path("bench-freshness"), help="report folder (default: bench-freshness)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default: 900)")
    p.add_argument("--json", type=Path, help="write the result as JSON")
    add_setting_flags(p, "bootstrap", "partitions", "device", "batch_size")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.stream.broker import install_sigterm_handler
    from tgastream.stream.demo import DemoConfig, run_demo
    from tgastream.core.errors import CommandError

    if args.rate <= 0:
        raise CommandError("--rate must be > 0")
    if args.data is not None and not args.data.is_file():
        raise CommandError(f"no such file: {args.data}")
    install_sigterm_handler()
    opts = DemoConfig(out=args.out, data=args.data, events=args.events, users=args.users, rate=args.rate,
                       timeout_s=args.timeout, quiet=False)
    report = run_demo(settings, opts, say=lambda s: print(s, flush=True))
    result = {
        "rate": args.rate, "events": report["events_replayed"],
        "achieved_events_per_s": report["events_per_s"],
        "freshness_p50_s": report["freshness_p50_s"], "freshness_p99_s": report["freshness_p99_s"],
        "trainer_samples_per_s": report["trainer_samples_per_s"], "samples": report["samples"],
        "trained_share": report["trained_share"], "train_policy": report["train_policy"],
        "device": report["device"], "data": str(args.data) if args.data else "synth",
    }
    share = result["trained_share"]
    print(f"\n{'rate':>8} {'events':>8} {'achieved/s':>11} {'fresh p50':>10} {'fresh p99':>10} {'trainer samples/s':>18} "
          f"{'trained':>8}  device")
    print(f"{args.rate:>8.0f} {result['events']:>8,} {result['achieved_events_per_s']:>11,.0f} "
          f"{(result['freshness_p50_s'] or float('nan')):>9.2f}s {(result['freshness_p99_s'] or float('nan')):>9.2f}s "
          f"{result['trainer_samples_per_s']:>18,.0f} {'–' if share is None else f'{share:.0%}':>8}  {result['device']}")
    write_json(args.json, result)
    return 0
