"""DomainBed's data protocol: seeded in/out holdout per domain, one equal minibatch per
training domain per step, evaluation loaders over every split.

The holdout is DomainBed's own: domain i under trial seed t is split with
``seed_hash(t, i)``, so a domain whose images are listed in the same order as DomainBed's
``ImageFolder`` lists them gets the same in and out images as a DomainBed run.

Training batches are a pure function of (seed, domain, step): sample indices come from
per-epoch permutations that any step can recompute, and each sample's augmentation runs
under its own seed. A run resumed at step t therefore sees exactly the batches a straight
run would have seen, whatever the number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gaqat.data.multidomain import DomainDataset, MultiDomainDataset
from gaqat.seeding import seed_hash

DEFAULT_EVAL_BATCH_SIZE = 128
#: DomainBed's holdout: the fraction of each domain kept out of training for validation.
HOLDOUT_FRACTION = 0.2


def holdout_split(
    size: int, fraction: float = HOLDOUT_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(in, out) sorted index arrays: ``int(size * fraction)`` indices held out.

    DomainBed's ``split_dataset``: ``RandomState(seed)`` shuffles the indices (the stream is
    fixed across platforms and numpy versions) and the first ``int(size * fraction)`` are
    out. They come back sorted: the order carries nothing here (training batches come from
    ``StepSampler``'s own permutations, evaluation counts), and sorted indices read a
    domain's files in order.
    """
    _check_fraction(fraction)
    order = np.random.RandomState(seed).permutation(size)
    n_out = int(size * fraction)
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def min_domain_size(fraction: float = HOLDOUT_FRACTION) -> int:
    """The fewest images for which ``holdout_split`` leaves both splits non-empty (5 at
    20%). A run needs both: a training domain's out split is its validation set, which
    model selection reads, and a held-out domain's out split is the oracle's; without
    them the run's records lack accuracies that its summary and report read."""
    _check_fraction(fraction)
    if fraction == 0:
        return 1  # no holdout asked for
    return next(n for n in itertools.count(2) if 1 <= int(n * fraction) < n)


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")


def check_domain_sizes(ds: MultiDomainDataset, fraction: float = HOLDOUT_FRACTION) -> None:
    """Refuse a dataset with a domain too small to split (see ``min_domain_size``)."""
    needed = min_domain_size(fraction)
    small = [
        f"{ds.root / domain if ds.root else repr(domain)} ({len(data)} images)"
        for domain, data in zip(ds.domains, ds.datasets)
        if len(data) < needed
    ]
    if small:
        raise ValueError(
            f"{ds.name}: too few images in domain folder(s) {', '.join(small)}: each domain needs "
            f"at least {needed} images, so that holding out {fraction:.0%} of it for "
            f"validation leaves images on both sides. Add images, or move the domain out "
            f"of the dataset"
        )


def check_run_data(ds: MultiDomainDataset, test_envs: Sequence[int]) -> None:
    """What a training run asks of its data beyond loading: every domain large enough
    for DomainBed's holdout, and no held-out class that no training domain has."""
    check_domain_sizes(ds)
    check_held_out_classes(ds, test_envs)


def check_held_out_classes(ds: MultiDomainDataset, test_envs: Sequence[int]) -> None:
    """Refuse held-out images of a class no training domain has: the model can never get
    them right, so the held-out accuracy would measure the class lists, not
    generalization. Domains that name their classes differently end here (a class map
    joins them)."""
    counts = ds.class_counts()
    training = [i for i in range(len(ds)) if i not in test_envs]
    seen = counts[training].sum(axis=0) > 0
    unseen = {
        ds.domains[e]: [c for k, c in enumerate(ds.classes) if counts[e, k] and not seen[k]]
        for e in sorted(set(test_envs))
    }
    listing = "; ".join(f"{d!r}: {_shown(names)}" for d, names in unseen.items() if names)
    if listing:
        raise ValueError(
            f"{ds.name}: held-out domains have images of classes that no training domain "
            f"({', '.join(repr(ds.domains[i]) for i in training)}) has ({listing}); the "
            f"model cannot get them right, so their accuracy would measure nothing. If the "
            f"domains name their class folders differently, join them with --class-map "
            f"FILE, a JSON object {{domain: {{folder name: class}}}}"
        )


