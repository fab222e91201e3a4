"""The one settings object: defaults < TOML file < ``TGASTREAM_*`` environment < command-line flags.

Every component takes the :class:`Settings` it needs passed in; nothing reads the environment
at import time. Invalid values raise :class:`SettingsError` whose message is one readable line.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from tgastream.core.kafka_security import KafkaSecurity

ENV_PREFIX = "TGASTREAM_"

# Defaults shared by Settings and the component configs that need one (written here only).
MAX_LEN = 200  # events kept per user graph
SAMPLE_LEN = 50  # graph nodes carried by a training sample
CONVERSION_WINDOW_S = 86_400.0  # click → buy conversion window (event time)
DIM = 64  # model width
LAYERS = 2  # encoder layers
HEADS = 2  # attention heads
LR = 1e-3  # online learning rate
REPLAY_SHARE = 0.25  # share of each online step drawn from the replay reservoir


class SettingsError(ValueError):
    """A configuration value is invalid; the message is one line meant for the user."""


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise SettingsError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class Settings:
    """Configuration of every tgastream process (docs/operations/configuration.md lists every field)."""

    # Kafka
    bootstrap: str = field(default="", metadata={"help": "Kafka bootstrap HOST:PORT; empty = find one on 127.0.0.1:9092 or start the embedded broker"})
    partitions: int = field(default=4, metadata={"help": "partitions of every topic we create"})
    events_topic: str = field(default="behavior-events", metadata={"help": "topic of behavior events (JSON, key = user id): what workers consume"})
    dlq_topic: str = field(default="behavior-events-dlq", metadata={"help": "dead-letter topic: every rejected record, original bytes, reason in headers"})
    samples_topic: str = field(default="training-samples", metadata={"help": "topic of training samples the workers emit and the trainer consumes"})
    embeddings_topic: str = field(default="embeddings", metadata={"help": "compacted topic of published user/item vectors, bought items and contexts (what API replicas read)"})
    features_topic: str = field(default="user-features", metadata={"help": "compacted topic of per-user features the workers publish"})
    # Kafka security (docs/security.md): used by every Kafka client through core/kafka_security.py
    security_protocol: str = field(default="PLAINTEXT", metadata={"help": "PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL"})
    sasl_mechanism: str = field(default="SCRAM-SHA-512", metadata={"help": "PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (with SASL_*)"})
    sasl_username: str = field(default="", metadata={"help": "SASL user name"})
    sasl_password: str = field(default="", metadata={"help": "SASL password: from the config file or TGASTREAM_SASL_PASSWORD only, never a flag (never printed)", "secret": True})
    sasl_password_file: str = field(default="", metadata={"help": "file holding the SASL password (must be chmod 600)"})
    ssl_cafile: str = field(default="", metadata={"help": "CA certificate(s) (PEM) that signed the brokers' certificates; empty = the system's CAs"})
    ssl_certfile: str = field(default="", metadata={"help": "client certificate (PEM) for brokers that require one (mutual TLS)"})
    ssl_keyfile: str = field(default="", metadata={"help": "client private key (PEM) of ssl_certfile (must be chmod 600)"})
    ssl_check_hostname: bool = field(default=True, metadata={"help": "check that a broker's certificate names its host"})
    # state
    data_dir: Path = field(default=Path("tgastream-data"), metadata={"help": "where RocksDB stores, checkpoints and reports live"})
    max_len: int = field(default=MAX_LEN, metadata={"help": "events kept per user graph"})
    sample_len: int = field(default=SAMPLE_LEN, metadata={"help": "graph nodes carried by a training sample"})
    conversion_window_s: float = field(default=CONVERSION_WINDOW_S, metadata={"help": "click → buy conversion window (event time)"})
    conversion_feedback: str = field(default="wait", metadata={"help": "trainer: how a click is trained before its label is known: wait (once, when its window closes) or fnw (at once as a fake negative, again as a positive at the buy, importance-weighted; Ktena et al. RecSys 2019); docs/conversion.md"})
    conversion_snapshot_steps: int = field(default=100, metadata={"help": "trainer: > 0 = every click's click-time P(buy) (the prediction it is judged by) comes from a copy of the model refreshed every this many steps instead of the newest weights (the retrieval side and the vectors stay fresh); like the API's /v1/score, which serves the newest checkpoint (checkpoint_every_steps). Chosen on both real logs' validation prefixes with the conversion prior: AUC +0.06 on Taobao 60k, +0.00 to +0.02 on Tmall (docs/conversion.md); 0 = the newest weights"})
    pending_predictions: int = field(default=200_000, metadata={"help": "trainer: click-time P(buy) predictions kept until their label arrives; past it the oldest is dropped and counted"})
    # stream workers
    worker_group: str = field(default="", metadata={"help": "consumer group (faust app id) of stream workers; empty = tgastream-<events_topic>"})
    worker_batch: int = field(default=5000, metadata={"help": "stream worker: most records fetched and applied per batch"})
    worker_flush_s: float = field(default=0.5, metadata={"help": "stream worker: how often changed user state is made durable (RocksDB + changelog)"})
    worker_cache_users: int = field(default=200_000, metadata={"help": "stream worker: users kept decoded in memory"})
    standby_replicas: int = field(default=0, metadata={"help": "stream worker: standby copies of each state partition on other workers"})
    rebalance_timeout_s: float = field(default=3.0, metadata={"help": "consumer group rebalance timeout; keep short on Tansu (DESIGN.md §7)"})
    join_timeout_s: float = field(default=120.0, metadata={"help": "longest wait at start-up for the worker's first partition assignment (joining the group); past it the worker leaves, logs what it waited on and joins again; 0 = wait forever"})
    stop_timeout_s: float = field(default=8.0, metadata={"help": "longest graceful stop (persist, commit, leave the group) after SIGTERM before a worker exits without waiting for the broker; nothing not durable is committed; 0 = wait forever"})
    # model / trainer
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dim: int = field(default=DIM, metadata={"help": "model width (embedding and hidden size)"})
    layers: int = field(default=LAYERS, metadata={"help": "TGA encoder layers"})
    heads: int = field(default=HEADS, metadata={"help": "attention heads (dim must be divisible by heads)"})
    batch_size: int = field(default=256, metadata={"help": "trainer micro-batch size"})
    max_wait_s: float = field(default=0.5, metadata={"help": "trainer: longest wait to fill a micro-batch"})
    burst: int = field(default=16, metadata={"help": "trainer: beyond batch_size a micro-batch takes what has already arrived, up to burst × batch_size (a trainer that is behind catches up in big steps); all of it is published, a random batch_size of it scored and trained on"})
    catchup_batches: int = field(default=2, metadata={"help": "trainer (train_policy all, one process with its publishing thread): a training step that is more than one batch behind the head takes up to this many batches at once (fewer, larger steps: more samples per second while behind; on the demo's stream a tenth or more capacity at 2 than at 1 (1.08x and 1.16x), medians of 3 side by side). Larger steps are fewer optimizer steps: with conversion_base_rate 0 the head's calibration suffered (demo click-time ECE 0.011 -> 0.24 at 2), with the base rate it holds (0.008-0.014); 1 = always batch_size. Ranks always train batch_size steps (their head waits for the step)"})
    train_policy: str = field(default="all", metadata={"help": "all: every new sample is trained once (training may lag behind publishing when the trainer is slower than the stream); bounded: a step trains a random batch_size of what arrived and the rest is never trained"})
    lr: float = field(default=LR, metadata={"help": "trainer: online learning rate"})
    drift_delta: float = field(default=0.002, metadata={"help": "trainer: ADWIN confidence for detecting a change in the training loss (smaller = fewer, surer alarms)"})
    repeat_prior: bool = field(default=True, metadata={"help": "trainer: the retrieval pointer starts as repeat-recent (model/retrieval_head.py; docs/model-quality.md); false = the plain copy pointer. Resuming a checkpoint trained with the other value is refused"})
    conversion_base_rate: float = field(default=0.02, metadata={"help": "trainer: > 0 = the conversion head's output bias starts at logit(rate), so a new model predicts about this buy rate (with conversion_prior: exactly, for clicks on items untouched in the context) instead of 0.5 and up, and is calibrated from its first steps (what lets catch-up steps keep calibration); 0 = bias from 0. Only how a new model starts: a checkpoint resumes as trained"})
    conversion_prior: bool = field(default=True, metadata={"help": "trainer: the conversion head starts as repeat-interest (touches of the clicked item in the context, carts and favs double; model/conversion_head.py; docs/conversion.md) and learns away from it; false = the plain head. Resuming a checkpoint trained with the other value is refused"})
    guard: bool = field(default=True, metadata={"help": "trainer: shadow-evaluate a baseline (the last good checkpoint) and roll back when the online model falls below it"})
    guard_margin: float = field(default=0.03, metadata={"help": "trainer: how far below the baseline (AUC or HR@10) the online model may fall over the window before a rollback"})
    guard_window: int = field(default=2000, metadata={"help": "trainer: paired cases (retrieval rows, conversion clicks) the guard compares over"})
    guard_min_retrievals: int = field(default=500, metadata={"help": "trainer: retrieval cases in the window before the HR@10 leg may trip (also the window a checkpoint must hold up over to become good)"})
    guard_min_positives: int = field(default=30, metadata={"help": "trainer: bought clicks (and as many not bought) in the window before the AUC leg may trip"})
    shadow_share: float = field(default=0.25, metadata={"help": "trainer: share of each step's new samples scored by the online model, the baseline and repeat-recent"})
    idle_ttl_s: float = field(default=7 * 86400.0, metadata={"help": "trainer: an item or category id unused for this long (event time) loses its row; an evicted item's vector is deleted from serving (a tombstone on the embeddings topic)"})
    evict_every: int = field(default=200, metadata={"help": "trainer: optimizer steps between eviction sweeps of idle ids"})
    republish_rate: int = field(default=2000, metadata={"help": "trainer: vectors per second published again with the current model when an older one made them (one embedding space at serving time); 0 = off"})
    republish_behind_share: float = field(default=0.1, metadata={"help": "trainer: share of republish_rate the re-publish sweep keeps while training is more than one batch behind the head (training first; the sweep resumes its full rate once caught up)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads of the trainer; 0 = cores ÷ ranks - 1 (at least 1), leaving a core to Kafka I/O, the publishing thread and the worker"})
    replay_share: float = field(default=REPLAY_SHARE, metadata={"help": "share of each step drawn from the replay reservoir"})
    checkpoint_dir: str = field(default="", metadata={"help": "where the trainer writes checkpoints and API replicas read the scoring model (a shared volume); empty = DATA_DIR/checkpoints"})
    checkpoint_every_steps: int = field(default=200, metadata={"help": "trainer: write a checkpoint every this many steps"})
    checkpoint_every_s: float = field(default=60.0, metadata={"help": "trainer: ... and at least this often (seconds)"})
    # serving / metrics
    api_host: str = field(default="127.0.0.1", metadata={"help": "address the HTTP API listens on"})
    api_port: int = field(default=8080, metadata={"help": "port of the HTTP API"})
    api_token: str = field(default="", metadata={"help": "bearer token every API route but /healthz requires; empty = none (never printed)", "secret": True})
    api_token_file: str = field(default="", metadata={"help": "file holding the API bearer token (must be chmod 600); instead of api_token"})
    api_ssl_certfile: str = field(default="", metadata={"help": "serve the API over HTTPS with this certificate (PEM); with api_ssl_keyfile"})
    api_ssl_keyfile: str = field(default="", metadata={"help": "private key (PEM) of api_ssl_certfile (must be chmod 600)"})
    ann_exact_below: int = field(default=50_000, metadata={"help": "API replica: below this many items recommendations scan every item exactly; at or above it an approximate index (faiss IVF) answers (docs/scaling.md)"})
    ann_nprobe: int = field(default=96, metadata={"help": "API replica: inverted lists of the approximate index scanned per query (more: better recall, slower)"})
    ann_lists_factor: float = field(default=8.0, metadata={"help": "API replica: inverted lists of the approximate index = this × √items, fixed when it is built (more: faster queries at the same recall, slower updates; docs/scaling.md)"})
    ann_update_chunk: int = field(default=256, metadata={"help": "API replica: most item vectors written to the index at once; a query waits for at most one such chunk"})
    # the live page /ui (stream/ui.py, docs/ui.md)
    ui_worker_metrics: str = field(default="", metadata={"help": "API: the stream workers' /metrics URLs (comma-separated; a host name with several addresses is each of them) the live page /ui scrapes each second; empty = not configured"})
    ui_trainer_metrics: str = field(default="", metadata={"help": "API: the trainer's /metrics URLs (comma-separated: one per rank) the live page /ui scrapes each second; empty = not configured"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port of this process; 0 = pick a free one"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address /metrics listens on (0.0.0.0 in containers)"})
    seed: int = field(default=0, metadata={"help": "random seed: the online learner, the shadow evaluation, tgastream eval's default"})

    def validate(self) -> "Settings":
        for name in ("partitions", "max_len", "sample_len", "dim", "layers", "heads", "batch_size", "burst", "catchup_batches", "evict_every",
                     "checkpoint_every_steps", "ann_nprobe", "ann_update_chunk"):
            _positive(name, getattr(self, name))
        if self.conversion_snapshot_steps < 0:
            raise SettingsError(f"conversion_snapshot_steps must be >= 0, got {self.conversion_snapshot_steps}")
        if self.threads < 0:
            raise SettingsError(f"threads must be >= 0, got {self.threads}")
        for name in ("conversion_window_s", "max_wait_s", "lr", "checkpoint_every_s", "idle_ttl_s", "ann_lists_factor"):
            _positive(name, getattr(self, name))
        for name in ("worker_batch", "worker_flush_s", "worker_cache_users", "rebalance_timeout_s"):
            _positive(name, getattr(self, name))
        if not 0.0 < self.drift_delta < 1.0:
            raise SettingsError(f"drift_delta must be in (0, 1), got {self.drift_delta}")
        for name in ("guard_window", "guard_min_retrievals", "guard_min_positives"):
            _positive(name, getattr(self, name))
        if not 0.0 < self.guard_margin < 1.0:
            raise SettingsError(f"guard_margin must be in (0, 1), got {self.guard_margin}")
        if self.guard_min_retrievals > self.guard_window:
            raise SettingsError(f"guard_min_retrievals ({self.guard_min_retrievals}) must be <= guard_window ({self.guard_window})")
        if not 0.0 <= self.republish_behind_share <= 1.0:
            raise SettingsError(f"republish_behind_share must be in [0, 1], got {self.republish_behind_share}")
        if not 0.0 < self.shadow_share <= 1.0:
            raise SettingsError(f"shadow_share must be in (0, 1], got {self.shadow_share}")
        if self.conversion_feedback not in ("wait", "fnw"):
            raise SettingsError(f"conversion_feedback must be wait or fnw, got {self.conversion_feedback!r}")
        _positive("pending_predictions", self.pending_predictions)
        if self.train_policy not in ("all", "bounded"):
            raise SettingsError(f"train_policy must be all or bounded, got {self.train_policy!r}")
        for name in ("stop_timeout_s", "join_timeout_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ann_exact_below < 0:
            raise SettingsError(f"ann_exact_below must be >= 0, got {self.ann_exact_below}")
        if self.standby_replicas < 0:
            raise SettingsError(f"standby_replicas must be >= 0, got {self.standby_replicas}")
        if not 0.0 <= self.conversion_base_rate < 1.0:
            raise SettingsError(f"conversion_base_rate must be in [0, 1), got {self.conversion_base_rate}")
        if not 0.0 <= self.replay_share < 1.0:
            raise SettingsError(f"replay_share must be in [0, 1), got {self.replay_share}")
        if self.dim % self.heads:
            raise SettingsError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.sample_len > self.max_len:
            raise SettingsError(f"sample_len ({self.sample_len}) must be <= max_len ({self.max_len})")
        if self.bootstrap and not _is_host_port(self.bootstrap):
            raise SettingsError(f"bootstrap must be HOST:PORT[,HOST:PORT...], got {self.bootstrap!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise SettingsError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("api_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingsError(f"{name} must be a port number, got {getattr(self, name)}")
        from tgastream.core.kafka_security import MECHANISMS, PROTOCOLS

        if self.security_protocol not in PROTOCOLS:
            raise SettingsError(f"security_protocol must be one of {', '.join(PROTOCOLS)}, got {self.security_protocol!r}")
        if self.sasl_mechanism not in MECHANISMS:
            raise SettingsError(f"sasl_mechanism must be one of {', '.join(MECHANISMS)}, got {self.sasl_mechanism!r}")
        if self.sasl_password and self.sasl_password_file:
            raise SettingsError("give sasl_password or sasl_password_file, not both")
        if self.api_token and self.api_token_file:
            raise SettingsError("give api_token or api_token_file, not both")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile) and self.ssl_keyfile:
            raise SettingsError("ssl_keyfile needs ssl_certfile")
        if bool(self.api_ssl_certfile) != bool(self.api_ssl_keyfile):
            raise SettingsError("api_ssl_certfile and api_ssl_keyfile go together")
        return self

    @property
    def kafka_security(self) -> "KafkaSecurity":
        """TLS and SASL of every Kafka client (the password read from its file now); a bad
        secret file or a missing credential raises :class:`SettingsError` in one line."""
        from tgastream.core.kafka_security import SecurityError, kafka_security

        try:
            return kafka_security(self)
        except SecurityError as exc:
            raise SettingsError(str(exc)) from None

    def secrets(self) -> list[str]:
        """Every secret value of these settings (to redact from logs and error lines)."""
        values = [str(getattr(self, f.name)) for f in fields(self) if f.metadata.get("secret") and getattr(self, f.name)]
        for read in (lambda: self.kafka_security.password, self.resolved_api_token):
            try:
                values.append(read())
            except SettingsError:
                pass  # an unusable secret file: the command that needs it says so in one line
        return sorted({v for v in values if v})

    def resolved_api_token(self) -> str:
        """The API bearer token: ``api_token``, or the content of ``api_token_file`` (checked chmod 600)."""
        if not self.api_token_file:
            return self.api_token
        from tgastream.core.kafka_security import SecurityError, read_secret_file

        try:
            return read_secret_file(self.api_token_file, "api_token")
        except SecurityError as exc:
            raise SettingsError(str(exc)) from None

    @property
    def checkpoints(self) -> Path:
        """The checkpoint directory: ``checkpoint_dir``, else ``data_dir/checkpoints``."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.data_dir) / "checkpoints"

    @property
    def consumer_group(self) -> str:
        """Group id shared by the stream workers of one events topic."""
        return self.worker_group or f"tgastream-{self.events_topic}"

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes).validate()

    def describe(self) -> str:
        """One line per setting, for printing at start."""
        return "\n".join(f"  {f.name} = {_shown(f, getattr(self, f.name))}" for f in fields(self))


