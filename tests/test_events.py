"""Parsing and validation of every accepted event format, and a reason for every bad record."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tgastream.core.events import (
    MAX_RECORD_BYTES, REASONS, Event, Rejection, detect_format, load_events, parse_json,
    parse_retailrocket_csv, parse_taobao_csv, read_log,
)

NOW = 1_700_000_000.0


def good(**over) -> bytes:
    rec = {"user_id": 1, "item_id": "i9", "category_id": 3, "behavior": "click", "ts": 1511658000}
    rec.update(over)
    return json.dumps(rec).encode()


def test_valid_json_event_is_normalised_to_strings_and_canonical_behavior():
    ev = parse_json(good(behavior="pv"), now=NOW)
    assert ev == Event("1", "i9", "3", "click", 1511658000.0)
    assert json.loads(ev.to_json()) == {"user_id": "1", "item_id": "i9", "category_id": "3", "behavior": "click", "ts": 1511658000}


@pytest.mark.parametrize("alias,canonical", [("pv", "click"), ("view", "click"), ("addtocart", "cart"),
                                             ("transaction", "buy"), ("FAV", "fav"), ("buy", "buy")])
def test_behavior_aliases_map_to_canonical(alias, canonical):
    assert parse_json(good(behavior=alias), now=NOW).behavior == canonical


BAD_JSON = [
    (b"\xff\xfe not utf8", "not_utf8"),
    (b"x" * (MAX_RECORD_BYTES + 1), "oversize"),
    (b"   ", "empty_record"),
    (b"{not json", "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'"just a string"', "not_object"),
    (json.dumps({"item_id": 1, "category_id": 1, "behavior": "buy", "ts": 1}).encode(), "missing_field"),
    (good(user_id=None), "missing_field"),
    (good(user_id=""), "empty_field"),
    (good(item_id="   "), "empty_field"),
    (good(user_id=[1]), "wrong_type"),
    (good(item_id=1.5), "wrong_type"),
    (good(category_id=True), "wrong_type"),
    (good(user_id="u" * 200), "id_too_long"),
    (good(behavior="like"), "unknown_behavior"),
    (good(behavior=3), "wrong_type"),
    (good(ts="yesterday"), "wrong_type"),
    (good(ts=-5), "timestamp_negative"),
    (good(ts=NOW + 10 * 86400), "timestamp_in_future"),
    (b'{"user_id":1,"item_id":1,"category_id":1,"behavior":"buy","ts":NaN}', "timestamp_not_finite"),
    (b'{"user_id":1,"item_id":1,"category_id":1,"behavior":"buy","ts":Infinity}', "timestamp_not_finite"),
    (good(user_id="a,b"), "wrong_type"),
    (b'{"user_id":"\\ud800","item_id":1,"category_id":1,"behavior":"buy","ts":1}', "not_utf8"),  # lone surrogate
]


@pytest.mark.parametrize("raw,reason", BAD_JSON, ids=[f"{r}-{i}" for i, (_, r) in enumerate(BAD_JSON)])
def test_bad_json_records_are_rejected_with_reason_and_original_bytes(raw, reason):
    rej = parse_json(raw, source="t:1", now=NOW)
    assert isinstance(rej, Rejection)
    assert rej.reason == reason, rej.detail
    assert rej.raw == raw and rej.source == "t:1" and rej.detail


def test_bad_record_kinds_cover_every_reason_but_csv_ones():
    seen = {r for _, r in BAD_JSON}
    assert len(BAD_JSON) >= 15
    assert seen == set(REASONS) - {"wrong_field_count", "bad_timestamp", "wrong_key", "internal_error"}


@pytest.mark.parametrize("line,reason", [
    (b"1,2,3,pv", "wrong_field_count"),
    (b"1,2,3,pv,100,9", "wrong_field_count"),
    (b"1,2,3,pv,soon", "bad_timestamp"),
    (b"1,2,3,like,100", "unknown_behavior"),
    (b",2,3,pv,100", "empty_field"),
    (b"1,2,3,pv,-1", "timestamp_negative"),
    (b"1,2,3,pv,nan", "timestamp_not_finite"),
    (b"1,\xff,3,pv,100", "not_utf8"),
])
def test_bad_taobao_lines_are_rejected(line, reason):
    rej = parse_taobao_csv(line, now=NOW)
    assert isinstance(rej, Rejection) and rej.reason == reason and rej.raw == line


def test_taobao_line_parses():
    assert parse_taobao_csv(b"543462,1715,1464116,cart,1511658000\r\n", now=NOW) == Event(
        "543462", "1715", "1464116", "cart", 1511658000.0)


def test_retailrocket_row_parses_ms_timestamps_and_unknown_category():
    ev = parse_retailrocket_csv(b"1433221332117,257597,addtocart,355908,", now=NOW)
    assert ev == Event("257597", "355908", "0", "cart", 1433221332.117)
    assert parse_retailrocket_csv(b"1433221332117,257597,transaction,355908,4000", now=NOW).behavior == "buy"
    assert parse_retailrocket_csv(b"1433221332117,257597,view,355908", now=NOW).reason == "wrong_field_count"


def test_read_log_detects_formats_skips_headers_and_reads_gzip(tmp_path: Path):
    rr = tmp_path / "events.csv.gz"
    with gzip.open(rr, "wb") as fh:
        fh.write(b"timestamp,visitorid,event,itemid,transactionid\n"
                 b"1433221332117,1,view,10,\n1433221332118,1,bogus,10,\n\n1433221332119,1,transaction,10,7\n")
    parsed = list(read_log(rr))
    assert [type(p).__name__ for p in parsed] == ["Event", "Rejection", "Event"]
    assert parsed[1].source == "events.csv.gz:3"
    jl = tmp_path / "log.jsonl"
    jl.write_bytes(good() + b"\n" + b"{oops\n")
    assert [getattr(p, "reason", None) for p in read_log(jl)] == [None, "not_json"]
    tb = tmp_path / "tb.csv"
    tb.write_text("1,2,3,pv,100\n1,2,3,buy,101\n")
    assert len(load_events(tb)) == 2


def test_detect_format():
    assert detect_format(Path("a.jsonl"), b"") == "json"
    assert detect_format(Path("a.txt"), b'{"user_id":1}') == "json"
    assert detect_format(Path("events.csv"), b"timestamp,visitorid,event,itemid,transactionid") == "retailrocket"
    assert detect_format(Path("x.csv"), b"1,2,3,pv,5") == "taobao"


def test_unknown_format_is_an_error(tmp_path: Path):
    f = tmp_path / "a.csv"
    f.write_text("1,2,3,pv,5\n")
    with pytest.raises(ValueError, match="unknown format"):
        list(read_log(f, "parquet"))


def test_real_taobao_slice_parses_without_rejections():
    from tests.conftest import shared_data

    path = shared_data("taobao-users-10k.csv")
    parsed = list(read_log(path))
    assert len(parsed) == 10_000
    assert all(isinstance(p, Event) for p in parsed)
