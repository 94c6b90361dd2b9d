"""Result tables from the ``results.jsonl`` files of training runs.

Each ``results.jsonl`` is one run. Runs are grouped by (dataset, algorithm, bit width,
test domains, trial seed); a selection method (:mod:`gaqat.selection`) turns each group,
whatever its hyperparameter draws, into one test accuracy. A table cell is the mean ±
standard error of those accuracies over trial seeds, in percent, with DomainBed's
standard error: numpy's ``std`` (population, ddof=0) divided by sqrt(n). With a single
trial seed there is no error to show, so the cell shows the mean alone. ``Avg`` averages
a row's columns per trial seed, over the trial seeds that cover every column, then takes
mean ± standard error of those averages (DomainBed's "Averages" table).

A run folder without a ``done`` file (killed or still running) is used and its cells
are marked ``*``. A torn last line (a run killed while writing) is skipped with a
warning; any other bad line is an error naming the file, line and key.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gaqat.jsonl import read_jsonl
from gaqat.selection import SELECTION_METHODS, SelectionMethod

FORMATS = ("markdown", "csv", "latex")
SELECTIONS = (*SELECTION_METHODS, "all")
RESULTS = "results.jsonl"
DONE = "done"
ALGORITHM_ORDER = ("erm", "sagm", "lsq", "lsq_sam", "lsq_sagm", "gaqat")  # METHOD.md §8
FLOAT_BITS = 32
ARGS_KEYS = ("dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed", "bits", "domains")


@dataclass(frozen=True)
class Run:
    path: Path
    records: list[dict]
    complete: bool
    dataset: str
    algorithm: str
    bits: int  # FLOAT_BITS for float runs
    test_envs: tuple[int, ...]
    trial_seed: int
    domains: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """Accuracies (fractions) of one table cell, one per trial seed."""

    values: tuple[float, ...]
    incomplete: bool

    @property
    def mean(self) -> float | None:
        return 100 * float(np.mean(self.values)) if self.values else None

    @property
    def stderr(self) -> float | None:
        """DomainBed's standard error, numpy std (ddof=0) / sqrt(n); None below 2 trials."""
        n = len(self.values)
        return 100 * float(np.std(self.values)) / np.sqrt(n) if n > 1 else None


@dataclass(frozen=True)
class Row:
    algorithm: str
    bits: int
    trials: int  # distinct trial seeds among the row's runs
    cells: list[Cell]  # one per column


@dataclass(frozen=True)
class Table:
    dataset: str
    selection: str  # a key of SELECTION_METHODS
    columns: list[str]  # test domain names; then "Avg"
    rows: list[Row]


def _check_record(record: object, where: str) -> dict:
    """The record if it has every key the report reads, else an error naming the key."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("step", "args"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
    args = record["args"]
    for key in ARGS_KEYS:
        if key not in args:
            raise ValueError(f"{where}: missing key 'args.{key}'")
    n = len(args["domains"])
    if not all(isinstance(e, int) and 0 <= e < n for e in args["test_envs"]):
        raise ValueError(f"{where}: args.test_envs {args['test_envs']} are not domain indices "
                         f"0..{n - 1} of {args['domains']}")
    for i in range(n):
        for split in ("in", "out"):
            key = f"env{i}_{split}_acc"
            if key not in record:
                raise ValueError(f"{where}: missing key {key!r}")
            if not isinstance(record[key], (int, float)):
                raise ValueError(f"{where}: {key} is {record[key]!r}, expected a number")
    return record


def _group_key(record: dict) -> tuple:
    args = record["args"]
    return (args["dataset"], args["algorithm"], args["bits"], tuple(args["test_envs"]),
            args["trial_seed"], args["hparams_seed"], tuple(args["domains"]))


def load_run(path: Path) -> Run | None:
    """One run from its ``results.jsonl``; None (with a warning) when it holds no record."""
    records: list[dict] = []
    for where, record in read_jsonl(path):
        records.append(_check_record(record, where))
        if _group_key(record) != _group_key(records[0]):
            raise ValueError(f"{where}: args (dataset, algorithm, bits, test_envs, seeds, domains) "
                             f"differ from line 1's; one results.jsonl must hold one run")
    if not records:
        warnings.warn(f"{path}: no records, skipped", stacklevel=2)
        return None
    args = records[0]["args"]
    return Run(path=path, records=records, complete=(path.parent / DONE).exists(),
               dataset=args["dataset"], algorithm=args["algorithm"],
               bits=FLOAT_BITS if args["bits"] is None else args["bits"],
               test_envs=tuple(args["test_envs"]), trial_seed=args["trial_seed"],
               domains=tuple(args["domains"]))


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every run whose ``results.jsonl`` lies below one of ``dirs`` (each file once)."""
    paths: dict[Path, None] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such folder")
        paths.update(dict.fromkeys(p.resolve() for p in sorted(d.rglob(RESULTS))))
    if not paths:
        raise FileNotFoundError(f"no {RESULTS} below {', '.join(map(str, dirs))}")
    runs = [run for run in map(load_run, paths) if run is not None]
    domains: dict[str, Run] = {}
    for run in runs:
        first = domains.setdefault(run.dataset, run)
        if run.domains != first.domains:
            raise ValueError(f"dataset {run.dataset}: {first.path} has domains "
                             f"{list(first.domains)} "
                             f"but {run.path} has {list(run.domains)}")
    return runs


