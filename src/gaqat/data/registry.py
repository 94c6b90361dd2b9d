"""``load_dataset``: one entry point from a dataset name (or a folder) to its domains."""

from __future__ import annotations

from pathlib import Path

from gaqat.data.digits import DOMAINS as DIGITS_DOMAINS
from gaqat.data.digits import default_data_dir, load_digits
from gaqat.data.folders import find_dataset_folder, load_image_folder
from gaqat.data.multidomain import MultiDomainDataset
from gaqat.data.specs import SPECS

DIGITS_NAMES = ("digits", "digitsdg")
FOLDER_PREFIX = "folder:"


def dataset_names() -> list[str]:
    """The names ``load_dataset`` accepts, besides ``folder:PATH``."""
    return ["digits", *(spec.name for spec in SPECS.values())]


def dataset_domains(name: str, root: str | Path | None = None) -> tuple[str, ...]:
    """The domains of a dataset, in index order; for the named ones without reading (or
    building) a single image."""
    key = name.lower()
    if key in DIGITS_NAMES:
        return DIGITS_DOMAINS
    if key in SPECS:
        return SPECS[key].domains
    return tuple(load_dataset(name, root).domains)


def load_dataset(name: str, root: str | Path | None = None) -> MultiDomainDataset:
    """A multi-domain dataset by name (case-insensitive).

    - ``"digits"``: DigitsDG; ``root`` is the data directory (default ``$GAQAT_DATA`` or
      ``~/.cache/gaqat``), built there on first use.
    - ``"PACS"``, ``"VLCS"``, ``"OfficeHome"``, ``"TerraIncognita"``, ``"DomainNet"``:
      ``root`` is the folder holding e.g. ``PACS/``, or that dataset folder itself
      (default: the data directory).
    - ``"folder:PATH"``, ``"folder:"`` with ``root``, or any existing directory: a custom
      dataset in DomainBed's layout, one subfolder per domain.
    """
    key = name.lower()
    if key in DIGITS_NAMES:
        return load_digits(root)
    if key in SPECS:
        spec = SPECS[key]
        return load_image_folder(find_dataset_folder(root or default_data_dir(), spec), spec)
    if key.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX):] or root
        if not path:
            raise ValueError("'folder:' needs a path: folder:PATH, or pass root")
        return load_image_folder(Path(path))
    if Path(name).is_dir():
        return load_image_folder(Path(name))
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}, "
                     f"or folder:PATH for a dataset laid out as PATH/<domain>/<class>/<image>")
