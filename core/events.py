"""Behavior events: the schema of DESIGN.md §2, parsers for every accepted format, and validation.

Every parser returns either an :class:`Event` or a :class:`Rejection` carrying a machine-readable
reason code (a closed set, safe as a Prometheus label) and a human detail. Nothing raises on bad
input: a rejected record is routed to the dead-letter topic by the caller, never dropped.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Union

BEHAVIORS: tuple[str, ...] = ("click", "fav", "cart", "buy")
"""Canonical behaviors; the index is the behavior code used by state and model."""

BEHAVIOR_CODE: dict[str, int] = {b: i for i, b in enumerate(BEHAVIORS)}

ALIASES: dict[str, str] = {
    "click": "click", "pv": "click", "view": "click",
    "fav": "fav", "favorite": "fav",
    "cart": "cart", "addtocart": "cart",
    "buy": "buy", "transaction": "buy", "purchase": "buy",
}

TAOBAO_CODES: dict[str, str] = {"click": "pv", "fav": "fav", "cart": "cart", "buy": "buy"}

MAX_RECORD_BYTES = 4096
"""A behavior event is well under 200 bytes; anything past this is an oversize record."""

MAX_ID_CHARS = 128
MAX_FUTURE_S = 24 * 3600.0
"""An event more than this far ahead of wall-clock time is rejected as 'timestamp_in_future'."""

REASONS: tuple[str, ...] = (
    "not_utf8", "oversize", "empty_record", "not_json", "not_object", "missing_field",
    "empty_field", "wrong_type", "id_too_long", "unknown_behavior", "bad_timestamp",
    "timestamp_not_finite", "timestamp_negative", "timestamp_in_future", "wrong_field_count",
    "wrong_key", "internal_error",
)
"""Every reason code a rejection can carry (closed set: metrics label values, DLQ header).
``wrong_key`` (record key is not the user id) and ``internal_error`` (applying the event raised)
are given by the stream worker, not by the parsers."""

REQUIRED = ("user_id", "item_id", "category_id", "behavior", "ts")


@dataclass(frozen=True, slots=True)
class Event:
    """One validated behavior event. Ids are normalised to strings; ``ts`` is event time in s."""

    user_id: str
    item_id: str
    category_id: str
    behavior: str
    ts: float

    @property
    def behavior_code(self) -> int:
        return BEHAVIOR_CODE[self.behavior]

    def to_json(self) -> bytes:
        """Canonical JSON encoding: the value written to ``behavior-events``."""
        ts: float | int = int(self.ts) if float(self.ts).is_integer() else self.ts
        return json.dumps(
            {"user_id": self.user_id, "item_id": self.item_id, "category_id": self.category_id,
             "behavior": self.behavior, "ts": ts},
            separators=(",", ":"),
        ).encode()

    def to_taobao_csv(self) -> str:
        return f"{self.user_id},{self.item_id},{self.category_id},{TAOBAO_CODES[self.behavior]},{int(self.ts)}"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was refused. ``raw`` is the original bytes, kept for the dead-letter topic."""

    reason: str
    detail: str
    raw: bytes = b""
    source: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")


Parsed = Union[Event, Rejection]


def _reject(reason: str, detail: str, raw: bytes = b"", source: str = "") -> Rejection:
    return Rejection(reason, detail, raw, source)