def _row_order(key: tuple[str, int]) -> tuple:
    """Float rows first, then by falling bit width; methods in METHOD.md's order."""
    algorithm, bits = key
    known = algorithm in ALGORITHM_ORDER
    return (-bits, not known, ALGORITHM_ORDER.index(algorithm) if known else 0, algorithm)


def _trial_accs(method: SelectionMethod, runs: list[Run],
                test_envs: tuple[int, ...]) -> dict[int, float]:
    """Test accuracy per trial seed of the runs holding out ``test_envs`` (best draw each)."""
    groups: dict[int, list[list[dict]]] = defaultdict(list)
    for run in runs:
        if run.test_envs == test_envs:
            groups[run.trial_seed].append(run.records)
    accs = {trial: method.sweep_acc(group) for trial, group in sorted(groups.items())}
    return {trial: acc[1] for trial, acc in accs.items() if acc is not None}


def _row(method: SelectionMethod, algorithm: str, bits: int, runs: list[Run],
         columns: list[tuple[int, ...]]) -> Row:
    per_column = [_trial_accs(method, runs, test_envs) for test_envs in columns]
    cells = [Cell(tuple(accs.values()), any(not r.complete for r in runs if r.test_envs == envs))
             for accs, envs in zip(per_column, columns)]
    covering = set.intersection(*(set(accs) for accs in per_column))
    averages = tuple(float(np.mean([accs[t] for accs in per_column])) for t in sorted(covering))
    cells.append(Cell(averages, any(cell.incomplete for cell in cells)))
    return Row(algorithm, bits, len({run.trial_seed for run in runs}), cells)


def build_tables(runs: list[Run], selection: str) -> list[Table]:
    """One table per dataset: rows (algorithm, bits), columns the test domains seen."""
    method = SELECTION_METHODS[selection]
    tables = []
    for dataset in sorted({run.dataset for run in runs}):
        mine = [run for run in runs if run.dataset == dataset]
        columns = sorted({run.test_envs for run in mine})
        keys = sorted({(run.algorithm, run.bits) for run in mine}, key=_row_order)
        rows = [_row(method, *key, [r for r in mine if (r.algorithm, r.bits) == key], columns)
                for key in keys]
        names = ["+".join(mine[0].domains[i] for i in envs) if envs else "(none)"
                 for envs in columns]
        tables.append(Table(dataset, selection, [*names, "Avg"], rows))
    return tables


def _cell_text(cell: Cell, pm: str, missing: str) -> str:
    if cell.mean is None:
        return missing
    text = f"{cell.mean:.1f}" if cell.stderr is None else f"{cell.mean:.1f} {pm} {cell.stderr:.1f}"
    return text + ("*" if cell.incomplete else "")


def _notes(runs: list[Run]) -> list[str]:
    n_incomplete = sum(not run.complete for run in runs)
    return [f"{len(runs)} runs ({n_incomplete} without a `{DONE}` file, marked *).",
            "Test-domain accuracy (%), mean ± standard error over trial seeds "
            "(numpy std with ddof=0 / sqrt(n), as DomainBed; no error shown for one seed). "
            "Avg: mean over the columns per trial seed, over the seeds that cover every column."]


def _markdown(tables: list[Table], runs: list[Run]) -> str:
    out = [*_notes(runs), ""]
    for table in tables:
        out += [f"### {table.dataset}: {SELECTION_METHODS[table.selection].name}", "",
                "| " + " | ".join(["Algorithm", "Bits", *table.columns, "Trials"]) + " |",
                "|" + "---|" * (len(table.columns) + 3)]
        for row in table.rows:
            texts = [_cell_text(c, "±", "–") for c in row.cells]
            cells = [row.algorithm, str(row.bits), *texts, str(row.trials)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _latex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&") \
        .replace("%", r"\%").replace("#", r"\#")


def _latex(tables: list[Table], runs: list[Run]) -> str:
    out = ["% " + note for note in _notes(runs)]
    for table in tables:
        header = ["Algorithm", "Bits", *table.columns, "Trials"]
        out += ["", f"% {table.dataset}: {SELECTION_METHODS[table.selection].name}",
                r"\begin{tabular}{ll" + "c" * (len(table.columns) + 1) + "}", r"\toprule",
                " & ".join(map(_latex_escape, header)) + r" \\", r"\midrule"]
        for row in table.rows:
            texts = [_cell_text(c, r"$\pm$", "--") for c in row.cells]
            out.append(" & ".join([_latex_escape(row.algorithm), str(row.bits), *texts,
                                   str(row.trials)]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def _csv(tables: list[Table]) -> str:
    """Long format, one row per cell: easy to pivot; numbers unrounded beyond 1e-4."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["selection", "dataset", "algorithm", "bits", "domain",
                     "mean", "stderr", "n", "incomplete"])
    for table in tables:
        for row in table.rows:
            for column, cell in zip(table.columns, row.cells):
                writer.writerow([table.selection, table.dataset, row.algorithm, row.bits, column,
                                 _number(cell.mean), _number(cell.stderr), len(cell.values),
                                 int(cell.incomplete)])
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _selections(selection: str) -> Iterable[str]:
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    return list(SELECTION_METHODS) if selection == "all" else [selection]


def report(dirs: Sequence[str | Path], fmt: str = "markdown", selection: str = "training") -> str:
    """The tables of every run below ``dirs``, as markdown, CSV or LaTeX text."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    names = _selections(selection)
    runs = load_runs(dirs)
    tables = [table for name in names for table in build_tables(runs, name)]
    if fmt == "csv":
        return _csv(tables)
    return _latex(tables, runs) if fmt == "latex" else _markdown(tables, runs)
