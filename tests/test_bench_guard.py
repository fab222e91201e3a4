"""`tgastream bench guard` end to end with tiny settings: the JSON has the three runs' HR@10 and
AUC over the stretch, the rollbacks and the curves, the PNG is written, and while the guarded
trainer is rolled back (or holds while the stream looks broken) it serves the version it went
back to."""

from __future__ import annotations

import json
from pathlib import Path

from tgastream.stream.cli import main


def test_bench_guard_writes_the_three_runs_and_serves_the_good_version_while_rolled_back(tmp_path):
    out = tmp_path / "guard.json"
    rc = main(["bench", "guard", "--users", "50", "--events", "1600", "--batch-size", "64", "--checkpoint-every", "4",
               "--eval-share", "0.3",
               "--dim", "16", "--segments", "4", "--guard-min-retrievals", "60", "--guard-window", "200",
               "--guard-min-positives", "3", "--shadow-share", "0.5", "--quiet", "--json", str(out), "--out", str(tmp_path)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert isinstance(r["rollbacks"], int) and r["rollbacks"] == sum(e["event"] == "rollback" for e in r["events"])
    for run in ("with_guard", "without_guard", "frozen"):
        assert {"hr@10", "auc"} <= set(r[run]) and r[run]["retrieval_cases"] > 0
        assert len(r["curve"][run]) == 4
    assert r["with_guard"]["retrieval_cases"] == r["without_guard"]["retrieval_cases"]  # the same samples
    assert (tmp_path / "guard.png").stat().st_size > 10_000
    held = None
    for at, version, state in r["served_versions"]:  # while not live: the version it rolled back to (or held)
        back = [e for e in r["events"] if e["event"] in ("rollback", "hold") and e["at"] < at]
        if state == "rolled_back":
            assert back and version == back[-1]["version"]
            held = version
    if r["rollbacks"]:
        assert held is not None


def test_bench_guard_without_flags_is_the_configuration_its_page_documents():
    from tgastream.stream.cli import build_parser, settings_from_args

    parser, _ = build_parser()
    args = parser.parse_args(["bench", "guard"])
    settings = settings_from_args(args)
    assert (args.users, args.events, args.lr) == (300, 12_000, 0.003)
    assert (settings.shadow_share, settings.guard_window, settings.guard_min_retrievals,
            settings.guard_min_positives) == (0.5, 1000, 300, 10)
    page = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "guard.md").read_text()
    assert ("tgastream bench guard --events 12000 --users 300 --lr 0.003 --shadow-share 0.5 "
            "--guard-min-retrievals 300 --guard-window 1000 --guard-min-positives 10 --json") in page
