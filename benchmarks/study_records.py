"""A study's records without its checkpoints: one archive to commit, copy or share.

A study on 2 CPU cores can take longer than the machine it started on lives, and its
checkpoints are hundreds of megabytes. Its records (each finished run's ``results.jsonl``,
``gradients.jsonl`` and done marker) are a few: with them a page is written again, and a
study continues elsewhere:

    tar -xJf ARCHIVE -C OUT      # then `run OUT` trains what is missing, `page OUT` writes

Two kinds of folder stay out. Links are the study's own (``run`` makes them again). The
float inits' records go under ``reference/``, not in place: the runs still to train need
their checkpoints, so ``run`` trains them again (bit-identically at matched threads), and
``reference/`` is what to compare the new ``results.jsonl`` with.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from gaqat.runfolder import CHECKPOINT, DONE, LOCK
from gaqat.sweep import FLOAT_INIT

REFERENCE = "reference"
LEFT_OUT = (CHECKPOINT, LOCK)


def finished_runs(out: Path) -> list[Path]:
    """Every finished run folder below ``out`` reached through no link (links above
    ``out`` do not count), in a stable order."""
    runs = []
    for done in out.rglob(DONE):
        parts = done.parent.relative_to(out).parts
        below = [out.joinpath(*parts[: i + 1]) for i in range(len(parts))]
        if parts[:1] != (REFERENCE,) and not any(p.is_symlink() for p in below):
            runs.append(done.parent)
    return sorted(runs)


def archive_records(out: Path, path: Path) -> int:
    """Write the records of every finished run below ``out`` to the tar.xz ``path`` (float
    inits under ``reference/``); return how many runs it holds. The archive is written
    beside ``path`` first, so a failure leaves an existing one as it was."""
    runs = finished_runs(out)
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(partial, "w:xz") as tar:
        for run in runs:
            name = run.relative_to(out)
            if run.name.startswith(f"{FLOAT_INIT}_"):
                name = REFERENCE / name
            for file in sorted(run.iterdir()):
                if file.is_file() and file.name not in LEFT_OUT:
                    tar.add(file, arcname=str(name / file.name))
    os.replace(partial, path)
    return len(runs)
