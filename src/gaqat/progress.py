"""Progress that suits where it goes: a live bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns; on a terminal that is one line that
moves, but in a SLURM log, a CI log, ``nohup.out`` or a pipe every redraw stays, and the
log becomes mostly bar. So :func:`progress` gives tqdm only when standard error is a
terminal, and otherwise a :class:`PlainProgress` that writes one line per
``set_postfix`` (the training loop calls it at each checkpoint) and, for bytes (a
download, which has no checkpoints), one line per tenth of the total.

Example::

    >>> import io
    >>> log = io.StringIO()  # not a terminal: plain lines
    >>> bar = progress(total=4, desc="erm", enabled=True, stream=log)
    >>> for _ in range(4):
    ...     bar.update(1)
    >>> bar.set_postfix(loss="0.512")
    >>> bar.close()
    >>> log.getvalue().startswith("erm: 4 steps of 4 (100%), ")
    True
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class PlainProgress:
    """tqdm's ``update``/``set_postfix``/``close`` as plain lines: ``desc: 300/1000 steps
    (30%), 12.3 s, loss=0.512``. ``unit`` names what is counted; byte counts print in MB."""

    def __init__(
        self,
        total: int | None,
        initial: int = 0,
        desc: str = "",
        unit: str = "steps",
        stream: TextIO | None = None,
    ):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.perf_counter()
        self._reported = initial  # the count at the last line
        self._tenth = (total or 0) / 10 if unit == "B" else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tenth and self.n - self._reported >= self._tenth:
            self._line()

    def set_postfix(self, **values: object) -> None:
        self._line(", ".join(f"{k}={v}" for k, v in values.items()))

    def close(self) -> None:
        if self.n != self._reported:
            self._line()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, extra: str = "") -> None:
        self._reported = self.n
        count = f"{self.n / 1e6:.1f} MB" if self.unit == "B" else f"{self.n} {self.unit}"
        if self.total:
            total = f"{self.total / 1e6:.1f} MB" if self.unit == "B" else f"{self.total}"
            count = f"{count} of {total} ({100 * self.n / self.total:.0f}%)"
        elapsed = f"{time.perf_counter() - self._start:.1f} s"
        parts = [p for p in (count, elapsed, extra) if p]
        print(f"{self.desc}: {', '.join(parts)}", file=self.stream, flush=True)


def progress(
    total: int | None,
    desc: str,
    enabled: bool,
    initial: int = 0,
    unit: str = "steps",
    stream: TextIO | None = None,
) -> tqdm | PlainProgress:
    """A progress display for ``total`` units: a tqdm bar when ``stream`` (standard error
    by default) is a terminal, plain lines otherwise, nothing when not ``enabled``."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:  # --quiet, or a rank other than the first
        return tqdm(total=total, initial=initial, disable=True)
    if not stream.isatty():
        return PlainProgress(total, initial, desc, unit, stream)
    if unit == "B":
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=stream,
        )
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=stream)