def _check_id(name: str, value: object) -> str | Rejection:
    if value is None:
        return _reject("missing_field", f"{name} is null")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return _reject("wrong_type", f"{name} must be int or string, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        return _reject("empty_field", f"{name} is empty")
    if len(text) > MAX_ID_CHARS:
        return _reject("id_too_long", f"{name} has {len(text)} chars (max {MAX_ID_CHARS})")
    if "," in text or "\n" in text:
        return _reject("wrong_type", f"{name} contains a separator character")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate, e.g. JSON "\ud800": not storable as UTF-8
            return _reject("not_utf8", f"{name} is not valid Unicode text")
    return text


def _check_ts(value: object, now: float | None) -> float | Rejection:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _reject("wrong_type", f"ts must be a number, got {type(value).__name__}")
    ts = float(value)
    if not math.isfinite(ts):
        return _reject("timestamp_not_finite", f"ts is {value}")
    if ts < 0:
        return _reject("timestamp_negative", f"ts is {value}")
    limit = (time.time() if now is None else now) + MAX_FUTURE_S
    if ts > limit:
        return _reject("timestamp_in_future", f"ts {value} is past now + {MAX_FUTURE_S:.0f}s")
    return ts


def validate_fields(fields: dict, now: float | None = None) -> Parsed:
    """Validate a decoded record (field name → value) against the event schema."""
    for name in REQUIRED:
        if name not in fields:
            return _reject("missing_field", f"{name} is missing")
    ids: list[str] = []
    for name in ("user_id", "item_id", "category_id"):
        checked = _check_id(name, fields[name])
        if isinstance(checked, Rejection):
            return checked
        ids.append(checked)
    behavior = fields["behavior"]
    if behavior is None:
        return _reject("missing_field", "behavior is null")
    if not isinstance(behavior, str):
        return _reject("wrong_type", f"behavior must be a string, got {type(behavior).__name__}")
    canonical = ALIASES.get(behavior.strip().lower())
    if canonical is None:
        return _reject("unknown_behavior", f"behavior {behavior[:40]!r} is not one of {', '.join(BEHAVIORS)}")
    if fields["ts"] is None:
        return _reject("missing_field", "ts is null")
    ts = _check_ts(fields["ts"], now)
    if isinstance(ts, Rejection):
        return ts
    return Event(ids[0], ids[1], ids[2], canonical, ts)


def _with_raw(parsed: Parsed, raw: bytes, source: str) -> Parsed:
    if isinstance(parsed, Rejection):
        return Rejection(parsed.reason, parsed.detail, raw, source)
    return parsed


def _decode(raw: bytes, source: str) -> str | Rejection:
    if len(raw) > MAX_RECORD_BYTES:
        return _reject("oversize", f"{len(raw)} bytes (max {MAX_RECORD_BYTES})", raw, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _reject("not_utf8", f"byte {exc.start} is not UTF-8", raw, source)
    if not text.strip():
        return _reject("empty_record", "record is empty", raw, source)
    return text


def parse_json(raw: bytes, source: str = "", now: float | None = None) -> Parsed:
    """Parse one JSON-object event (the ``behavior-events`` wire format and JSON-lines files)."""
    text = _decode(raw, source)
    if isinstance(text, Rejection):
        return text
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return _reject("not_json", f"invalid JSON: {exc.msg} at char {exc.pos}", raw, source)
    if not isinstance(obj, dict):
        return _reject("not_object", f"JSON {type(obj).__name__}, expected an object", raw, source)
    return _with_raw(validate_fields(obj, now), raw, source)


def _parse_number(text: str) -> float | int | Rejection:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return _reject("bad_timestamp", f"timestamp {text[:40]!r} is not a number")


def _csv_columns(raw: bytes, source: str, ts_col: int) -> tuple[list[str], float | int] | Rejection:
    """The five columns of a CSV event line and its parsed timestamp column, or why not."""
    text = _decode(raw, source)
    if isinstance(text, Rejection):
        return text
    cols = text.rstrip("\r\n").split(",")
    if len(cols) != 5:
        return _reject("wrong_field_count", f"{len(cols)} fields, expected 5", raw, source)
    ts = _parse_number(cols[ts_col].strip())
    if isinstance(ts, Rejection):
        return _with_raw(ts, raw, source)
    return cols, ts


def parse_taobao_csv(raw: bytes, source: str = "", now: float | None = None) -> Parsed:
    """Parse one Taobao UserBehavior line: ``user_id,item_id,category_id,behavior_type,timestamp``."""
    parsed = _csv_columns(raw, source, 4)
    if isinstance(parsed, Rejection):
        return parsed
    cols, ts = parsed
    fields = {"user_id": cols[0], "item_id": cols[1], "category_id": cols[2], "behavior": cols[3], "ts": ts}
    return _with_raw(validate_fields(fields, now), raw, source)


RETAILROCKET_HEADER = ("timestamp", "visitorid", "event", "itemid", "transactionid")


def parse_retailrocket_csv(raw: bytes, source: str = "", now: float | None = None) -> Parsed:
    """Parse one RetailRocket ``events.csv`` row: ``timestamp(ms),visitorid,event,itemid,transactionid``.

    RetailRocket has no category per event, so ``category_id`` is "0" (unknown), as DESIGN.md says.
    """
    parsed = _csv_columns(raw, source, 0)
    if isinstance(parsed, Rejection):
        return parsed
    cols, ts_ms = parsed
    ts = ts_ms / 1000.0 if isinstance(ts_ms, (int, float)) and math.isfinite(ts_ms) else ts_ms
    fields = {"user_id": cols[1], "item_id": cols[3], "category_id": "0", "behavior": cols[2], "ts": ts}
    return _with_raw(validate_fields(fields, now), raw, source)


FORMATS = ("auto", "json", "taobao", "retailrocket")
_PARSERS = {"json": parse_json, "taobao": parse_taobao_csv, "retailrocket": parse_retailrocket_csv}


def open_log(path: Path) -> IO[bytes]:
    """Open a log file for binary reading, transparently un-gzipping ``*.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def detect_format(path: Path, first_line: bytes) -> str:
    """Guess a log's format from its name and first line."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")) or first_line.lstrip().startswith(b"{"):
        return "json"
    header = tuple(c.strip().lower() for c in first_line.decode("utf-8", "replace").strip().split(","))
    if header == RETAILROCKET_HEADER:
        return "retailrocket"
    return "taobao"


def read_log(path: Path, fmt: str = "auto", now: float | None = None) -> Iterator[Parsed]:
    """Yield every record of a log file, parsed, in file order (a RetailRocket header is skipped)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    with open_log(path) as fh:
        first = fh.readline()
        if fmt == "auto":
            fmt = detect_format(path, first)
        parse = _PARSERS[fmt]
        lines: Iterator[bytes] = iter(fh)
        lineno = 1  # the header line, when there is one, is consumed
        if not (fmt == "retailrocket" and first.strip().lower().startswith(b"timestamp,")):
            lines = _chain_first(first, lines)
            lineno = 0
        for raw in lines:
            lineno += 1
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue  # blank lines are layout, not records
            yield parse(raw, f"{path.name}:{lineno}", now)


def _chain_first(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def load_events(path: Path, fmt: str = "auto") -> list[Event]:
    """All valid events of a log, in file order (rejections skipped): for offline tools and tests."""
    return [p for p in read_log(path, fmt) if isinstance(p, Event)]


WATERMARK_KEY = b"__watermark__"
"""Key of a control record on ``behavior-events``: value ``{"watermark": ts}`` says event time on
this partition has reached ``ts``, so label windows that end before it can close (end of a replay)."""


def watermark_value(ts: float) -> bytes:
    return json.dumps({"watermark": ts}, separators=(",", ":")).encode()


def parse_watermark(value: bytes) -> float | None:
    """Event time carried by a watermark record, or None when the value is malformed."""
    try:
        ts = float(json.loads(value)["watermark"])
    except (ValueError, TypeError, KeyError):
        return None
    return ts if math.isfinite(ts) else None


def write_taobao_csv(events: list[Event], out: IO[str]) -> None:
    for e in events:
        out.write(e.to_taobao_csv())
        out.write("\n")


__all__ = [
    "ALIASES", "BEHAVIORS", "BEHAVIOR_CODE", "Event", "FORMATS", "REASONS", "Rejection",
    "WATERMARK_KEY", "detect_format", "parse_watermark", "watermark_value", "load_events", "open_log", "parse_json", "parse_retailrocket_csv",
    "parse_taobao_csv", "read_log", "validate_fields", "write_taobao_csv",
]
