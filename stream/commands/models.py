"""``tgastream models``: the model registry of a checkpoint directory (state/registry.py)."""

from __future__ import annotations

import argparse
import json
import time

from tgastream.core.settings import Settings

HELP = "list model versions (checkpoints): version, parent, step, metrics at save time, status"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags

    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    add_setting_flags(p, "data_dir", "checkpoint_dir")


def _fmt(x: object) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.core.errors import CommandError
    from tgastream.state.registry import Registry, RegistryError

    try:
        reg = Registry.load(settings.checkpoints)
    except RegistryError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(json.dumps({"serving": reg.serving, "versions": [
            {**v.__dict__, "file_exists": reg.exists(v)} for v in reg.versions]}, indent=1))
        return 0
    if not reg.versions:
        print(f"no model versions in {settings.checkpoints} (the trainer registers each checkpoint it writes)")
        return 0
    print(f"{'version':>8} {'parent':>7} {'step':>7}  {'status':<10}{'hr@10':>7}{'auc':>7}  {'saved':<20} file")
    for v in reg.versions:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created))
        gone = "" if reg.exists(v) else " (deleted)"
        print(f"{v.version:>8} {_fmt(v.parent):>7} {v.step:>7}  {v.status:<10}{_fmt(v.metrics.get('hr@10')):>7}"
              f"{_fmt(v.metrics.get('auc')):>7}  {saved:<20} {v.file}{gone}")
    s = reg.serving
    print(f"serving: {s.get('state')} (version {_fmt(s.get('version'))})")
    return 0