def _shown(f: dataclasses.Field, value: Any) -> Any:
    """A setting's value as printed: secrets never appear in logs."""
    return ("***" if value else "") if f.metadata.get("secret") else value


def _is_host_port(text: str) -> bool:
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return False
    return True


def _coerce(name: str, kind: Any, value: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path}.get(kind, kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}") from None


FIELD_TYPES: dict[str, Any] = {f.name: f.type for f in fields(Settings)}


def _apply(base: dict[str, Any], values: Mapping[str, Any], origin: str) -> None:
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            raise SettingsError(f"unknown setting {key!r} in {origin}")
        base[name] = _coerce(name, FIELD_TYPES[name], value)


def _check_private(path: Path, secrets: list[str]) -> None:
    """A config file that holds a secret must not be readable by group or others (like ssh keys)."""
    if secrets and path.stat().st_mode & 0o077:
        raise SettingsError(f"config file {path} holds {', '.join(secrets)} and is accessible by group or others; "
                            f"run: chmod 600 {path}")


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build and validate settings from a TOML file, an environment mapping and explicit overrides."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config_file} is not valid TOML: {exc}") from None
        section = data.get("tgastream", data)
        _check_private(Path(config_file), [f.name for f in fields(Settings) if f.metadata.get("secret") and section.get(f.name)])
        _apply(values, section, str(config_file))
    if env:
        _apply(values, {k[len(ENV_PREFIX):].lower(): v for k, v in env.items()
                        if k.startswith(ENV_PREFIX) and k != ENV_PREFIX + "CONFIG"}, "environment")
    if overrides:
        _apply(values, {k: v for k, v in overrides.items() if v is not None}, "flags")
    return Settings(**values).validate()
