"""The figures of docs/faithfulness.md, from the command the page gives.

    python docs/faithfulness_figures.py [--run DIR]          # run (or resume) and write them
    python docs/faithfulness_figures.py --run DIR --check    # recompute; exit 1 if they differ

Runs ``jmllm-joint faithfulness --tiny --out DIR`` (the page's command, every default: 100
held-out toy scenes; resumable, so an interrupted run goes on where it stopped), then writes

- the tables between ``<!-- faithfulness:begin -->`` and ``<!-- faithfulness:end -->`` in
  ``docs/faithfulness.md``,
- ``docs/faithfulness-toy.json``: the run's ``faithfulness.json`` (the tables are made from it;
  a test keeps the page equal to it),
- ``docs/images/faithfulness-curves.png`` and ``docs/images/faithfulness-cascade.png``.

After the toy world is retrained, run it again and commit what it changes; the prose around the
tables reads the figures and must be checked by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
PAGE = DOCS / "faithfulness.md"
SUMMARY = DOCS / "faithfulness-toy.json"
IMAGES = DOCS / "images"
BEGIN, END = "<!-- faithfulness:begin -->", "<!-- faithfulness:end -->"
TIMING = "The run took "
COMMAND = ["jmllm-joint", "faithfulness", "--tiny"]
HEADLINE = ("deletion_auc", "insertion_auc", "deletion_auc_pixels", "insertion_auc_pixels",
            "pointing", "maxboxacc_iou50", "randomisation_spearman")  # fmt: skip
SEPARATION = ("deletion_auc", "insertion_auc", "deletion_auc_pixels", "insertion_auc_pixels",
              "pointing", "maxboxacc_iou50")  # fmt: skip


def _cell(entry: dict[str, Any] | None, digits: int = 2) -> str:
    if not entry:
        return "—"
    value = f"{entry['value']:.{digits}f}"
    if entry.get("ci_low") is None:
        return value
    return f"{value} [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]"


def _p(p: float | None) -> str:
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def tables(summary: dict[str, Any]) -> str:
    """The Markdown the page holds between its markers, from a ``faithfulness.json``."""
    from jmllm.joint.faithfulness.report import METRICS

    methods = list(summary["methods"])
    best = {k: summary["ranking"][k][0] for k in HEADLINE if k in summary["ranking"]}
    s = summary["settings"]
    out = [
        f"{summary['images']} held-out scenes ({summary['source'].get('name', '')}), "
        f"{summary['targets']} explained words ({summary['unscored_mentions']} mentions of a "
        f"wrong or absent object left out); {s['steps']} steps per curve, baseline "
        f"`{s['baseline']}`, integrated gradients with {s['ig_steps']} steps, cascade "
        f"`{s['cascade']}` (seed {s['cascade_seed']}), MaxBoxAccV2 `{s['protocol']}`. "
        f"Each cell: the mean and its {summary['bootstrap']['confidence']:.0%} interval "
        f"(percentile bootstrap over scenes, {summary['bootstrap']['resamples']} resamples); "
        "**bold**: the best of the column.",
        "",
        "| method | " + " | ".join(f"`{k}` ({METRICS[k][0]})" for k in HEADLINE) + " |",
        "| --- | " + " | ".join("---" for _ in HEADLINE) + " |",
    ]
    for m in methods:
        cells = []
        for k in HEADLINE:
            text = _cell(summary["methods"][m].get(k))
            cells.append(f"**{text}**" if best.get(k) == m else text)
        out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    paired = summary["paired"]["methods"]
    out += [
        "",
        "Against GA, paired by scene (method − `ga`; Wilcoxon signed-rank p; MaxBoxAccV2 is a "
        "dataset-level maximum, so its difference has an interval and no test):",
        "",
        "| method − `ga` | " + " | ".join(f"`{k}`" for k in HEADLINE) + " |",
        "| --- | " + " | ".join("---" for _ in HEADLINE) + " |",
    ]
    for m, row in paired.items():
        cells = [
            f"{_cell(row[k])}, p {_p(row[k]['wilcoxon_p'])}" if k in row else "—" for k in HEADLINE
        ]
        out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    if summary["separation"]:
        out += [
            "",
            "Trained against fully randomised maps (trained − randomised, scored on the same "
            "truth and the trained J; ✓: the interval lies on the metric's good side):",
            "",
            "| method | " + " | ".join(f"`{k}`" for k in SEPARATION) + " |",
            "| --- | " + " | ".join("---" for _ in SEPARATION) + " |",
        ]
        for m, row in summary["separation"].items():
            cells = [
                f"{_cell(row[k])} {'✓' if row[k]['separates'] else '✗'}" if k in row else "—"
                for k in SEPARATION
            ]
            out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    if summary["cascade"]:
        stages = [r["stage"] for r in next(iter(summary["cascade"].values()))]
        out += [
            "",
            "Randomisation cascade, Spearman with the trained map (W, then the LM head, then "
            "the decoder layers from the top, cumulatively):",
            "",
            "| method | " + " | ".join(f"`{st}`" for st in stages) + " |",
            "| --- | " + " | ".join("---" for _ in stages) + " |",
        ]
        for m, rows in summary["cascade"].items():
            out.append(f"| `{m}` | " + " | ".join(_cell(r["spearman"]) for r in rows) + " |")
    out.append("")
    kept = summary.get("images_kept", 0)
    resumed = (
        f", scoring {summary.get('images_scored_now', 0)} images; {kept} were scored by an "
        "earlier invocation it resumed, whose time is not counted"
        if kept
        else ""
    )
    out.append(
        f"{TIMING}{summary.get('seconds', 0):.0f} s{resumed} (`seconds` in the JSON; the "
        "machine is shared, so it is an order of magnitude, not a benchmark)."
    )
    return "\n".join(out)


def page_with(tables_md: str, page: str) -> str:
    """The page with its generated block replaced."""
    start, end = page.index(BEGIN) + len(BEGIN), page.index(END)
    return page[:start] + "\n" + tables_md + "\n" + page[end:]


def _figures(page: str) -> list[str]:
    """The page's generated lines but the run's wall-clock sentence: the figures are
    deterministic, the seconds a run takes are not, so ``--check`` compares the rest."""
    block = page[page.index(BEGIN) : page.index(END)]
    return [line for line in block.splitlines() if not line.startswith(TIMING)]


def run(out: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}  # fmt: skip
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / COMMAND[0]), *COMMAND[1:], "--out", str(out)]
    subprocess.run(command, check=True, env=env)
    summary: dict[str, Any] = json.loads((out / "faithfulness.json").read_text(encoding="utf-8"))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="the run's folder (default: a temporary one)")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    out = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="faithfulness-"))
    summary = run(out)
    new_page = page_with(tables(summary), PAGE.read_text(encoding="utf-8"))
    if args.check:
        same = _figures(new_page) == _figures(PAGE.read_text(encoding="utf-8"))
        print("docs/faithfulness.md: up to date" if same else "docs/faithfulness.md: differs")
        return 0 if same else 1
    PAGE.write_text(new_page, encoding="utf-8")
    SUMMARY.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in ("curves.png", "cascade.png"):
        shutil.copyfile(out / name, IMAGES / f"faithfulness-{name}")
    print(f"wrote {PAGE}, {SUMMARY} and the pictures in {IMAGES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
