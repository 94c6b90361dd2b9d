"""Class maps: which class each domain's folders hold, when domains name them differently.

Some multi-domain collections name each domain's class folders in that domain's own
language (``en/cat``, ``fr/chat``). Read as they are, they share no class, and a model
tested on one domain would be scored on classes it never saw. A class map is a small
JSON file, ``{domain: {folder name: class}}``, that joins them without renaming anything
on disk. Folders (and domains) it does not name keep their folder name as their class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SHAPE = "{domain: {folder name: class}}"


@dataclass(frozen=True)
class ClassMap:
    """A checked class map; ``source`` (the file) names it in messages."""

    source: str
    entries: Mapping[str, Mapping[str, str]]

    def classes_of(self, domain: str, folders: Sequence[str]) -> dict[str, str]:
        """Each of ``domain``'s class folders and the class it holds."""
        mapped = self.entries.get(domain, {})
        return {folder: mapped.get(folder, folder) for folder in folders}

    def check(self, class_dirs: Mapping[str, Sequence[str]]) -> None:
        """Every domain and folder the map names exists (a typo would otherwise leave a
        class unjoined, and the run refused for a reason far from its cause)."""
        for domain, mapped in self.entries.items():
            if domain not in class_dirs:
                raise ValueError(
                    f"class map {self.source}: unknown domain {domain!r} "
                    f"(domains: {', '.join(class_dirs)})"
                )
            found = class_dirs[domain]
            for folder in mapped:
                if folder not in found:
                    raise ValueError(
                        f"class map {self.source}: {domain!r} has no class folder {folder!r} "
                        f"(found: {', '.join(found) or 'none'})"
                    )


def read_class_map(path: str | Path) -> ClassMap:
    """The class map in ``path``, its shape checked; errors name the file and the key."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"class map {source}: no such file") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"class map {source}: not valid JSON ({error}); expected an object {SHAPE}"
        ) from None
    _expect_object(entries, source, "", SHAPE)
    for domain, mapped in entries.items():
        _expect_object(mapped, source, f"{domain!r}: ", "{folder name: class}")
        for folder, name in mapped.items():
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"class map {source}: {domain!r} / {folder!r}: expected a class name "
                    f"(a non-empty string), got {json.dumps(name)}"
                )
    return ClassMap(source, entries)


def _expect_object(value: object, source: str, where: str, shape: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(
            f"class map {source}: {where}expected a JSON object {shape}, "
            f"got {json.dumps(value)[:60]}"
        )
