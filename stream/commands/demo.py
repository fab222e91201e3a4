"""``tgastream demo``: the whole pipeline on one machine, with a report at the end."""

from __future__ import annotations

import argparse
from pathlib import Path

from tgastream.core.settings import Settings

HELP = "run broker, stream worker, trainer and API on one machine, replay a log, write a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS, add_setting_flags

    p.add_argument("--out", type=Path, default=Path("demo-report"), help="report folder (default: demo-report)")
    p.add_argument("--data", type=Path, help="replay this log instead of generating one (Taobao CSV, JSON lines, RetailRocket)")
    p.add_argument("--events", type=int, default=20_000, help="size of the generated log (default: 20000)")
    p.add_argument("--users", type=int, default=500, help="users in the generated log (default: 500)")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated log (default: 7)")
    p.add_argument("--rate", type=float, default=1000.0, help="replay rate, events/s (default: 1000)")
    p.add_argument("--timeout", type=float, default=900.0, help="stop after this many seconds (default: 900)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_setting_flags(p, "bootstrap", "partitions", "device", "dim", "layers", "heads", "batch_size", "sample_len", "train_policy",
                      "api_port", "republish_rate", "stop_timeout_s", "conversion_feedback",
                      *KAFKA_SECURITY_SETTINGS)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.stream.broker import install_sigterm_handler
    from tgastream.stream.demo import DemoConfig, run_demo
    from tgastream.core.errors import CommandError

    if args.data is not None and not args.data.is_file():
        raise CommandError(f"no such file: {args.data}")
    if args.events < args.users or args.users < 1:
        raise CommandError("need --users >= 1 and --events >= --users")
    if args.rate <= 0:
        raise CommandError("--rate must be > 0")
    install_sigterm_handler()
    print("tgastream demo: settings\n" + settings.describe(), flush=True)
    opts = DemoConfig(out=args.out, data=args.data, events=args.events, users=args.users, seed=args.seed,
                       rate=args.rate, timeout_s=args.timeout, quiet=args.quiet)
    report = run_demo(settings, opts, say=lambda s: print(s, flush=True))
    width = max(len(k) for k in report)
    print("\nreport")
    for key, value in report.items():
        print(f"  {key:<{width}}  {value}")
    print(f"\nwritten: {args.out}/report.json, online_metrics.png, throughput.png, freshness.png")
    return 0
