"""Field checks for the JSON records gaqat reads back (``results.jsonl``, ``gradients.jsonl``).

Every reader checks its records here, so a bad record reads the same wherever it is met:
the file and line, the field, what it holds and what was expected. A field is named by
its dotted path (``args.trial_seed``); its type is a Python type, checked as JSON values
are: a ``float`` field also takes an integer, and only a ``bool`` field takes true or
false. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping

_MISSING = object()
_EXPECTED = {float: "a number", dict: "a JSON object", list: "a JSON array"}


def is_a(value: object, kind: type) -> bool:
    """Whether a JSON ``value`` is of ``kind`` (ints are numbers, booleans are not)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _get(record: dict, key: str) -> object:
    """The value at the dotted path ``key``, or ``_MISSING``."""
    value: object = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def check_fields(
    record: object, fields: Mapping[str, type], where: str, required: bool = True
) -> dict:
    """``record`` if it is a JSON object whose ``fields`` (dotted path -> type) hold values
    of their types, else a ValueError that starts with ``where`` ("FILE, line N").

    Fields are checked in order, so list a parent (``args``: dict) before its children.
    With ``required`` False a missing field passes; one that is there is still checked.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, kind in fields.items():
        value = _get(record, key)
        if value is _MISSING:
            if required:
                raise ValueError(f"{where}: missing field {key!r}")
        elif not is_a(value, kind):
            raise ValueError(
                f"{where}: field {key!r} is {value!r}, expected "
                f"{_EXPECTED.get(kind, kind.__name__)}"
            )
    return record
