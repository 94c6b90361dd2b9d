"""The DigitsDG cache: ``<data dir>/digits_dg/`` holds the arrays and their manifest.

Building takes seconds, so the arrays are kept as a compressed ``.npz`` beside a JSON
manifest that records how they were made (seed, fonts, photos, package versions) and a
SHA-256 of their content. The hash is checked on every load, so a truncated or edited
cache is rebuilt, not trusted. Both files are written atomically, as checkpoints are.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from gaqat.data.digits_synthesis import (
    BUILD_VERSION,
    CLASSES,
    DOMAINS,
    NAME,
    PHOTOS,
    SEED,
    SOURCE_PACKAGES,
    generate,
)
from gaqat.runfolder import replace_atomic

CACHE_FOLDER = "digits_dg"
ARRAYS_FILE = "digits_dg.npz"
MANIFEST_FILE = "manifest.json"


def default_data_dir() -> Path:
    """``$GAQAT_DATA`` or ``~/.cache/gaqat``: where DigitsDG is cached, and where the
    photo datasets are looked for when no root is given."""
    return Path(os.environ.get("GAQAT_DATA") or Path.home() / ".cache" / "gaqat").expanduser()


def cache_folder(data_dir: str | Path | None = None) -> Path:
    """``<data_dir>/digits_dg``; a path that already ends in ``digits_dg`` is taken as is."""
    data_dir = Path(data_dir or default_data_dir())
    return data_dir if data_dir.name == CACHE_FOLDER else data_dir / CACHE_FOLDER


def ensure_digits(data_dir: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, manifest) from a verified cache, rebuilding it when it is not usable."""
    folder = cache_folder(data_dir)
    if (folder / MANIFEST_FILE).exists() or (folder / ARRAYS_FILE).exists():
        try:
            return read_cache(folder)
        except (OSError, ValueError) as error:
            warnings.warn(
                f"DigitsDG cache in {folder} is unusable ({error}); rebuilding it", stacklevel=2
            )
    return build_digits(folder)


def build_digits(data_dir: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Generate DigitsDG and write the cache; returns (arrays, manifest)."""
    folder = cache_folder(data_dir)
    start = time.perf_counter()
    arrays, fonts = generate()
    manifest = {
        "name": NAME,
        "build_version": BUILD_VERSION,
        "seed": SEED,
        "domains": list(DOMAINS),
        "classes": list(CLASSES),
        "counts": {d: len(arrays[f"{d}_y"]) for d in DOMAINS},
        "content_sha256": content_hash(arrays),
        "fonts": [f.name for f in fonts],
        "photos": list(PHOTOS),
        "sources": {p: version(p) for p in SOURCE_PACKAGES},
    }
    folder.mkdir(parents=True, exist_ok=True)
    replace_atomic(folder / ARRAYS_FILE, lambda tmp: _write_arrays(tmp, arrays))
    manifest["build_seconds"] = round(time.perf_counter() - start, 2)
    text = json.dumps(manifest, indent=2).encode()
    replace_atomic(folder / MANIFEST_FILE, lambda tmp: tmp.write_bytes(text))
    return arrays, manifest


def read_cache(folder: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a cache folder; ValueError (or an I/O error) when it is not valid."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    if manifest.get("build_version") != BUILD_VERSION:
        raise ValueError(
            f"{folder / MANIFEST_FILE}: build_version "
            f"{manifest.get('build_version')}, expected {BUILD_VERSION}"
        )
    try:
        with np.load(folder / ARRAYS_FILE) as npz:
            arrays = {key: npz[key] for key in _array_keys()}
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"{folder / ARRAYS_FILE} is unreadable: {error!r}") from error
    if content_hash(arrays) != manifest.get("content_sha256"):
        raise ValueError(f"{folder / ARRAYS_FILE}: content SHA-256 differs from the manifest")
    return arrays, manifest


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the arrays themselves (not the .npz bytes, whose zip headers vary)."""
    digest = hashlib.sha256()
    for key in _array_keys():
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _array_keys() -> list[str]:
    return [f"{d}_{part}" for d in DOMAINS for part in ("x", "y")]


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as f:  # given a path, numpy would add ".npz" to the temporary name
        np.savez_compressed(f, **arrays)
