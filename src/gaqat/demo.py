"""The embedded default job: the whole method on DigitsDG, offline, in minutes on a CPU.

It is a small sweep (``gaqat.sweep``): DigitsDG with mnist_m held out, a float ``erm``
run, and ``lsq_sagm`` and ``gaqat`` started from that same float checkpoint; then the
report. As any sweep, every run's arguments are checked before the first starts, a
finished run is kept and an interrupted one resumed, so rerunning the command after a
crash finishes the job instead of starting over.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gaqat.errors import as_usage_errors
from gaqat.report import report
from gaqat.sweep import Job, SweepConfig, launch, plan

DATASET = "digits"
TEST_ENV = 1  # mnist_m: the domain with the largest gap to the other three
FLOAT_STEPS = 1000
QAT_STEPS = 500
QAT_ALGORITHMS = ("lsq_sagm", "gaqat")


def demo_jobs(
    output: Path,
    data_dir: Path | None = None,
    bits: int = 4,
    float_steps: int = FLOAT_STEPS,
    qat_steps: int = QAT_STEPS,
    progress: bool = True,
) -> list[Job]:
    """The demo's runs, float first, every argument checked."""
    config = SweepConfig(
        DATASET,
        Path(output),
        QAT_ALGORITHMS,
        test_envs=(TEST_ENV,),
        bits=(bits,),
        options={
            "steps": qat_steps,
            "checkpoint_freq": max(1, qat_steps // 5),
            "data_dir": data_dir,
            "progress": progress,
        },
        float_options={"steps": float_steps, "checkpoint_freq": max(1, float_steps // 5)},
    )
    with as_usage_errors():
        return plan(config)  # which checks every job's arguments


def demo(
    output: Path,
    data_dir: Path | None = None,
    bits: int = 4,
    overwrite: bool = False,
    float_steps: int = FLOAT_STEPS,
    qat_steps: int = QAT_STEPS,
    progress: bool = True,
    note: Callable[[str], None] = print,
) -> str:
    """Run (or finish) the demo's runs and return the report of the demo folder."""
    jobs = demo_jobs(output, data_dir, bits, float_steps, qat_steps, progress)
    outcomes = launch(jobs, overwrite=overwrite, note=note)
    failed = [o for o in outcomes if o.status not in ("kept", "ran")]
    if failed:
        raise RuntimeError(f"{failed[0].job.folder}: {failed[0].status}: {failed[0].detail}")
    return report([output], selection="all")
