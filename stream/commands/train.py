"""``tgastream train``: the online trainer (micro-batch fine-tuning of TGA on training-samples)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from tgastream.core.settings import Settings

HELP = "run the online trainer: consume training-samples, fine-tune TGA, publish embeddings"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS, add_setting_flags

    p.add_argument("--idle-exit", type=float, default=0.0, metavar="S",
                   help="exit after S seconds without new samples, once every sample is trained and (with the publishing "
                        "thread) the re-publish sweep has caught up or had S more seconds (default: 0 = run until stopped)")
    p.add_argument("--max-samples", type=int, default=0, help="exit after this many samples (default: 0 = no limit)")
    p.add_argument("--publish-every", type=int, default=1, help="publish vectors every k steps (default: 1)")
    p.add_argument("--warm-start", type=Path, help="initialise from a learner state file (a checkpoint's 'learner' entry saved with torch.save)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    ranks = p.add_argument_group("data-parallel ranks (torch.distributed; wraps torchrun)")
    ranks.add_argument("--nproc", type=int, default=0, metavar="N",
                       help="run N trainer ranks on this machine under torchrun (default: 0 = one process, "
                            "or as many as torchrun started this one with)")
    ranks.add_argument("--nnodes", default="1", help="machines taking part, torchrun's --nnodes (default: 1)")
    ranks.add_argument("--node-rank", type=int, default=None, help="this machine's index (static rendezvous)")
    ranks.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                       help="c10d rendezvous endpoint for several machines (default: standalone, one machine)")
    ranks.add_argument("--rdzv-id", default="tgastream-trainer", help="rendezvous id shared by the machines")
    ranks.add_argument("--max-restarts", type=int, default=0,
                       help="restart the whole group this many times after a rank dies (it resumes from the "
                            "newest complete checkpoint; default: 0)")
    add_setting_flags(p, "bootstrap", "partitions", "samples_topic", "embeddings_topic", "data_dir", "device",
                      "dim", "layers", "heads", "threads", "batch_size", "burst", "max_wait_s", "lr", "replay_share",
                      "checkpoint_every_steps", "checkpoint_every_s", "metrics_port", "metrics_host", "max_len", "sample_len",
                      "train_policy", "repeat_prior", "conversion_prior", "conversion_base_rate", "stop_timeout_s", "checkpoint_dir", "republish_rate", "republish_behind_share", "catchup_batches",
                      "idle_ttl_s", "evict_every",
                      "drift_delta", "guard", "guard_margin", "guard_window", "guard_min_retrievals",
                      "guard_min_positives", "shadow_share", "seed", "conversion_feedback", "conversion_snapshot_steps", "pending_predictions",
                      *KAFKA_SECURITY_SETTINGS)


def torchrun_command(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run ... -m tgastream.stream.cli train ARGS`` with the rank
    flags turned into torchrun's and the rest passed through to every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--max-restarts", str(args.max_restarts), "--nnodes", str(args.nnodes)]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
    elif args.node_rank is None:
        cmd += ["--standalone"]
    if args.node_rank is not None:
        cmd += ["--node-rank", str(args.node_rank)]
    return cmd + ["--module", "tgastream.stream.cli", "train", *strip_rank_flags(argv)]


RANK_FLAGS = {"--nproc": 1, "--nnodes": 1, "--node-rank": 1, "--rdzv-endpoint": 1, "--rdzv-id": 1, "--max-restarts": 1}


def strip_rank_flags(argv: list[str]) -> list[str]:
    """``argv`` of ``train`` without the flags that only the launcher reads."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in RANK_FLAGS:
            skip = 0 if "=" in a else RANK_FLAGS[name]
            continue
        out.append(a)
    return out


def launcher_env(environ: Mapping[str, str], rendezvous: bool) -> dict[str, str]:
    """torchrun's environment. With a c10d rendezvous (several machines), each round of it
    publishes its own master address and port: torch's shared store publishes them in the first
    round only, so a node that restarts after a kill -9 waits for a master address its surviving
    peer never writes again, while the peer waits for it (both give up with DistStoreError;
    docs/scaling.md §4). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE`` set by the user is kept."""
    env = dict(environ)
    if rendezvous:
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def launch_ranks(args: argparse.Namespace) -> int:
    """Start the ranks under torchrun and wait for them (SIGTERM/SIGINT are passed on)."""
    import os
    import signal
    import subprocess

    from tgastream.core.errors import CommandError

    if args.nproc < 1:
        raise CommandError(f"--nproc must be >= 1, got {args.nproc}")
    given = list(getattr(args, "argv", []))
    argv = given[given.index("train") + 1:] if "train" in given else []
    cmd = torchrun_command(args, argv)
    print("tgastream train: starting ranks: " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=launcher_env(os.environ, bool(args.rdzv_endpoint)))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    return proc.wait()


def rank_threads(settings: Settings, local_world: int) -> int:
    """Torch threads of one rank: the setting, else the cores shared by the ranks on this
    machine, one left for Kafka I/O (at least 1)."""
    from tgastream.model.device import cpu_threads

    return cpu_threads(settings.threads, local_world)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from prometheus_client import start_http_server

    from tgastream.model.distributed import env_world, init_group, rank_device

    if args.nproc and "LOCAL_RANK" not in os.environ:
        return launch_ranks(args)
    rank, world, local_rank = env_world()

    from tgastream.model.inference import IncompatibleCheckpoint
    from tgastream.model.device import resolve_device
    from tgastream.model.online import OnlineLearner
    from tgastream.stream.configs import online_config, online_model_config
    from tgastream.stream.broker import connect_with
    from tgastream.core.errors import CommandError
    from tgastream.stream.topics import ensure_app_topics
    from tgastream.stream.trainer import Trainer, TrainerMetrics, install_stop_handlers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.warm_start is not None and not args.warm_start.is_file():
        raise CommandError(f"no such model file: {args.warm_start}")
    print("tgastream train: settings\n" + settings.describe(), file=sys.stderr)
    handle = connect_with(settings, allow_embedded=False)
    ensure_app_topics(handle.bootstrap, settings)
    if world > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        device = rank_device(settings.device, local_rank)
        settings = dataclasses.replace(settings, device=device, threads=rank_threads(settings, local_world),
                                       metrics_port=settings.metrics_port + local_rank if settings.metrics_port else 0)
        group = init_group(resolve_device(device))
        print(f"tgastream train: rank {rank} of {world} (local {local_rank}), backend "
              f"{'nccl' if resolve_device(device).type == 'cuda' else 'gloo'}, partitions p % {world} == {rank}",
              file=sys.stderr, flush=True)
    else:
        group = None
    learner = OnlineLearner(online_model_config(settings), online_config(settings), group=group)
    if args.warm_start is not None:
        learner.warm_start(args.warm_start)
    metrics = TrainerMetrics()
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host,
                                        registry=metrics.registry)
    print(f"tgastream train: device {learner.device}; metrics on :{server.server_port}/metrics", file=sys.stderr, flush=True)

    def show(stats: dict) -> None:
        online = stats["online"]
        share = stats["trained_share"]
        print(f"\rsamples {stats['samples']:>9,}  trained {stats['trained']:>9,} "
              f"({'–' if share is None else f'{share:.0%}'})  backlog {stats['backlog']:>7,}  steps {stats['steps']:>7,}  "
              f"hr@10 {online.get('hr@10') or 0:.3f}  auc {online.get('auc') or 0:.3f}", end="", file=sys.stderr)

    trainer = Trainer(settings, handle.bootstrap, learner, metrics, publish_every=args.publish_every,
                      progress=None if args.quiet else show)
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
    learner.group.close()
    return 0
