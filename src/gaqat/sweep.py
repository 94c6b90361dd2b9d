"""Sweeps: every (algorithm, bits, held-out domain, trial seed, hparams seed) as one run.

As DomainBed's sweep, each job's folder is named by a hash of its arguments, so
launching the same sweep again is idempotent: a finished folder is kept, an unfinished
one resumed, a new one started; a job's identity never depends on which sweep asked
for it. Unlike DomainBed, QAT runs start from a float checkpoint: every QAT job gets
the ``erm`` run of its (held-out domain, trial seed) as ``init``, added to the sweep if
not asked for, so the QAT methods of one pair share init, seed and batches and their
difference is a paired comparison: between seeds, accuracies differ by as much as the
methods do.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from gaqat import hparams as hparams_registry
from gaqat.data import dataset_domains
from gaqat.errors import UsageError
from gaqat.launchers import Handle, InlineLauncher, Launcher
from gaqat.names import ALGORITHMS, canonical_dataset, get_recipe
from gaqat.runfolder import CHECKPOINT, STATES, FolderBusyError, check_output_folder, run_state
from gaqat.train import TrainConfig, check_arguments

FLOAT_INIT = "erm"  # the float method every QAT job starts from
SWEEP_RECORD = "sweep.json"
HASH_CHARS = 8
# TrainConfig's defaults of the options that change results
IDENTITY_DEFAULTS = {"image_size": None, "weights": "default", "precision": "fp32"}
# What a sweep's runs compute, beyond which runs there are, with the options that set it.
# A sweep folder is reported as one: a relaunch with other values would pool the runs of
# two settings, so it is refused. More algorithms, domains or seeds are welcome.
SWEEP_IDENTITY = {
    "dataset": "--dataset",
    "class_map": "--class-map",
    "steps": "--steps",
    "checkpoint_freq": "--checkpoint-freq",
    "float_steps": "--float-steps",
    "float_checkpoint_freq": "--float-checkpoint-freq",
    "hparams": "--hparams",
    "image_size": "--image-size",
    "weights": "--weights",
    "precision": "--precision",
}


RUN_OPTIONS = (
    "data_dir",
    "class_map",
    "steps",
    "checkpoint_freq",
    "hparams",
    "weights",
    "image_size",
    "num_workers",
    "device",
    "deterministic",
    "precision",
    "channels_last",
    "compile",
    "progress",
)
"""The TrainConfig fields a sweep hands to every run alike; the others differ per run."""


@dataclass(frozen=True)
class SweepConfig:
    """A grid: one run per (algorithm, bits, held-out domain, trial seed, hparams seed).

    ``test_envs`` holds domain indices or ``"all"``; ``options`` the :data:`RUN_OPTIONS`
    every run shares (``hparams``: overrides, each run taking the keys its method has);
    ``float_options`` replaces some of them for the float runs (erm, sagm), which usually
    train longer than the QAT runs that start from them.
    """

    dataset: str
    output: Path
    algorithms: Sequence[str]
    test_envs: Sequence[int | str] = ("all",)
    bits: Sequence[int] = (4,)
    seeds: Sequence[int] = (0,)
    hparams_seeds: Sequence[int] = (0,)
    options: dict = field(default_factory=dict)
    float_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready, for ``sweep.json``."""
        text = lambda v: str(v) if isinstance(v, Path) else v  # noqa: E731
        return {
            k: (
                {o: text(x) for o, x in v.items()}
                if isinstance(v, dict)
                else text(v)
                if not isinstance(v, (list, tuple))
                else list(v)
            )
            for k, v in asdict(self).items()
        }


@dataclass(frozen=True)
class Job:
    """One run of a sweep; ``needs`` is the folder of the float run it starts from."""

    config: TrainConfig
    key: dict  # the arguments that identify the run (hashed into its folder name)
    state: str  # "done", "incomplete" or "new" when planned
    needs: Path | None = None

    @property
    def folder(self) -> Path:
        return Path(self.config.output)


@dataclass(frozen=True)
class Outcome:
    """What ``launch`` did with a job: "kept" (finished earlier), "ran", "failed", "busy"
    (another process runs it) or "skipped" (its float init failed or is busy)."""

    job: Job
    status: str
    detail: str = ""


