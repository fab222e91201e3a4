"""The docs site's reference pages match the code: every setting, metric, alert and API route is
there, as `python -m tgastream.stream.docgen` (`make docs-ref`) writes it."""

from __future__ import annotations

import re
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tgastream.core.settings import ENV_PREFIX, Settings
from tgastream.stream import docgen

ROOT = Path(__file__).resolve().parent.parent


def test_committed_reference_pages_equal_a_fresh_generation():
    stale = docgen.stale(ROOT)
    assert not stale, f"stale: {sorted(str(p.relative_to(ROOT)) for p in stale)}: run `make docs-ref` and commit"


def test_every_setting_is_on_the_configuration_page():
    page = (ROOT / "docs/operations/configuration.md").read_text()
    for f in fields(Settings):
        assert re.search(rf"^\| `{f.name}` \|.*`{ENV_PREFIX}{f.name.upper()}`", page, re.M), f.name


def _exposed_families(registry: CollectorRegistry) -> set[str]:
    return {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}


def test_every_metric_a_process_exposes_is_on_the_metrics_page():
    # the metric objects as the processes create them (independent of the generator's source scan)
    from tgastream.stream.metrics import WorkerMetrics
    from tgastream.stream.serve import ApiMetrics
    from tgastream.stream.trainer import TrainerMetrics

    names = (_exposed_families(WorkerMetrics().registry) | _exposed_families(TrainerMetrics().registry)
             | _exposed_families(ApiMetrics(CollectorRegistry()).registry))
    assert len(names) > 40
    page = (ROOT / "docs/operations/metrics.md").read_text()
    missing = sorted(n for n in names if f"| `{n}` |" not in page)
    assert not missing, f"metrics missing from docs/operations/metrics.md: {missing}: run `make docs-ref`"


def test_a_metric_in_a_new_module_reaches_the_page(tmp_path):
    (tmp_path / "stream").mkdir()
    (tmp_path / "stream/newthing.py").write_text(textwrap.dedent('''
        from prometheus_client import Counter, Gauge
        A = Counter("tgastream_new_things", "things " + "made", ["kind"])
        B = Gauge("tgastream_new_level", documentation="a level")
        C = Counter("other_prefix_total", "not ours")
    '''))
    table = docgen.metrics_table(tmp_path)
    assert "| `tgastream_new_things_total` | counter | `kind` | things made |" in table
    assert "| `tgastream_new_level` | gauge | – | a level |" in table
    assert "other_prefix" not in table and "Defined in `stream/newthing.py`" in table


def test_a_metric_whose_help_is_not_a_literal_is_one_readable_error(tmp_path):
    (tmp_path / "stream").mkdir()
    (tmp_path / "stream/bad.py").write_text('from prometheus_client import Gauge\nG = Gauge("tgastream_x", HELP)\n')
    with pytest.raises(docgen.DocgenError, match=r"stream/bad.py:2"):
        docgen.metric_definitions(tmp_path)


def test_fill_replaces_only_the_generated_block():
    page = f"intro\n{docgen.BEGIN.format(name='x')}\nold\n{docgen.END.format(name='x')}\noutro\n"
    out = docgen.fill(page, "x", "new")
    assert out.startswith("intro\n") and out.endswith("outro\n") and "new" in out and "old" not in out
    assert docgen.fill(out, "x", "new") == out  # idempotent
    with pytest.raises(docgen.DocgenError, match="no generated block"):
        docgen.fill("no markers", "x", "new")


def test_check_mode_names_a_stale_page_and_fails(tmp_path, capsys):
    docs = tmp_path / "docs"
    for rel in ("operations/configuration.md", "operations/metrics.md", "operations/alerts.md", "api/reference.md",
                "api/openapi.json"):
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text((ROOT / "docs" / rel).read_text())
    for layer in docgen.LAYERS:
        (tmp_path / layer).symlink_to(ROOT / layer)
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 0
    page = docs / "operations/configuration.md"
    page.write_text(re.sub(r"^\| `lr` \|.*\n", "", page.read_text(), flags=re.M))  # a setting without its row
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert "stale: docs/operations/configuration.md" in capsys.readouterr().err
    assert docgen.main(["--root", str(tmp_path)]) == 0 and "| `lr` |" in page.read_text()
