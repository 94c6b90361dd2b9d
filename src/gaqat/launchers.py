"""Where a sweep's runs execute: in this process, in local worker processes, or on SLURM.

A launcher takes one run (a :class:`gaqat.train.TrainConfig`) and hands back a handle
with ``done()`` and ``result()``, as ``concurrent.futures`` and submitit both do; the
sweep (``gaqat.sweep.launch``) decides what to start and when. ``slots`` is how many
runs it keeps going at once.

- :class:`InlineLauncher`: one run at a time, in this process (the default).
- :class:`ProcessLauncher`: N runs at once in worker processes; the CPU threads are split
  between them, and on a machine with GPUs each worker gets its own GPU.
- :class:`SubmititLauncher`: each run a SLURM job through submitit (the ``[slurm]``
  extra), at most N queued or running at once; ``cluster="local"`` runs them as local
  processes instead, which is how the tests use it. Stopping the sweep leaves submitted
  jobs running.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Any, Protocol

from gaqat.train import TrainConfig, run


class Handle(Protocol):
    """A started run: a ``concurrent.futures.Future`` or a submitit job."""

    def done(self) -> bool: ...

    def result(self) -> Any: ...


class Launcher(Protocol):
    """Starts runs; keeps at most ``slots`` of them going at once."""

    slots: int

    def start(self, config: TrainConfig) -> Handle: ...

    def stop(self, interrupt: bool = False) -> None:
        """Release the workers; with ``interrupt``, stop the runs going (Ctrl-C, SIGTERM)."""


class InlineLauncher:
    """Runs each run to its end inside ``start``: the sweep stays sequential. ``threads``
    sets torch's CPU threads for them (default: torch's own choice)."""

    slots = 1

    def __init__(self, threads: int | None = None):
        if threads is not None:
            import torch

            torch.set_num_threads(threads)

    def start(self, config: TrainConfig) -> Handle:
        handle: Future = Future()
        try:
            handle.set_result(run(config))
        except Exception as error:  # KeyboardInterrupt goes through: the sweep stops
            handle.set_exception(error)
        return handle

    def stop(self, interrupt: bool = False) -> None:
        """Nothing runs in the background."""


def _run_in_worker(config: TrainConfig, threads: int) -> Path:
    """A worker process's run, on its share of the CPU threads."""
    import torch

    torch.set_num_threads(threads)
    return run(config)


class ProcessLauncher:
    """``processes`` runs at once, each in a worker process of its own.

    The CPU's threads are split evenly between the workers unless ``threads`` says how
    many each gets. The thread count changes the rounding of float sums, and through the
    quantizers' rounding a run's results: a run gives the same records as in a sequential
    sweep when it gets the same number of threads (``gaqat sweep --threads``).

    Runs without a ``device`` go to the visible GPUs in turn, one run per GPU at a time
    when there are at least as many GPUs as workers. Workers are spawned, not forked, so
    CUDA starts cleanly in each.
    """

    def __init__(self, processes: int, threads: int | None = None):
        import torch

        if processes < 1:
            raise ValueError(f"--jobs: expected at least 1, got {processes}")
        self.slots = processes
        self.threads = threads or max(1, (os.cpu_count() or 1) // processes)
        self.gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        self._pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn"))
        self._started = 0

    def start(self, config: TrainConfig) -> Handle:
        config = replace(config, progress=False)  # bars of several workers would interleave
        if config.device is None and self.gpus:
            config = replace(config, device=self.gpus[self._started % len(self.gpus)])
        self._started += 1
        return self._pool.submit(_run_in_worker, config, self.threads)

    def stop(self, interrupt: bool = False) -> None:
        """Cancel what has not started; with ``interrupt``, Ctrl-C the workers too (a
        SIGTERM reaches only this process), so each run stops at its last checkpoint."""
        if interrupt:
            for worker in active_children():
                os.kill(worker.pid, signal.SIGINT)
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class SlurmOptions:
    """What each run's SLURM job asks for (submitit's parameters)."""

    partition: str | None = None
    gpus: int = 1
    cpus: int = 8
    mem_gb: float = 32
    time_min: int = 24 * 60
    cluster: str | None = None  # None: SLURM when srun is there; "local" for local processes


class SubmititLauncher:
    """Each run a job submitted through submitit; at most ``slots`` in the queue at once.

    Logs and submitit's pickles go to ``folder`` (on a file system the compute nodes
    share). A QAT run is submitted only once its float init is done, so dependencies need
    no scheduler support; a relaunched sweep skips finished runs and resumes the others.
    """

    def __init__(self, folder: Path, slots: int, options: SlurmOptions):
        try:
            import submitit
        except ModuleNotFoundError:
            raise RuntimeError(
                '--launcher slurm needs submitit: pip install "gaqat[slurm]"'
            ) from None
        self.slots = slots
        self.threads = options.cpus
        self._executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=options.cluster)
        parameters = {
            "timeout_min": options.time_min,
            "mem_gb": options.mem_gb,
            "cpus_per_task": options.cpus,
            "gpus_per_node": options.gpus,
            "tasks_per_node": 1,
            "nodes": 1,
            "name": "gaqat",
        }
        if options.partition:
            parameters["slurm_partition"] = options.partition
        self._executor.update_parameters(**parameters)

    def start(self, config: TrainConfig) -> Handle:
        return self._executor.submit(_run_in_worker, replace(config, progress=False), self.threads)

    def stop(self, interrupt: bool = False) -> None:
        """Submitted jobs keep their allocation and go on, even after an interrupt; a
        relaunch leaves them be ("busy") and picks up the runs that were waiting for them."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, ``kill``) stops like Ctrl-C: a run cleanly and
    resumably, a launcher with its workers (a killed parent would leave them training).
    ``gaqat``'s commands run under it; so should a script that calls :func:`gaqat.sweep.launch`.

    >>> import os, signal
    >>> from gaqat.launchers import sigterm_as_interrupt
    >>> try:
    ...     with sigterm_as_interrupt():
    ...         os.kill(os.getpid(), signal.SIGTERM)
    ... except KeyboardInterrupt as stop:
    ...     print(stop)
    stopped by signal 15
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