def job_hash(key: dict) -> str:
    """A short hash of canonical JSON: equal on every machine, Python version and run."""
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_CHARS]


def test_env_indices(
    dataset: str, data_dir: Path | None, test_envs: Sequence[str | int]
) -> list[int]:
    """``["all"]`` -> every domain index; otherwise the indices, checked against the domains."""
    names = dataset_domains(dataset, data_dir)
    if [str(e) for e in test_envs] == ["all"]:
        return list(range(len(names)))
    try:
        indices = [int(e) for e in test_envs]
    except ValueError:
        raise ValueError(
            f"--test-envs: expected 'all' or domain indices, got {list(test_envs)}"
        ) from None
    bad = [i for i in indices if not 0 <= i < len(names)]
    if bad or not indices:
        listing = ", ".join(f"{i}={name}" for i, name in enumerate(names))
        raise ValueError(
            f"--test-envs: {bad or 'none given'} not among {dataset}'s domains ({listing})"
        )
    return indices


def _overrides_for(algorithm: str, dataset: str, hparams: dict) -> dict:
    """The overrides this algorithm has keys for (``window`` means nothing to erm)."""
    known = hparams_registry.default_hparams(algorithm, dataset)
    mine = {k: v for k, v in hparams.items() if k in known}
    hparams_registry.apply_overrides(known, mine, algorithm, dataset)  # bad values fail here
    return mine


def _check_overrides(algorithms: Sequence[str], dataset: str, hparams: dict) -> None:
    known = set().union(*(hparams_registry.default_hparams(a, dataset) for a in algorithms))
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(
            f"--hparams: unknown key(s) {', '.join(unknown)} for algorithms "
            f"{', '.join(algorithms)}; valid keys: {', '.join(sorted(known))}"
        )


def _prefix(key: dict) -> str:
    bits = f"_w{key['bits']}" if key["bits"] is not None else ""
    hp = f"_hp{key['hparams_seed']}" if key["hparams_seed"] else ""
    return f"{key['algorithm']}{bits}_env{key['test_envs'][0]}_seed{key['trial_seed']}{hp}"


def _identity(options: dict) -> dict:
    """The options that change a run's result, hashed into its folder name; the others
    (devices, workers, data location) are not. Keys absent at their defaults keep the
    hashes of older sweeps valid."""
    identity = {"steps": options.get("steps"), "checkpoint_freq": options.get("checkpoint_freq")}
    return identity | {
        k: options[k]
        for k in ("image_size", "weights")
        if options.get(k, IDENTITY_DEFAULTS[k]) != IDENTITY_DEFAULTS[k]
    }


def plan(config: SweepConfig) -> list[Job]:
    """The sweep's jobs, float runs before the QAT runs that start from them.

    Jobs come grouped by (trial seed, held-out domain), so a sweep stopped halfway has
    whole pairs. Repeated combinations are one job. Every job's arguments are checked,
    and the output must be a sweep of the same settings (or new, or empty). Reads nothing
    but job states and ``sweep.json``.
    """
    grid = _Grid.of(config)
    algorithms, bits = list(config.algorithms), list(config.bits)
    if not algorithms:
        raise ValueError("--algorithms: give at least one of " + ", ".join(ALGORITHMS))
    test_envs = test_env_indices(grid.dataset, grid.options.get("data_dir"), config.test_envs)
    quantized = [a for a in algorithms if get_recipe(a).quantized]
    if quantized and not bits:  # each width is checked with its jobs' arguments
        raise ValueError(f"--bits: QAT methods ({', '.join(quantized)}) need a bit width")
    needed = [FLOAT_INIT, *algorithms] if quantized else algorithms
    _check_overrides(needed, grid.dataset, grid.hparams)
    planned: dict[str, Job] = {}
    for seed in config.seeds:
        for env in test_envs:
            init = grid.job(FLOAT_INIT, None, env, seed, 0) if quantized else None
            group = [init] if init else []
            for algorithm in algorithms:
                widths = bits if algorithm in quantized else [None]
                start = init if algorithm in quantized else None
                group += [
                    grid.job(algorithm, width, env, seed, hp_seed, start)
                    for hp_seed in config.hparams_seeds
                    for width in widths
                ]
            for member in sorted(group, key=lambda j: j.needs is not None):  # stable: floats first
                planned.setdefault(member.folder.name, member)
    _check_sweep_folder(grid.output, set(planned))
    for planned_job in planned.values():
        check_arguments(planned_job.config)
    _check_relaunch(config)
    return list(planned.values())


