"""Runs into tables, as DomainBed's ``collect_results`` aggregates them: accuracy tables,
or paired differences to a baseline.

A *group* (dataset, algorithm, bit width, test domain, trial seed) holds every run holding
out that domain, alone or with others, and a selection method (:mod:`gaqat.selection`)
turns it, whatever its hyperparameter draws, into one test accuracy. Runs of one group
sharing an hparams seed are one *draw* to DomainBed, their records pooled.

An accuracy table has a row per (algorithm, bit width) and a column per test domain. A
cell is the mean ± standard error of the group accuracies over trial seeds, in percent,
with DomainBed's standard error: numpy's ``std`` (population, ddof=0) divided by
sqrt(n). With a single trial seed there is no error to show, so the cell shows the mean
alone. ``Avg`` averages a row's columns per trial seed, over the trial seeds that cover
every column, then takes mean ± standard error of those averages (DomainBed's
"Averages" table).

Between-seed noise can be as large as the effects studied, so a paired table reports
paired differences instead: each draw against the baseline's draw sharing its dataset,
test domain, trial seed and hyperparameter seed (same init, data split, batches and
shared hyperparameters), each side's checkpoint chosen by the selection method. There is
no choice among hyperparameter draws: every draw is a pair of its own. A row is paired
with the baseline at its own bit width or, when the baseline has none there (a float
baseline such as ``erm``), with the baseline's float runs; a float row is never compared
with a quantized baseline. A cell is the mean difference ± its standard error with the
sample std (ddof=1, the paired t-test's) and the wins/ties/losses of the algorithm.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gaqat.corruptions import load_corruptions
from gaqat.names import ALGORITHMS
from gaqat.report.runs import FLOAT_BITS, Run, same_draw
from gaqat.report.table import Cell, Difference, Label, Mean, Table
from gaqat.runfolder import DONE
from gaqat.selection import SELECTION_METHODS, SelectionMethod

# The CSV columns of each kind of table: its keys, its rows' labels, "domain", its cells'.
ACCURACY_CSV = (
    "selection",
    "dataset",
    "algorithm",
    "bits",
    "domain",
    "mean",
    "stderr",
    "n",
    "incomplete",
)
PAIRED_CSV = (
    "selection",
    "dataset",
    "algorithm",
    "bits",
    "baseline",
    "baseline_bits",
    "domain",
    "mean_diff",
    "stderr",
    "n",
    "wins",
    "ties",
    "losses",
    "incomplete",
)


def _row_order(key: tuple[str, int]) -> tuple:
    """Float rows first, then by falling bit width; gaqat's methods in the order of
    ``gaqat.names.ALGORITHMS``, then any other (DomainBed's) by name."""
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


# --- accuracy tables ---------------------------------------------------------------------


def _runs(group: dict[int, list[Run]]) -> list[Run]:
    return [run for runs in group.values() for run in runs]


def _row(
    method: SelectionMethod,
    algorithm: str,
    bits: int,
    trials: int,
    columns: list[dict[int, list[Run]]],
) -> list[Cell]:
    """One table row from its groups: per column, ``{trial seed: runs}``."""
    per_column = [
        {
            trial: acc[1]
            for trial, runs in sorted(group.items())
            if (acc := method.sweep_acc(_records(runs))) is not None
        }
        for group in columns
    ]
    return _mean_row(algorithm, bits, trials, per_column, columns)


def _mean_row(
    algorithm: str,
    bits: int,
    trials: int,
    per_column: list[dict[int, float]],
    columns: list[dict[int, list[Run]]],
) -> list[Cell]:
    """A row's cells from its accuracies per column and trial seed, then their Avg."""
    cells = [
        Mean(tuple(accs.values()), not all(run.complete for run in _runs(group)))
        for accs, group in zip(per_column, columns)
    ]
    covering = set.intersection(*(set(accs) for accs in per_column)) if columns else set()
    averages = tuple(float(np.mean([accs[t] for accs in per_column])) for t in sorted(covering))
    cells.append(Mean(averages, any(cell.incomplete for cell in cells)))
    return [Label(algorithm, "algorithm"), Label(str(bits), "bits"), *cells, Label(str(trials))]


def accuracy_tables(runs: list[Run], selection: str) -> list[Table]:
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
            rows.append(
                _row(method, *key, trials, [groups[(dataset, *key, env)] for env in columns])
            )
        names = [mine[0].domains[env] for env in columns]
        tables.append(
            Table(
                f"{dataset}: {method.name}",
                {"selection": selection, "dataset": dataset},
                ["Algorithm", "Bits", *names, "Avg", "Trials"],
                rows,
            )
        )
    return tables


def accuracy_notes(runs: list[Run], selections: list[str]) -> list[str]:
    """What the accuracy tables show, and why a method scored nothing."""
    n_incomplete = sum(not run.complete for run in runs)
    notes = [
        f"{len(runs)} runs ({n_incomplete} without a `{DONE}` file, marked *).",
        (
            "Test-domain accuracy (%), mean ± standard error over trial seeds "
            "(numpy std with ddof=0 / sqrt(n), as DomainBed; no error shown for one seed). "
            "Avg: mean over the columns per trial seed, over the seeds that cover every "
            "column. As DomainBed, only runs with one test domain are scored."
        ),
    ]
    if "leave-one-out" in selections and not any(len(run.test_envs) == 2 for run in runs):
        notes.append(
            "Leave-one-domain-out cross-validation scores a domain only with runs "
            "holding it out together with each other domain (--test-envs i j); "
            "there are none here."
        )
    return notes


def ensemble_notes(runs: list[Run]) -> list[str]:
    """The size of each ensemble row (``gaqat ensemble``), which a table of accuracies
    cannot show: its members' bytes together against one float32 model's."""
    sizes = {}
    for run in runs:
        about = run.records[-1].get("ensemble", {}) if run.records else {}
        if "ensemble_bytes" in about:
            sizes[(run.algorithm, run.bits)] = about
    return [
        f"{name} at {bits} bits: {s['members']} members, {s['ensemble_bytes']:,} bytes, "
        f"{s['ensemble_bytes'] / s['float_bytes']:.2f}× one float model "
        f"({s['float_bytes']:,} bytes)."
        for (name, bits), s in sorted(sizes.items())
    ]


def corruption_tables(runs: list[Run]) -> list[Table]:
    """Mean corrupted held-out accuracy (``gaqat corrupt``'s ``corruptions.jsonl``), grouped
    as :func:`accuracy_tables` groups runs: a row per (algorithm, bits), a column per test
    domain held out alone, mean ± standard error over trial seeds (several hparams draws of
    one seed averaged: their files score the last checkpoint, which no selection picks).
    Runs without the file are left out; a file that cannot be read, with a warning."""
    results = {}
    for run in runs:
        try:
            result = load_corruptions(run.path.parent)
        except ValueError as error:
            warnings.warn(f"{error}; left out of the corrupted accuracy", stacklevel=2)
            continue
        if result is not None:
            results[run.path] = result
    tables = []
    groups = _groups([run for run in runs if run.path in results])
    for dataset in sorted({run.dataset for run in runs if run.path in results}):
        mine = [run for run in runs if run.dataset == dataset]
        columns = sorted({run.test_envs[0] for run in mine if len(run.test_envs) == 1})
        keys = {(run.algorithm, run.bits) for run in mine if run.path in results}
        rows = []
        for key in sorted(keys, key=_row_order):
            cells = [groups.get((dataset, *key, env), {}) for env in columns]
            per_column = [
                {
                    trial: float(np.mean(accs))
                    for trial, members in sorted(group.items())
                    if (
                        accs := [
                            results[run.path].domain_mean_accuracy(env)
                            for run in members
                            if run.test_envs == (env,)
                        ]
                    )
                }
                for env, group in zip(columns, cells)
            ]
            trials = len(set().union(*per_column))
            rows.append(_mean_row(*key, trials, per_column, cells))
        tables.append(
            Table(
                f"{dataset}: corrupted held-out accuracy",
                {"selection": "corrupted", "dataset": dataset},
                ["Algorithm", "Bits", *(mine[0].domains[env] for env in columns), "Avg", "Trials"],
                rows,
            )
        )
    return tables


def corruption_note(tables: list[Table]) -> list[str]:
    """What the corrupted-accuracy tables show, when there are some."""
    if not tables:
        return []
    return [
        "Corrupted held-out accuracy (%): each run's last checkpoint (not the one selected), "
        "mean over the corruptions × severities of its corruptions.jsonl (`gaqat corrupt`; "
        "compare runs evaluated on the same ones), mean ± standard error over trial seeds."
    ]


# --- paired differences ------------------------------------------------------------------


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


def _draws(env: int, runs: list[Run]) -> list[Draw]:
    """A group's draws that have a run holding out ``env`` alone (the others score nothing)."""
    by_seed: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_seed[run.hparams_seed].append(run)
    draws = []
    for members in by_seed.values():
        alone = [run for run in members if len(run.test_envs) == 1]
        if len(alone) > 1:
            raise ValueError(
                f"{alone[0].path} and {alone[1].path}: {same_draw(alone[0])}; "
                f"a paired comparison needs one (report their folders separately)"
            )
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
        raise ValueError(
            f"baseline {baseline!r} is not among the algorithms found: {', '.join(algorithms)}"
        )
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
            comparisons.append(
                Comparison(dataset, algorithm, bits, baseline, base_bits, pairs, unpaired)
            )
    return comparisons


def _difference(method: SelectionMethod, pairs: list[tuple[Draw, Draw]]) -> Difference:
    accs = [(method.run_acc(draw.records), method.run_acc(base.records)) for draw, base in pairs]
    return Difference(
        tuple(a[1] - b[1] for a, b in accs if a is not None and b is not None),
        any(not draw.complete for pair in pairs for draw in pair),
    )


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
        rows = [
            [
                Label(c.algorithm, "algorithm"),
                Label(str(c.bits), "bits"),
                Label(str(c.baseline_bits), "baseline_bits"),
                *(
                    _difference(method, [p for p in c.pairs if p[0].test_env == env])
                    for env in columns
                ),
                _difference(method, c.pairs),
            ]
            for c in mine
        ]
        names = [draws[0].alone.domains[env] for env in columns]
        baseline = mine[0].baseline
        tables.append(
            Table(
                f"{dataset}: paired difference to {baseline}, {method.name}",
                {"selection": selection, "dataset": dataset, "baseline": baseline},
                ["Algorithm", "Bits", f"{baseline} bits", *names, "All"],
                rows,
            )
        )
    return tables


def pairing_notes(comparisons: list[Comparison]) -> list[str]:
    """The rows not compared and the runs left without a partner: nothing dropped silently."""
    notes = []
    for c in comparisons:
        name = f"{c.dataset}: {c.algorithm} {c.bits}-bit"
        if c.baseline_bits is None:
            notes.append(
                f"{name} not compared: {c.baseline} has no {c.bits}-bit and no float "
                f"runs ({len(c.unpaired)} runs)."
            )
        elif c.unpaired:
            notes.append(
                f"{name} vs {c.baseline} {c.baseline_bits}-bit: {len(c.unpaired)} "
                f"unpaired runs: " + "; ".join(d.alone.describe() for d in c.unpaired)
            )
    return notes


def paired_notes(runs: list[Run], comparisons: list[Comparison]) -> list[str]:
    """What the paired tables show, and what was left out of them."""
    return [
        accuracy_notes(runs, [])[0],
        (
            "Paired difference in test-domain accuracy (points), algorithm − baseline, over "
            "the runs sharing test domains, trial seed and hparams seed; each run's "
            "checkpoint chosen by the selection method, no choice among hyperparameter "
            "draws. A row is paired at its own bit width, else with a float baseline. Cell: "
            "mean ± standard error (sample std with ddof=1 / sqrt(n); none for one pair) "
            "(pairs: wins/ties/losses). All: every pair of the row pooled."
        ),
        *(f"- {note}" for note in pairing_notes(comparisons)),
    ]
