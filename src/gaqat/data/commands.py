"""What ``gaqat data build|info|preview|download`` do with their parsed arguments."""

from __future__ import annotations

import argparse
import time

from gaqat.data.digits import build_digits, default_data_dir
from gaqat.data.download import download_dataset
from gaqat.data.multidomain import MultiDomainDataset
from gaqat.data.preview import preview_grid
from gaqat.data.registry import DIGITS_NAMES, load_dataset


def build(args: argparse.Namespace) -> int:
    if args.name.lower() not in DIGITS_NAMES:
        raise ValueError(f"only 'digits' is built locally; use `gaqat data download "
                         f"{args.name} --root DIR` for a real dataset")
    start = time.perf_counter()
    _, manifest = build_digits(args.root)
    counts = ", ".join(f"{d} {n}" for d, n in manifest["counts"].items())
    print(f"built DigitsDG in {time.perf_counter() - start:.1f} s under "
          f"{args.root or default_data_dir()}: {counts}; {len(manifest['fonts'])} fonts; "
          f"content sha256 {manifest['content_sha256']}")
    return 0


def info(args: argparse.Namespace) -> int:
    print(format_info(load_dataset(args.name, args.root)))
    return 0


def preview(args: argparse.Namespace) -> int:
    path = preview_grid(load_dataset(args.name, args.root), args.out, args.per_domain, args.seed)
    print(f"wrote {path}")
    return 0


def download(args: argparse.Namespace) -> int:
    target = download_dataset(args.name, args.root, keep_archives=args.keep_archives)
    print(f"{args.name} is in {target}")
    print(format_info(load_dataset(args.name, args.root)))
    return 0


def format_info(ds: MultiDomainDataset) -> str:
    """Domains, classes, and images per domain and class, as a plain-text table."""
    counts = ds.class_counts()
    c, h, w = ds.input_shape
    lines = [f"{ds.name}: {len(ds)} domains, {ds.num_classes} classes, {int(counts.sum())} "
             f"images, input {c}x{h}x{w}"]
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
