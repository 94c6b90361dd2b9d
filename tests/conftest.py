"""Fixtures shared by several test files; the shared helpers (tiny runs, tiny models) are
in helpers.py (test files never import each other, nor conftest.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gaqat.data import build_digits
from gaqat.data.digits_cache import (
    ARRAYS_FILE,
    MANIFEST_FILE,
    cache_folder,
    content_hash,
    read_cache,
)

SMALL_DIGITS = 300  # images per domain in the tests' DigitsDG


@pytest.fixture(scope="session")
def full_digits_dir(tmp_path_factory):
    """The real DigitsDG cache (9297 images), built once per test process: for the tests
    of the build itself and of numbers that need every image."""
    data_dir = tmp_path_factory.mktemp("digits_full")
    build_digits(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory, full_digits_dir):
    """A valid DigitsDG cache of each domain's first ``SMALL_DIGITS`` images. Every run
    evaluates all of its data at each checkpoint, and on the full 9297 images that was
    95% of a tiny test run's time; the runs, splits and files are otherwise the same."""
    arrays, manifest = read_cache(cache_folder(full_digits_dir))
    small = {key: array[:SMALL_DIGITS] for key, array in arrays.items()}
    folder = cache_folder(tmp_path_factory.mktemp("digits_small"))
    folder.mkdir()
    np.savez_compressed(folder / ARRAYS_FILE, **small)
    manifest["counts"] = {d: len(small[f"{d}_y"]) for d in manifest["counts"]}
    manifest["content_sha256"] = content_hash(small)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder.parent


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on busy cores torch's threads only wait
    for each other: a module's tests on one (``pytestmark = usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Image folders in DomainBed's layout (the folder, loader and download tests) ---------


@pytest.fixture
def make_tree():
    """``make_tree(root, {domain: [class, ...]}, per_class=2, size=12)`` writes
    ``root/<domain>/<class>/<k>.png`` and returns ``root``: small images whose colour
    encodes the class (red), the domain (green) and the image (blue), and whose height
    grows with ``k``, so no two files of a class are alike."""

    def make(root: Path, layout: dict[str, list[str]], per_class: int = 2, size: int = 12) -> Path:
        for d, (domain, classes) in enumerate(layout.items()):
            for c, name in enumerate(classes):
                folder = root / domain / name
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(per_class):
                    colour = (20 * c % 256, 40 * d % 256, 30 * k % 256)
                    Image.new("RGB", (size, size + k), colour).save(folder / f"{k}.png")
        return root

    return make
