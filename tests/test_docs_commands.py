"""Every `tgastream ...` command line in README.md and the docs site parses with the real command
line (the parser `tgastream` builds, nothing run), and README stays a landing page."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tgastream.stream.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
# inline spans that are a synopsis (`tgastream replay FILE [--rate N]`, `tgastream rollback --to VERSION`) or
# name a command (`tgastream eval`) rather than a command line; code blocks have no such exception
SYNOPSIS = re.compile(r"[\[\]|…]|\.\.\.|(?<![\w.:/=-])[A-Z][A-Z0-9_]*(?![\w.=])|^tgastream [\w-]+$")


def doc_files() -> list[Path]:
    """README.md and the site's pages; docs/bench/ holds the benchmarks' output, not docs."""
    return [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md") if "bench" not in p.relative_to(ROOT / "docs").parts)


def tgastream_argv(line: str) -> list[list[str]]:
    """The argument lists of every `tgastream` call in one shell line (after `&&`, `;`, `|`, env assignments)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    calls: list[list[str]] = []
    current: list[str] = []
    for token in list(lexer) + [";"]:
        if token in ("&&", "||", ";", "|", "&"):
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                current.pop(0)  # NAME=value before the command
            if current and Path(current[0]).name == "tgastream":
                calls.append(current[1:])
            current = []
        else:
            current.append(token)
    return calls


def command_lines(text: str) -> list[tuple[str, list[str]]]:
    """(as written, argv) of every tgastream call in shell code blocks and in inline code spans."""
    found: list[tuple[str, list[str]]] = []
    for lang, body in FENCE.findall(text):
        if lang not in SHELL_BLOCKS:
            continue  # diagrams, JSON, TOML, Python
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            found += [(line, argv) for argv in tgastream_argv(line)]
    prose = FENCE.sub("", text)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span.startswith("tgastream ") and not SYNOPSIS.search(span):
            found += [(span, argv) for argv in tgastream_argv(span)]
    return found


def all_command_lines() -> list[tuple[str, str, list[str]]]:
    return [(str(path.relative_to(ROOT)), line, argv) for path in doc_files() for line, argv in command_lines(path.read_text())]


def parse_error(parser, argv: list[str]) -> str | None:
    """None when `tgastream ARGV` parses; else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else (err.getvalue().strip() or f"exit {exc.code}")
    return None


@pytest.fixture(scope="module")
def parser():
    return build_parser()[0]


def test_the_extractor_finds_commands_in_blocks_and_spans_and_skips_the_rest():
    text = ("```bash\nexport X=1\nTGASTREAM_X=0 tgastream demo --events 10   # comment\n"
            "tgastream synth -o x.csv && tgastream replay x.csv \\\n  --rate 5\n```\n"
            "```\n tgastream replay FILE ─► diagram\n```\n"
            "Run `tgastream train\n--nproc 2`, not `tgastream replay FILE [--rate N]`, `tgastream train --nproc N` or\n"
            "`tgastream eval`; `make demo`.\n")
    assert [argv for _line, argv in command_lines(text)] == [
        ["demo", "--events", "10"], ["synth", "-o", "x.csv"], ["replay", "x.csv", "--rate", "5"], ["train", "--nproc", "2"]]


def test_a_wrong_command_line_is_caught(parser):
    assert parse_error(parser, ["replay", "x.csv", "--rate", "fast"])
    assert parse_error(parser, ["bench", "nosuch"])
    assert parse_error(parser, ["train", "--nproc", "2"]) is None


def test_the_docs_hold_many_command_lines():
    lines = all_command_lines()
    assert len(lines) >= 40, len(lines)
    assert any(f == "README.md" for f, _l, _a in lines), "README shows no tgastream command"


def test_every_command_line_in_the_docs_parses(parser):
    failures = [f"{file}: `{line}`: {error}" for file, line, argv in all_command_lines()
                if (error := parse_error(parser, argv))]
    assert not failures, "\n".join(failures)


def test_readme_is_a_landing_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    shown = re.sub(r"<!--.*?-->", "", text, flags=re.S)  # a commented-out placeholder is not a link
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", shown)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local), "README links into no docs page"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
