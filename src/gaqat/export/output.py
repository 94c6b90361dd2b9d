"""Where an export may write, checked before any work; and the writing, after all of it.

A user's files are never lost to an export: an existing output is replaced only with
``--overwrite``, and a file of a run (its checkpoint, records, ``done``) or the checkpoint
exported never is. The outputs are made in memory and written last, each to a temporary
file beside it that is then renamed over it, so that a full disk or a crash leaves the
files that were there as they were and no partial one.
"""

from __future__ import annotations

import os
from pathlib import Path

from gaqat.errors import UsageError
from gaqat.runfolder import LOCK, RUN_FILES, file_in_the_way, run_state, temporary_path


def _protected(path: Path, checkpoint: Path) -> str | None:
    """What ``path`` is when it is the checkpoint exported or a file of a run, else None."""
    real = path.resolve()  # through links
    if checkpoint.exists() and real == checkpoint.resolve():
        return "the checkpoint exported"
    if real.name in (*RUN_FILES, LOCK) and run_state(real.parent) != "new":
        return f"a file of the run in {path.parent}"
    return None


def check_output_file(path: Path, option: str, checkpoint: Path, overwrite: bool) -> None:
    """UsageError unless the export may write ``path`` (given as, or derived from, ``option``)."""
    if path.is_dir():
        raise UsageError(
            f"{option} {path} is a folder; give the file to write in it, e.g. {path / 'model.onnx'}"
        )
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise UsageError(f"{option} {path}: {blocker} is a file, not a folder")
    protected = _protected(path, checkpoint)
    if protected:
        raise UsageError(
            f"{option} {path} is {protected}; export never writes over it, even with "
            f"--overwrite: choose another file name"
        )
    if path.exists() and not overwrite:
        raise UsageError(f"{option} {path} exists; add --overwrite to replace it")


def _write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_outputs(files: dict[Path, bytes]) -> None:
    """Write every file or none: each to a temporary file beside it first, renamed over
    it once all are written. OSError naming the file that could not be written."""
    temporary: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary[path] = temporary_path(path)
            _write(temporary[path], data)
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    except OSError as error:
        raise OSError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
