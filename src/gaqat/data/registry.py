"""``load_dataset``: one entry point from a dataset name (or a folder) to its domains;
``load_recorded``: from a run's recorded arguments back to the data it trained on."""

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


def load_dataset(
    name: str, root: str | Path | None = None, class_map: str | Path | None = None
) -> MultiDomainDataset:
    """A multi-domain dataset by name (case-insensitive).

    - ``"digits"``: DigitsDG; ``root`` is the data directory (default ``$GAQAT_DATA`` or
      ``~/.cache/gaqat``), built there on first use.
    - ``"PACS"``, ``"VLCS"``, ``"OfficeHome"``, ``"TerraIncognita"``, ``"DomainNet"``:
      ``root`` is the folder holding e.g. ``PACS/``, or that dataset folder itself
      (default: the data directory).
    - ``"folder:PATH"``, ``"folder:"`` with ``root``, or any existing directory: a custom
      dataset in DomainBed's layout, one subfolder per domain.

    ``class_map``: a JSON file ``{domain: {folder name: class}}`` for image folders whose
    domains name their classes differently (``gaqat.data.classmap``).
    """
    # Imported here: the datasets need torch, the names in dataset_domains do not.
    from gaqat.data.classmap import read_class_map
    from gaqat.data.digits import load_digits
    from gaqat.data.folders import find_dataset_folder, load_image_folder

    key = canonical_dataset(name)
    if key == "digits":
        if class_map is not None:
            raise ValueError(
                f"class map {class_map}: DigitsDG's classes are fixed; a class map is for "
                f"image folders whose domains name their classes differently"
            )
        return load_digits(root)
    mapping = read_class_map(class_map) if class_map is not None else None
    if key in DATASETS:
        spec = SPECS[key.lower()]
        folder = find_dataset_folder(root or default_data_dir(), spec)
        return load_image_folder(folder, spec, mapping)
    if name.lower().startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX) :] or root
        if not path:
            raise ValueError("'folder:' needs a path: folder:PATH, or pass root")
        return load_image_folder(Path(path), class_map=mapping)
    if Path(name).is_dir():
        return load_image_folder(Path(name), class_map=mapping)
    raise ValueError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
        f"or folder:PATH for a dataset laid out as PATH/<domain>/<class>/<image>"
    )


def dataset_record(ds: MultiDomainDataset, class_map: str | Path | None = None) -> dict:
    """What a run records beside ``args["dataset"]`` (the bare name, which DomainBed's
    tools group runs by, and which two folders can share) so that resuming or evaluating
    it finds its data and checks it: the folder's absolute path, the class map's, and the
    files' fingerprint. Empty for DigitsDG, which is rebuilt the same from its name."""
    if ds.root is None:
        return {}
    record = {"dataset_path": str(Path(ds.root).resolve()), "dataset_fingerprint": ds.fingerprint}
    if class_map is not None:
        record["class_map"] = str(Path(class_map).resolve())
    return record


def load_recorded(
    args: dict, data_dir: str | Path | None = None, source: str = "the run"
) -> MultiDomainDataset:
    """The dataset a run trained on, from the ``args`` it recorded, checked against the
    fingerprint it recorded. ``data_dir`` overrides where to look: for a named dataset
    the folder holding it (or the dataset folder itself), for a custom folder the folder
    itself or the one holding it (a moved copy). ``source`` names the run in messages."""
    name, path = args["dataset"], args.get("dataset_path")
    class_map = args.get("class_map")
    if path is None:  # DigitsDG, or a run recorded before paths were
        ds = load_dataset(name, data_dir or args.get("data_dir"), class_map)
    elif canonical_dataset(name) in DATASETS:
        ds = load_dataset(name, data_dir or path, class_map)
    else:
        folder = Path(data_dir) if data_dir else Path(path)
        if data_dir and (folder / Path(path).name).is_dir():
            folder = folder / Path(path).name
        ds = load_dataset(f"{FOLDER_PREFIX}{folder}", class_map=class_map)
    check_same_data(args, ds, source, "pass the folder it was trained on with --data-dir")
    return ds


def check_same_data(args: dict, ds: MultiDomainDataset, source: str, remedy: str) -> None:
    """Refuse data whose fingerprint differs from the one ``args`` recorded: the run's
    labels and holdout splits come from its own files, so on others a resumed run would
    train, and an evaluation score, on splits that are not the run's. Runs that recorded
    no fingerprint are not checked."""
    recorded = args.get("dataset_fingerprint")
    if recorded is None or recorded == ds.fingerprint:
        return
    here = Path(ds.root).resolve() if ds.root is not None else ds.name
    raise ValueError(
        f"{source} was trained on the images of {args.get('dataset_path', args['dataset'])} "
        f"(fingerprint {recorded}), but {here} holds other files (fingerprint "
        f"{ds.fingerprint}: another dataset of the same name, another class map, or "
        f"images added, removed or renamed since), and the run's labels and holdout "
        f"splits come from its own files: {remedy}"
    )