def fair_float_baseline(config: SweepConfig, output: Path) -> list[Job]:
    """What quantization costs, measured fairly: for every float init of ``config``'s QAT
    runs, an ``erm`` run in ``output`` that continues it for the QAT runs' steps, at the
    QAT learning rate and schedule. Against the float init alone, QAT's extra training
    would pass for quantization's effect.

    Returns the inits (planned as in ``config``) followed by these runs, ready for
    :func:`launch`; each run's folder is named by its arguments, the init's included,
    as any sweep job's. ``--hparams`` overrides apply to both; an ``lr`` override is the
    QAT runs' learning rate here too.
    """
    inits = [
        job for job in plan(config) if job.needs is None and job.key["algorithm"] == FLOAT_INIT
    ]
    quantized = [a for a in config.algorithms if get_recipe(a).quantized]
    if not quantized:
        raise ValueError("fair_float_baseline: the sweep has no QAT method to match")
    grid = _Grid.of(replace(config, output=Path(output), float_options={}))
    qat_lr = hparams_registry.default_hparams(quantized[0], grid.dataset)["lr"]
    grid = replace(grid, hparams={"lr": qat_lr, **grid.hparams})
    runs = [
        grid.job(FLOAT_INIT, None, job.key["test_envs"][0], job.key["trial_seed"], 0, job)
        for job in inits
        if job.key["hparams_seed"] == 0
    ]
    _check_sweep_folder(grid.output, {job.folder.name for job in runs})
    for job in runs:
        check_arguments(job.config)
    return inits + runs


@dataclass(frozen=True)
class _Grid:
    """What every job of a sweep shares, so that one job is its grid point alone."""

    dataset: str
    output: Path
    options: dict  # the QAT runs' shared options, without hparams
    float_options: dict  # the float runs' (options with SweepConfig.float_options)
    hparams: dict  # the overrides, each job taking the keys its method has

    @classmethod
    def of(cls, config: SweepConfig) -> _Grid:
        for field_name in ("options", "float_options"):
            unknown = sorted(set(getattr(config, field_name)) - set(RUN_OPTIONS))
            if unknown:
                raise ValueError(
                    f"SweepConfig.{field_name}: {unknown} are not shared run options "
                    f"({', '.join(RUN_OPTIONS)})"
                )
        options = dict(config.options)
        hparams = dict(options.pop("hparams", None) or {})
        float_options = {**options, **config.float_options}
        return cls(config.dataset, Path(config.output), options, float_options, hparams)

    def job(
        self,
        algorithm: str,
        width: int | None,
        env: int,
        seed: int,
        hp_seed: int,
        init: Job | None = None,
    ) -> Job:
        """One grid point's job: its folder named by the hash of its identifying key."""
        mine = self.float_options if width is None else self.options
        key = {
            "dataset": self.dataset,
            "algorithm": algorithm,
            "bits": width,
            "test_envs": [env],
            "trial_seed": seed,
            "hparams_seed": hp_seed,
            **_identity(mine),
            "hparams": _overrides_for(algorithm, self.dataset, self.hparams),
            "init": init.folder.name if init else None,
        }
        folder = self.output / f"{_prefix(key)}_{job_hash(key)}"
        run_config = TrainConfig(
            dataset=self.dataset,
            output=folder,
            test_envs=(env,),
            algorithm=algorithm,
            bits=width,
            trial_seed=seed,
            hparams_seed=hp_seed,
            hparams=key["hparams"],
            init=init.folder / CHECKPOINT if init else None,
            resume=True,
            **mine,
        )
        return Job(run_config, key, run_state(folder), init.folder if init else None)


