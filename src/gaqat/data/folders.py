"""Image folders in DomainBed's layout: ``ROOT/<domain>/<class>/<image>``.

Unlike DomainBed's per-domain ``ImageFolder``, labels come from one class list shared by
every domain (the named dataset's classes, or the sorted union of class folders, after a
class map if one is given), so a domain that lacks a class cannot shift the labels of the
others.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from gaqat.data.classmap import ClassMap
from gaqat.data.multidomain import DomainDataset, MultiDomainDataset
from gaqat.data.specs import FolderSpec
from gaqat.data.transforms import photo_transform

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

#: What PIL raises for a file it cannot read or decode. A header claiming more pixels than
#: PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is one: decoding it could
#: take gigabytes, and PIL raises past twice the limit (and only warns below it).
_PIL_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
#: 16-bit greyscale, which ``convert("RGB")`` would clip at 255 (see ``to_rgb``).
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

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
                return to_rgb(image)
        except _PIL_ERRORS as error:
            # The header was readable when scanned, the pixels are not: name the file.
            raise RuntimeError(f"cannot decode image {path}: {error}") from error

    def make_transform(self, image_size: int, train: bool) -> Callable:
        return photo_transform(image_size, train)

    def undecodable(self) -> list[int]:
        """Indices of the images whose pixels fail to decode (truncated or corrupt files,
        which a header check lets through and which would stop training when drawn)."""
        with _refusing_bombs(), ThreadPoolExecutor(max_workers=8) as pool:
            decodes = list(pool.map(_decodes, self.paths))
        return [i for i, ok in enumerate(decodes) if not ok]


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB. ``convert("RGB")`` clips 16-bit greyscale (modes ``I;16`` and
    ``I``) at 255, which turns nearly every pixel white; those are scaled by 1/257 instead,
    which maps 0..65535 onto 0..255 exactly, as reducing a PNG's sample depth does. A fixed
    scale keeps brightness comparable across images, where stretching each image's own
    range would brighten dark photos and blow up the noise of flat ones."""
    if image.mode in _WIDE_MODES:
        pixels = np.rint(np.asarray(image, dtype=np.float64) / 257)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_image_folder(
    root: str | Path, spec: FolderSpec | None = None, class_map: ClassMap | None = None
) -> MultiDomainDataset:
    """Load a dataset folder whose subfolders are domains.

    With ``spec`` (a named dataset) the domains and classes must be the spec's; without,
    every subfolder is a domain (in sorted order) and the classes are the sorted union of
    their class folders. ``class_map`` says which class a domain's folder holds when the
    domains name their classes differently.
    """
    root = Path(root)
    label = spec.name if spec else root.name
    domains = _domain_folders(root, spec, label)
    folders = {d: _subfolders(root / d) for d in domains}
    if spec is None:
        _refuse_folder_of_datasets(root, folders, label)
    classes, class_of = _classes(root, folders, spec, class_map)
    index = {c: i for i, c in enumerate(classes)}

    scanned = [
        _scan_domain(root / d, {f: index[c] for f, c in class_of[d].items()}) for d in domains
    ]
    unreadable = [bad for _, _, problems in scanned for bad in problems]
    if unreadable:
        shown = "; ".join(f"{path}: {problem}" for path, problem in unreadable[:3])
        warnings.warn(
            f"{label}: skipped {len(unreadable)} unreadable, corrupt or oversized image(s) "
            f"under {root} ({'first: ' if len(unreadable) > 3 else ''}{shown})",
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
                f"{label}: domain {domain!r} has no images of class(es) {', '.join(missing)} "
                f"(if the domains name their classes differently, join them with a class "
                f"map: --class-map)",
                stacklevel=2,
            )
        datasets.append(
            ImageFolderDomain(paths, np.array(labels), photo_transform(PHOTO_SIZE, train=False))
        )
    fingerprint = _fingerprint(root, domains, classes, datasets)
    return MultiDomainDataset(
        label, domains, classes, datasets, PHOTO_SIZE, root=root, fingerprint=fingerprint
    )


