"""``tgastream rollback --to VERSION``: pin a model version by hand (``--release`` unpins).

The running trainer notices the pin at its next step (or at its start): it loads that version's
weights (keeping id-map rows added since), publishes from it and keeps learning in the shadow
until the pin is released.
"""

from __future__ import annotations

import argparse

from tgastream.core.settings import Settings

HELP = "pin a model version by hand (the trainer rolls back to it and publishes from it); --release unpins"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import add_setting_flags

    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--to", type=int, metavar="VERSION", help="the version to pin (see tgastream models)")
    g.add_argument("--release", action="store_true", help="release the pin: the trainer publishes from its online model again")
    add_setting_flags(p, "data_dir", "checkpoint_dir")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tgastream.core.errors import CommandError
    from tgastream.state.registry import RegistryError, editing

    try:
        with editing(settings.checkpoints) as reg:  # the trainer may be saving it right now
            if args.release:
                pinned = reg.pinned()
                if pinned is None:
                    raise CommandError(f"no version is pinned in {settings.checkpoints}")
                pinned.status = "good"
            else:
                v = reg.pin(args.to)
        if args.release:
            print(f"released the pin on version {pinned.version}; the trainer goes live at its next step")
            return 0
    except RegistryError as exc:
        raise CommandError(str(exc)) from None
    print(f"pinned version {v.version} (step {v.step}, {v.file}); the running trainer rolls back to it at its next "
          f"step, a stopped one at its start")
    return 0
