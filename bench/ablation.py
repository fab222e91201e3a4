"""An ablation table from several ``tgastream eval --json`` results: one row per lever.

Each lever was run as its own ``tgastream eval ... --on-validation --json RUN.json`` (the
validation share only, so no setting is chosen on the test period). This collects, per run, TGA's
seed means (AUC, GAUC, HR@10, novel HR@10, repeat HR@10) next to the run's baselines (DIN,
repeat-recent, co-visitation, where the run has them) and the paired comparisons, and writes
one JSON and one Markdown table:

    python -m tgastream.bench.ablation LABEL=RUN.json ... --json docs/bench/ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tgastream.bench.report import write_json

FIGURES = ("auc", "gauc", "hr@10", "hr@10_repeat", "hr@10_novel")
COMPARED = ("auc: tga - din", "gauc: tga - din", "hr@10: tga / repeat", "hr@10_novel: tga - covisit")


@dataclass(frozen=True)
class Run:
    label: str  # the lever, as the table names it
    path: Path


def parse_run(text: str) -> Run:
    """``LABEL=PATH`` → :class:`Run` (a bare path is labelled by its file stem)."""
    label, sep, path = text.partition("=")
    return Run(label, Path(path)) if sep else Run(Path(text).stem, Path(text))


def row_of(run: Run, result: dict) -> dict:
    """TGA's figures (seed means and sd), DIN's AUC/GAUC and the paired comparisons of one run."""
    tga = result["models"].get("tga", {})
    row = {"lever": run.label, "file": str(run.path), "seeds": result.get("seeds"),
           "config": {k: result["config"].get(k) for k in ("model_overrides", "transition_prior", "conversion_raw",
                                                            "dropout", "dim", "layers")}
           | {"train": result["config"].get("train")},
           "scored": result["data"].get("scored", "test period"), "test_cases": result["test_cases"]}
    for key in FIGURES:
        row[f"tga_{key}"] = tga.get(key)
        row[f"tga_{key}_sd"] = tga.get("sd", {}).get(key)
    for name in ("din", "repeat", "covisit"):
        m = result["models"].get(name)
        if m:
            for key in ("auc", "gauc", "hr@10", "hr@10_novel"):
                if m.get(key) is not None:
                    row[f"{name}_{key}"] = m[key]
    for label in COMPARED:
        c = result.get("comparisons", {}).get(label)
        if c:
            row[label] = {"value": c["value"], "ci": c["ci"]}
    return row


def _num(v, sd=None) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" + (f" ± {sd:.3f}" if sd else "")


def _cmp(c: dict | None) -> str:
    if not c or c.get("value") is None:
        return "–"
    ci = c.get("ci")
    return f"{c['value']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def format_markdown(rows: list[dict]) -> str:
    """One line per lever: TGA's seed means ± sd, DIN's AUC/GAUC, and the paired comparisons."""
    head = ("| lever | TGA AUC | TGA GAUC | TGA HR@10 | TGA HR@10 repeat | TGA HR@10 novel | DIN AUC | DIN GAUC "
            "| AUC TGA − DIN [95%] | GAUC TGA − DIN [95%] | HR@10 TGA / repeat [95%] | novel TGA − co-vis. [95%] |")
    lines = [head, "|---|" + "---:|" * 11]
    for r in rows:
        cells = [_num(r.get(f"tga_{k}"), r.get(f"tga_{k}_sd")) for k in FIGURES]
        cells += [_num(r.get("din_auc")), _num(r.get("din_gauc"))]
        cells += [_cmp(r.get("auc: tga - din")), _cmp(r.get("gauc: tga - din")), _cmp(r.get("hr@10: tga / repeat")),
                  _cmp(r.get("hr@10_novel: tga - covisit"))]
        lines.append(f"| {r['lever']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=PATH of a tgastream eval --json result (one per lever)")
    p.add_argument("--json", type=Path, required=True, help="write the table as JSON here (Markdown next to it)")
    args = p.parse_args(argv)
    rows = []
    for run in map(parse_run, args.runs):
        try:
            result = json.loads(run.path.read_text())
        except (OSError, ValueError) as exc:
            print(f"error: cannot read {run.path}: {exc}", file=sys.stderr)
            return 2
        rows.append(row_of(run, result))
    table = format_markdown(rows)
    print(table)
    write_json(args.json, {"rows": rows})
    args.json.with_suffix(".md").write_text(table)
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
