"""Model selection: which checkpoint of a run, and which run of a sweep, is reported.

The definitions are DomainBed's (``domainbed/model_selection.py``):

- training-domain validation (DomainBed's ``IIDAccuracySelectionMethod``): the
  checkpoint with the highest mean ``out`` (held-out 20%) accuracy over the training
  domains; its test domain's ``in`` accuracy is reported.
- test-domain validation, the oracle (``OracleSelectionMethod``): no early stopping,
  the *last* checkpoint of each run; its validation accuracy is the test domain's
  ``out`` accuracy (used only to choose among hyperparameter draws), and the test
  domain's ``in`` accuracy is reported. It looks at the test domain, so it is an upper
  bound, never a result to claim.

Across the runs of one sweep cell (same dataset, algorithm, test domains, trial seed;
different hyperparameter draws) both pick the run with the highest validation accuracy.
Ties go to the earliest checkpoint and the first run.

DomainBed scores only runs with one test domain. A run with several test domains is
scored here with the mean of their accuracies (for one test domain this is exactly
DomainBed's number); a run with none has nothing to report and is left out (None).
"""

from __future__ import annotations

import itertools

import numpy as np


def _n_envs(record: dict) -> int:
    """Domains in a record, counted from its ``env{i}_out_acc`` keys as DomainBed does."""
    return next(i for i in itertools.count() if f"env{i}_out_acc" not in record)


def _mean_acc(record: dict, envs: list[int], split: str) -> float:
    return float(np.mean([record[f"env{i}_{split}_acc"] for i in envs]))


class SelectionMethod:
    """A strategy from one run's records (one per checkpoint) to (val_acc, test_acc)."""

    name: str

    def run_acc(self, records: list[dict]) -> tuple[float, float] | None:
        """The chosen checkpoint's accuracies; None for a run without records or test domain."""
        if not records or not records[0]["args"]["test_envs"]:
            return None
        return self._pick(records, list(records[0]["args"]["test_envs"]))

    def _pick(self, records: list[dict], test_envs: list[int]) -> tuple[float, float]:
        """(val_acc, test_acc) of the checkpoint this strategy chooses."""
        raise NotImplementedError

    def sweep_acc(self, runs: list[list[dict]]) -> tuple[float, float] | None:
        """The (val_acc, test_acc) of the run with the best validation accuracy, or None."""
        scored = [acc for acc in map(self.run_acc, runs) if acc is not None]
        return max(scored, key=lambda acc: acc[0]) if scored else None


class TrainingDomainValidation(SelectionMethod):
    name = "training-domain validation set"

    def _pick(self, records: list[dict], test_envs: list[int]) -> tuple[float, float]:
        train_envs = [i for i in range(_n_envs(records[0])) if i not in test_envs]
        best = max(records, key=lambda r: _mean_acc(r, train_envs, "out"))
        return _mean_acc(best, train_envs, "out"), _mean_acc(best, test_envs, "in")


class OracleSelection(SelectionMethod):
    name = "test-domain validation set (oracle)"

    def _pick(self, records: list[dict], test_envs: list[int]) -> tuple[float, float]:
        last = max(records, key=lambda r: r["step"])
        return _mean_acc(last, test_envs, "out"), _mean_acc(last, test_envs, "in")


SELECTION_METHODS: dict[str, SelectionMethod] = {
    "training": TrainingDomainValidation(),
    "oracle": OracleSelection(),
}
