"""``tgastream serve``: the HTTP API over the trainer's serving store."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

from tgastream.core.settings import Settings

HELP = "serve embeddings, recommendations and conversion scores over HTTP"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags

    p.add_argument("--store", type=Path,
                   help="read this trainer's serving RocksDB (a secondary reader beside the trainer) instead of "
                        "materializing the embeddings topic into DATA_DIR/api-serving (the default)")
    from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS

    add_setting_flags(p, "bootstrap", "partitions", "embeddings_topic", "data_dir", "checkpoint_dir", "api_host", "api_port",
                      "device", "api_token_file", "api_ssl_certfile", "api_ssl_keyfile", "ann_exact_below", "ann_nprobe", "ann_lists_factor",
                      "ann_update_chunk", "ui_worker_metrics", "ui_trainer_metrics", *KAFKA_SECURITY_SETTINGS)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.core.errors import CommandError
    from tgastream.core.kafka_security import server_ssl_context
    from tgastream.stream.broker import connect_with, install_sigterm_handler
    from tgastream.stream.configs import ann_config
    from tgastream.stream.serve import run_server
    from tgastream.stream.topics import ensure_app_topics
    from tgastream.stream.ui import UiConfig

    install_sigterm_handler()
    token = settings.resolved_api_token()  # from api_token or api_token_file (chmod 600)
    https = server_ssl_context(settings.api_ssl_certfile, settings.api_ssl_keyfile)
    topic = None
    if args.store is not None:
        store = args.store
        print(f"tgastream serve: the trainer's store {store}")
    else:
        broker = connect_with(settings, allow_embedded=False)
        ensure_app_topics(broker.bootstrap, settings)
        store = Path(settings.data_dir) / "api-serving"
        topic = (broker.bootstrap, settings.embeddings_topic)
        print(f"tgastream serve: topic {settings.embeddings_topic} on {broker.bootstrap} → {store}")
    try:
        run_server(store, settings.api_host, settings.api_port, scorer_for(settings), lambda s: print(s, flush=True),
                   token=token, topic=topic, checkpoint_dir=settings.checkpoints, security=settings.kafka_security,
                   ssl_context=https, ann=ann_config(settings),
                   ui=UiConfig(worker_metrics=settings.ui_worker_metrics, trainer_metrics=settings.ui_trainer_metrics,
                               bootstrap=topic[0] if topic else None, events_topic=settings.events_topic,
                               security=settings.kafka_security))
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        raise CommandError(f"cannot listen on {settings.api_host}:{settings.api_port}: {exc.strerror.split(': ')[-1]} "
                           "(another process there? choose --api-port)") from None
    return 0


def scorer_for(settings: Settings):
    """The conversion scorer over the trainer's checkpoints (not ready until one exists)."""
    import torch

    from tgastream.model.device import cpu_threads
    from tgastream.model.inference import IncompatibleCheckpoint
    from tgastream.model.scoring import CheckpointScorer
    from tgastream.core.errors import CommandError

    device = "cpu" if settings.device == "auto" else settings.device  # the API scores small batches
    if torch.device(device).type == "cpu":
        torch.set_num_threads(cpu_threads(settings.threads))
    try:
        return CheckpointScorer(settings.checkpoints, device, settings.sample_len)
    except IncompatibleCheckpoint as exc:
        raise CommandError(f"{exc}; point --data-dir at the trainer that serves this model") from None
