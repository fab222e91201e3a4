"""Subcommands of the ``tgastream`` CLI: thin wrappers that parse flags and call library code.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args, settings) -> int``
and imports heavy libraries (torch, faust) inside ``run`` so ``--help`` stays fast.
"""
