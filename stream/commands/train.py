"""``tgastream train``: the online trainer (micro-batch fine-tuning of TGA on training-samples)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tgastream.core.settings import Settings

HELP = "run the online trainer: consume training-samples, fine-tune TGA, publish embeddings"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags

    p.add_argument("--idle-exit", type=float, default=0.0, metavar="S",
                   help="exit after S seconds without new samples (default: 0 = run until stopped)")
    p.add_argument("--max-samples", type=int, default=0, help="exit after this many samples (default: 0 = no limit)")
    p.add_argument("--publish-every", type=int, default=1, help="publish vectors every k steps (default: 1)")
    p.add_argument("--warm-start", type=Path, help="initialise from a learner state file (a checkpoint's 'learner' entry saved with torch.save)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_setting_flags(p, "bootstrap", "partitions", "samples_topic", "embeddings_topic", "data_dir", "device",
                      "dim", "layers", "heads", "threads", "batch_size", "burst", "max_wait_s", "lr", "replay_share",
                      "checkpoint_every_steps", "checkpoint_every_s", "metrics_port", "metrics_host", "max_len", "sample_len",
                      "train_policy", "stop_timeout_s", "checkpoint_dir", "republish_rate",
                      "drift_delta", "guard", "guard_margin", "guard_window", "guard_min_retrievals",
                      "guard_min_positives", "shadow_share", "seed")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from prometheus_client import start_http_server

    from tgastream.model.inference import IncompatibleCheckpoint
    from tgastream.model.online import OnlineLearner
    from tgastream.stream.configs import online_config, online_model_config
    from tgastream.stream.broker import connect_or_start
    from tgastream.core.errors import CommandError
    from tgastream.stream.topics import ensure_app_topics
    from tgastream.stream.trainer import Trainer, TrainerMetrics, install_stop_handlers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.warm_start is not None and not args.warm_start.is_file():
        raise CommandError(f"no such model file: {args.warm_start}")
    print("tgastream train: settings\n" + settings.describe(), file=sys.stderr)
    handle = connect_or_start(settings.bootstrap, allow_embedded=False)
    ensure_app_topics(handle.bootstrap, settings)
    learner = OnlineLearner(online_model_config(settings), online_config(settings))
    if args.warm_start is not None:
        learner.warm_start(args.warm_start)
    metrics = TrainerMetrics()
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host,
                                        registry=metrics.registry)
    print(f"tgastream train: device {learner.device}; metrics on :{server.server_port}/metrics", file=sys.stderr, flush=True)

    def show(stats: dict) -> None:
        if not args.quiet:
            online = stats["online"]
            share = stats["trained_share"]
            print(f"\rsamples {stats['samples']:>9,}  trained {stats['trained']:>9,} "
                  f"({'–' if share is None else f'{share:.0%}'})  backlog {stats['backlog']:>7,}  steps {stats['steps']:>7,}  "
                  f"hr@10 {online.get('hr@10') or 0:.3f}  auc {online.get('auc') or 0:.3f}", end="", file=sys.stderr)

    trainer = Trainer(settings, handle.bootstrap, learner, metrics, publish_every=args.publish_every, progress=show)
    install_stop_handlers(trainer)
    try:
        resumed = trainer.restore()
    except IncompatibleCheckpoint as exc:
        raise CommandError(f"checkpoint in {trainer.ckpt_dir} {exc}: use an empty --data-dir, or remove "
                           "its checkpoints/ to start training afresh") from None
    if resumed:
        print(f"\ntgastream train: resumed at step {trainer.run.steps}, offsets {trainer.offsets}", file=sys.stderr)
    run_ = trainer.serve_forever(idle_exit_s=args.idle_exit, max_samples=args.max_samples)
    p50, p99 = run_.freshness_quantiles()
    print(f"\ntgastream train: done. samples {run_.samples:,}, trained {run_.trained:,}, "
          f"re-delivered (skipped) {run_.redelivered:,}, steps {run_.steps:,}, "
          f"freshness p50 {p50 or 0:.3f}s p99 {p99 or 0:.3f}s", file=sys.stderr)
    server.shutdown()
    return 0
