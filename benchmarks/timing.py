"""Shared helpers for benchmarks: interleaved timing, peak memory, tables and JSON results.

The machine running a benchmark is usually shared, so its load drifts over seconds.
Timing each candidate in its own block would charge that drift to whichever candidate
ran at the wrong moment; instead every round runs each candidate once, in an order that
rotates from round to round, and the report uses the median and the interquartile range
(IQR), which ignore the occasional stall.

Benchmarks run as ``python benchmarks/<name>.py``, so import this file as a sibling
module: ``from timing import time_interleaved, print_table, write_json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def benchmark_parser(
    description: str, cases: Sequence[str], rounds: int = 20, warmup: int = 3
) -> argparse.ArgumentParser:
    """The flags benchmarks share: --quick --rounds --warmup --device --cases --threads --clock.

    Add a benchmark's own flags to the returned parser; parse with ``parse_benchmark_args``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", choices=list(cases), default=list(cases))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: process CPU time (with --threads 1, on a busy machine)",
    )
    return parser


def parse_benchmark_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse, and apply --threads before any tensor work starts."""
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return args


@dataclass
class Timing:
    """Time samples of one candidate (wall or CPU clock), in ms, and its peak memory in MiB."""

    name: str
    times_ms: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None

    def quantiles(self) -> tuple[float, float, float]:
        """(first quartile, median, third quartile) of the samples."""
        if len(self.times_ms) < 2:
            only = self.times_ms[0]
            return only, only, only
        q1, median, q3 = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q1, median, q3

    @property
    def median_ms(self) -> float:
        return self.quantiles()[1]

    @property
    def iqr_ms(self) -> float:
        q1, _, q3 = self.quantiles()
        return q3 - q1

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "median_ms": self.median_ms,
            "iqr_ms": self.iqr_ms,
            "peak_memory_mb": self.peak_memory_mb,
            "times_ms": self.times_ms,
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device | str) -> float:
    """CUDA: bytes allocated at peak since the last reset. CPU: the process's max RSS.

    The CPU figure is a process-wide high-water mark: it never goes down, so when several
    candidates share a process only the first one's value is its own and later ones show
    at least the largest earlier peak.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10  # bytes vs KiB


def saved_tensors_mb(fn: Callable[[], object]) -> float:
    """MiB of distinct storages autograd saves for backward while ``fn`` runs.

    A device-independent, noise-free measure of a training step's activation memory,
    useful on CPU where the process's peak RSS cannot tell candidates apart.
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values()) / 2**20


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time each zero-argument callable ``rounds`` times, interleaved; returns name -> Timing.

    Each candidate first runs ``warmup`` times on its own (allocator caches, autotuning,
    lazy initialisation such as LSQ step sizes); its peak memory is read right after
    (on CUDA the peak counter is reset before each candidate's warm-up). Then round ``r``
    runs the candidates once each, starting from candidate ``r mod k``. CUDA work is
    synchronised before and after each call so the time covers the whole step.

    ``clock="cpu"`` measures the process's CPU time instead of wall time: on a CPU
    shared with other jobs, and with ``torch.set_num_threads(1)``, it leaves out the
    time the process waited to be scheduled (with more threads it also counts their
    spin-waits, so use it single-threaded).
    """
    if not candidates:
        raise ValueError("time_interleaved: candidates is empty")
    if rounds < 1 or warmup < 0:
        raise ValueError(
            f"time_interleaved: expected rounds >= 1 and warmup >= 0, "
            f"got rounds={rounds}, warmup={warmup}"
        )
    if clock not in CLOCKS:
        raise ValueError(f"time_interleaved: clock must be one of {list(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    device = torch.device(device)
    names = list(candidates)
    timings = {name: Timing(name) for name in names}
    for name in names:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            candidates[name]()
        _synchronize(device)
        timings[name].peak_memory_mb = peak_memory_mb(device)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start = now()
            candidates[name]()
            _synchronize(device)
            timings[name].times_ms.append((now() - start) * 1e3)
    return timings


def timing_rows(
    timings: Mapping[str, Timing], baseline: str | None = None, **extra: object
) -> list[dict]:
    """One table row per candidate: median, IQR, ratios to ``baseline``, peak memory.

    ``ratio`` divides the medians; ``paired_ratio`` is the median over rounds of the
    ratio within a round, whose two calls ran moments apart, so load that drifts
    between rounds cancels out. ``extra`` columns (e.g. ``case="resnet18"``) come first.
    """
    if baseline is not None and baseline not in timings:
        raise ValueError(f"timing_rows: baseline {baseline!r} is not one of {list(timings)}")
    rows = []
    for name, timing in timings.items():
        row = {**extra, "candidate": name, "median_ms": timing.median_ms, "iqr_ms": timing.iqr_ms}
        if baseline is not None:
            row["ratio"] = timing.median_ms / timings[baseline].median_ms
            row["paired_ratio"] = statistics.median(
                t / b for t, b in zip(timing.times_ms, timings[baseline].times_ms)
            )
        row["peak_mb"] = timing.peak_memory_mb
        rows.append(row)
    return rows


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows``; columns default to the keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def print_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    if title:
        print(f"\n### {title}\n")
    print(format_table(rows, columns))


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What a reader needs to compare numbers across runs."""
    device = torch.device(device)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(
    name: str,
    payload: Mapping[str, object],
    device: torch.device | str = "cpu",
    results_dir: Path = RESULTS_DIR,
) -> Path:
    """Write ``payload`` plus machine info and a timestamp to ``results_dir/<name>.json``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    document = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(device),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    raise TypeError(f"write_json: cannot serialise {type(value).__name__}")
