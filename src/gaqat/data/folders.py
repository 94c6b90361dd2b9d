"""Image folders in DomainBed's layout: ``ROOT/<domain>/<class>/<image>``.

Unlike DomainBed's per-domain ``ImageFolder``, labels come from one class list shared by
every domain (the named dataset's classes, or the sorted union of class folders), so a
domain that lacks a class cannot shift the labels of the others.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gaqat.data.multidomain import DomainDataset, MultiDomainDataset
from gaqat.data.specs import FolderSpec
from gaqat.data.transforms import photo_transform

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

#: Image side of the photo datasets, as in DomainBed; ``make_loaders(image_size=...)`` overrides it.
PHOTO_SIZE = 224


class ImageFolderDomain(DomainDataset):
    """One domain's image files, decoded on access (photo datasets do not fit in memory)."""

    def __init__(self, paths: Sequence[str | Path], labels: np.ndarray, transform: Callable):
        super().__init__(labels, transform)
        self.paths = [str(p) for p in paths]  # str, not Path: a third of the memory at scale

    def raw(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            # The header was readable when scanned, the pixels are not: name the file.
            raise RuntimeError(f"cannot decode image {path}: {error}") from error

    def make_transform(self, image_size: int, train: bool) -> Callable:
        return photo_transform(image_size, train)

    def undecodable(self) -> list[int]:
        """Indices of the images whose pixels fail to decode (truncated or corrupt files,
        which a header check lets through and which would stop training when drawn)."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            decodes = list(pool.map(_decodes, self.paths))
        return [i for i, ok in enumerate(decodes) if not ok]


def load_image_folder(root: str | Path, spec: FolderSpec | None = None) -> MultiDomainDataset:
    """Load a dataset folder whose subfolders are domains.

    With ``spec`` (a named dataset) the domains and classes must be the spec's; without,
    every subfolder is a domain (in sorted order) and the classes are the sorted union of
    their class folders.
    """
    root = Path(root)
    label = spec.name if spec else root.name
    domains = _domain_folders(root, spec, label)
    class_dirs = {d: _subfolders(root / d) for d in domains}
    if spec is not None:
        classes = list(spec.classes)
        known = set(classes)
        for domain, found in class_dirs.items():
            stray = [c for c in found if c not in known]
            if stray:
                raise ValueError(
                    f"{label}: {root / domain / stray[0]} is not a class of {label} "
                    f"(stray folders: {', '.join(stray)}); expected {spec.layout()}"
                )
    else:
        classes = sorted(set().union(*class_dirs.values()))
    index = {c: i for i, c in enumerate(classes)}

    scanned = [_scan_domain(root / d, class_dirs[d], index) for d in domains]
    unreadable = [p for _, _, bad in scanned for p in bad]
    if unreadable:
        warnings.warn(
            f"{label}: skipped {len(unreadable)} unreadable or corrupt image(s) under {root} "
            f"(first: {unreadable[0]})",
            stacklevel=2,
        )
    datasets = []
    for domain, (paths, labels, _) in zip(domains, scanned):
        if not paths:
            raise ValueError(
                f"{label}: domain folder {root / domain} has no readable images "
                f"(expected <class>/<image> with extensions {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        missing = sorted(set(classes) - {classes[i] for i in set(labels)})
        if missing:
            warnings.warn(
                f"{label}: domain {domain!r} has no images of class(es) {', '.join(missing)}",
                stacklevel=2,
            )
        datasets.append(
            ImageFolderDomain(paths, np.array(labels), photo_transform(PHOTO_SIZE, train=False))
        )
    return MultiDomainDataset(label, domains, classes, datasets, PHOTO_SIZE)


def find_dataset_folder(root: str | Path, spec: FolderSpec) -> Path:
    """``root/<folder>`` if present, else ``root`` itself when it holds the spec's domains."""
    root = Path(root)
    nested = root / spec.folder
    if nested.is_dir():
        return nested
    if root.is_dir() and set(_subfolders(root)) & set(spec.domains):
        return root
    found = _subfolders(root) if root.is_dir() else []
    raise FileNotFoundError(
        f"{spec.name}: no dataset found at {nested} or {root}; expected {spec.layout()}. "
        f"Folders found in {root}: {', '.join(found) or 'none'}. "
        f"Run `gaqat data download {spec.name} --root {root}` or lay the files out by hand."
    )


def _domain_folders(root: Path, spec: FolderSpec | None, label: str) -> list[str]:
    found = _subfolders(root) if root.is_dir() else []
    expected = list(spec.domains) if spec else found
    missing = [d for d in expected if d not in found]
    if not expected or missing:
        problem = f"missing domain folder(s) {', '.join(missing)}" if missing else "no domains"
        where = f"{root}" if root.is_dir() else f"{root} (which does not exist)"
        wanted = ", ".join(spec.domains) if spec else "one subfolder per domain"
        raise FileNotFoundError(
            f"{label}: {problem} in {where}; expected domains: {wanted}; "
            f"found: {', '.join(found) or 'none'}"
        )
    return expected


def _subfolders(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _scan_domain(
    folder: Path, class_names: Sequence[str], index: dict[str, int]
) -> tuple[list[Path], list[int], list[Path]]:
    """(image paths, labels, unreadable paths); non-image files are ignored."""
    candidates: list[tuple[Path, int]] = []
    for name in class_names:
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames.sort()
            candidates += [
                (Path(dirpath) / f, index[name])
                for f in sorted(filenames)
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS
            ]
    with ThreadPoolExecutor(max_workers=8) as pool:  # header reads are I/O bound
        readable = list(pool.map(_readable, [p for p, _ in candidates]))
    good = [c for c, ok in zip(candidates, readable) if ok]
    bad = [p for (p, _), ok in zip(candidates, readable) if not ok]
    return [p for p, _ in good], [y for _, y in good], bad


def _decodes(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


def _readable(path: Path) -> bool:
    """Whether PIL recognises the file's header (cheap: pixels are decoded later)."""
    try:
        with Image.open(path) as image:
            return image.size[0] > 0 and image.size[1] > 0
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False
