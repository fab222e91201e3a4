"""``tgastream replay``: an event log (or a topic, from a point in time) → ``behavior-events``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from tgastream.core.events import FORMATS
from tgastream.core.settings import Settings

HELP = "replay an event log file (or re-read a topic from a timestamp) into the events topic"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS, add_setting_flags

    p.add_argument("file", nargs="?", type=Path, help="log file: JSON lines, Taobao CSV or RetailRocket events.csv (.gz ok)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: auto-detect)")
    p.add_argument("--order", choices=("time", "file"), default="time", help="send in event-time order or file order (default: time)")
    p.add_argument("--rate", type=float, default=0.0, help="target events/s (default: 0 = as fast as possible)")
    p.add_argument("--speedup", type=float, default=0.0, help="replay event time N× faster than real time (default: off)")
    p.add_argument("--limit", type=int, default=0, help="send at most N records (default: all)")
    p.add_argument("--watermark", action="store_true", help="end with a watermark record on every partition (closes open label windows)")
    p.add_argument("--json", type=Path, help="write the summary as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--from-topic", help="instead of a file: re-read this topic into --to (default: the events topic)")
    p.add_argument("--since", help="with --from-topic: first record time, ISO 8601 or epoch seconds")
    p.add_argument("--to", help="with --from-topic: destination topic")
    add_setting_flags(p, "bootstrap", "partitions", "events_topic", "dlq_topic", *KAFKA_SECURITY_SETTINGS)


def parse_time(text: str) -> float:
    """Epoch seconds from ``1511658000`` or ``2017-11-26T01:00:00`` (UTC unless an offset is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r} is neither epoch seconds nor an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.stream.broker import connect_with, install_sigterm_handler
    from tgastream.core.errors import CommandError
    from tgastream.stream.replay import ReplayConfig, copy_topic, replay_file, write_summary_json
    from tgastream.stream.topics import ensure_app_topics

    if (args.file is None) == (args.from_topic is None):
        raise CommandError("give exactly one of FILE or --from-topic")
    if args.from_topic and args.since is None:
        raise CommandError("--from-topic needs --since TIME")
    for flag in ("rate", "speedup", "limit"):
        if getattr(args, flag) < 0:
            raise CommandError(f"--{flag} must be >= 0")
    if args.file is not None and not args.file.is_file():
        raise CommandError(f"no such file: {args.file}")
    try:
        since = parse_time(args.since) if args.since is not None else 0.0
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    install_sigterm_handler()
    with connect_with(settings) as broker:
        if broker.embedded:
            print(f"using an embedded broker on {broker.bootstrap} (memory only; it stops when replay ends)", file=sys.stderr)
        ensure_app_topics(broker.bootstrap, settings)
        if args.from_topic:
            dest = args.to or settings.events_topic
            if dest == args.from_topic:
                raise CommandError("--to must differ from --from-topic")
            summary = copy_topic(broker.bootstrap, args.from_topic, dest, int(since * 1000), progress=not args.quiet,
                                 security=settings.kafka_security)
            print(json.dumps(summary.to_json()))
            return 0
        opts = ReplayConfig(path=args.file, fmt=args.format, order=args.order, rate=args.rate,
                             speedup=args.speedup, limit=args.limit, watermark=args.watermark,
                             watermark_margin_s=settings.conversion_window_s)  # past every open window
        summary = replay_file(broker.bootstrap, settings, opts, progress=not args.quiet)
    print(summary.render())
    if args.json:
        write_summary_json(summary, args.json)
    return 0
