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

Each name is imported from its module on first use, so that what needs no torch stays
free of it: ``gaqat.data.specs``, ``gaqat.data.download``, the DigitsDG cache, and
``dataset_domains`` of a named dataset.
"""

from importlib import import_module

#: Each public name and the module that defines it.
_MODULES = {
    "SPECS": "specs",
    "DomainDataset": "multidomain",
    "DomainLoaders": "loaders",
    "FolderSpec": "specs",
    "MultiDomainDataset": "multidomain",
    "Split": "loaders",
    "TrainBatches": "loaders",
    "build_digits": "digits_cache",
    "check_run_data": "loaders",
    "check_same_data": "registry",
    "dataset_record": "registry",
    "dataset_domains": "registry",
    "default_data_dir": "digits_cache",
    "download_dataset": "download",
    "ensure_digits": "digits_cache",
    "holdout_split": "loaders",
    "load_dataset": "registry",
    "load_recorded": "registry",
    "make_loaders": "loaders",
    "preview_grid": "preview",
}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULES[name]}"), name)
