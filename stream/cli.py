"""The ``tgastream`` command line: one entry point, one subcommand per job.

Errors a user can fix (bad flag, bad config, unreachable broker, missing file) end the program
with one readable line and a non-zero exit code; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Sequence

from tgastream.core.errors import CommandError
from tgastream.core.kafka_security import install_log_redaction, process_secrets, redact
from tgastream.core.settings import Settings, SettingsError, load_settings

COMMANDS: dict[str, str] = {
    "broker": "tgastream.stream.commands.broker",
    "synth": "tgastream.stream.commands.synth",
    "replay": "tgastream.stream.commands.replay",
    "bench": "tgastream.stream.commands.bench",
    "eval": "tgastream.stream.commands.eval",
    "serve": "tgastream.stream.commands.serve",
    "worker": "tgastream.stream.commands.worker",
    "train": "tgastream.stream.commands.train",
    "demo": "tgastream.stream.commands.demo",
    "doctor": "tgastream.stream.commands.doctor",
    "models": "tgastream.stream.commands.models",
    "rollback": "tgastream.stream.commands.rollback",
}
"""Subcommand name → module; a module joins the CLI by adding one line here."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is shown as one line instead of a traceback."""
    from tgastream.stream.broker import BrokerError
    from tgastream.stream.topics import TopicError
    from tgastream.state.registry import RegistryError
    from tgastream.core.kafka_security import SecurityError
    from tgastream.model.device import DeviceUnavailable

    return (CommandError, SettingsError, BrokerError, TopicError, RegistryError, SecurityError, FileNotFoundError,
            IsADirectoryError, DeviceUnavailable)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus a pointer to --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_SETTING_FIELDS = {f.name: f for f in fields(Settings)}

KAFKA_SECURITY_SETTINGS = ("security_protocol", "sasl_mechanism", "sasl_username", "sasl_password_file",
                           "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
"""Flags of every command that talks to Kafka (docs/security.md). The password itself has no flag
(a flag shows in ``ps`` and shell history): TGASTREAM_SASL_PASSWORD, the config file, or
--sasl-password-file."""


def add_setting_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add ``--name`` flags that override the settings of the same name (default: not given)."""
    for name in names:
        f = _SETTING_FIELDS[name]
        if f.metadata.get("secret"):
            raise ValueError(f"setting {name} is a secret: it gets no command-line flag")
        default = f.default
        helptext = f.metadata.get("help", name.replace("_", " "))
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", default=None,
                            metavar=name.upper(), help=f"{helptext} (default: {default!s})")


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers (``50,200,1000``)."""
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    """An argparse type: comma-separated numbers (``2,4,8``)."""
    return [float(x) for x in text.split(",") if x.strip()]


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    config = args.config or os.environ.get("TGASTREAM_CONFIG")
    return load_settings(Path(config) if config else None, os.environ, overrides)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = OneLineParser(prog="tgastream", description="Streaming online learning of TGA on behavior events.")
    parser.add_argument("--config", help="TOML settings file (also TGASTREAM_CONFIG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    modules: dict[str, ModuleType] = {}
    for name, path in COMMANDS.items():
        module = importlib.import_module(path)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--config", help="TOML settings file (also TGASTREAM_CONFIG)", default=argparse.SUPPRESS)
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (a launcher passes them on)
    if not args.command:
        parser.print_help()
        return 2
    if not hasattr(args, "config"):
        args.config = None
    try:
        settings = settings_from_args(args)
        install_log_redaction(settings.secrets())  # every log line of this process, libraries' too
        return int(modules[args.command].run(args, settings) or 0)
    except user_errors() as exc:
        msg = exc.strerror + f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
        print(f"tgastream {args.command}: error: {redact(msg, process_secrets())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tgastream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
