"""Fixtures shared by several test files; the shared helpers (tiny runs, tiny models) are
in helpers.py (test files never import each other, nor conftest.py)."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from gaqat.data import build_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A DigitsDG cache built once per test session (the build takes seconds)."""
    data_dir = tmp_path_factory.mktemp("digits_data")
    build_digits(data_dir)
    return data_dir


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
