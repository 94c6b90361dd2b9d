"""The files of a run folder, and the JSON-lines files among them.

``gaqat train`` writes them; ``report``, ``plots``, ``sweep`` and ``demo`` read them:

- ``results.jsonl``: one record per checkpoint (DomainBed's keys);
- ``gradients.jsonl``: GAQAT's window summaries and freeze decisions;
- ``checkpoint.pt``: the latest checkpoint (``gaqat.checkpoint``);
- ``done``: written last; a folder with it holds a finished run;
- ``corruptions.jsonl``: its accuracy on corrupted images, written by ``gaqat corrupt``
  (``gaqat.corruptions``) after training, replaced atomically;
- ``.lock``: held by the process writing the folder (:func:`locked`);
- ``.previous/``: a run being overwritten, kept until the new one has its first
  checkpoint (:func:`set_aside`).

A run killed while writing can leave a torn last line; readers skip it with a
:class:`TornLineWarning`, and any other bad line is an error naming the file and line.
This module imports no torch, so reading results stays light.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gaqat.errors import UsageError

RESULTS = "results.jsonl"
GRADIENTS = "gradients.jsonl"
CHECKPOINT = "checkpoint.pt"
DONE = "done"
CORRUPTIONS = "corruptions.jsonl"
LOCK = ".lock"
PREVIOUS = ".previous"
RUN_FILES = (RESULTS, GRADIENTS, CHECKPOINT, DONE, CORRUPTIONS)  # set aside by an overwrite
OWN_FILES = (*RUN_FILES, LOCK, PREVIOUS)  # what gaqat writes into a run folder


STATES = ("done", "incomplete", "new")


def run_state(folder: Path) -> str:
    """ "done" (finished), "incomplete" (started: results or a checkpoint) or "new".

    An overwrite that died before its first checkpoint counts as the run it was replacing,
    which :func:`settle` puts back.
    """
    folder = Path(folder)
    if (folder / PREVIOUS).is_dir() and not (folder / CHECKPOINT).exists():
        folder = folder / PREVIOUS
    if (folder / DONE).exists():
        return "done"
    if (folder / RESULTS).exists() or (folder / CHECKPOINT).exists():
        return "incomplete"
    return "new"


def file_in_the_way(path: Path) -> Path | None:
    """The file at ``path`` or at the nearest existing parent, which would make creating
    ``path`` as a folder, or a file in it, fail with "File exists"; None when there is none."""
    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def check_output_folder(folder: Path, option: str, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse, as a usage error, an output that cannot or must not become ``what``: a
    broken symbolic link, a file or a path below one (``mkdir`` would fail with "File
    exists" after the other checks), or a folder holding entries that are not ``ours``
    (the user's own files: a run written among them would be mixed with them)."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise UsageError(
            f"{option} {folder}: a broken symbolic link (to {os.readlink(folder)}); "
            f"expected a folder: remove the link or choose another path"
        )
    blocker = file_in_the_way(folder)
    if blocker is not None:
        where = "is a file" if blocker == folder.absolute() else f"is below the file {blocker}"
        raise UsageError(f"{option} {folder} {where}; expected a folder")
    if folder.is_dir():
        others = sorted(entry.name for entry in folder.iterdir() if not ours(entry))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UsageError(
                f"{option} {folder}: a folder of other files ({shown}), not {what}; "
                f"choose a new or empty folder"
            )


class TornLineWarning(UserWarning):
    """The last line of a JSON-lines file is incomplete (the run was killed mid-write)."""


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """``(where, record)`` per non-blank line; ``where`` reads "FILE, line N" for messages."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a text file of JSON lines ({error})") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    records = []
    for n, (lineno, line) in enumerate(lines):
        where = f"{path}, line {lineno}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as error:
            if n == len(lines) - 1:
                warnings.warn(
                    f"{where}: torn last line skipped (run killed while writing?)",
                    TornLineWarning,
                    stacklevel=2,
                )
                break
            raise ValueError(f"{where}: not valid JSON ({error})") from None
    return records


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Append and flush to disk: the lines must be there before the checkpoint covering them."""
    lines = [json.dumps(r) + "\n" for r in records]
    if lines:
        with Path(path).open("a") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())


def temporary_path(path: Path) -> Path:
    """A hidden name beside ``path`` for writing it before a rename; the process's own, so
    two processes writing one file (a shared cache) do not collide."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: a crash
    leaves either the old file or the new one, never a mix (:func:`temporary_path`)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records whose ``step`` is at most ``last_step``: what a run resumed from
    the checkpoint of ``last_step`` has already written. The file is replaced atomically.

    A torn last line (the run was killed while writing it) is dropped with a warning; so
    is a missing record of ``last_step`` itself, whose evaluation is then lost.
    """
    path = Path(path)
    if not path.exists():
        return
    records = read_jsonl(path)  # warns about a torn last line
    kept = [r for _, r in records if r["step"] <= last_step]
    if path.name == RESULTS and last_step and not any(r["step"] == last_step for r in kept):
        warnings.warn(
            f"{path}: no complete record of step {last_step}, which the checkpoint "
            f"covers; that evaluation is missing from the resumed run",
            TornLineWarning,
            stacklevel=2,
        )
    if len(kept) < len(records) or path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        replace_atomic(
            path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        )


class FolderBusyError(RuntimeError):
    """Another process holds the run folder's lock."""


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting (byte 0 on Windows, the file on POSIX)."""
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's exclusive lock while the block runs, or raise FolderBusyError.

    The operating system drops the lock when the holder dies (``kill -9`` included), so a
    crash never leaves a stale lock. After byte 0 the lock file says who holds it. A
    folder this call created is removed again when nothing but the lock was written.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            with path.open("rb") as f:
                f.seek(1)
                holder = f.read().decode("utf-8", "replace").strip() or "unknown process"
            raise FolderBusyError(
                f"{folder} is in use by another process ({holder}); wait for "
                f"it to finish or stop it, then run the command again"
            )
        since = datetime.datetime.now().isoformat(timespec="seconds")
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {since}: {' '.join(sys.argv)}"
        os.ftruncate(fd, 1)
        os.lseek(fd, 1, os.SEEK_SET)
        os.write(fd, holder.encode("utf-8"))
        yield
    finally:
        os.close(fd)  # releases the lock
        if created and [p.name for p in folder.iterdir()] == [LOCK]:
            path.unlink()
            folder.rmdir()


def set_aside(folder: Path) -> None:
    """Move a run's files into ``.previous/`` before it is overwritten (see :func:`settle`)."""
    folder = Path(folder)
    previous = folder / PREVIOUS
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for name in RUN_FILES:
        if (folder / name).exists():
            os.replace(folder / name, previous / name)


def settle(folder: Path, keep_new: bool) -> None:
    """End an overwrite: drop the set-aside run (``keep_new``: the new run has a checkpoint)
    or put it back in place of the new run's partial files. Nothing to do without one."""
    folder = Path(folder)
    previous = folder / PREVIOUS
    if not previous.is_dir():
        return
    if not keep_new:
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
            if (previous / name).exists():
                os.replace(previous / name, folder / name)
    shutil.rmtree(previous)
