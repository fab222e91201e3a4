"""``tgastream broker``: run the embedded Tansu broker in the foreground for local work."""

from __future__ import annotations

import argparse
import time

from tgastream.core.settings import Settings

HELP = "run the embedded Kafka-compatible broker (Tansu, memory only) in the foreground"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=9092, help="loopback port to listen on (default: 9092; 0 = any free port)")
    p.add_argument("--no-topics", action="store_true", help="do not create the pipeline's topics at start")
    from tgastream.stream.cli import add_setting_flags

    add_setting_flags(p, "partitions")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.stream.broker import EmbeddedBroker, install_sigterm_handler
    from tgastream.stream.topics import app_topics, ensure_app_topics

    install_sigterm_handler()
    with EmbeddedBroker(port=args.port) as broker:
        if not args.no_topics:
            ensure_app_topics(broker.bootstrap, settings)
        print(f"broker listening on {broker.bootstrap} (pid {broker.pid}); topics: "
              f"{', '.join(app_topics(settings)) if not args.no_topics else 'none'}", flush=True)
        print("memory only: topics vanish when it stops. Ctrl-C to stop.", flush=True)
        try:
            while broker.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping broker", flush=True)
            return 0
    print("broker exited", flush=True)
    return 1
