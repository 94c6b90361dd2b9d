"""The multi-domain dataset: DomainBed's ``MultipleDomainDataset`` with named domains.

Each domain is a ``DomainDataset`` that separates reading an item (``raw``) from turning it
into a tensor (``transform``), so the loaders can serve the same items with the training
or the evaluation transform, at any image size, without reloading anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class DomainDataset(Dataset, ABC):
    """One domain: ``labels`` (int64 array), ``raw(i)``, and the eval ``transform``."""

    def __init__(self, labels: np.ndarray, transform: Callable) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def raw(self, index: int) -> Any:
        """The stored item before any transform (a PIL image or a uint8 CHW tensor)."""

    @abstractmethod
    def make_transform(self, image_size: int, train: bool) -> Callable:
        """The transform that turns ``raw`` items into tensors of ``image_size``."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.raw(index)), int(self.labels[index])


class MultiDomainDataset:
    """Named domains sharing one label space; ``ds[i]`` is the i-th domain's Dataset.

    An image folder also has its ``root`` and a ``fingerprint`` of its files, which a run
    records so that resuming or evaluating it can tell its data from another folder of
    the same name; both are None for data built in memory (DigitsDG).
    """

    def __init__(
        self,
        name: str,
        domains: Sequence[str],
        classes: Sequence[str],
        datasets: Sequence[DomainDataset],
        image_size: int,
        *,
        root: Path | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if len(domains) != len(datasets):
            raise ValueError(f"{name}: {len(domains)} domain names for {len(datasets)} datasets")
        self.name = name
        self.domains = list(domains)
        self.classes = list(classes)
        self.datasets = list(datasets)
        self.image_size = image_size
        self.root = root
        self.fingerprint = fingerprint

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.datasets)

    def __getitem__(self, index: int) -> DomainDataset:
        return self.datasets[index]

    def class_counts(self) -> np.ndarray:
        """Images per (domain, class): what ``gaqat data info`` prints."""
        return np.stack([np.bincount(d.labels, minlength=self.num_classes) for d in self.datasets])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}={len(d)}" for n, d in zip(self.domains, self.datasets))
        return f"MultiDomainDataset({self.name!r}, {self.num_classes} classes, {sizes})"
