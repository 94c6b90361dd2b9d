"""Errors that gaqat explains to its users in one paragraph instead of a traceback.

:class:`UsageError` means the command's arguments are wrong: it is raised before any work
starts or any file is touched, and the command line exits with status 2, as for
argparse's own errors. Other known failures (``ValueError``, ``OSError``,
``RuntimeError``) happen at run time and exit with status 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UsageError(ValueError):
    """Bad arguments, found before any work started or any file was touched."""


@contextmanager
def as_usage_errors() -> Iterator[None]:
    """Treat the ValueError / FileNotFoundError of registries and loaders, met while
    checking a command's arguments, as usage errors."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
