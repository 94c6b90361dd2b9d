"""``gaqat report``: result tables from the ``results.jsonl`` files of training runs,
gaqat's and DomainBed's, so that both kinds of sweep can share one table.

:func:`report` goes through one module per step:

- :mod:`gaqat.report.runs` reads and checks the runs below some folders;
- :mod:`gaqat.report.aggregate` groups them as DomainBed's ``collect_results`` does and
  scores each group with a selection method (:mod:`gaqat.selection`), into accuracy
  tables (mean ± standard error over trial seeds) or paired differences to a baseline;
- :mod:`gaqat.report.table` is the one table type, whose cells print themselves;
- :mod:`gaqat.report.render` prints tables as markdown, LaTeX or CSV.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from gaqat.report.aggregate import (
    ACCURACY_CSV,
    PAIRED_CSV,
    accuracy_notes,
    accuracy_tables,
    pair_runs,
    paired_notes,
    paired_tables,
    pairing_notes,
)
from gaqat.report.render import as_csv, as_latex, as_markdown
from gaqat.report.runs import load_runs
from gaqat.selection import SELECTION_METHODS

FORMATS = ("markdown", "csv", "latex")
SELECTIONS = (*SELECTION_METHODS, "all")


def _selections(selection: str) -> list[str]:
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    return list(SELECTION_METHODS) if selection == "all" else [selection]


def report(
    dirs: Sequence[str | Path],
    fmt: str = "markdown",
    selection: str = "training",
    paired: str | None = None,
) -> str:
    """The tables of every run below ``dirs``, as markdown, CSV or LaTeX text.

    With ``paired`` (a baseline algorithm) the paired-difference tables replace the
    accuracy tables; CSV has no notes, so its unpaired runs are reported as warnings.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    names = _selections(selection)
    runs = load_runs(dirs)
    if paired is None:
        tables = [table for name in names for table in accuracy_tables(runs, name)]
        header, notes = ACCURACY_CSV, accuracy_notes(runs, names)
    else:
        comparisons = pair_runs(runs, paired)
        tables = [table for name in names for table in paired_tables(comparisons, name)]
        header, notes = PAIRED_CSV, paired_notes(runs, comparisons)
        if fmt == "csv":
            for note in pairing_notes(comparisons):
                warnings.warn(note, stacklevel=2)
    if fmt == "csv":
        return as_csv(header, tables)
    return as_latex(notes, tables) if fmt == "latex" else as_markdown(notes, tables)