def _classes(
    root: Path, folders: dict[str, list[str]], spec: FolderSpec | None, class_map: ClassMap | None
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The class list (the spec's, or the sorted union of what the domains hold) and,
    per domain, the class each of its folders holds (its own name, unless mapped)."""
    if class_map is not None:
        class_map.check(folders)
    class_of = {
        d: class_map.classes_of(d, found) if class_map else {f: f for f in found}
        for d, found in folders.items()
    }
    if spec is None:
        return sorted({c for mapped in class_of.values() for c in mapped.values()}), class_of
    _refuse_stray_classes(root, class_of, spec)
    return list(spec.classes), class_of


def _refuse_stray_classes(
    root: Path, class_of: dict[str, dict[str, str]], spec: FolderSpec
) -> None:
    """A named dataset's folders hold only its classes (a stray one is a misplaced
    download, not a class to train on)."""
    known = set(spec.classes)
    for domain, mapped in class_of.items():
        stray = [folder for folder, c in mapped.items() if c not in known]
        if stray:
            raise ValueError(
                f"{spec.name}: {root / domain / stray[0]} is not a class of {spec.name} "
                f"(stray folders: {', '.join(stray)}); expected {spec.layout()}"
            )


def _refuse_folder_of_datasets(root: Path, folders: dict[str, list[str]], label: str) -> None:
    """A folder that holds datasets (``ROOT/PACS/<domain>/<class>/<image>``), read as a
    dataset, would make each dataset a domain and its domains classes. Its mark: no class
    folder holds an image, each holds only folders."""
    class_folders = [root / d / c for d, found in folders.items() for c in found]
    if not class_folders or any(_holds_images(f) for f in class_folders):
        return
    if not all(_subfolders(f) for f in class_folders):
        return
    meant = " or ".join(str(root / d) for d in list(folders)[:3])
    raise ValueError(
        f"{label}: {root} looks like a folder of datasets, not a dataset: its class "
        f"folders (such as {class_folders[0]}) hold no images, only more folders, as "
        f"ROOT/<dataset>/<domain>/<class>/<image> would; did you mean {meant}?"
    )


def _holds_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in entries)


def _fingerprint(
    root: Path,
    domains: Sequence[str],
    classes: Sequence[str],
    datasets: Sequence[ImageFolderDomain],
) -> str:
    """A digest of the domains, the classes in label order and each image's class and
    path under ``root``: what a run's labels and splits depend on. Moving the folder keeps
    it; another folder of the same name, or images added, removed or renamed, change it."""
    digest = hashlib.sha256(json.dumps([list(domains), list(classes)]).encode())
    prefix = len(str(root)) + 1
    for data in datasets:
        lines = (f"{classes[y]}\t{p[prefix:]}\n" for p, y in zip(data.paths, data.labels))
        digest.update("".join(lines).encode())
    return digest.hexdigest()[:16]


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
    folder: Path, labels: Mapping[str, int]
) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """(image paths, labels, (path, problem) of the files PIL cannot use) of the class
    folders ``labels`` maps to a label; non-image files are ignored."""
    candidates = [
        (path, label) for name, label in labels.items() for path in _image_files(folder / name)
    ]
    with _refusing_bombs(), ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound
        problems = list(pool.map(_header_problem, [p for p, _ in candidates]))
    good = [c for c, problem in zip(candidates, problems) if problem is None]
    bad = [(p, problem) for (p, _), problem in zip(candidates, problems) if problem is not None]
    return [p for p, _ in good], [y for _, y in good], bad


def _image_files(folder: Path) -> list[str]:
    """The image files under a class folder, in sorted order. Linked folders are followed
    (as DomainBed's ImageFolder follows them) but never into a folder already walked, so
    a link loop (``loop -> .``) or two links to one folder count no image twice."""
    files, walked = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in walked:
            dirnames.clear()
            continue
        walked.add(real)
        dirnames.sort()
        files += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return files


@contextmanager
def _refusing_bombs() -> Iterator[None]:
    """Make PIL's decompression-bomb warning an error while files are checked (the filter
    is process-wide, so the checking threads see it): such a file is then refused by name
    instead of decoded at full size."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _decodes(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except _PIL_ERRORS:
        return False


def _header_problem(path: str) -> str | None:
    """Why PIL cannot use the file, from its header alone (cheap: pixels are decoded
    later); None when it can."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"too large to decode safely ({error})"
    except _PIL_ERRORS:
        return "not an image PIL can read"
    return None if width > 0 and height > 0 else "an image of no pixels"
