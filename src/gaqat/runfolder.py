"""The files of a run folder, and the JSON-lines files among them.

``gaqat train`` writes them; ``report``, ``plots``, ``sweep`` and ``demo`` read them:

- ``results.jsonl``: one record per checkpoint (DomainBed's keys);
- ``gradients.jsonl``: GAQAT's window summaries and freeze decisions;
- ``checkpoint.pt``: the latest checkpoint (``gaqat.checkpoint``);
- ``done``: written last; a folder with it holds a finished run.

A run killed while writing can leave a torn last line; readers skip it with a
:class:`TornLineWarning`, and any other bad line is an error naming the file and line.
This module imports no torch, so reading results stays light.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path


RESULTS = "results.jsonl"
GRADIENTS = "gradients.jsonl"
CHECKPOINT = "checkpoint.pt"
DONE = "done"


STATES = ("done", "incomplete", "new")


def run_state(folder: Path) -> str:
    """"done" (finished), "incomplete" (started: results or a checkpoint) or "new"."""
    folder = Path(folder)
    if (folder / DONE).exists():
        return "done"
    if (folder / RESULTS).exists() or (folder / CHECKPOINT).exists():
        return "incomplete"
    return "new"


class TornLineWarning(UserWarning):
    """The last line of a JSON-lines file is incomplete (the run was killed mid-write)."""


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """``(where, record)`` per non-blank line; ``where`` reads "FILE, line N" for messages."""
    lines = [(i + 1, line) for i, line in enumerate(Path(path).read_text().splitlines())
             if line.strip()]
    records = []
    for n, (lineno, line) in enumerate(lines):
        where = f"{path}, line {lineno}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as error:
            if n == len(lines) - 1:
                warnings.warn(f"{where}: torn last line skipped (run killed while writing?)",
                              TornLineWarning, stacklevel=2)
                break
            raise ValueError(f"{where}: not valid JSON ({error})") from None
    return records


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    lines = [json.dumps(r) + "\n" for r in records]
    if lines:
        with Path(path).open("a") as f:
            f.writelines(lines)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records whose ``step`` is at most ``last_step`` (a torn line goes too): what
    a run resumed from the checkpoint of ``last_step`` has already written."""
    if path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TornLineWarning)
            kept = [r for _, r in read_jsonl(path) if r["step"] <= last_step]
        path.write_text("")
        append_jsonl(path, kept)
