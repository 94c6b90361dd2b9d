"""EoQ's ensembles in a study: per method, bit width and held-out domain, the runs that
differ only by trial seed evaluated as one model (``gaqat ensemble``), each paired with
the mean of its own members.

A study lists its runs per (method, bits); :func:`ensemble_jobs` says which ensembles
those runs make, :func:`build_ensembles` builds the missing ones and
:func:`ensemble_gains` reads them. The members' accuracies are the ones the ensemble's
own evaluation recorded (``member_accs``): the same code and splits as the ensemble's,
whatever code evaluated their runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from gaqat.ensemble import build_ensemble, ensemble_name
from gaqat.report.runs import load_runs
from gaqat.report.table import Difference
from gaqat.runfolder import RESULTS, read_jsonl, run_state
from gaqat.selection import SELECTION_METHODS


class EnsembleJob(NamedTuple):
    method: str
    key: tuple[int, int]  # (bits, held-out domain): how a study pairs it
    members: list[Path]
    folder: Path


def selected(folders) -> dict[tuple[int, int, int], float]:
    """Held-out accuracy (training-domain validation) of the finished runs among
    ``folders``, by (bits, held-out domain, trial seed)."""
    method, folders = SELECTION_METHODS["training"], list(folders)
    runs = load_runs(folders) if folders else []
    return {
        (run.bits, run.test_envs[0], run.trial_seed): method.run_acc(run.records)[1]
        for run in runs
        if run.complete
    }


def paired_difference(a: dict, b: dict) -> Difference:
    """a − b over the keys both have: the same bits, held-out domain and seed."""
    return Difference(tuple(a[k] - b[k] for k in a if k in b), False)


def by_draw(folders) -> dict[tuple[int, int], object]:
    """Finished runs keyed by (held-out domain, trial seed); none for no folders."""
    folders = list(folders)
    runs = load_runs(folders) if folders else []
    return {(run.test_envs[0], run.trial_seed): run for run in runs if run.complete}


def ensemble_jobs(
    runs: dict[tuple[str, int], list[Path]], out: Path, test_envs, seeds
) -> list[EnsembleJob]:
    """The ensembles of ``seeds`` that ``runs`` (run folders per (method, bits)) make: one
    per (method, bits, held-out domain of ``test_envs``) whose runs of every seed have
    finished, in ``out/ensK_<method>_w<bits>_env<domain>``."""
    jobs = []
    for (method, bits), folders in runs.items():
        finished = by_draw(folders)
        for env in test_envs:
            if all((env, seed) in finished for seed in seeds):
                members = [finished[env, seed].path.parent for seed in seeds]
                name = f"{ensemble_name(f'{method}_w{bits}', len(seeds))}_env{env}"
                jobs.append(EnsembleJob(method, (bits, env), members, out / name))
    return jobs


def build_ensembles(jobs: list[EnsembleJob], data_dir=None, device=None) -> None:
    """Build every ensemble of ``jobs`` that has not finished (an unfinished one again)."""
    for job in jobs:
        if run_state(job.folder) != "done":
            print(f"== {job.folder}", flush=True)
            options = {"data_dir": data_dir, "device": device, "overwrite": True}
            build_ensemble(job.members, job.folder, **options)


def ensemble_gains(jobs: list[EnsembleJob]) -> dict[str, dict]:
    """Per method with finished ensembles, ``ensK_<method> − <method>``: the ensemble's
    held-out accuracy (training-domain validation) − the mean of its members', paired by
    (bits, held-out domain), as ``Difference.stats``, with ``size_vs_float``, the
    ensemble's bytes against one float model's per bit width."""
    ensembles, singles, sizes, k = {}, {}, {}, {}
    for job in jobs:
        if run_state(job.folder) != "done":
            continue
        (accuracy,) = selected([job.folder]).values()
        about = [record for _, record in read_jsonl(job.folder / RESULTS)][-1]["ensemble"]
        ensembles.setdefault(job.method, {})[job.key] = accuracy
        held_out = about["member_accs"][f"env{job.key[1]}_in_acc"]
        singles.setdefault(job.method, {})[job.key] = float(np.mean(held_out))
        ratio = about["ensemble_bytes"] / about["float_bytes"]
        sizes.setdefault(job.method, {})[str(job.key[0])] = ratio
        k[job.method] = len(job.members)
    return {
        f"ens{k[m]}_{m} − {m}": {
            **paired_difference(ensembles[m], singles[m]).stats(),
            "size_vs_float": sizes[m],
        }
        for m in ensembles
    }


def size_lines(head: dict[str, dict]) -> list[str]:
    """Under a comparison table, the size of each ensemble in it (per bit width where it
    has several)."""
    sizes = [
        f"`{n.split(' − ')[0]}`: {_ratios(r['size_vs_float'])}"
        for n, r in head.items()
        if "size_vs_float" in r
    ]
    return ["", f"Ensemble size against one float model: {', '.join(sizes)}."] if sizes else []


def _ratios(by_bits: dict[str, float]) -> str:
    if len(by_bits) == 1:
        return f"{next(iter(by_bits.values())):.2f}×"
    return " / ".join(f"{r:.2f}× at {b} bits" for b, r in by_bits.items())
