"""Tables as text: markdown, LaTeX (booktabs) or long-format CSV.

Markdown and LaTeX print notes, then each table under its title; LaTeX puts the notes
and titles in comments. CSV has no notes: one line per statistic cell, easy to pivot.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from gaqat.report.table import Style, Table


def _same(text: str) -> str:
    return text


# Every character LaTeX gives a meaning to in running text, as text.
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX prints it literally (algorithm and domain names may hold anything)."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


MARKDOWN = Style(pm="±", missing="–", escape=_same)
LATEX = Style(pm=r"$\pm$", missing="--", escape=latex_escape)


def as_markdown(notes: list[str], tables: list[Table]) -> str:
    out = [*notes, ""]
    for table in tables:
        out += [
            f"### {table.title}",
            "",
            "| " + " | ".join(table.header) + " |",
            "|" + "---|" * len(table.header),
        ]
        out += ["| " + " | ".join(cell.text(MARKDOWN) for cell in row) + " |" for row in table.rows]
        out.append("")
    return "\n".join(out)


def as_latex(notes: list[str], tables: list[Table]) -> str:
    out = ["% " + note for note in notes]
    for table in tables:
        out += [
            "",
            f"% {table.title}",
            r"\begin{tabular}{ll" + "c" * (len(table.header) - 2) + "}",
            r"\toprule",
            " & ".join(map(latex_escape, table.header)) + r" \\",
            r"\midrule",
        ]
        out += [" & ".join(cell.text(LATEX) for cell in row) + r" \\" for row in table.rows]
        out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def as_csv(header: Sequence[str], tables: list[Table]) -> str:
    """The CSV ``header``, then every table's :meth:`~Table.csv_lines`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(line for table in tables for line in table.csv_lines())
    return buffer.getvalue()
