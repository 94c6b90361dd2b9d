"""Multi-domain image data under the DomainBed protocol.

Public API (what training code calls)::

    ds = load_dataset(name, root=None, class_map=None) -> MultiDomainDataset
        name: "digits" (DigitsDG, built offline into root = data dir, default
        $GAQAT_DATA or ~/.cache/gaqat), "PACS", "VLCS", "OfficeHome", "TerraIncognita",
        "DomainNet" (root = the folder holding e.g. PACS/, or PACS/ itself), or
        "folder:PATH" / an existing directory (custom ROOT/<domain>/<class>/<image>).
        Case-insensitive. class_map: a JSON file {domain: {folder name: class}} for
        domains that name their class folders differently.
    ds.name, ds.domains, ds.classes, ds.num_classes, ds.input_shape (C, H, W)
    len(ds) == number of domains; ds[i] is domain i's torch Dataset of
        (image_tensor, label) with the evaluation transform.

    loaders = make_loaders(ds, test_envs, batch_size, *, seed=0, holdout_fraction=0.2,
                           augment=True, num_workers=0, image_size=None,
                           eval_batch_size=None)
    loaders.train                      iterator; next() -> [(x, y) per training domain]
    loaders.train_batches(start_step)  the same stream from any step (resume)
    loaders.eval                       {"env{i}_in" | "env{i}_out": DataLoader}
    loaders.splits                     [Split(domain, in_indices, out_indices)]: DomainBed's
                                       holdout, domain i seeded with seed_hash(seed, i)
    loaders.seed, loaders.holdout_fraction   what the splits and batches came from

Transforms: photos follow DomainBed (224, RandomResizedCrop 0.7-1, flip, colour jitter
0.3, random grayscale, ImageNet normalisation; resize only at test time). DigitsDG is
32x32 normalised to [-1, 1], trained with shifts of at most 2 pixels only: flips and
colour jitter would destroy digits or the colour cues that separate their domains.

A run records ``dataset_record(ds, class_map)`` in its args (the folder's absolute path,
the class map, a fingerprint of the files); ``load_recorded(args, data_dir=None)`` loads
that data again and refuses other files of the same name (``check_same_data``).
``check_run_data(ds, test_envs)`` refuses data a run cannot use: a domain too small for
the holdout, held-out classes that no training domain has.

Other entry points: ``build_digits`` / ``ensure_digits`` (the DigitsDG cache),
``download_dataset`` (the five real datasets), ``preview_grid`` (a PNG of samples),
``holdout_split`` (DomainBed's seeded 80/20 split of one domain).

Where the names live: this package imports only its torch-free modules, so ``import
gaqat.data`` (the names above from ``registry``, ``specs``, ``download`` and
``digits_cache``) costs no torch import. The names that need torch are imported from
their module::

    from gaqat.data.loaders import make_loaders, holdout_split, check_run_data
    from gaqat.data.loaders import DomainLoaders, Split, TrainBatches
    from gaqat.data.multidomain import MultiDomainDataset, DomainDataset
    from gaqat.data.preview import preview_grid

Example: the domains of a named dataset (no image read, no torch), then a custom image
folder in DomainBed's layout, split and batched as ``gaqat train`` does::

    >>> from gaqat.data import dataset_domains, load_dataset
    >>> dataset_domains("pacs")
    ('art_painting', 'cartoon', 'photo', 'sketch')
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp()) / "toy"
    >>> for domain in ("photo", "sketch"):
    ...     for label in ("cat", "dog"):
    ...         folder = root / domain / label
    ...         folder.mkdir(parents=True)
    ...         for k in range(5):
    ...             Image.new("RGB", (8, 8), (50 * k, 0, 0)).save(folder / f"{k}.png")
    >>> ds = load_dataset(f"folder:{root}")
    >>> ds.domains, ds.classes, len(ds[0])
    (['photo', 'sketch'], ['cat', 'dog'], 10)
    >>> from gaqat.data.loaders import make_loaders
    >>> loaders = make_loaders(ds, test_envs=[1], batch_size=4, image_size=16)
    >>> [(tuple(x.shape), len(y)) for x, y in next(loaders.train)]  # per training domain
    [((4, 3, 16, 16), 4)]
    >>> sorted(loaders.eval)
    ['env0_in', 'env0_out', 'env1_in', 'env1_out']
"""

from gaqat.data.digits_cache import build_digits, default_data_dir, ensure_digits
from gaqat.data.download import download_dataset
from gaqat.data.registry import (
    check_same_data,
    dataset_domains,
    dataset_record,
    load_dataset,
    load_recorded,
)
from gaqat.data.specs import SPECS, FolderSpec

__all__ = [
    "SPECS",
    "FolderSpec",
    "build_digits",
    "check_same_data",
    "dataset_domains",
    "dataset_record",
    "default_data_dir",
    "download_dataset",
    "ensure_digits",
    "load_dataset",
    "load_recorded",
]
