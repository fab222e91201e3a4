"""How every Kafka client of the project authenticates and encrypts: one place, one function per
client library.

The settings (``security_protocol``, ``sasl_*``, ``ssl_*`` in :mod:`core.settings`) become a
:class:`KafkaSecurity` (:func:`kafka_security`), and the keyword arguments of each client library
are built from it here and nowhere else:

- :func:`kafka_python_args` for ``kafka.KafkaProducer`` / ``KafkaConsumer`` / ``KafkaAdminClient``
  (replay, trainer, API replicas, topic admin, doctor, benchmarks);
- :func:`aiokafka_args` for ``aiokafka.AIOKafkaProducer`` (the worker's batched producer);
- :func:`faust_args` for ``faust.App`` (the worker's consumer group and table changelog).

``tests/test_kafka_security.py`` walks the source and fails when a client is made without one of
them, so a new client cannot silently talk PLAINTEXT to a secured cluster.

Secrets (the SASL password, the API token) are read from TOML, ``TGASTREAM_*`` or a file, never
from a command-line flag alone (a flag shows in ``ps``); a secret file readable by group or others
is refused, as ssh refuses such a private key; a secret is printed as ``***`` everywhere
(:func:`redact`, :func:`install_log_redaction`).
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
MASK = "***"


class SecurityError(ValueError):
    """A security setting or secret file is unusable; the message is one line for the user."""


@dataclass(frozen=True)
class KafkaSecurity:
    """TLS and SASL of a Kafka connection. ``password`` never appears in ``repr`` or :meth:`describe`."""

    protocol: str = "PLAINTEXT"
    mechanism: str = "PLAIN"
    username: str = ""
    password: str = field(default="", repr=False)
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    check_hostname: bool = True

    @property
    def sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def secrets(self) -> list[str]:
        """The values that must never be printed."""
        return [self.password] if self.password else []

    def describe(self) -> str:
        """One line for logs and doctor: protocol, mechanism, user; never the password."""
        parts = [self.protocol]
        if self.sasl:
            parts.append(f"{self.mechanism} as {self.username!r} (password {MASK})")
        if self.tls:
            parts.append(f"CA {self.cafile or 'system'}" + ("" if self.check_hostname else ", hostname not checked"))
            if self.certfile:
                parts.append(f"client certificate {self.certfile}")
        return ", ".join(parts)


PLAINTEXT = KafkaSecurity()


def check_secret_file(path: str | Path, what: str) -> Path:
    """``path`` as a readable secret file, or :class:`SecurityError`: it must exist and must not be
    readable or writable by group or others (``chmod 600``), like ssh's private keys."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise SecurityError(f"{what} file {p} does not exist") from None
    except OSError as exc:
        raise SecurityError(f"{what} file {p} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise SecurityError(f"{what} file {p} is not a regular file")
    if mode & 0o077:
        raise SecurityError(f"{what} file {p} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                            f"run: chmod 600 {p}")
    return p


def read_secret_file(path: str | Path, what: str) -> str:
    """The secret in ``path`` (permissions checked; surrounding whitespace and newline dropped)."""
    p = check_secret_file(path, what)
    try:
        return p.read_text().strip()
    except OSError as exc:
        raise SecurityError(f"{what} file {p} cannot be read: {exc.strerror}") from None


def kafka_security(settings: Any) -> KafkaSecurity:
    """The :class:`KafkaSecurity` of ``settings`` (a :class:`core.settings.Settings`); the password
    comes from ``sasl_password`` (TOML or ``TGASTREAM_SASL_PASSWORD``) or ``sasl_password_file``."""
    protocol = settings.security_protocol
    password = settings.sasl_password
    if settings.sasl_password_file:
        password = read_secret_file(settings.sasl_password_file, "sasl_password")
    sec = KafkaSecurity(protocol=protocol, mechanism=settings.sasl_mechanism, username=settings.sasl_username,
                        password=password, cafile=settings.ssl_cafile, certfile=settings.ssl_certfile,
                        keyfile=settings.ssl_keyfile, check_hostname=settings.ssl_check_hostname)
    if sec.sasl and not (sec.username and sec.password):
        raise SecurityError(f"security_protocol {protocol} needs sasl_username and a password "
                            "(TGASTREAM_SASL_PASSWORD, sasl_password in the config file, or --sasl-password-file)")
    if sec.keyfile:
        check_secret_file(sec.keyfile, "ssl_keyfile")
    for name in ("cafile", "certfile"):
        value = getattr(sec, name)
        if value and not Path(value).is_file():
            raise SecurityError(f"ssl_{name} {value} does not exist")
    return sec


def ssl_context(sec: KafkaSecurity) -> ssl.SSLContext | None:
    """The client TLS context of ``sec`` (None without TLS): the CA file (or the system's CAs),
    the client certificate and key when given, hostname checking as configured."""
    if not sec.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=sec.cafile or None)
        if sec.certfile:
            ctx.load_cert_chain(sec.certfile, sec.keyfile or None)
    except (ssl.SSLError, OSError) as exc:
        raise SecurityError(f"TLS files cannot be loaded (ssl_cafile/ssl_certfile/ssl_keyfile): {exc}") from None
    ctx.check_hostname = sec.check_hostname
    return ctx


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext | None:
    """The API's HTTPS context from a certificate and its key (None when not configured); the key
    file must be chmod 600."""
    if not certfile:
        return None
    check_secret_file(keyfile, "api_ssl_keyfile")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise SecurityError(f"api_ssl_certfile/api_ssl_keyfile cannot be loaded: {exc}") from None
    return ctx


def kafka_python_args(bootstrap: str, sec: KafkaSecurity = PLAINTEXT, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of a kafka-python client (``KafkaProducer``, ``KafkaConsumer``,
    ``KafkaAdminClient``) for ``bootstrap`` with ``sec``; ``extra`` are the caller's own."""
    args: dict[str, Any] = dict(bootstrap_servers=bootstrap, security_protocol=sec.protocol)
    if sec.tls:
        args["ssl_context"] = ssl_context(sec)
        args["ssl_check_hostname"] = sec.check_hostname
    if sec.sasl:
        args.update(sasl_mechanism=sec.mechanism, sasl_plain_username=sec.username, sasl_plain_password=sec.password)
    args.update(extra)
    return args


def aiokafka_args(bootstrap: str, sec: KafkaSecurity = PLAINTEXT, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of an aiokafka client (``AIOKafkaProducer``/``AIOKafkaConsumer``)."""
    args: dict[str, Any] = dict(bootstrap_servers=bootstrap, security_protocol=sec.protocol)
    if sec.tls:
        args["ssl_context"] = ssl_context(sec)
    if sec.sasl:
        args.update(sasl_mechanism=sec.mechanism, sasl_plain_username=sec.username, sasl_plain_password=sec.password)
    args.update(extra)
    return args


def faust_args(bootstrap: str, sec: KafkaSecurity = PLAINTEXT) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` of a ``faust.App`` (faust hands them to aiokafka)."""
    import faust

    args: dict[str, Any] = dict(broker=[f"kafka://{hp.strip()}" for hp in bootstrap.split(",")])
    if sec.sasl:
        args["broker_credentials"] = faust.SASLCredentials(
            username=sec.username, password=sec.password, ssl_context=ssl_context(sec), mechanism=sec.mechanism)
    elif sec.tls:
        args["broker_credentials"] = faust.SSLCredentials(ssl_context(sec))
    return args


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for s in secrets:
        if s:
            text = text.replace(s, MASK)
    return text


def _redacted_record(record: logging.LogRecord, secrets: list[str]) -> logging.LogRecord:
    """``record`` with the secrets in its final message (and traceback) replaced by ``***``."""
    try:
        msg = record.getMessage()
    except Exception:  # a library's malformed log call: leave it to logging's own error handling
        return record
    if record.exc_info and record.exc_info[0] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        if any(s in text for s in secrets):
            msg, record.exc_info, record.exc_text = msg + "\n" + text, None, None
    clean = redact(msg, secrets)
    if clean != msg:
        record.msg, record.args = clean, None
    return record


def install_log_redaction(secrets: Iterable[str]) -> None:
    """Redact ``secrets`` from every log record this process makes, whatever logger or handler
    (libraries may log their configuration or a server's error text): the record factory
    replaces them by ``***`` when the record is made."""
    new = [s for s in secrets if s and s not in _PROCESS_SECRETS]
    if not new:
        return
    _PROCESS_SECRETS.extend(new)
    if getattr(logging.getLogRecordFactory(), "_tgastream_redacting", False):
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return _redacted_record(base(*args, **kwargs), _PROCESS_SECRETS)

    factory._tgastream_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
    base_hook = sys.excepthook

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        """A traceback (a bug) printed with the secrets replaced."""
        import traceback

        text = "".join(traceback.format_exception(kind, exc, tb))
        if any(s in text for s in _PROCESS_SECRETS):
            sys.stderr.write(redact(text, _PROCESS_SECRETS))
        else:
            base_hook(kind, exc, tb)

    sys.excepthook = excepthook


_PROCESS_SECRETS: list[str] = []


def process_secrets() -> list[str]:
    """Secrets registered by :func:`install_log_redaction` in this process (for error lines)."""
    return list(_PROCESS_SECRETS)