def _shown(names: Sequence[str], limit: int = 10) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass(frozen=True)
class Split:
    """One domain's holdout: indices into ``ds[domain]``."""

    domain: str
    in_indices: np.ndarray = field(repr=False)
    out_indices: np.ndarray = field(repr=False)


class SplitView(Dataset):
    """A subset of one domain served with a given transform.

    A key may be a position or ``(position, seed)``; a ``seeded`` view passes the seed to
    its (training) transform, which draws its augmentation from it alone.
    """

    def __init__(
        self, domain: DomainDataset, indices: np.ndarray, transform: Callable, seeded: bool = False
    ) -> None:
        self.domain = domain
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seeded = seeded

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        position, seed = key if isinstance(key, tuple) else (key, None)
        index = int(self.indices[position])
        raw = self.domain.raw(index)
        image = self.transform(raw, seed) if self.seeded else self.transform(raw)
        return image, int(self.domain.labels[index])


class StepSampler(Sampler):
    """Infinite batch sampler over ``size`` items; batch t is a function of (seed, stream, t).

    Items are drawn without replacement within an epoch (a seeded permutation per epoch),
    and each comes with a per-sample augmentation seed. ``shard=(rank, ranks)`` keeps the
    rank's contiguous 1/ranks of every batch: the ranks together see the batch one process
    would, image for image.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        stream: int,
        start_step: int = 0,
        shard: tuple[int, int] = (0, 1),
    ):
        if size < 1 or batch_size < 1:
            raise ValueError(f"need size >= 1 and batch_size >= 1, got {size} and {batch_size}")
        rank, ranks = shard
        if batch_size % ranks:
            raise ValueError(
                f"batch_size {batch_size} does not split into {ranks} equal shards: "
                f"give a batch size divisible by the number of processes"
            )
        self.shard = slice(rank * batch_size // ranks, (rank + 1) * batch_size // ranks)
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.start_step = start_step
        self._permutations: dict[int, np.ndarray] = {}

    def batch(self, step: int) -> list[tuple[int, int]]:
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, self.size)
        items = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            items[chosen] = self._permutation(int(epoch))[offsets[chosen]]
        rng = np.random.default_rng([self.seed, self.stream, 1, step])
        seeds = rng.integers(0, 2**63 - 1, size=self.batch_size)
        return list(zip(items.tolist(), seeds.tolist()))[self.shard]

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # batches smaller than an epoch span at most two
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, self.stream, 0, epoch])
            self._permutations[epoch] = rng.permutation(self.size)
        return self._permutations[epoch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (self.batch(step) for step in itertools.count(self.start_step))


class TrainBatches:
    """Iterator of steps: each ``next`` is a list of one ``(x, y)`` per training domain."""

    def __init__(
        self,
        views: Sequence[SplitView],
        streams: Sequence[int],
        batch_size: int,
        seed: int,
        start_step: int,
        num_workers: int,
        pin_memory: bool,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self._loaders = [
            DataLoader(
                view,
                batch_sampler=StepSampler(len(view), batch_size, seed, stream, start_step, shard),
                num_workers=num_workers,
                pin_memory=pin_memory,
                generator=_private_generator(seed),
            )
            for view, stream in zip(views, streams)
        ]
        self._iterators: list[Iterator] | None = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterators is None:  # workers start on first use, not at construction
            self._iterators = [iter(loader) for loader in self._loaders]
        return [next(it) for it in self._iterators]


class DomainLoaders:
    """What ``make_loaders`` returns: ``train`` (from step 0), ``eval``, ``splits``, and the
    ``seed`` and ``holdout_fraction`` they came from (a run's record states them)."""

    def __init__(
        self,
        dataset: MultiDomainDataset,
        test_envs: Sequence[int],
        batch_size: int,
        seed: int,
        holdout_fraction: float,
        splits: list[Split],
        augment: bool,
        num_workers: int,
        image_size: int,
        eval_batch_size: int,
    ) -> None:
        self.train_envs = tuple(i for i in range(len(dataset)) if i not in test_envs)
        self.batch_size = batch_size
        self.seed = seed
        self.holdout_fraction = holdout_fraction
        self.splits = splits
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available()
        self._train_views = [
            SplitView(
                dataset[i],
                splits[i].in_indices,
                dataset[i].make_transform(image_size, train=augment),
                seeded=augment,
            )
            for i in self.train_envs
        ]
        self.eval: dict[str, DataLoader] = {}
        for i, split in enumerate(splits):
            transform = dataset[i].make_transform(image_size, train=False)
            for part, indices in (("in", split.in_indices), ("out", split.out_indices)):
                if len(indices):
                    self.eval[f"env{i}_{part}"] = DataLoader(
                        SplitView(dataset[i], indices, transform),
                        batch_size=eval_batch_size,
                        shuffle=False,
                        num_workers=num_workers,
                        pin_memory=self.pin_memory,
                        persistent_workers=num_workers > 0,
                        generator=_private_generator(seed),
                    )
        self._train: TrainBatches | None = None

    @property
    def train(self) -> TrainBatches:
        """The training stream from step 0 (created once; see ``train_batches`` to resume)."""
        if self._train is None:
            self._train = self.train_batches(0)
        return self._train

    def train_batches(self, start_step: int = 0, shard: tuple[int, int] = (0, 1)) -> TrainBatches:
        """A fresh training stream whose first batch is the one a straight run sees at
        ``start_step``; with ``shard=(rank, ranks)``, that rank's share of it."""
        return TrainBatches(
            self._train_views,
            self.train_envs,
            self.batch_size,
            self.seed,
            start_step,
            self.num_workers,
            self.pin_memory,
            shard,
        )


def _private_generator(seed: int) -> torch.Generator:
    """DataLoaders draw worker seeds from this, not from (and so not advancing) the
    global generator that model code relies on."""
    return torch.Generator().manual_seed(seed)


def make_loaders(
    ds: MultiDomainDataset,
    test_envs: Sequence[int],
    batch_size: int,
    *,
    seed: int = 0,
    holdout_fraction: float = HOLDOUT_FRACTION,
    augment: bool = True,
    num_workers: int = 0,
    image_size: int | None = None,
    eval_batch_size: int | None = None,
) -> DomainLoaders:
    """Splits and loaders for training on every domain not in ``test_envs``.

    ``seed`` is DomainBed's trial seed: it fixes each domain's holdout (through
    ``seed_hash(seed, domain index)``, as DomainBed) and the training batches.
    """
    test_envs = sorted({int(i) for i in test_envs})
    bad = [i for i in test_envs if not 0 <= i < len(ds)]
    if bad:
        raise ValueError(
            f"test_envs {bad} out of range for {ds.name}'s {len(ds)} domains "
            f"({', '.join(f'{i}={d}' for i, d in enumerate(ds.domains))})"
        )
    if len(test_envs) == len(ds):
        raise ValueError(f"test_envs {test_envs} leave no training domain in {ds.name}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    check_domain_sizes(ds, holdout_fraction)
    splits = [
        Split(domain, *holdout_split(len(ds[i]), holdout_fraction, seed_hash(int(seed), i)))
        for i, domain in enumerate(ds.domains)
    ]
    return DomainLoaders(
        ds,
        test_envs,
        batch_size,
        seed,
        holdout_fraction,
        splits,
        augment,
        num_workers,
        image_size or ds.image_size,
        eval_batch_size or DEFAULT_EVAL_BATCH_SIZE,
    )