def _check_sweep_folder(output: Path, job_folders: set[str]) -> None:
    """A sweep goes into a folder of its own: new, empty, a sweep (``sweep.json``), or a
    folder of runs (the demo's, which records none)."""
    is_sweep = (output / SWEEP_RECORD).is_file()
    check_output_folder(
        output,
        "--output",
        ours=lambda entry: (
            is_sweep
            or entry.name in job_folders
            or entry.name == ".submitit"  # the SLURM launcher's logs
            or (entry.is_dir() and run_state(entry) != "new")
        ),
        what=f"a gaqat sweep (it has no {SWEEP_RECORD} and no runs)",
    )


def sweep_identity(record: dict) -> dict:
    """The :data:`SWEEP_IDENTITY` of a sweep's ``to_dict`` (what ``sweep.json`` records)."""
    options = record.get("options", {})
    floats = {**options, **record.get("float_options", {})}
    defaults = {"hparams": {}, **IDENTITY_DEFAULTS}
    shared = (
        "class_map",
        "steps",
        "checkpoint_freq",
        "hparams",
        "image_size",
        "weights",
        "precision",
    )
    return {
        "dataset": canonical_dataset(str(record["dataset"])),
        **{k: options.get(k, defaults.get(k)) for k in shared},
        "float_steps": floats.get("steps"),
        "float_checkpoint_freq": floats.get("checkpoint_freq"),
    }


def _check_relaunch(config: SweepConfig) -> None:
    """Refuse a relaunch whose :data:`SWEEP_IDENTITY` differs from the recorded one."""
    path = Path(config.output) / SWEEP_RECORD
    if not path.is_file():
        return
    try:
        recorded = sweep_identity(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path}: not a sweep record that this gaqat reads ({type(error).__name__}: "
            f"{error}); choose a new --output"
        ) from None
    given = sweep_identity(config.to_dict())
    differences = [
        f"{option} {json.dumps(recorded[key])} recorded, {json.dumps(given[key])} given"
        for key, option in SWEEP_IDENTITY.items()
        if recorded[key] != given[key]
    ]
    if differences:
        raise UsageError(
            f"--output {config.output} holds a sweep with other settings "
            f"({'; '.join(differences)}); its report would pool runs of both. Relaunch "
            f"with the settings recorded in {path}, or choose a new --output"
        )


