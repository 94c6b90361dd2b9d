"""The DomainBed data protocol: seeded holdout, balanced deterministic training batches,
evaluation loaders over every split."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from gaqat.data import load_dataset
from gaqat.data.digits import ArrayDomain
from gaqat.data.loaders import StepSampler, holdout_split, make_loaders
from gaqat.data.multidomain import MultiDomainDataset

SIZES = (50, 37, 64)


def indexed_dataset(sizes=SIZES) -> MultiDomainDataset:
    """Tiny in-memory domains whose channel 0 holds the item's index (so batches tell which
    items they hold), channel 1 a ramp (so shifts show), label the index modulo 10."""
    datasets = []
    for n in sizes:
        images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        images[:, 0] = np.arange(n, dtype=np.uint8)[:, None, None]
        images[:, 1] = 8 * np.arange(32, dtype=np.uint8)
        datasets.append(ArrayDomain(images, np.arange(n) % 10))
    return MultiDomainDataset(
        "indexed", [f"d{i}" for i in range(len(sizes))], [str(k) for k in range(10)], datasets, 32
    )


def item_ids(x: torch.Tensor) -> list[int]:
    """Invert the eval normalisation of ``indexed_dataset``'s centre pixel."""
    return ((x[:, 0, 16, 16] * 0.5 + 0.5) * 255).round().long().tolist()


def test_holdout_split_is_pinned_disjoint_and_complete():
    in_idx, out_idx = holdout_split(10, 0.2, seed=0)
    # numpy's RandomState(0).permutation(10) is [2 8 4 9 1 6 7 3 0 5] on every machine.
    assert out_idx.tolist() == [2, 8] and in_idx.tolist() == [0, 1, 3, 4, 5, 6, 7, 9]
    a_in, a_out = holdout_split(1000, 0.2, seed=3)
    b_in, b_out = holdout_split(1000, 0.2, seed=3)
    assert np.array_equal(a_out, b_out) and len(a_out) == 200
    assert sorted(np.concatenate([a_in, a_out]).tolist()) == list(range(1000))
    assert not np.array_equal(holdout_split(1000, 0.2, seed=4)[1], a_out)
    with pytest.raises(ValueError, match="holdout_fraction"):
        holdout_split(10, 1.0)


def domainbed_holdout(n: int, trial_seed: int, env: int, fraction: float = 0.2):
    """DomainBed's split of domain ``env``, written out independently of gaqat: an md5 seed
    of the string "(trial_seed, env)", a shuffled list, the first int(n * fraction) out."""
    seed = int(hashlib.md5(str((trial_seed, env)).encode("utf-8")).hexdigest(), 16) % 2**31
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    return keys[int(n * fraction) :], keys[: int(n * fraction)]


@pytest.mark.parametrize("trial_seed", [0, 1, 7])
@pytest.mark.parametrize("fraction", [0.2, 0.35])
def test_each_domain_is_split_as_domainbed_splits_it(trial_seed, fraction):
    sizes = (50, 50, 37, 64, 11)  # two of equal size: they must still get different splits
    loaders = make_loaders(
        indexed_dataset(sizes), [1], batch_size=4, seed=trial_seed, holdout_fraction=fraction
    )
    assert loaders.holdout_fraction == fraction
    for i, n in enumerate(sizes):
        ref_in, ref_out = domainbed_holdout(n, trial_seed, i, fraction)
        split = loaders.splits[i]
        assert split.in_indices.tolist() == sorted(ref_in)
        assert split.out_indices.tolist() == sorted(ref_out)
    assert loaders.splits[0].out_indices.tolist() != loaders.splits[1].out_indices.tolist()


def test_training_batches_are_balanced_and_from_the_in_splits():
    ds = indexed_dataset()
    loaders = make_loaders(ds, test_envs=[1], batch_size=8, seed=1, augment=False)
    assert loaders.train_envs == (0, 2)
    seen = {0: [], 2: []}
    for _ in range(10):
        step = next(loaders.train)
        assert len(step) == 2
        for env, (x, y) in zip((0, 2), step):
            assert x.shape == (8, 3, 32, 32) and y.shape == (8,) and y.dtype == torch.int64
            ids = item_ids(x)
            assert (y == torch.tensor(ids) % 10).all()
            seen[env] += ids
    for env in (0, 2):
        assert set(seen[env]) <= set(loaders.splits[env].in_indices.tolist())
    # Without replacement within an epoch: the first 40 of env 0's in split are distinct.
    assert len(set(seen[0][:40])) == 40 == len(loaders.splits[0].in_indices)


