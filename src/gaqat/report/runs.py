"""The runs the report reads: one per ``results.jsonl``, gaqat's or DomainBed's, checked.

A run's table row is (algorithm, bit width). A gaqat QAT record names its bit width
twice: in ``args.bits`` and in ``args.algorithm`` (``lsq_sagm_w4``, so that DomainBed's
tools, which group by that name alone, keep bit widths apart); the row is named without
the ``_w4``. Records of older gaqat versions (``lsq_sagm`` with ``args.bits`` 4) read the
same. A record without ``args.bits`` (a float run, or any of DomainBed's own) is 32-bit.
Domain names come from ``args.domains``; DomainBed's records have none, so they come
from gaqat's registry for the datasets it knows (``PACS``, ``VLCS``, ...), else ``env0``,
``env1``, ... So a gaqat sweep and a DomainBed sweep can share one table.

A run folder without a ``done`` file (killed or still running) is read and marked
incomplete. A torn last line (a run killed while writing) is skipped with a warning. A
run with any other bad line (a field missing or of the wrong type, an accuracy outside
[0, 1] or NaN) is skipped, with a :class:`SkippedRunWarning` naming the file, line and
field (:mod:`gaqat.fields`): the whole run, not the line, because selection picks one of
its checkpoints, and picking among the ones left would report a number the run never had.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gaqat.fields import check_fields, is_a
from gaqat.names import DATASETS, canonical_dataset
from gaqat.runfolder import DONE, RESULTS, read_jsonl
from gaqat.selection import count_domains

FLOAT_BITS = 32
# The fields every record needs: its checkpoint and the args DomainBed's scripts read.
_FIELDS = {
    "step": int,
    "args": dict,
    "args.dataset": str,
    "args.algorithm": str,
    "args.test_envs": list,
    "args.trial_seed": int,
    "args.hparams_seed": int,
}


class SkippedRunWarning(RuntimeWarning):
    """A run left out of the report because its results file is corrupt (shown even
    with ``--quiet``: the tables lack it)."""


@dataclass(frozen=True)
class Run:
    """One ``results.jsonl``: its records and what every one of them shares."""

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
        return (
            f"{self.algorithm} {self.bits}-bit, test {envs}, trial {self.trial_seed}, "
            f"hparams {self.hparams_seed} ({self.path.parent})"
        )


def same_draw(run: Run) -> str:
    """What two runs of one draw holding out the same domains are, in messages."""
    return (
        f"two {run.algorithm} {run.bits}-bit runs with the same test domains, trial seed "
        f"and hparams seed"
    )


def _check_record(record: object, where: str) -> dict:
    """The record if it has every field the report reads, else an error naming the field."""
    check_fields(record, _FIELDS, where)
    args = record["args"]
    if args.get("bits") is not None:  # None (or absent): a float run
        check_fields(record, {"args.bits": int}, where)
    n = _domain_count(record, where)
    if not all(is_a(e, int) and 0 <= e < n for e in args["test_envs"]):
        raise ValueError(
            f"{where}: args.test_envs {args['test_envs']} are not domain indices 0..{n - 1}"
        )
    accuracies = [f"env{i}_{split}_acc" for i in range(n) for split in ("in", "out")]
    check_fields(record, dict.fromkeys(accuracies, float), where)
    for key in accuracies:
        if not 0 <= record[key] <= 1:  # NaN too
            raise ValueError(
                f"{where}: field {key!r} is {record[key]}, expected an accuracy from 0 to 1"
            )
    return record


def _domain_count(record: dict, where: str) -> int:
    """The domains a record's accuracies cover: its ``args.domains`` (gaqat's), else
    as many as its keys name (DomainBed's records have no names)."""
    domains = record["args"].get("domains")
    if domains is None:
        return count_domains(record)
    if not (isinstance(domains, list) and domains and all(isinstance(d, str) for d in domains)):
        raise ValueError(
            f"{where}: field 'args.domains' is {domains!r}, expected a list of domain names"
        )
    return len(domains)


def _run_key(record: dict) -> tuple:
    """What every record of one run shares."""
    args = record["args"]
    return (
        args["dataset"],
        args["algorithm"],
        args.get("bits"),
        tuple(args["test_envs"]),
        args["trial_seed"],
        args["hparams_seed"],
        tuple(args.get("domains", ())),
    )


def _row_name(args: dict) -> tuple[str, int]:
    """(algorithm, bits) of a record: ``lsq_sagm_w4`` with bits 4 is row (lsq_sagm, 4)."""
    bits = args.get("bits")
    if bits is None:
        return args["algorithm"], FLOAT_BITS
    return args["algorithm"].removesuffix(f"_w{bits}"), bits


def _known_domains(dataset: str, n: int, path: Path) -> tuple[str, ...]:
    """Domain names for records that carry none (DomainBed's): gaqat's, for a dataset it
    knows (``gaqat.names``), else ``env0``, ``env1``, ..."""
    domains = DATASETS.get(canonical_dataset(dataset))
    if domains is None:
        return tuple(f"env{i}" for i in range(n))
    if len(domains) != n:
        raise ValueError(
            f"{path}: {dataset}: records have {n} domains, gaqat's {dataset} has "
            f"{len(domains)} ({', '.join(domains)})"
        )
    return domains


def load_run(path: Path) -> Run | None:
    """One run from its ``results.jsonl``; None (with a warning) when it holds no record."""
    records: list[dict] = []
    for where, record in read_jsonl(path):
        records.append(_check_record(record, where))
        if _run_key(record) != _run_key(records[0]):
            raise ValueError(
                f"{where}: args (dataset, algorithm, bits, test_envs, seeds, domains) "
                f"differ from line 1's; one results.jsonl must hold one run"
            )
    if not records:
        warnings.warn(f"{path}: no records, skipped", stacklevel=2)
        return None
    args = records[0]["args"]
    algorithm, bits = _row_name(args)
    domains = (
        tuple(args["domains"])
        if "domains" in args
        else _known_domains(args["dataset"], count_domains(records[0]), path)
    )
    return Run(
        path=path,
        records=records,
        complete=(path.parent / DONE).exists(),
        dataset=args["dataset"],
        algorithm=algorithm,
        bits=bits,
        test_envs=tuple(args["test_envs"]),
        trial_seed=args["trial_seed"],
        hparams_seed=args["hparams_seed"],
        domains=domains,
    )


def _read_runs(paths: Sequence[Path], below: str) -> list[Run]:
    """The runs of ``paths``. A corrupt one is skipped with a warning, so that it does not
    keep the others from the report; none left is an error that says why (the warnings of
    a failed command may go unseen)."""
    runs, skipped = [], []
    for path in paths:
        try:
            run = load_run(path)
        except ValueError as error:
            warnings.warn(f"{error}; run skipped", SkippedRunWarning, stacklevel=3)
            skipped.append(str(error))
            continue
        if run is None:
            skipped.append(f"{path}: no records")
        else:
            runs.append(run)
    if not runs:
        more = f" (and {len(skipped) - 1} more skipped)" if len(skipped) > 1 else ""
        raise ValueError(f"no readable run with records below {below}: {skipped[0]}{more}")
    return runs


def _results_below(folder: Path) -> list[Path]:
    """Every ``results.jsonl`` below ``folder``, following symbolic links: a sweep may
    link the runs it shares with another (its float inits) instead of training them again."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        if RESULTS in files:
            found.append(Path(root) / RESULTS)
    return found


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every run whose ``results.jsonl`` lies below one of ``dirs`` (each file once).

    A corrupt run is skipped with a :class:`SkippedRunWarning`. A dataset's runs must
    agree on its domains. Two runs of one draw holding out the same domains are kept, with
    a warning: their records are pooled as DomainBed pools them.
    """
    paths: dict[Path, None] = {}
    for d in map(Path, dirs):
        if d.is_file():
            raise FileNotFoundError(f"{d} is a file; give the folder that holds it: {d.parent}")
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such folder")
        paths.update(dict.fromkeys(p.resolve() for p in _results_below(d)))
    if not paths:
        raise FileNotFoundError(f"no {RESULTS} below {', '.join(map(str, dirs))}")
    runs = _read_runs(list(paths), ", ".join(map(str, dirs)))
    domains: dict[str, Run] = {}
    draws: dict[tuple, Run] = {}
    for run in runs:
        first = domains.setdefault(run.dataset, run)
        if run.domains != first.domains:
            raise ValueError(
                f"dataset {run.dataset}: {first.path} has domains "
                f"{list(first.domains)} "
                f"but {run.path} has {list(run.domains)}"
            )
        other = draws.setdefault(
            (run.dataset, run.algorithm, run.bits, run.test_envs, run.trial_seed, run.hparams_seed),
            run,
        )
        if other is not run:
            warnings.warn(
                f"{other.path} and {run.path}: {same_draw(run)}; their records are "
                f"pooled as one draw, as DomainBed's tools pool them",
                stacklevel=2,
            )
    return runs
