"""The layers only point down: core ← state ← model ← stream ← bench (docs/concepts/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "state", "model", "stream", "bench")
ALLOWED = {  # what each layer may import of ours (itself included)
    "core": {"core"},
    "state": {"core", "state"},
    "model": {"core", "state", "model"},
    "stream": {"core", "state", "model", "stream"},
    "bench": {"core", "state", "model", "stream", "bench"},
}
ENTRY = {"stream/cli.py", "stream/commands"}  # the CLI registry names every command, benchmarks included


def imported_layers(path: Path) -> set[tuple[str, int]]:
    """(layer, line) of every import of a tgastream package in ``path``, function-local ones too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] in PACKAGES:
                found.add((f"top-level {parts[0]}", node.lineno))  # never without the namespace
            elif parts[0] == "tgastream" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add((parts[1], node.lineno))
    return found


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_every_package_is_checked():
    assert {p.relative_to(REPO).parts[0] for p in modules()} == set(PACKAGES)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down_the_layers(path):
    rel = path.relative_to(REPO)
    layer = rel.parts[0]
    allowed = set(ALLOWED[layer])
    if str(rel) in ENTRY or str(rel.parent) in ENTRY:
        allowed.add("bench")
    bad = sorted((name, line) for name, line in imported_layers(path) if name not in allowed)
    assert not bad, f"{rel} imports {', '.join(f'{n} (line {ln})' for n, ln in bad)}; {layer} may import {sorted(allowed)}"


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from tgastream.stream.trainer import Trainer\nimport model.tga\n")
    assert imported_layers(bad) == {("stream", 2), ("top-level model", 3)}
