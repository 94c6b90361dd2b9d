"""A contact sheet of each domain, so people look at their data before training on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from gaqat.data.multidomain import MultiDomainDataset

TILE = 96
MARGIN = 110  # left column for the domain names
CAPTION = 14  # strip under each tile for the class name


def preview_grid(
    ds: MultiDomainDataset, out: str | Path, per_domain: int = 10, seed: int = 0
) -> Path:
    """Write a PNG with one row per domain of ``per_domain`` samples, cycling through
    the classes present so that each row shows several of them."""
    if per_domain < 1:
        raise ValueError(f"per_domain must be >= 1, got {per_domain}")
    rng = np.random.default_rng(seed)
    row_height = TILE + CAPTION
    sheet = Image.new("RGB", (MARGIN + per_domain * TILE, len(ds) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (domain, data) in enumerate(zip(ds.domains, ds.datasets)):
        top = row * row_height
        draw.text((4, top + TILE // 2), domain, fill="black", font=font)
        classes = np.unique(data.labels)
        for col in range(per_domain):
            label = classes[col % len(classes)]
            index = int(rng.choice(np.flatnonzero(data.labels == label)))
            left = MARGIN + col * TILE
            sheet.paste(_thumbnail(data.raw(index)), (left, top))
            draw.text((left + 2, top + TILE), ds.classes[label][:14], fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _thumbnail(raw: Image.Image | torch.Tensor) -> Image.Image:
    if isinstance(raw, torch.Tensor):  # uint8 CHW from an in-memory domain
        raw = Image.fromarray(raw.permute(1, 2, 0).numpy())
    resample = Image.NEAREST if raw.width < TILE else Image.BILINEAR  # keep small pixels crisp
    return raw.convert("RGB").resize((TILE, TILE), resample)
