"""What every study's results page shares: paired differences read from the runs, their
wording, and the page filled from a template in ``benchmarks/templates``.

A study script keeps its own analysis (a summary dataclass) and template; this module is
the part the next study imports instead of copying.
"""

from __future__ import annotations

import csv
import io
import subprocess
import warnings
from pathlib import Path
from string import Template

from gaqat.report import report
from gaqat.report.aggregate import pair_runs
from gaqat.report.runs import load_runs
from gaqat.report.table import Difference
from gaqat.selection import SELECTION_METHODS

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"


def paired(dirs, baseline: str, selection: str = "training") -> list[dict]:
    """``gaqat report --paired BASELINE --format csv`` as dicts (numbers in percent)."""
    with warnings.catch_warnings():  # "erm not compared": float erm has no QAT baseline
        warnings.simplefilter("ignore")
        text = report([str(d) for d in dirs], "csv", selection, baseline)
    return list(csv.DictReader(io.StringIO(text)))


def pooled(
    folders, algorithm: str, baseline: str, selection: str = "training", finished_only=False
) -> dict:
    """``algorithm`` − ``baseline`` over every pair of every bit width (the table's rows
    pool one bit width each), in the report's own pairing and statistics; with
    ``finished_only``, runs still training pair with nothing."""
    method = SELECTION_METHODS[selection]
    runs = [r for r in load_runs(folders) if r.complete or not finished_only]
    present = {algorithm, baseline} <= {r.algorithm for r in runs}
    differences = []
    for comparison in pair_runs(runs, baseline) if present else ():
        if comparison.algorithm == algorithm and comparison.baseline_bits is not None:
            for draw, base in comparison.pairs:
                differences.append(
                    method.run_acc(draw.records)[1] - method.run_acc(base.records)[1]
                )
    return {k: str(v) for k, v in Difference(tuple(differences), False).stats().items()}


def all_domains(rows: list[dict], algorithm: str, bits: str) -> dict:
    """The row of ``paired`` that pools every held-out domain ({} when there is none)."""
    return next(
        (
            r
            for r in rows
            if r["algorithm"] == algorithm and r["bits"] == bits and r["domain"] == "All"
        ),
        {},
    )


def diff_text(row: dict) -> str:
    """A paired difference in words: mean ± standard error, pairs, wins/ties/losses."""
    if not row or not row.get("n") or row["n"] == "0":
        return "no pairs"
    stderr = f" ± {float(row['stderr']):.2f}" if row.get("stderr") else ""
    singular = {"wins": "win", "ties": "tie", "losses": "loss"}
    counts = ", ".join(f"{row[k]} {k if int(row[k]) != 1 else singular[k]}" for k in singular)
    return f"{float(row['mean_diff']):+.2f}{stderr} points over {row['n']} pairs ({counts})"


def verdict(row: dict, comparison: str = "gaqat − lsq_sagm") -> str:
    """Which side a paired difference favours: beyond two standard errors, or neither."""
    if not row or not row.get("stderr"):
        return "undecided"
    mean, stderr = float(row["mean_diff"]), float(row["stderr"])
    if abs(mean) < 2 * stderr:
        return "no difference beyond noise"
    first, second = comparison.split(" − ")
    return f"{first if mean > 0 else second} better"


def comparison_table(rows: dict[str, dict]) -> list[str]:
    """A markdown table of named paired differences ("a − b" → the difference's stats)."""
    return [
        "| comparison | difference (points) | |",
        "|---|---|---|",
        *(f"| {name} | {diff_text(row)} | {verdict(row, name)} |" for name, row in rows.items()),
    ]


def commit() -> str:
    """The checkout's short commit, so a page says which code wrote it."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def render(template: str, **fields) -> str:
    """``templates/<template>`` with its ``${field}`` placeholders filled; a list of lines
    fills one as those lines."""
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    return Template(text).substitute(
        {k: "\n".join(v) if isinstance(v, list) else str(v) for k, v in fields.items()}
    )