def table(jobs: Sequence[Job]) -> str:
    """The dry-run listing: one aligned line per job, then the count per state."""
    header = ("state", "folder", "algorithm", "bits", "test env", "seed", "hparams seed")
    rows = [header] + [
        (
            j.state,
            j.folder.name,
            j.key["algorithm"],
            "-" if j.key["bits"] is None else str(j.key["bits"]),
            str(j.key["test_envs"][0]),
            str(j.key["trial_seed"]),
            str(j.key["hparams_seed"]),
        )
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    counts = [f"{sum(r[0] == s for r in rows[1:])} {s}" for s in STATES]
    return "\n".join(lines + [f"{len(jobs)} jobs: {', '.join(counts)}"])


def save_record(config: SweepConfig, jobs: Sequence[Job]) -> Path:
    """``OUT/sweep.json``: the sweep's config and job list, for the record."""
    path = Path(config.output) / SWEEP_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config.to_dict(),
        "jobs": [{"folder": j.folder.name, **j.key} for j in jobs],
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def launch(
    jobs: Sequence[Job],
    *,
    launcher: Launcher | None = None,
    skip_failed: bool = False,
    overwrite: bool = False,
    note: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run the jobs through ``launcher`` (default: one after another in this process),
    reporting one line per job to ``note``; returns one outcome per job reached.

    A job starts once its float init is done, while the launcher has a free slot. A
    finished folder is kept (with ``overwrite``: trained again), an unfinished one
    resumed, one that another process holds is left to it ("busy"). A failing job stops
    the sweep (running jobs finish), or with ``skip_failed`` is reported and the sweep
    goes on without the jobs that start from it. Ctrl-C stops the runs: their last
    checkpoints are where a relaunch resumes.
    """
    return _Launch(list(jobs), launcher or InlineLauncher(), skip_failed, overwrite, note).run()


@dataclass
class _Launch:
    """One ``launch``'s bookkeeping: which jobs wait, run, finished or cannot be used."""

    jobs: list[Job]
    launcher: Launcher
    skip_failed: bool
    overwrite: bool
    note: Callable[[str], None]
    outcomes: list[Outcome] = field(default_factory=list)
    # float runs that failed, are busy or were skipped, and why
    unusable: dict[Path, str] = field(default_factory=dict)
    finished: set[Path] = field(default_factory=set)
    running: dict[Handle, tuple[Job, float]] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)

    def run(self) -> list[Outcome]:
        """Start jobs as slots free up; after a failure, wait for the running ones only."""
        waiting = list(self.jobs)
        going = True
        try:
            while going and (waiting or self.running):
                self.start_ready(waiting)
                if not self.running:
                    break
                going = all([self.collect(h) for h in _finished(list(self.running))])
            while self.running:  # after a failure: let the runs already going end
                for handle in _finished(list(self.running)):
                    self.collect(handle)
        except KeyboardInterrupt:
            self.launcher.stop(interrupt=True)
            self.note(
                "interrupted: the runs resume from their last checkpoints when the sweep is "
                "launched again"
            )
            raise
        self.launcher.stop()
        return self.outcomes

    def start_ready(self, waiting: list[Job]) -> None:
        """Keep, skip or start each waiting job whose float init is done, while slots are free;
        remove from ``waiting`` the jobs dealt with."""
        for job in list(waiting):
            if len(self.running) >= self.launcher.slots:
                break
            if job.needs in self.unusable:
                self.unusable[job.folder] = (
                    f"needs {job.needs.name}, which {self.unusable[job.needs]}"
                )
                self.report(job, "skipped", self.unusable[job.folder])
            elif job.needs is not None and job.needs not in self.finished:
                continue  # its float init is still running or waiting
            elif run_state(job.folder) == "done" and not self.overwrite:
                self.finished.add(job.folder)
                self.report(job, "kept", "finished earlier")
            else:
                config = (
                    replace(job.config, resume=False, overwrite=True)
                    if self.overwrite
                    else job.config
                )
                self.running[self.launcher.start(config)] = (job, time.perf_counter())
            waiting.remove(job)

    def collect(self, handle: Handle) -> bool:
        """Report the finished run of ``handle``; False when the sweep must stop."""
        job, tic = self.running.pop(handle)
        try:
            handle.result()
        except FolderBusyError as error:
            self.unusable[job.folder] = "another process is running"
            self.report(job, "busy", str(error))
        except Exception as error:  # any failure of one run is reported, not only ours
            self.unusable[job.folder] = "failed"
            self.report(job, "failed", f"{type(error).__name__}: {error}")
            return self.skip_failed
        else:
            self.finished.add(job.folder)
            self.durations.append(time.perf_counter() - tic)
            self.report(job, "ran", f"{self.durations[-1]:.1f} s")
        return True

    def report(self, job: Job, status: str, detail: str = "") -> None:
        """Record the job's outcome and note one line: progress, and with several slots
        how many run and wait and about how long is left."""
        self.outcomes.append(Outcome(job, status, detail))
        total, slots = len(self.jobs), self.launcher.slots
        line = f"[{len(self.outcomes)}/{total}] {status:<7} {job.folder}" + (
            f": {detail}" if detail else ""
        )
        if slots > 1:
            left, running = total - len(self.outcomes), len(self.running)
            eta = (
                f", about {np.mean(self.durations) * math.ceil(left / slots) / 60:.0f} min left"
                if self.durations and left
                else ""
            )
            line += f" ({running} running, {left - running} waiting{eta})"
        self.note(line)


def _finished(handles: list[Handle]) -> list[Handle]:
    """Wait until one of the handles is done; return every one that is."""
    futures = [h for h in handles if isinstance(h, Future)]
    if len(futures) == len(handles):
        wait(futures, return_when=FIRST_COMPLETED)
    else:
        while not any(h.done() for h in handles):
            time.sleep(1.0)
    return [h for h in handles if h.done()]
