"""The report's one table type: rows of cells, each cell printing itself.

Every format prints a :class:`Table`: a title, a header and rows of cells. A cell is a
:class:`Label` (part of a row's name), a :class:`Mean` (accuracies over trial seeds) or a
:class:`Difference` (paired differences). Markdown and LaTeX print each cell in their
:class:`Style`; CSV has one line per statistic cell (:meth:`Table.csv_lines`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

TIE = 1e-9  # accuracy difference (fraction) below which a pair is a tie: float noise only


@dataclass(frozen=True)
class Style:
    """How a format prints cells: its ± sign, its empty cell, its escaping of names."""

    pm: str
    missing: str
    escape: Callable[[str], str]


@dataclass(frozen=True)
class Label:
    """Part of a row's name (algorithm, bit width, trial count), printed as it is;
    ``field`` is its CSV column (None: not in the CSV)."""

    value: str
    field: str | None = None

    def text(self, style: Style) -> str:
        return style.escape(self.value)


@dataclass(frozen=True)
class Mean:
    """Accuracies (fractions) of one table cell, one per trial seed, printed in percent as
    mean ± standard error, with ``*`` when a run behind it has not finished."""

    values: tuple[float, ...]
    incomplete: bool
    ddof: ClassVar[int] = 0  # DomainBed's population std
    sign: ClassVar[str] = ""

    @property
    def mean(self) -> float | None:
        return 100 * float(np.mean(self.values)) if self.values else None

    @property
    def stderr(self) -> float | None:
        """Standard error, numpy std (with ``ddof``) / sqrt(n); None below 2 values."""
        n = len(self.values)
        return 100 * float(np.std(self.values, ddof=self.ddof)) / np.sqrt(n) if n > 1 else None

    def text(self, style: Style) -> str:
        if self.mean is None:
            return style.missing
        text = f"{self.mean:{self.sign}.1f}"
        if self.stderr is not None:
            text += f" {style.pm} {self.stderr:.1f}"
        return text + ("*" if self.incomplete else "")

    def stats(self) -> dict[str, object]:
        """The cell's CSV columns, numbers unrounded beyond 1e-4."""
        return {
            "mean": _number(self.mean),
            "stderr": _number(self.stderr),
            "n": len(self.values),
            "incomplete": int(self.incomplete),
        }


@dataclass(frozen=True)
class Difference(Mean):
    """Paired differences (algorithm − baseline, fractions) of one cell, one per pair,
    printed with the number of pairs and the algorithm's wins/ties/losses.

    The standard error uses the sample std (ddof=1): the paired t-test's, honest for the
    few pairs a study has, where ddof=0 would understate it.
    """

    ddof: ClassVar[int] = 1
    sign: ClassVar[str] = "+"

    @property
    def counts(self) -> tuple[int, int, int]:
        """Wins, ties and losses of the algorithm against the baseline."""
        wins = sum(d > TIE for d in self.values)
        losses = sum(d < -TIE for d in self.values)
        return wins, len(self.values) - wins - losses, losses

    def text(self, style: Style) -> str:
        if not self.values:
            return style.missing
        counts = "/".join(map(str, self.counts))
        return f"{super().text(style)} ({len(self.values)}: {counts})"

    def stats(self) -> dict[str, object]:
        stats = super().stats()
        wins, ties, losses = self.counts
        return {
            "mean_diff": stats.pop("mean"),
            **stats,
            "wins": wins,
            "ties": ties,
            "losses": losses,
        }


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


Cell = Label | Mean


@dataclass(frozen=True)
class Table:
    """What every format prints: a title, a header and rows of cells.

    ``keys`` are the CSV columns every cell of the table shares (selection, dataset...).
    """

    title: str
    keys: dict[str, object]
    header: list[str]
    rows: list[list[Cell]]

    def csv_lines(self) -> Iterator[dict[str, object]]:
        """One line per statistic cell: the table's keys, its row's labels, its column
        (the ``domain``) and its statistics."""
        for row in self.rows:
            labels = {c.field: c.value for c in row if isinstance(c, Label) and c.field}
            for column, cell in zip(self.header, row):
                if isinstance(cell, Mean):
                    yield {**self.keys, **labels, "domain": column, **cell.stats()}
