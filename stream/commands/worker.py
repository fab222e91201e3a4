"""``tgastream worker``: run a stream worker (events → user state → samples) until stopped."""

from __future__ import annotations

import argparse
import sys

from tgastream.core.settings import Settings

HELP = "run a stream worker: consume behavior-events, keep user graphs in RocksDB, emit training samples"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS, add_setting_flags

    p.add_argument("--progress", type=float, default=10.0, metavar="S",
                   help="seconds between progress lines (default: 10; 0 = none)")
    p.add_argument("--max-seconds", type=float, default=0.0, metavar="S",
                   help="stop after this many seconds (default: 0 = run until SIGTERM/Ctrl-C)")
    p.add_argument("--quiet", action="store_true", help="only warnings and the final summary")
    p.add_argument("--stall-timeout-s", type=float, default=120.0, metavar="S",
                   help="records wait on the worker's partitions and it fetched none this long: it logs what "
                        "it waits on, leaves the group and joins again (default: 120; 0 = never)")
    add_setting_flags(p, "bootstrap", "partitions", "events_topic", "dlq_topic", "samples_topic",
                      "features_topic", "data_dir", "metrics_port", "metrics_host", "worker_group",
                      "worker_batch", "worker_flush_s", "standby_replicas", "rebalance_timeout_s",
                      "stop_timeout_s", "join_timeout_s", *KAFKA_SECURITY_SETTINGS)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import logging

    from tgastream.stream.broker import connect_with
    from tgastream.core.errors import CommandError
    from tgastream.stream.worker import WorkerConfig, configure_logging, run_worker, tune_gc

    if args.progress < 0 or args.max_seconds < 0 or args.stall_timeout_s < 0:
        raise CommandError("--progress, --max-seconds and --stall-timeout-s must be >= 0")
    configure_logging(logging.WARNING if args.quiet else logging.INFO)
    tune_gc()
    broker = connect_with(settings, allow_embedded=False)
    settings = settings.replace(bootstrap=broker.bootstrap)
    print("tgastream worker settings:\n" + settings.describe(), file=sys.stderr, flush=True)
    options = WorkerConfig(progress_s=0.0 if args.quiet else args.progress, max_seconds=args.max_seconds,
                           stop_timeout_s=settings.stop_timeout_s, join_timeout_s=settings.join_timeout_s,
                           stall_timeout_s=args.stall_timeout_s)
    try:
        asyncio.run(run_worker(settings, options, out=sys.stdout))
    except RuntimeError as exc:
        raise CommandError(str(exc)) from None
    return 0
