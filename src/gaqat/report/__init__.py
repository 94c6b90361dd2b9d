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
    corruption_note,
    corruption_tables,
    ensemble_notes,
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
    r"""The tables of every run below ``dirs``, as markdown, CSV or LaTeX text.

    Runs evaluated by ``gaqat corrupt`` add a table of their corrupted held-out accuracy;
    ensembles (``gaqat ensemble``) a note of their size against one float model.
    With ``paired`` (a baseline algorithm) the paired-difference tables replace the
    accuracy tables; CSV has no notes, so its unpaired runs are reported as warnings.

    Example: two finished runs, one per held-out domain, each with one checkpoint record
    (``gaqat train`` writes more fields; these are the ones a report reads)::

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from gaqat.report import report
        >>> sweep = Path(tempfile.mkdtemp())
        >>> for env, acc in ((0, 0.6), (1, 0.8)):
        ...     args = {"dataset": "toy", "domains": ["photo", "sketch"], "algorithm": "erm",
        ...             "test_envs": [env], "trial_seed": 0, "hparams_seed": 0}
        ...     record = {"step": 100, "args": args, "env0_in_acc": acc, "env0_out_acc": acc,
        ...               "env1_in_acc": acc, "env1_out_acc": acc}
        ...     run = sweep / f"erm_{env}"
        ...     run.mkdir()
        ...     _ = (run / "results.jsonl").write_text(json.dumps(record) + "\n")
        ...     (run / "done").touch()  # the run finished
        >>> print(report([sweep]).strip().split("\n\n")[-1])  # the table, after its notes
        | Algorithm | Bits | photo | sketch | Avg | Trials |
        |---|---|---|---|---|---|
        | erm | 32 | 60.0 | 80.0 | 70.0 | 1 |
        >>> print(report([sweep], fmt="csv"))
        selection,dataset,algorithm,bits,domain,mean,stderr,n,incomplete
        training,toy,erm,32,photo,60.0000,,1,0
        training,toy,erm,32,sketch,80.0000,,1,0
        training,toy,erm,32,Avg,70.0000,,1,0
        <BLANKLINE>
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    names = _selections(selection)
    runs = load_runs(dirs)
    if paired is None:
        corrupted = corruption_tables(runs)
        tables = [table for name in names for table in accuracy_tables(runs, name)] + corrupted
        notes = accuracy_notes(runs, names) + ensemble_notes(runs) + corruption_note(corrupted)
        header = ACCURACY_CSV
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
