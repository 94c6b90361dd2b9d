"""``load_dataset``: one entry point from a dataset name (or a folder) to its domains."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gaqat.data.digits_cache import default_data_dir
from gaqat.data.specs import SPECS
from gaqat.names import DATASETS, canonical_dataset

if TYPE_CHECKING:
    from gaqat.data.multidomain import MultiDomainDataset

FOLDER_PREFIX = "folder:"


def dataset_domains(name: str, root: str | Path | None = None) -> tuple[str, ...]:
    """The domains of a dataset, in index order; for the named ones without reading (or
    building) a single image."""
    named = DATASETS.get(canonical_dataset(name))
    return named if named is not None else tuple(load_dataset(name, root).domains)


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
    # Imported here: the datasets need torch, the names in dataset_domains do not.
    from gaqat.data.digits import load_digits
    from gaqat.data.folders import find_dataset_folder, load_image_folder

    key = canonical_dataset(name)
    if key == "digits":
        return load_digits(root)
    if key in DATASETS:
        spec = SPECS[key.lower()]
        return load_image_folder(find_dataset_folder(root or default_data_dir(), spec), spec)
    if name.lower().startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX) :] or root
        if not path:
            raise ValueError("'folder:' needs a path: folder:PATH, or pass root")
        return load_image_folder(Path(path))
    if Path(name).is_dir():
        return load_image_folder(Path(name))
    raise ValueError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
        f"or folder:PATH for a dataset laid out as PATH/<domain>/<class>/<image>"
    )
