"""DigitsDG, the offline four-domain digit benchmark, as a multi-domain dataset.

Its images are rendered by ``gaqat.data.digits_synthesis`` and kept by
``gaqat.data.digits_cache``; here they are served from memory, with no file or PIL work
per item.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gaqat.data.digits_cache import ensure_digits
from gaqat.data.digits_synthesis import CLASSES, DOMAINS, NAME, SIZE
from gaqat.data.multidomain import DomainDataset, MultiDomainDataset
from gaqat.data.transforms import DigitsTransform


class ArrayDomain(DomainDataset):
    """One domain held in memory as uint8 (N, 3, S, S) arrays: no file or PIL work per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[1] != 3
            or images.shape[2] != images.shape[3]
            or len(images) != len(labels)
        ):
            raise ValueError(
                f"expected uint8 images of shape (N, 3, S, S) and N labels, got "
                f"{images.dtype} {images.shape} and {len(labels)} labels"
            )
        self.images = images
        self.size = images.shape[-1]
        super().__init__(labels, self.make_transform(self.size, train=False))

    def raw(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index])

    def make_transform(self, image_size: int, train: bool) -> Callable:
        return DigitsTransform(image_size, self.size, train)


def load_digits(data_dir: str | Path | None = None) -> MultiDomainDataset:
    """DigitsDG from the cache under ``data_dir``, built first if missing or corrupt."""
    arrays, _ = ensure_digits(data_dir)
    datasets = [ArrayDomain(arrays[f"{d}_x"], arrays[f"{d}_y"]) for d in DOMAINS]
    return MultiDomainDataset(NAME, DOMAINS, CLASSES, datasets, SIZE)
