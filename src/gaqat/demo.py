"""The embedded default job: the whole method on DigitsDG, offline, in minutes on a CPU.

It builds DigitsDG, trains a float model on three domains (mnist_m held out), starts
``lsq_sagm`` and ``gaqat`` from that same float checkpoint, and returns the report.
Each run is resumed if interrupted and skipped if already finished, so rerunning the
command after a crash finishes the job instead of starting over. Every run's arguments
are checked before the first one starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gaqat.report import report
from gaqat.runfolder import CHECKPOINT, DONE
from gaqat.train import TrainConfig, check_arguments, run

DATASET = "digits"
TEST_ENV = 1  # mnist_m: the domain with the largest gap to the other three
FLOAT_STEPS = 1000
QAT_STEPS = 500
QAT_ALGORITHMS = ("lsq_sagm", "gaqat")


def demo(output: Path, data_dir: Path | None = None, bits: int = 4, overwrite: bool = False,
         float_steps: int = FLOAT_STEPS, qat_steps: int = QAT_STEPS, progress: bool = True,
         note: Callable[[str], None] = print) -> str:
    output = Path(output)
    float_run = output / "erm"
    jobs = [TrainConfig(dataset=DATASET, output=float_run, test_envs=(TEST_ENV,), algorithm="erm",
                        data_dir=data_dir, steps=float_steps,
                        checkpoint_freq=max(1, float_steps // 5), progress=progress)]
    jobs += [TrainConfig(dataset=DATASET, output=output / f"{name}_w{bits}", test_envs=(TEST_ENV,),
                         algorithm=name, bits=bits, data_dir=data_dir, steps=qat_steps,
                         checkpoint_freq=max(1, qat_steps // 5), init=float_run / CHECKPOINT,
                         progress=progress)
             for name in QAT_ALGORITHMS]
    for job in jobs:
        job.overwrite, job.resume = overwrite, not overwrite
        check_arguments(job)
    for job in jobs:
        if (job.output / DONE).exists() and not overwrite:
            note(f"{job.output}: finished earlier, kept (--overwrite retrains)")
            continue
        run(job)
    return report([output], selection="all")
