"""Model selection: which checkpoint of a run, and which hyperparameter draw of a sweep,
is reported.

The rules are DomainBed's (``domainbed/model_selection.py``), on plain lists of records.
A *group* is what DomainBed's ``collect_results`` groups: the records of one dataset,
algorithm and trial seed whose run holds out the group's test domain, alone or with other
domains (a run with two test domains is in the group of each). A *draw* is the part of a
group that shares ``args.hparams_seed``.

- training-domain validation (``IIDAccuracySelectionMethod``): among the records of
  runs holding out the test domain alone, the checkpoint with the highest mean ``out``
  (held-out 20%) accuracy over every other domain; its test domain's ``in`` accuracy.
- leave-one-domain-out cross-validation (``LeaveOneOutSelectionMethod``): at each step,
  every other domain j is scored by the ``in`` accuracy on j of the run holding out the
  test domain and j; the step with the best mean over the other domains is chosen, and
  the run holding out the test domain alone gives its test accuracy. A step without that
  run, or without a run for every other domain, is skipped.
- test-domain validation, the oracle (``OracleSelectionMethod``): no early stopping, the
  *last* checkpoint of the run holding out the test domain alone; its test domain's
  ``out`` accuracy chooses among draws, its ``in`` accuracy is reported. It looks at the
  test domain, so it is an upper bound, never a result to claim.

A run that averages its weights (SWA, SWAD: ``gaqat.averaging``) reports its averaged
network: its records include one flagged ``"averaged": true`` at the last step, and every
method scores that record alone, in place of the run's checkpoints (DomainBed's own tools,
which know no flag, take it as one more record of the last step).

A group reports the draw with the highest validation accuracy. Ties, as DomainBed breaks
them: within a draw the earliest checkpoint (the oracle: the last record of the last
step); among draws the higher hparams seed (DomainBed sorts draws by hparams seed, then
stably by validation accuracy, and takes the last).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable

import numpy as np

Accs = tuple[float, float]  # (validation accuracy, test accuracy)


def count_domains(record: dict) -> int:
    """Domains in a record, counted from its ``env{i}_out_acc`` keys as DomainBed does."""
    return next(i for i in itertools.count() if f"env{i}_out_acc" not in record)


def _alone(records: list[dict]) -> list[dict]:
    """The records of runs holding out a single domain: the only ones scored."""
    return [r for r in records if len(r["args"]["test_envs"]) == 1]


def _reported(records: list[dict]) -> list[dict]:
    """The records that stand for their runs: the averaged ones where there are any."""
    averaged = [r for r in records if r.get("averaged")]
    return averaged or records


def _grouped(records: list[dict], key: Callable[[dict], int]) -> list[list[dict]]:
    """``records`` grouped by ``key``, in increasing key order (DomainBed's ``Q.group``)."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return [groups[k] for k in sorted(groups)]


def _best(accs: list[Accs | None]) -> Accs | None:
    """The first highest validation accuracy, or None when nothing was scored."""
    scored = [acc for acc in accs if acc is not None]
    return max(scored, key=lambda acc: acc[0]) if scored else None


class SelectionMethod:
    """A strategy from one draw's records to (val_acc, test_acc), and from a group's to the
    chosen draw's."""

    name: str

    def run_acc(self, records: list[dict]) -> Accs | None:
        """The accuracies of the checkpoint chosen among one draw's records; None when
        the draw has nothing this method can score."""
        raise NotImplementedError

    def sweep_acc(self, records: list[dict]) -> Accs | None:
        """The accuracies of the best draw among a group's records, or None."""
        draws = [
            self.run_acc(draw) for draw in _grouped(records, lambda r: r["args"]["hparams_seed"])
        ]
        return _best(draws[::-1])  # reversed: a tie goes to the higher hparams seed


class TrainingDomainValidation(SelectionMethod):
    name = "training-domain validation set"

    def run_acc(self, records: list[dict]) -> Accs | None:
        return _best([self._step_acc(r) for r in _alone(_reported(records))])

    @staticmethod
    def _step_acc(record: dict) -> Accs:
        (test,) = record["args"]["test_envs"]
        val = np.mean(
            [record[f"env{i}_out_acc"] for i in range(count_domains(record)) if i != test]
        )
        return float(val), record[f"env{test}_in_acc"]


class LeaveOneDomainOut(SelectionMethod):
    name = "leave-one-domain-out cross-validation"

    def run_acc(self, records: list[dict]) -> Accs | None:
        steps = _grouped(_reported(records), lambda r: r["step"])
        return _best([self._step_acc(step) for step in steps])

    @staticmethod
    def _step_acc(records: list[dict]) -> Accs | None:
        """The accuracies of one step, from the records of every run of the draw."""
        alone = _alone(records)
        if len(alone) != 1:
            return None
        (test,) = alone[0]["args"]["test_envs"]
        val: dict[int, float] = {}
        for r in records:
            if len(r["args"]["test_envs"]) == 2:
                (other,) = set(r["args"]["test_envs"]) - {test}
                val[other] = r[f"env{other}_in_acc"]
        others = [j for j in range(count_domains(records[0])) if j != test]
        if not all(j in val for j in others):
            return None
        return float(np.sum([val[j] for j in others])) / len(others), alone[0][f"env{test}_in_acc"]


class OracleSelection(SelectionMethod):
    name = "test-domain validation set (oracle)"

    def run_acc(self, records: list[dict]) -> Accs | None:
        alone = _alone(_reported(records))
        if not alone:
            return None
        last = sorted(alone, key=lambda r: r["step"])[-1]
        (test,) = last["args"]["test_envs"]
        return last[f"env{test}_out_acc"], last[f"env{test}_in_acc"]


SELECTION_METHODS: dict[str, SelectionMethod] = {  # DomainBed's order
    "training": TrainingDomainValidation(),
    "leave-one-out": LeaveOneDomainOut(),
    "oracle": OracleSelection(),
}
