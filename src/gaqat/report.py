"""Result tables from the ``results.jsonl`` files of training runs: gaqat's and DomainBed's.

Each ``results.jsonl`` is one run. Table rows are (algorithm, bit width). A gaqat QAT
record names its bit width twice: in ``args.bits`` and in ``args.algorithm``
(``lsq_sagm_w4``, so that DomainBed's tools, which group by that name alone, keep bit
widths apart); the row is named without the ``_w4``. Records of older gaqat versions
(``lsq_sagm`` with ``args.bits`` 4) read the same. A record without ``args.bits`` (a
float run, or any of DomainBed's own) is 32-bit. Domain names come from ``args.domains``;
DomainBed's records have none, so they come from gaqat's registry for the datasets it
knows (``PACS``, ``VLCS``, ...), else ``env0``, ``env1``, ... So a gaqat sweep and a
DomainBed sweep can share one table.

Aggregation is DomainBed's (``collect_results``): a *group* (dataset, algorithm, bit
width, test domain, trial seed) holds every run holding out that domain, alone or with
others, and a selection method (:mod:`gaqat.selection`) turns it, whatever its
hyperparameter draws, into one test accuracy. Runs of one group sharing an hparams seed
are one draw to DomainBed, their records pooled; two such runs holding out the same
domains are pooled here too, with a warning. A table cell is the mean ± standard error
of those accuracies over trial seeds, in percent, with DomainBed's standard error:
numpy's ``std`` (population, ddof=0) divided by sqrt(n). With a single trial seed there
is no error to show, so the cell shows the mean alone. ``Avg`` averages a row's columns
per trial seed, over the trial seeds that cover every column, then takes mean ± standard
error of those averages (DomainBed's "Averages" table).

A run folder without a ``done`` file (killed or still running) is used and the cells
that hold it are marked ``*``. A torn last line (a run killed while writing) is skipped
with a warning; any other bad line is an error naming the file, line and key.

Between-seed noise can be as large as the effects studied, so ``paired=BASELINE``
reports paired differences instead: each draw against the baseline's draw sharing its
dataset, test domain, trial seed and hyperparameter seed (same init, data split, batches
and shared hyperparameters), each side's checkpoint chosen by the selection method. There
is no choice among hyperparameter draws: every draw is a pair of its own. A row is paired
with the baseline at its own bit width or, when the baseline has none there (a float
baseline such as ``erm``), with the baseline's float runs; a float row is never compared
with a quantized baseline. A cell is the mean difference ± its standard error with the
sample std (ddof=1, the paired t-test's) and the wins/ties/losses of the algorithm.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np

from gaqat.fields import check_fields, is_a
from gaqat.names import ALGORITHMS, DATASETS, canonical_dataset
from gaqat.runfolder import DONE, RESULTS, read_jsonl
from gaqat.selection import SELECTION_METHODS, SelectionMethod, count_domains

FORMATS = ("markdown", "csv", "latex")
SELECTIONS = (*SELECTION_METHODS, "all")
FLOAT_BITS = 32
# The fields every record needs: its checkpoint and the args DomainBed's scripts read.
FIELDS = {"step": int, "args": dict, "args.dataset": str, "args.algorithm": str,
          "args.test_envs": list, "args.trial_seed": int, "args.hparams_seed": int}
ACCURACY_CSV = ("selection", "dataset", "algorithm", "bits", "domain", "mean", "stderr", "n",
                "incomplete")
PAIRED_CSV = ("selection", "dataset", "algorithm", "bits", "baseline", "baseline_bits", "domain",
              "mean_diff", "stderr", "n", "wins", "ties", "losses", "incomplete")
TIE = 1e-9  # accuracy difference (fraction) below which a pair is a tie: float noise only


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
    hparams_seed: int
    domains: tuple[str, ...]

    def describe(self) -> str:
        envs = "+".join(self.domains[i] for i in self.test_envs) or "(none)"
        return (f"{self.algorithm} {self.bits}-bit, test {envs}, trial {self.trial_seed}, "
                f"hparams {self.hparams_seed} ({self.path.parent})")


@dataclass(frozen=True)
class Draw:
    """One hyperparameter draw of a group: the runs of one (dataset, algorithm, bits, trial
    seed, hparams seed) that hold out ``test_env``. ``alone`` holds it out alone (what
    every selection method scores); the others hold out a second domain too
    (leave-one-domain-out's validation)."""

    test_env: int
    alone: Run
    runs: tuple[Run, ...]

    @property
    def pair_key(self) -> tuple:
        """What a paired draw shares: init, data split, batches and hyperparameter draw."""
        return self.alone.dataset, self.test_env, self.alone.trial_seed, self.alone.hparams_seed

    @property
    def records(self) -> list[dict]:
        return _records(self.runs)

    @property
    def complete(self) -> bool:
        return all(run.complete for run in self.runs)


@dataclass(frozen=True)
class Style:
    """How a format prints cells: its ± sign, its empty cell, its escaping of names."""

    pm: str
    missing: str
    escape: Callable[[str], str]


@dataclass(frozen=True)
class Label:
    """Part of a row's name (algorithm, bit width, trial count), printed as it is;
    ``field`` is its CSV column (None: not in the CSV)."""

    value: str
    field: str | None = None

    def text(self, style: Style) -> str:
        return style.escape(self.value)


@dataclass(frozen=True)
class Mean:
    """Accuracies (fractions) of one table cell, one per trial seed, printed in percent as
    mean ± standard error, with ``*`` when a run behind it has not finished."""

    values: tuple[float, ...]
    incomplete: bool
    ddof: ClassVar[int] = 0  # DomainBed's population std
    sign: ClassVar[str] = ""

    @property
    def mean(self) -> float | None:
        return 100 * float(np.mean(self.values)) if self.values else None

    @property
    def stderr(self) -> float | None:
        """Standard error, numpy std (with ``ddof``) / sqrt(n); None below 2 values."""
        n = len(self.values)
        return 100 * float(np.std(self.values, ddof=self.ddof)) / np.sqrt(n) if n > 1 else None

    def text(self, style: Style) -> str:
        if self.mean is None:
            return style.missing
        text = f"{self.mean:{self.sign}.1f}"
        if self.stderr is not None:
            text += f" {style.pm} {self.stderr:.1f}"
        return text + ("*" if self.incomplete else "")

    def stats(self) -> dict[str, object]:
        """The cell's CSV columns."""
        return {"mean": _number(self.mean), "stderr": _number(self.stderr),
                "n": len(self.values), "incomplete": int(self.incomplete)}


@dataclass(frozen=True)
class Difference(Mean):
    """Paired differences (algorithm − baseline, fractions) of one cell, one per pair,
    printed with the number of pairs and the algorithm's wins/ties/losses.

    The standard error uses the sample std (ddof=1): the paired t-test's, honest for the
    few pairs a study has, where ddof=0 would understate it.
    """

    ddof: ClassVar[int] = 1
    sign: ClassVar[str] = "+"

    @property
    def counts(self) -> tuple[int, int, int]:
        """Wins, ties and losses of the algorithm against the baseline."""
        wins = sum(d > TIE for d in self.values)
        losses = sum(d < -TIE for d in self.values)
        return wins, len(self.values) - wins - losses, losses

    def text(self, style: Style) -> str:
        if not self.values:
            return style.missing
        counts = "/".join(map(str, self.counts))
        return f"{super().text(style)} ({len(self.values)}: {counts})"

    def stats(self) -> dict[str, object]:
        stats = super().stats()
        wins, ties, losses = self.counts
        return {"mean_diff": stats.pop("mean"), **stats, "wins": wins, "ties": ties,
                "losses": losses}


Cell = Label | Mean


@dataclass(frozen=True)
class Table:
    """What every format prints: a title, a header and rows of cells.

    ``keys`` are the CSV columns every cell of the table shares (selection, dataset...).
    """

    title: str
    keys: dict[str, object]
    header: list[str]
    rows: list[list[Cell]]

    def csv_lines(self) -> Iterator[dict[str, object]]:
        """One line per statistic cell: the table's keys, its row's labels, its column
        (the ``domain``) and its statistics."""
        for row in self.rows:
            labels = {c.field: c.value for c in row if isinstance(c, Label) and c.field}
            for column, cell in zip(self.header, row):
                if isinstance(cell, Mean):
                    yield {**self.keys, **labels, "domain": column, **cell.stats()}


@dataclass(frozen=True)
class Comparison:
    """One (algorithm, bit width) of a dataset against the baseline's runs it pairs with.

    ``baseline_bits`` is None when the baseline has no runs it may be compared with.
    """

    dataset: str
    algorithm: str
    bits: int
    baseline: str
    baseline_bits: int | None
    pairs: list[tuple[Draw, Draw]]  # (draw, baseline draw)
    unpaired: list[Draw]  # draws of either side without a partner


def _check_record(record: object, where: str) -> dict:
    """The record if it has every field the report reads, else an error naming the field."""
    check_fields(record, FIELDS, where)
    args = record["args"]
    check_fields(record, {"args.domains": list}, where, required=False)  # DomainBed's: none
    n = len(args["domains"]) if "domains" in args else count_domains(record)
    if not all(is_a(e, int) and 0 <= e < n for e in args["test_envs"]):
        raise ValueError(f"{where}: args.test_envs {args['test_envs']} are not domain indices "
                         f"0..{n - 1}")
    return check_fields(record, {f"env{i}_{split}_acc": float
                                 for i in range(n) for split in ("in", "out")}, where)


def _group_key(record: dict) -> tuple:
    args = record["args"]
    return (args["dataset"], args["algorithm"], args.get("bits"), tuple(args["test_envs"]),
            args["trial_seed"], args["hparams_seed"], tuple(args.get("domains", ())))


def _row_name(args: dict) -> tuple[str, int]:
    """(algorithm, bits) of a record: ``lsq_sagm_w4`` with bits 4 is row (lsq_sagm, 4)."""
    bits = args.get("bits")
    if bits is None:
        return args["algorithm"], FLOAT_BITS
    return args["algorithm"].removesuffix(f"_w{bits}"), bits


def _known_domains(dataset: str, n: int) -> tuple[str, ...]:
    """Domain names for records that carry none (DomainBed's): gaqat's, for a dataset it
    knows (``gaqat.names``), else ``env0``, ``env1``, ..."""
    domains = DATASETS.get(canonical_dataset(dataset))
    if domains is None:
        return tuple(f"env{i}" for i in range(n))
    if len(domains) != n:
        raise ValueError(f"{dataset}: records have {n} domains, gaqat's {dataset} has "
                         f"{len(domains)} ({', '.join(domains)})")
    return domains


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
    algorithm, bits = _row_name(args)
    domains = (tuple(args["domains"]) if "domains" in args
               else _known_domains(args["dataset"], count_domains(records[0])))
    return Run(path=path, records=records, complete=(path.parent / DONE).exists(),
               dataset=args["dataset"], algorithm=algorithm, bits=bits,
               test_envs=tuple(args["test_envs"]), trial_seed=args["trial_seed"],
               hparams_seed=args["hparams_seed"], domains=domains)


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
    draws: dict[tuple, Run] = {}
    for run in runs:
        first = domains.setdefault(run.dataset, run)
        if run.domains != first.domains:
            raise ValueError(f"dataset {run.dataset}: {first.path} has domains "
                             f"{list(first.domains)} "
                             f"but {run.path} has {list(run.domains)}")
        other = draws.setdefault((run.dataset, run.algorithm, run.bits, run.test_envs,
                                  run.trial_seed, run.hparams_seed), run)
        if other is not run:
            warnings.warn(f"{other.path} and {run.path}: {_same_draw(run)}; their records are "
                          f"pooled as one draw, as DomainBed's tools pool them", stacklevel=2)
    return runs


def _same_draw(run: Run) -> str:
    return (f"two {run.algorithm} {run.bits}-bit runs with the same test domains, trial seed "
            f"and hparams seed")


def _row_order(key: tuple[str, int]) -> tuple:
    """Float rows first, then by falling bit width; gaqat's methods in the order of ``gaqat.names.ALGORITHMS``, then
    any other (DomainBed's) by name."""
    algorithm, bits = key
    order = list(ALGORITHMS)
    known = algorithm in order
    return (-bits, not known, order.index(algorithm) if known else 0, algorithm)


def _groups(runs: list[Run]) -> dict[tuple, dict[int, list[Run]]]:
    """DomainBed's groups: (dataset, algorithm, bits, test domain) -> trial seed -> every
    run holding out that domain, alone or with others."""
    groups: dict[tuple, dict[int, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for env in run.test_envs:
            groups[run.dataset, run.algorithm, run.bits, env][run.trial_seed].append(run)
    return groups


def _records(runs: Iterable[Run]) -> list[dict]:
    return [r for run in runs for r in run.records]


def _runs(group: dict[int, list[Run]]) -> list[Run]:
    return [run for runs in group.values() for run in runs]


def _row(method: SelectionMethod, algorithm: str, bits: int, trials: int,
         columns: list[dict[int, list[Run]]]) -> list[Cell]:
    """One table row from its groups: per column, ``{trial seed: runs}``."""
    per_column = [{trial: acc[1] for trial, runs in sorted(group.items())
                   if (acc := method.sweep_acc(_records(runs))) is not None}
                  for group in columns]
    cells = [Mean(tuple(accs.values()), not all(run.complete for run in _runs(group)))
             for accs, group in zip(per_column, columns)]
    covering = set.intersection(*(set(accs) for accs in per_column)) if columns else set()
    averages = tuple(float(np.mean([accs[t] for accs in per_column])) for t in sorted(covering))
    cells.append(Mean(averages, any(cell.incomplete for cell in cells)))
    return [Label(algorithm, "algorithm"), Label(str(bits), "bits"), *cells, Label(str(trials))]


def build_tables(runs: list[Run], selection: str) -> list[Table]:
    """One table per dataset: rows (algorithm, bits), columns the domains some run holds
    out alone (every method needs such a run to score a domain)."""
    method = SELECTION_METHODS[selection]
    groups = _groups(runs)
    tables = []
    for dataset in sorted({run.dataset for run in runs}):
        mine = [run for run in runs if run.dataset == dataset]
        columns = sorted({run.test_envs[0] for run in mine if len(run.test_envs) == 1})
        rows = []
        for key in sorted({(run.algorithm, run.bits) for run in mine}, key=_row_order):
            trials = len({run.trial_seed for run in mine if (run.algorithm, run.bits) == key})
            rows.append(_row(method, *key, trials,
                             [groups[(dataset, *key, env)] for env in columns]))
        names = [mine[0].domains[env] for env in columns]
        tables.append(Table(f"{dataset}: {method.name}",
                            {"selection": selection, "dataset": dataset},
                            ["Algorithm", "Bits", *names, "Avg", "Trials"], rows))
    return tables


def _draws(env: int, runs: list[Run]) -> list[Draw]:
    """A group's draws that have a run holding out ``env`` alone (the others score nothing)."""
    by_seed: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_seed[run.hparams_seed].append(run)
    draws = []
    for members in by_seed.values():
        alone = [run for run in members if len(run.test_envs) == 1]
        if len(alone) > 1:
            raise ValueError(f"{alone[0].path} and {alone[1].path}: {_same_draw(alone[0])}; "
                             f"a paired comparison needs one (report their folders separately)")
        if alone:
            draws.append(Draw(env, alone[0], tuple(members)))
    return draws


def pair_runs(runs: list[Run], baseline: str) -> list[Comparison]:
    """Every other (dataset, algorithm, bits) paired with ``baseline``'s draws.

    A row is paired at its own bit width, or with the float baseline when the baseline
    has no runs at that width; otherwise it is not compared (``baseline_bits`` None).
    """
    algorithms = sorted({run.algorithm for run in runs})
    if baseline not in algorithms:
        raise ValueError(f"baseline {baseline!r} is not among the algorithms found: "
                         f"{', '.join(algorithms)}")
    draws: dict[tuple, dict[tuple, Draw]] = defaultdict(dict)  # (dataset, algorithm, bits)
    for (dataset, algorithm, bits, env), trials in _groups(runs).items():
        for members in trials.values():
            draws[dataset, algorithm, bits].update((d.pair_key, d) for d in _draws(env, members))
    comparisons = []
    for dataset in sorted({run.dataset for run in runs}):
        rows = {key[1:]: keyed for key, keyed in draws.items() if key[0] == dataset}
        base = {bits: keyed for (algorithm, bits), keyed in rows.items() if algorithm == baseline}
        for algorithm, bits in sorted(rows, key=_row_order):
            if algorithm == baseline:
                continue
            mine = rows[algorithm, bits]
            base_bits = bits if bits in base else FLOAT_BITS if FLOAT_BITS in base else None
            theirs = base.get(base_bits, {})
            pairs = [(mine[key], theirs[key]) for key in mine if key in theirs]
            unpaired = [draw for key, draw in mine.items() if key not in theirs]
            if base_bits is not None:
                unpaired += [draw for key, draw in theirs.items() if key not in mine]
            comparisons.append(Comparison(dataset, algorithm, bits, baseline, base_bits, pairs,
                                          unpaired))
    return comparisons


def _difference(method: SelectionMethod, pairs: list[tuple[Draw, Draw]]) -> Difference:
    accs = [(method.run_acc(draw.records), method.run_acc(base.records)) for draw, base in pairs]
    return Difference(tuple(a[1] - b[1] for a, b in accs if a is not None and b is not None),
                      any(not draw.complete for pair in pairs for draw in pair))


def paired_tables(comparisons: list[Comparison], selection: str) -> list[Table]:
    """One table per dataset with pairs: rows the compared (algorithm, bits), columns the
    test domains paired, then "All" pooling every pair of the row."""
    method = SELECTION_METHODS[selection]
    tables = []
    for dataset in sorted({c.dataset for c in comparisons}):
        mine = [c for c in comparisons if c.dataset == dataset and c.baseline_bits is not None]
        draws = [draw for c in mine for draw, _ in c.pairs]
        if not draws:
            continue
        columns = sorted({draw.test_env for draw in draws})
        rows = [[Label(c.algorithm, "algorithm"), Label(str(c.bits), "bits"),
                 Label(str(c.baseline_bits), "baseline_bits"),
                 *(_difference(method, [p for p in c.pairs if p[0].test_env == env])
                   for env in columns), _difference(method, c.pairs)]
                for c in mine]
        names = [draws[0].alone.domains[env] for env in columns]
        baseline = mine[0].baseline
        tables.append(Table(f"{dataset}: paired difference to {baseline}, {method.name}",
                            {"selection": selection, "dataset": dataset, "baseline": baseline},
                            ["Algorithm", "Bits", f"{baseline} bits", *names, "All"], rows))
    return tables


def _notes(runs: list[Run], selections: list[str]) -> list[str]:
    n_incomplete = sum(not run.complete for run in runs)
    notes = [f"{len(runs)} runs ({n_incomplete} without a `{DONE}` file, marked *).",
             "Test-domain accuracy (%), mean ± standard error over trial seeds "
             "(numpy std with ddof=0 / sqrt(n), as DomainBed; no error shown for one seed). "
             "Avg: mean over the columns per trial seed, over the seeds that cover every "
             "column. As DomainBed, only runs with one test domain are scored."]
    if "leave-one-out" in selections and not any(len(run.test_envs) == 2 for run in runs):
        notes.append("Leave-one-domain-out cross-validation scores a domain only with runs "
                     "holding it out together with each other domain (--test-envs i j); "
                     "there are none here.")
    return notes


def _pairing_notes(comparisons: list[Comparison]) -> list[str]:
    """The rows not compared and the runs left without a partner: nothing dropped silently."""
    notes = []
    for c in comparisons:
        name = f"{c.dataset}: {c.algorithm} {c.bits}-bit"
        if c.baseline_bits is None:
            notes.append(f"{name} not compared: {c.baseline} has no {c.bits}-bit and no float "
                         f"runs ({len(c.unpaired)} runs).")
        elif c.unpaired:
            notes.append(f"{name} vs {c.baseline} {c.baseline_bits}-bit: {len(c.unpaired)} "
                         f"unpaired runs: " + "; ".join(d.alone.describe() for d in c.unpaired))
    return notes


def _paired_notes(runs: list[Run], comparisons: list[Comparison]) -> list[str]:
    return [_notes(runs, [])[0],
            "Paired difference in test-domain accuracy (points), algorithm − baseline, over "
            "the runs sharing test domains, trial seed and hparams seed; each run's checkpoint "
            "chosen by the selection method, no choice among hyperparameter draws. A row is "
            "paired at its own bit width, else with a float baseline. Cell: mean ± standard "
            "error (sample std with ddof=1 / sqrt(n); none for one pair) (pairs: wins/ties/"
            "losses). All: every pair of the row pooled.",
            *(f"- {note}" for note in _pairing_notes(comparisons))]


def _same(text: str) -> str:
    return text


def _latex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&") \
        .replace("%", r"\%").replace("#", r"\#")


MARKDOWN = Style(pm="±", missing="–", escape=_same)
LATEX = Style(pm=r"$\pm$", missing="--", escape=_latex_escape)


def _markdown(notes: list[str], tables: list[Table]) -> str:
    out = [*notes, ""]
    for table in tables:
        out += [f"### {table.title}", "", "| " + " | ".join(table.header) + " |",
                "|" + "---|" * len(table.header)]
        out += ["| " + " | ".join(cell.text(MARKDOWN) for cell in row) + " |"
                for row in table.rows]
        out.append("")
    return "\n".join(out)


def _latex(notes: list[str], tables: list[Table]) -> str:
    out = ["% " + note for note in notes]
    for table in tables:
        out += ["", f"% {table.title}",
                r"\begin{tabular}{ll" + "c" * (len(table.header) - 2) + "}", r"\toprule",
                " & ".join(map(_latex_escape, table.header)) + r" \\", r"\midrule"]
        out += [" & ".join(cell.text(LATEX) for cell in row) + r" \\" for row in table.rows]
        out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def _csv(header: Sequence[str], tables: list[Table]) -> str:
    """Long format, one line per statistic cell: easy to pivot; numbers unrounded beyond 1e-4."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(line for table in tables for line in table.csv_lines())
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _selections(selection: str) -> list[str]:
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    return list(SELECTION_METHODS) if selection == "all" else [selection]


def report(dirs: Sequence[str | Path], fmt: str = "markdown", selection: str = "training",
           paired: str | None = None) -> str:
    """The tables of every run below ``dirs``, as markdown, CSV or LaTeX text.

    With ``paired`` (a baseline algorithm) the paired-difference tables replace the
    accuracy tables; CSV has no notes, so its unpaired runs are reported as warnings.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    names = _selections(selection)
    runs = load_runs(dirs)
    if paired is None:
        tables: list = [table for name in names for table in build_tables(runs, name)]
        header, notes = ACCURACY_CSV, _notes(runs, names)
    else:
        comparisons = pair_runs(runs, paired)
        tables = [table for name in names for table in paired_tables(comparisons, name)]
        header, notes = PAIRED_CSV, _paired_notes(runs, comparisons)
        if fmt == "csv":
            for note in _pairing_notes(comparisons):
                warnings.warn(note, stacklevel=2)
    if fmt == "csv":
        return _csv(header, tables)
    return _latex(notes, tables) if fmt == "latex" else _markdown(notes, tables)
