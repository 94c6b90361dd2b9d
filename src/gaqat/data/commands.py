"""What ``gaqat data build|info|preview|download`` do with their parsed arguments."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

from gaqat.data.digits_cache import build_digits, default_data_dir
from gaqat.data.download import download_dataset
from gaqat.data.folders import ImageFolderDomain
from gaqat.data.loaders import check_domain_sizes
from gaqat.data.multidomain import MultiDomainDataset
from gaqat.data.preview import preview_grid
from gaqat.data.registry import load_dataset
from gaqat.errors import UsageError, as_usage_errors
from gaqat.names import canonical_dataset


def build(args: argparse.Namespace) -> int:
    if canonical_dataset(args.name) != "digits":
        raise UsageError(
            f"only 'digits' is built locally; use `gaqat data download "
            f"{args.name} --root DIR` for a real dataset"
        )
    start = time.perf_counter()
    _, manifest = build_digits(args.root)
    counts = ", ".join(f"{d} {n}" for d, n in manifest["counts"].items())
    print(
        f"built DigitsDG in {time.perf_counter() - start:.1f} s under "
        f"{args.root or default_data_dir()}: {counts}; {len(manifest['fonts'])} fonts; "
        f"content sha256 {manifest['content_sha256']}"
    )
    return 0


def info(args: argparse.Namespace) -> int:
    """The table of ``format_info``; unless ``--quick``, every image is decoded first and
    the ones that fail are left out of the counts and listed (exit status 1). A domain
    too small to train on is warned about: the table is what helps fix it."""
    ds = _load(args)
    try:
        check_domain_sizes(ds)
    except ValueError as error:
        warnings.warn(str(error), stacklevel=1)
    bad = (
        {}
        if args.quick
        else {
            i: domain.undecodable()
            for i, domain in enumerate(ds.datasets)
            if isinstance(domain, ImageFolderDomain)
        }
    )
    bad = {i: indices for i, indices in bad.items() if indices}
    print(format_info(ds, exclude=bad))
    if not bad:
        return 0
    paths = [ds.datasets[i].paths[j] for i, indices in bad.items() for j in indices]
    shown = "\n  ".join(paths[:20]) + (
        f"\n  ... and {len(paths) - 20} more" if len(paths) > 20 else ""
    )
    print(
        f"{len(paths)} image(s) fail to decode (truncated or corrupt) and are not counted "
        f"above; training stops when it draws one. Replace or delete them:\n  {shown}",
        file=sys.stderr,
    )
    return 1


def preview(args: argparse.Namespace) -> int:
    path = preview_grid(_load(args), args.out, args.per_domain, args.seed)
    print(f"wrote {path}")
    return 0


def download(args: argparse.Namespace) -> int:
    target = download_dataset(args.name, args.root, keep_archives=args.keep_archives)
    print(f"{args.name} is in {target}")
    print(format_info(load_dataset(args.name, args.root)))
    return 0


def _load(args: argparse.Namespace) -> MultiDomainDataset:
    with as_usage_errors():  # an unknown name, a missing folder, a bad class map
        return load_dataset(args.name, args.root, args.class_map)


def format_info(ds: MultiDomainDataset, exclude: dict[int, list[int]] | None = None) -> str:
    """Domains, classes, and images per domain and class, as a plain-text table;
    ``exclude`` maps a domain index to image indices not to count."""
    counts = ds.class_counts()
    for i, indices in (exclude or {}).items():
        np.subtract.at(counts[i], ds.datasets[i].labels[indices], 1)
    c, h, w = ds.input_shape
    lines = [
        f"{ds.name}: {len(ds)} domains, {ds.num_classes} classes, {int(counts.sum())} "
        f"images, input {c}x{h}x{w}"
    ]
    first = max(len("class"), *(len(name) for name in ds.classes), len("total"))
    widths = [max(len(d), len(str(int(counts[i].sum())))) for i, d in enumerate(ds.domains)]
    header = [f"{'class':<{first}}", *(f"{d:>{w}}" for d, w in zip(ds.domains, widths))]
    lines.append("  ".join(header))
    rows = [(name, counts[:, k]) for k, name in enumerate(ds.classes)]
    rows.append(("total", counts.sum(axis=1)))
    for name, values in rows:
        cells = [f"{name:<{first}}", *(f"{int(v):>{w}}" for v, w in zip(values, widths))]
        lines.append("  ".join(cells))
    return "\n".join(lines)
