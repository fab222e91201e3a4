"""The stored user record: a changelog value never replaces a newer state of the same user."""

from __future__ import annotations

from tgastream.core.events import Event
from tgastream.state.record import UserRecord, peek_offset, supersedes


def _record(offsets: list[int]) -> bytes:
    rec = UserRecord.new("u", 50)
    for k, off in enumerate(offsets):
        rec.apply(Event("u", f"i{k}", "c", "click", 1000.0 + k), off, 86400.0, 20)
    return rec.to_bytes()


def test_an_older_state_does_not_supersede_a_newer_one():
    old, new = _record([3, 7]), _record([3, 7, 12])
    assert peek_offset(old) == 7 and peek_offset(new) == 12
    assert supersedes(new, old)
    assert not supersedes(old, new)


def test_equal_offsets_deletions_and_first_writes_follow_changelog_order():
    a = _record([5])
    assert supersedes(a, a)
    assert supersedes(None, a) and supersedes(a, None)