def test_resumed_stream_equals_the_straight_one_with_augmentation():
    ds = indexed_dataset()
    straight = make_loaders(ds, [2], batch_size=6, seed=5).train
    steps = [next(straight) for _ in range(9)]
    torch.manual_seed(123)  # the caller's global RNG must not matter ...
    resumed = make_loaders(ds, [2], batch_size=6, seed=5).train_batches(start_step=7)
    for expected in steps[7:]:
        for (x, y), (x2, y2) in zip(expected, next(resumed)):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    other_seed = next(make_loaders(ds, [2], batch_size=6, seed=6).train)
    assert not torch.equal(other_seed[0][0], steps[0][0][0])


def test_augmentation_is_seeded_and_leaves_the_global_rng_alone():
    ds = indexed_dataset()
    augmented = make_loaders(ds, [0], batch_size=16, seed=0).train
    plain = make_loaders(ds, [0], batch_size=16, seed=0, augment=False).train
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    (xa, ya), _ = next(augmented)
    (xp, yp), _ = next(plain)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(ya, yp) and not torch.equal(xa, xp)  # same items, shifted pixels


def test_workers_give_the_same_batches():
    ds = indexed_dataset()
    single = make_loaders(ds, [1], batch_size=4, seed=2).train_batches(3)
    workers = make_loaders(ds, [1], batch_size=4, seed=2, num_workers=1).train_batches(3)
    for _ in range(2):
        for (x, y), (x2, y2) in zip(next(single), next(workers)):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_step_sampler_wraps_epochs_for_tiny_domains():
    sampler = StepSampler(size=5, batch_size=7, seed=0, stream=0)
    first = [i for i, _ in sampler.batch(0)] + [i for i, _ in sampler.batch(1)][:3]
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert sampler.batch(1) == StepSampler(5, 7, 0, 0).batch(1)


def test_eval_loaders_cover_every_split_of_every_domain():
    ds = indexed_dataset()
    loaders = make_loaders(ds, [0], batch_size=4, seed=0, eval_batch_size=16)
    assert sorted(loaders.eval) == sorted(f"env{i}_{p}" for i in range(3) for p in ("in", "out"))
    for i, n in enumerate(SIZES):
        ids = {part: [] for part in ("in", "out")}
        for part in ids:
            for x, _ in loaders.eval[f"env{i}_{part}"]:
                ids[part] += item_ids(x)
        assert len(ids["out"]) == int(n * 0.2)
        assert sorted(ids["in"] + ids["out"]) == list(range(n))
        assert ids["out"] == loaders.splits[i].out_indices.tolist()  # in order, no shuffle


def test_bad_test_envs_and_seeds_are_errors():
    ds = indexed_dataset()
    with pytest.raises(ValueError, match=r"test_envs \[3\] out of range.*0=d0"):
        make_loaders(ds, [3], batch_size=4)
    with pytest.raises(ValueError, match="no training domain"):
        make_loaders(ds, [0, 1, 2], batch_size=4)
    with pytest.raises(ValueError, match="seed must be in"):
        make_loaders(ds, [0], batch_size=4, seed=-1)


def test_photo_folders_train_at_a_configurable_size(tmp_path, make_tree):
    root = make_tree(
        tmp_path / "toy", {"a": ["x", "y"], "b": ["x", "y"], "c": ["x", "y"]}, per_class=5, size=40
    )
    ds = load_dataset(f"folder:{root}")
    loaders = make_loaders(ds, [2], batch_size=3, seed=0, image_size=32)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = next(loaders.train)  # torchvision draws from the global RNG: seeded, restored
    assert torch.equal(torch.rand(3), expected)
    again = next(make_loaders(ds, [2], batch_size=3, seed=0, image_size=32).train)
    assert [x.shape for x, _ in first] == [(3, 3, 32, 32)] * 2
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(first, again))
    unaugmented = next(
        make_loaders(ds, [2], batch_size=3, seed=0, image_size=32, augment=False).train
    )
    assert not torch.equal(first[0][0], unaugmented[0][0])
    x, _ = next(iter(loaders.eval["env2_out"]))
    assert x.shape[1:] == (3, 32, 32)


def test_the_shards_of_a_batch_are_the_batch():
    """With several ranks each draws its share: together, the single process's batch."""
    whole = StepSampler(size=50, batch_size=12, seed=3, stream=1)
    for step in (0, 4, 9):
        shards = [StepSampler(50, 12, 3, 1, shard=(r, 3)).batch(step) for r in range(3)]
        assert [len(s) for s in shards] == [4, 4, 4]
        assert sum(shards, []) == whole.batch(step)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        StepSampler(50, 10, 3, 1, shard=(0, 3))
