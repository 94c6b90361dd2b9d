"""Sweeps: every (algorithm, bits, held-out domain, trial seed, hparams seed) as one run.

As DomainBed's sweep, each job's folder is named by a hash of its arguments, so
launching the same sweep again is idempotent: a finished folder is kept, an unfinished
one resumed, a new one started; a job's identity never depends on which sweep asked
for it. Unlike DomainBed, QAT runs start from a float checkpoint: every QAT job gets
the ``erm`` run of its (held-out domain, trial seed) as ``init``, added to the sweep if
not asked for, so the QAT methods of one pair share init, seed and batches and their
difference is a paired comparison (STUDY.md, "Accuracy and noise").
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from gaqat import hparams as hparams_registry
from gaqat.algorithms import ALGORITHMS, get_recipe
from gaqat.data import dataset_domains
from gaqat.quant import BITS_RANGE
from gaqat.report import report
from gaqat.runfolder import CHECKPOINT, STATES, run_state
from gaqat.train import TrainConfig, run

FLOAT_INIT = "erm"  # the float method every QAT job starts from
SWEEP_RECORD = "sweep.json"
HASH_CHARS = 8


@dataclass(frozen=True)
class Job:
    """One run of a sweep; ``needs`` is the folder of the float run it starts from."""

    config: TrainConfig
    key: dict          # the arguments that identify the run (hashed into its folder name)
    state: str         # "done", "incomplete" or "new" when planned
    needs: Path | None = None

    @property
    def folder(self) -> Path:
        return Path(self.config.output)


@dataclass(frozen=True)
class Outcome:
    """What ``launch`` did with a job: "kept" (finished earlier), "ran", "failed", "skipped"."""

    job: Job
    status: str
    detail: str = ""


def job_hash(key: dict) -> str:
    """A short hash of canonical JSON: equal on every machine, Python version and run."""
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_CHARS]


def test_env_indices(dataset: str, data_dir: Path | None,
                     test_envs: Sequence[str | int]) -> list[int]:
    """``["all"]`` -> every domain index; otherwise the indices, checked against the domains."""
    names = dataset_domains(dataset, data_dir)
    if [str(e) for e in test_envs] == ["all"]:
        return list(range(len(names)))
    try:
        indices = [int(e) for e in test_envs]
    except ValueError:
        raise ValueError(f"--test-envs: expected 'all' or domain indices, "
                         f"got {list(test_envs)}") from None
    bad = [i for i in indices if not 0 <= i < len(names)]
    if bad or not indices:
        listing = ", ".join(f"{i}={name}" for i, name in enumerate(names))
        raise ValueError(f"--test-envs: {bad or 'none given'} not among {dataset}'s "
                         f"domains ({listing})")
    return indices


def _overrides_for(algorithm: str, dataset: str, hparams: dict) -> dict:
    """The overrides this algorithm has keys for (``window`` means nothing to erm)."""
    known = hparams_registry.default_hparams(algorithm, dataset)
    mine = {k: v for k, v in hparams.items() if k in known}
    hparams_registry.apply_overrides(known, mine)  # wrong types fail at planning time
    return mine


def _check_overrides(algorithms: Sequence[str], dataset: str, hparams: dict) -> None:
    known = set().union(*(hparams_registry.default_hparams(a, dataset) for a in algorithms))
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(f"--hparams: unknown key(s) {', '.join(unknown)} for algorithms "
                         f"{', '.join(algorithms)}; valid keys: {', '.join(sorted(known))}")


def _prefix(key: dict) -> str:
    bits = f"_w{key['bits']}" if key["bits"] is not None else ""
    hp = f"_hp{key['hparams_seed']}" if key["hparams_seed"] else ""
    return f"{key['algorithm']}{bits}_env{key['test_envs'][0]}_seed{key['trial_seed']}{hp}"


def plan(output: Path, dataset: str, algorithms: Sequence[str], test_envs: Sequence[int], *,
         bits: Sequence[int] = (4,), seeds: Sequence[int] = (0,),
         hparams_seeds: Sequence[int] = (0,), steps: int | None = None,
         checkpoint_freq: int | None = None, hparams: dict | None = None,
         data_dir: Path | None = None) -> list[Job]:
    """The sweep's jobs, float runs before the QAT runs that start from them.

    Jobs come grouped by (trial seed, held-out domain), so a sweep stopped halfway has
    whole pairs. Repeated combinations are one job. Reads nothing but job states.
    """
    output, hparams = Path(output), dict(hparams or {})
    if not algorithms:
        raise ValueError("--algorithms: give at least one of " + ", ".join(ALGORITHMS))
    quantized = [a for a in algorithms if get_recipe(a).quantized]
    if quantized and (not bits or not all(BITS_RANGE[0] <= b <= BITS_RANGE[1] for b in bits)):
        raise ValueError(f"--bits: QAT methods ({', '.join(quantized)}) need bit widths from "
                         f"{BITS_RANGE[0]} to {BITS_RANGE[1]}, got {list(bits)}")
    needed = [FLOAT_INIT, *algorithms] if quantized else list(algorithms)
    _check_overrides(needed, dataset, hparams)

    def job(algorithm: str, width: int | None, env: int, seed: int, hp_seed: int,
            init: Job | None = None) -> Job:
        key = {"dataset": dataset, "algorithm": algorithm, "bits": width, "test_envs": [env],
               "trial_seed": seed, "hparams_seed": hp_seed, "steps": steps,
               "checkpoint_freq": checkpoint_freq,
               "hparams": _overrides_for(algorithm, dataset, hparams),
               "init": init.folder.name if init else None}
        folder = output / f"{_prefix(key)}_{job_hash(key)}"
        config = TrainConfig(dataset=dataset, output=folder, test_envs=(env,), algorithm=algorithm,
                             bits=width, data_dir=data_dir, steps=steps,
                             checkpoint_freq=checkpoint_freq, trial_seed=seed,
                             hparams_seed=hp_seed, hparams=key["hparams"],
                             init=init.folder / CHECKPOINT if init else None, resume=True)
        return Job(config, key, run_state(folder), init.folder if init else None)

    planned: dict[str, Job] = {}
    for seed in seeds:
        for env in test_envs:
            init = job(FLOAT_INIT, None, env, seed, 0) if quantized else None
            group = [init] if init else []
            for algorithm in algorithms:
                widths = bits if algorithm in quantized else [None]
                start = init if algorithm in quantized else None
                group += [job(algorithm, width, env, seed, hp_seed, start)
                          for hp_seed in hparams_seeds for width in widths]
            for member in sorted(group, key=lambda j: j.needs is not None):  # stable: floats first
                planned.setdefault(member.folder.name, member)
    return list(planned.values())


def table(jobs: Sequence[Job]) -> str:
    """The dry-run listing: one aligned line per job, then the count per state."""
    header = ("state", "folder", "algorithm", "bits", "test env", "seed", "hparams seed")
    rows = [header] + [(j.state, j.folder.name, j.key["algorithm"],
                        "-" if j.key["bits"] is None else str(j.key["bits"]),
                        str(j.key["test_envs"][0]), str(j.key["trial_seed"]),
                        str(j.key["hparams_seed"])) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    counts = [f"{sum(r[0] == s for r in rows[1:])} {s}" for s in STATES]
    return "\n".join(lines + [f"{len(jobs)} jobs: {', '.join(counts)}"])


def save_record(output: Path, arguments: dict, jobs: Sequence[Job]) -> Path:
    """``OUT/sweep.json``: the arguments and job list, for the record (jobs are their hashes)."""
    path = Path(output) / SWEEP_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items()}
    record = {"arguments": args,
              "jobs": [{"folder": j.folder.name, **j.key} for j in jobs]}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def launch(jobs: Sequence[Job], *, skip_failed: bool = False, device: str | None = None,
           num_workers: int = 0, progress: bool = True) -> list[Outcome]:
    """Run the jobs one after another in this process, printing one status line per job.

    A finished folder is kept, an unfinished one resumed. A failing job stops the sweep,
    or with ``skip_failed`` is reported and the sweep goes on without the jobs that start
    from it. Ctrl-C stops inside a run: its last checkpoint is where a relaunch resumes.
    Returns one outcome per job reached.
    """
    outcomes: list[Outcome] = []
    broken: dict[Path, str] = {}  # float runs that failed or were skipped: folder -> why

    def note(job: Job, status: str, detail: str = "") -> None:
        outcomes.append(Outcome(job, status, detail))
        n = f"[{len(outcomes)}/{len(jobs)}]"
        print(f"{n} {status:<7} {job.folder}" + (f": {detail}" if detail else ""), flush=True)

    for job in jobs:
        if job.needs in broken:
            broken[job.folder] = f"needs {job.needs.name}, which {broken[job.needs]}"
            note(job, "skipped", broken[job.folder])
            continue
        if run_state(job.folder) == "done":
            note(job, "kept", "finished earlier")
            continue
        tic = time.perf_counter()
        try:
            run(replace(job.config, resume=True, device=device, num_workers=num_workers,
                        progress=progress))
        except KeyboardInterrupt:
            print(f"interrupted: {job.folder} resumes from its last checkpoint when the "
                  f"sweep is launched again", flush=True)
            raise
        except Exception as error:  # any failure of one run is reported, not only ours
            broken[job.folder] = "failed"
            note(job, "failed", f"{type(error).__name__}: {error}")
            if not skip_failed:
                break
            continue
        note(job, "ran", f"{time.perf_counter() - tic:.1f} s")
    return outcomes


def main(arguments: dict) -> int:
    """``gaqat sweep``: plan, print the job table, then (unless ``dry_run``) launch and report.

    ``arguments`` holds the command line's options by name. Exit status: 0 when every
    job finished, 1 when one failed or was skipped, 130 on Ctrl-C.
    """
    a = {**arguments, "test_envs": test_env_indices(arguments["dataset"], arguments["data_dir"],
                                                     arguments["test_envs"])}
    jobs = plan(a["output"], a["dataset"], a["algorithms"], a["test_envs"], bits=a["bits"],
                seeds=a["seeds"], hparams_seeds=a["hparams_seeds"], steps=a["steps"],
                checkpoint_freq=a["checkpoint_freq"], hparams=a["hparams"], data_dir=a["data_dir"])
    print(table(jobs), flush=True)
    if a["dry_run"]:
        return 0
    save_record(a["output"], a, jobs)
    try:
        outcomes = launch(jobs, skip_failed=a["skip_failed"], device=a["device"],
                          num_workers=a["num_workers"], progress=a["progress"])
    except KeyboardInterrupt:
        return 130
    if any(o.status in ("kept", "ran") for o in outcomes):
        print(report([a["output"]], selection="all"))
    not_done = [o for o in outcomes if o.status in ("failed", "skipped")]
    not_started = len(jobs) - len(outcomes)
    if not_done or not_started:
        stopped = (f", {not_started} not started (--skip-failed goes on past a failure)"
                   if not_started else "")
        print(f"gaqat sweep: {len(not_done)} job(s) failed or skipped{stopped}; launching "
              f"the same sweep again retries them", file=sys.stderr)
        return 1
    return 0
