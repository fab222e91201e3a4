"""``tgastream doctor``: say which paths this installation runs, before anything is started.

One line per check: the fused kernel or the reference path (and why), CUDA or CPU, the broker,
the data dir, the package versions. It starts nothing and writes nothing but a probe file in an
existing data dir (and the kernel cache, when it builds the kernel). Exit 0 when the installation
is usable; ``--require-fused`` / ``--require-broker`` make a missing kernel / broker fail too
(CI and the image build use ``--require-fused``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from tgastream.core.settings import Settings

if TYPE_CHECKING:
    from tgastream.core.kafka_security import KafkaSecurity

HELP = "check this installation: fused kernel or reference path, CUDA or CPU, broker, data dir, versions"

PACKAGES = ("tgastream", "torch", "faust-streaming", "aiokafka", "kafka-python", "rocksdict")


@dataclass(frozen=True)
class Check:
    """One line of the report; a check that is not ``ok`` and ``required`` makes the exit code 1."""

    name: str
    ok: bool
    text: str
    required: bool = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS, add_setting_flags

    p.add_argument("--require-fused", action="store_true", help="exit 1 when the fused CPU kernel is not available")
    p.add_argument("--require-broker", action="store_true", help="exit 1 when no Kafka broker answers at the bootstrap")
    add_setting_flags(p, "bootstrap", "data_dir", "device", "stop_timeout_s", *KAFKA_SECURITY_SETTINGS)


def kernel_check(required: bool) -> Check:
    from tgastream.model import fused

    st = fused.status()
    if st.available:
        flags = " ".join(f for f in fused.compile_flags(fused.march()) if f.startswith("-m"))
        return Check("fused kernel", True, f"available ({fused.march()}{', ' + flags if flags else ''}): {st.library}")
    return Check("fused kernel", False, f"NOT available, the reference torch path runs: {st.reason}", required)


def compute_check(device_setting: str) -> Check:
    import torch

    from tgastream.model.device import describe, resolve_device

    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available()
            else f"CUDA not available (torch built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for CPU'})")
    try:
        device = resolve_device(device_setting)
    except (ValueError, RuntimeError) as exc:
        return Check("compute", False, f"device {device_setting!r} unusable: {exc}; torch {torch.__version__}, {cuda}")
    return Check("compute", True, f"{describe(device)}; torch {torch.__version__}, {cuda}")


def security_check(settings: Settings) -> tuple[Check, "KafkaSecurity | None"]:
    """The Kafka TLS/SASL settings: usable (secret files readable and private, files present)?"""
    from tgastream.core.settings import SettingsError

    try:
        sec = settings.kafka_security
    except SettingsError as exc:
        return Check("kafka auth", False, str(exc)), None
    return Check("kafka auth", True, sec.describe()), sec


def broker_check(bootstrap: str, required: bool, security: "KafkaSecurity | None" = None,
                 timeout_s: float = 5.0) -> Check:
    """Connection, TLS, authentication and metadata, step by step: which one fails."""
    from tgastream.stream.broker import answers_metadata, port_open
    from tgastream.stream.kafka_probe import probe

    if security is None:
        return Check("broker", False, f"{bootstrap} not tried: the Kafka security settings are unusable", required)
    if security.tls or security.sasl:
        result = probe(bootstrap, security, timeout_s)
        if not result.ok:
            return Check("broker", False, f"{bootstrap}: {result.stage} failed: {result.message}", required)
        return Check("broker", True, result.message)
    if answers_metadata(bootstrap, timeout_s=5.0):
        return Check("broker", True, f"{bootstrap} answers (Kafka metadata)")
    why = "nothing listens there"
    if port_open(bootstrap):
        result = probe(bootstrap, security, timeout_s)
        why = f"{result.stage} failed: {result.message}" if not result.ok else "listens but answers no Kafka metadata request"
    hint = "" if required else " (not required: demo/tests start the embedded broker; pass --bootstrap HOST:PORT)"
    return Check("broker", False, f"{bootstrap} unreachable: {why}{hint}", required)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def data_dir_check(data_dir: Path) -> Check:
    path = data_dir.expanduser().absolute()
    if path.is_dir():
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
                pass
        except OSError as exc:
            return Check("data dir", False, f"{path}: not writable ({exc.strerror})")
        return Check("data dir", True, f"{path}: writable")
    if path.exists():
        return Check("data dir", False, f"{path}: exists and is not a directory")
    parent = _nearest_existing(path)
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return Check("data dir", True, f"{path}: does not exist yet, can be created (in {parent})")
    return Check("data dir", False, f"{path}: does not exist and {parent} is not writable")


def packages_check() -> Check:
    versions, missing = [], []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    from tgastream import model

    where = Path(next(iter(model.__path__))).parent
    text = ", ".join(versions) + (f"; MISSING: {', '.join(missing)}" if missing else "") + f" (code in {where})"
    return Check("packages", not missing, text)


def run_checks(settings: Settings, args: argparse.Namespace) -> list[Check]:
    from tgastream.stream.broker import DEFAULT_BOOTSTRAP

    security, kafka = security_check(settings)
    return [
        packages_check(),
        kernel_check(args.require_fused),
        compute_check(settings.device),
        security,
        broker_check(settings.bootstrap or DEFAULT_BOOTSTRAP, args.require_broker, kafka, settings.stop_timeout_s or 5.0),
        data_dir_check(Path(settings.data_dir)),
    ]


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"  {'ok' if c.ok else ('FAIL' if c.required else '--'):<4} {c.name:<{width}}  {c.text}" for c in checks]
    failed = [c.name for c in checks if not c.ok and c.required]
    verdict = f"NOT usable: {', '.join(failed)}" if failed else "usable"
    return "tgastream doctor\n" + "\n".join(lines) + f"\n{verdict}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    checks = run_checks(settings, args)
    print(render(checks), flush=True)
    return 1 if any(not c.ok and c.required for c in checks) else 0
