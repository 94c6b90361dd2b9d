"""The ``gaqat`` command: argument parsing only; every command calls one function elsewhere.

Each subcommand has its own ``_add_<name>`` function below, so adding or changing one
command touches one block.
"""

from __future__ import annotations

import argparse
import sys


def _add_data(sub: argparse._SubParsersAction) -> None:
    """``gaqat data ...`` (filled in by the data module's issue)."""


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``gaqat train`` and ``gaqat demo``."""


def _add_report(sub: argparse._SubParsersAction) -> None:
    """``gaqat report``."""


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``gaqat export``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gaqat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_train, _add_report, _add_export):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Bad input and known failure modes: one clear line, no traceback.
        print(f"gaqat {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
