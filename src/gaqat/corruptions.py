"""Robustness to common corruptions: a run's accuracy on ImageNet-C-style corrupted copies
of its own evaluation images, and its mean corruption error (mCE) against a baseline run
(Hendrycks & Dietterich, 2019).

Held-out domains are one distribution shift; the 15 ImageNet-C corruptions (noise, blur,
weather, digital) at 5 severities are another, controlled one, and a low-bit model may
lose more to them than its clean accuracy says. Read top to bottom:

- the corruptions, their groups and sets (:func:`corruption_names`);
- one image corrupted deterministically (:func:`image_seed`, :func:`corrupt_image`): each
  image under its own seed from (corruption, severity, domain, image), so a run evaluated
  twice gives the same numbers and two runs see the same corrupted pixels;
- what is evaluated (:func:`spread`): the images the run itself evaluated, drawn again
  from its checkpoint as ``gaqat.export.evaluate.run_splits`` draws them: every held-out
  domain whole and every training domain's validation split (never a training image);
- the numbers (:class:`CorruptionResult`, :func:`mce`, :func:`relative_mce`);
- the evaluation (:func:`evaluate_corruptions`): runs that share their images share the
  corruption work, and each run's numbers go to its ``corruptions.jsonl``, which a later
  call re-uses (:func:`load_corruptions`);
- the table (:func:`corruption_table`) and the figure (:func:`plot_corruptions`).

The corruptions are ``imagecorruptions-imaug``'s (the ``corruptions`` extra), imported
only when an image is corrupted. This module imports no torch or matplotlib at import
time, so that ``gaqat report`` reads the files as lightly as it reads results.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from gaqat import __version__
from gaqat.errors import UsageError, as_usage_errors
from gaqat.fields import check_fields
from gaqat.runfolder import CHECKPOINT, CORRUPTIONS, locked, read_jsonl, replace_atomic

if TYPE_CHECKING:  # torch, imported when needed
    from gaqat.export.evaluate import RunSplits

# --- the corruptions ----------------------------------------------------------------------

#: ImageNet-C's four groups of benchmark corruptions, and the four it holds out ("extra",
#: its validation corruptions: for tuning, not for the benchmark number).
GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    "extra": ("speckle_noise", "gaussian_blur", "spatter", "saturate"),
}
BENCHMARK = tuple(
    name for group in ("noise", "blur", "weather", "digital") for name in GROUPS[group]
)
CORRUPTION_SETS: dict[str, tuple[str, ...]] = {
    "benchmark": BENCHMARK,
    "extra": GROUPS["extra"],
    "all": (*BENCHMARK, *GROUPS["extra"]),
}
SEVERITIES = (1, 2, 3, 4, 5)
CLEAN = "clean"  # the uncorrupted images, severity 0
ROLES = ("held out", "validation")
LIBRARY = "imagecorruptions-imaug"
INSTALL = 'pip install "gaqat[corruptions]"'
BATCH = 256  # images corrupted, transformed and classified at once
# The two corruptions that draw from a generator of their own (scikit-image's, numba's),
# not from numpy's global one: they take their seed as an argument.
_OWN_SEED = ("impulse_noise", "glass_blur")
# The library refuses smaller images.
_MIN_SIDE = 32


def group_of(corruption: str) -> str:
    """The group a corruption belongs to; ``"clean"`` for the clean images."""
    if corruption == CLEAN:
        return CLEAN
    return next(group for group, names in GROUPS.items() if corruption in names)


def corruption_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The corruptions that set names (``benchmark``, ``extra``, ``all``), group names and
    corruption names stand for, each once, in ImageNet-C's order; anything else is a
    usage error that lists the valid names.

    >>> corruption_names("extra")
    ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
    >>> corruption_names(["fog", "noise", "gaussian_noise"])
    ('gaussian_noise', 'shot_noise', 'impulse_noise', 'fog')
    """
    words = [spec] if isinstance(spec, str) else list(spec)
    known = {**CORRUPTION_SETS, **GROUPS, **{name: (name,) for name in CORRUPTION_SETS["all"]}}
    unknown = [word for word in words if word not in known]
    if unknown or not words:
        raise UsageError(
            f"--corruptions: {', '.join(map(repr, unknown)) or 'none given'}: expected "
            f"{', '.join(CORRUPTION_SETS)}, a group ({', '.join(GROUPS)}) or corruption "
            f"names: {', '.join(CORRUPTION_SETS['all'])}"
        )
    chosen = {name for word in words for name in known[word]}
    return tuple(name for name in CORRUPTION_SETS["all"] if name in chosen)


def check_severities(severities: Iterable[int]) -> tuple[int, ...]:
    """Severities sorted, each once; a usage error outside 1..5."""
    chosen = sorted(set(severities))
    if not chosen or any(s not in SEVERITIES for s in chosen):
        raise UsageError(f"--severities {chosen}: expected some of 1, 2, 3, 4, 5")
    return tuple(chosen)


# --- one image ----------------------------------------------------------------------------


def _library() -> ModuleType:
    """``imagecorruptions``, imported when first needed (the ``corruptions`` extra)."""
    try:
        return importlib.import_module("imagecorruptions")
    except ImportError as error:
        raise UsageError(
            f"corrupting images needs {LIBRARY}, which is not installed ({error}); {INSTALL}"
        ) from None


def library_version() -> str:
    """The installed corruption library's version, recorded with every evaluation: another
    version may draw other noise."""
    _library()
    try:
        return metadata.version(LIBRARY)
    except metadata.PackageNotFoundError:  # bethgelab's package, of the same import name
        raise UsageError(
            f"the imagecorruptions installed is not {LIBRARY}, the fork that runs on NumPy 2 "
            f"and current scikit-image; {INSTALL}"
        ) from None


def image_seed(corruption: str, severity: int, env: int, index: int) -> int:
    """The seed that corrupts image ``index`` of domain ``env``: a function of these four
    alone (numpy's SeedSequence over a SHA-256 of the name, not Python's salted ``hash``),
    so every run, process and machine draws the same noise for the same image.

    >>> image_seed("fog", 3, 0, 7) == image_seed("fog", 3, 0, 7) != image_seed("fog", 3, 0, 8)
    True
    """
    name = int.from_bytes(hashlib.sha256(corruption.encode()).digest()[:8], "little")
    return int(np.random.SeedSequence([name, severity, env, index]).generate_state(1)[0])


def _to_array(raw: Any) -> np.ndarray:
    """A stored image as the library takes it: uint8 HxWx3 (grayscale repeated)."""
    import torch
    from PIL import Image

    if isinstance(raw, Image.Image):
        array = np.asarray(raw.convert("RGB"))
    elif isinstance(raw, torch.Tensor) and raw.ndim == 3 and raw.dtype == torch.uint8:
        array = raw.numpy(force=True).transpose(1, 2, 0)
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
    else:
        raise TypeError(
            f"expected a stored image: a PIL image or a uint8 CHW tensor, got {type(raw).__name__}"
        )
    if min(array.shape[:2]) < _MIN_SIDE or array.shape[2] != 3:
        raise ValueError(
            f"cannot corrupt an image of {array.shape[1]}x{array.shape[0]} pixels and "
            f"{array.shape[2]} channels: {LIBRARY} needs 1 or 3 channels and sides of at "
            f"least {_MIN_SIDE} pixels"
        )
    return np.ascontiguousarray(array)


def _like(raw: Any, array: np.ndarray) -> Any:
    """``array`` (uint8 HxWx3) as the type of ``raw``: a PIL image or a CHW tensor."""
    from PIL import Image

    if isinstance(raw, Image.Image):
        return Image.fromarray(array, "RGB")
    import torch

    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def corrupt_image(raw: Any, corruption: str, severity: int, seed: int) -> Any:
    """``raw`` (a PIL image or a uint8 CHW tensor, as ``DomainDataset.raw`` serves them)
    corrupted, as the same type and size with 3 channels. The library draws from numpy's
    global generator: it is seeded with ``seed`` (:func:`image_seed`) and then put back as
    it was, so the caller's random stream is untouched.

    >>> from PIL import Image
    >>> image = Image.new("RGB", (32, 32), (200, 120, 40))
    >>> noisy = corrupt_image(image, "gaussian_noise", 5, seed=1)
    >>> noisy.size, noisy != image, noisy == corrupt_image(image, "gaussian_noise", 5, seed=1)
    ((32, 32), True, True)
    """
    corrupt = _library().corrupt
    array = _to_array(raw)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        own = {"seed": seed} if corruption in _OWN_SEED else {}
        out = corrupt(array, severity=severity, corruption_name=corruption, **own)
    finally:
        np.random.set_state(state)
    if out.shape != array.shape:  # the fork keeps the size; guard against another version
        raise RuntimeError(
            f"{LIBRARY} {corruption} returned a {out.shape} image for a {array.shape} one"
        )
    return _like(raw, out)


# --- what is evaluated --------------------------------------------------------------------


def spread(size: int, per_domain: int) -> np.ndarray:
    """Positions of ``per_domain`` images spread evenly over a split of ``size``, in their
    stored order; all of them for 0 or for more than the split has. Spread, not the first
    ``per_domain``: image folders (and DigitsDG's mnist) store a domain class by class, so
    its first images would be of a few classes only.

    >>> spread(10, 4).tolist()
    [0, 2, 5, 7]
    >>> spread(3, 0).tolist()
    [0, 1, 2]
    """
    if per_domain == 0 or per_domain >= size:
        return np.arange(size)
    return np.arange(per_domain) * size // per_domain


@dataclass(frozen=True)
class _Images:
    """The images of one domain evaluated in one role: indices into the domain, in order."""

    env: int
    domain_name: str
    role: str
    domain: Any  # the DomainDataset: raw(i), labels
    indices: np.ndarray
    transform: Any  # the run's evaluation transform


def _evaluated_images(splits: RunSplits, per_domain: int) -> list[_Images]:
    """From ``run_splits``' loaders: each held-out domain whole (its in and out splits),
    each training domain's validation (out) split; ``per_domain`` of each, spread."""
    chosen = []
    for env, name in enumerate(splits.domains):
        held_out = env in splits.test_envs
        parts = ("in", "out") if held_out else ("out",)
        views = [
            splits.loaders[f"env{env}_{p}"].dataset
            for p in parts
            if f"env{env}_{p}" in splits.loaders
        ]
        if not views:
            continue
        indices = np.sort(np.concatenate([view.indices for view in views]))
        indices = indices[spread(len(indices), per_domain)]
        role = "held out" if held_out else "validation"
        chosen.append(_Images(env, name, role, views[0].domain, indices, views[0].transform))
    return chosen


# --- the numbers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of ``corruptions.jsonl``: a domain's images under one corruption and
    severity (``clean`` and 0 for the images as stored)."""

    env: int
    domain: str
    role: str
    corruption: str
    severity: int
    images: int
    correct: int

    @property
    def acc(self) -> float:
        return self.correct / self.images

    def record(self) -> dict:
        return {
            "kind": "accuracy",
            "domain": self.domain,
            "env": self.env,
            "role": self.role,
            "corruption": self.corruption,
            "group": group_of(self.corruption),
            "severity": self.severity,
            "images": self.images,
            "correct": self.correct,
            "acc": self.acc,
        }


@dataclass(frozen=True)
class CorruptionResult:
    """One run's rows: accuracies pooled over the images of a role's domains (``held
    out`` or ``validation``), and the settings they were evaluated under (``per_domain``,
    the library and its version, the checkpoint's ``step``, the run's ``algorithm`` and
    ``bits``)."""

    settings: dict
    rows: tuple[Row, ...]
    _pooled: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pooled: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        for row in self.rows:
            counts = pooled[row.role, row.corruption, row.severity]
            counts[0] += row.correct
            counts[1] += row.images
        object.__setattr__(self, "_pooled", dict(pooled))

    @classmethod
    def from_accuracies(
        cls, clean: float, accuracies: Mapping[str, Sequence[float]], role: str = "held out"
    ) -> CorruptionResult:
        """A result of one domain of 1000 images in ``role``: ``accuracies`` per corruption
        at severities 1, 2, ...; for examples and tests.

        >>> result = CorruptionResult.from_accuracies(0.9, {"fog": [0.8, 0.6]})
        >>> result.clean_accuracy(), result.accuracy("held out", "fog", 2)
        (0.9, 0.6)
        >>> round(result.mean_accuracy(), 3)
        0.7
        """
        n = 1000
        rows = [Row(0, "toy", role, CLEAN, 0, n, round(clean * n))]
        rows += [
            Row(0, "toy", role, name, severity, n, round(acc * n))
            for name, accs in accuracies.items()
            for severity, acc in enumerate(accs, 1)
        ]
        return cls({}, tuple(rows))

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for role in ROLES if any(row.role == role for row in self.rows))

    @property
    def corruptions(self) -> tuple[str, ...]:
        names = {row.corruption for row in self.rows}
        return tuple(name for name in CORRUPTION_SETS["all"] if name in names)

    @property
    def severities(self) -> tuple[int, ...]:
        return tuple(sorted({row.severity for row in self.rows} - {0}))

    @property
    def algorithm(self) -> str:
        return self.settings.get("algorithm") or "–"

    @property
    def bits(self) -> int:
        return self.settings.get("bits") or 32

    def accuracy(self, role: str, corruption: str, severity: int) -> float:
        """Top-1 accuracy on ``role``'s images under ``corruption`` at ``severity``."""
        try:
            correct, images = self._pooled[role, corruption, severity]
        except KeyError:
            raise ValueError(
                f"no {role} images evaluated under {corruption} at severity {severity}"
            ) from None
        return correct / images

    def accuracies(self, role: str = "held out") -> dict[tuple[str, int], float]:
        """Accuracy per (corruption, severity) of ``role``, clean left out."""
        return {
            (name, s): self.accuracy(role, name, s)
            for name in self.corruptions
            for s in self.severities
        }

    def clean_accuracy(self, role: str = "held out") -> float:
        return self.accuracy(role, CLEAN, 0)

    def mean_accuracy(self, role: str = "held out") -> float:
        """Mean accuracy over every corruption × severity (each condition weighs alike)."""
        return float(np.mean(list(self.accuracies(role).values())))

    def domain_mean_accuracy(self, env: int) -> float | None:
        """Mean corrupted accuracy of one domain's images; None when it was not evaluated."""
        accs = [row.acc for row in self.rows if row.env == env and row.severity > 0]
        return float(np.mean(accs)) if accs else None

    def only(self, corruptions: Sequence[str], severities: Sequence[int]) -> CorruptionResult:
        """The rows of these corruptions and severities, with the clean ones."""
        keep = {(CLEAN, 0), *((c, s) for c in corruptions for s in severities)}
        rows = tuple(row for row in self.rows if (row.corruption, row.severity) in keep)
        return CorruptionResult(self.settings, rows)


def _ratios(
    result: CorruptionResult, baseline: CorruptionResult, role: str, relative: bool
) -> float:
    """The mean over corruptions of Σ_s E / Σ_s E_base, errors taken less the clean error
    when ``relative``; NaN where the baseline's sum is 0."""
    missing = [c for c in result.corruptions if c not in baseline.corruptions]
    missing += [f"severity {s}" for s in result.severities if s not in baseline.severities]
    if missing:
        raise ValueError(f"the baseline was not evaluated under {', '.join(map(str, missing))}")
    shift = (1 - result.clean_accuracy(role), 1 - baseline.clean_accuracy(role))
    ratios = []
    for name in result.corruptions:
        ours = sum(1 - result.accuracy(role, name, s) for s in result.severities)
        base = sum(1 - baseline.accuracy(role, name, s) for s in result.severities)
        if relative:
            n = len(result.severities)
            ours, base = ours - n * shift[0], base - n * shift[1]
        ratios.append(ours / base if base else math.nan)
    return float(np.mean(ratios))


def mce(result: CorruptionResult, baseline: CorruptionResult, role: str = "held out") -> float:
    """Mean corruption error, a fraction (1.0: the baseline's): CE_c = Σ_s E(c, s) /
    Σ_s E_base(c, s) over severities s, averaged over corruptions c; E is top-1 error.

    >>> run = CorruptionResult.from_accuracies(0.9, {"fog": [0.8, 0.6], "snow": [0.7, 0.7]})
    >>> base = CorruptionResult.from_accuracies(0.8, {"fog": [0.6, 0.4], "snow": [0.4, 0.4]})
    >>> round(mce(run, base), 3)  # (0.6 / 1.0 + 0.6 / 1.2) / 2
    0.55
    """
    return _ratios(result, baseline, role, relative=False)


def relative_mce(
    result: CorruptionResult, baseline: CorruptionResult, role: str = "held out"
) -> float:
    """Relative mCE: the errors' rise over each model's clean error, Σ_s (E(c, s) −
    E_clean) / Σ_s (E_base(c, s) − E_base_clean), averaged over corruptions; it tells how
    much accuracy corruption costs, whatever the clean accuracy.

    >>> run = CorruptionResult.from_accuracies(0.9, {"fog": [0.8, 0.6], "snow": [0.7, 0.7]})
    >>> base = CorruptionResult.from_accuracies(0.8, {"fog": [0.6, 0.4], "snow": [0.4, 0.4]})
    >>> round(relative_mce(run, base), 3)  # (0.4 / 0.6 + 0.4 / 0.8) / 2
    0.583
    """
    return _ratios(result, baseline, role, relative=True)


# --- reading and writing corruptions.jsonl ------------------------------------------------

_SETTINGS = {"per_domain": int, "library": str, "library_version": str}
_ROW = {
    "env": int,
    "domain": str,
    "role": str,
    "corruption": str,
    "severity": int,
    "images": int,
    "correct": int,
}
# The settings that must agree for rows to be re-used.
_COMPARED = ("per_domain", "library", "library_version", "step")


def load_corruptions(folder: str | Path) -> CorruptionResult | None:
    """The run's ``corruptions.jsonl``; None when it has none. A bad line is a ValueError
    naming the file, line and field."""
    path = Path(folder) / CORRUPTIONS
    if not path.is_file():
        return None
    records = read_jsonl(path)
    if not records or records[0][1].get("kind") != "settings":
        raise ValueError(f"{path}: the first line is not the settings line of `gaqat corrupt`")
    settings = check_fields(records[0][1], _SETTINGS, records[0][0])
    rows = []
    for where, record in records[1:]:
        check_fields(record, _ROW, where)
        if record["images"] < 1 or not 0 <= record["correct"] <= record["images"]:
            raise ValueError(f"{where}: {record['correct']} of {record['images']} images right")
        if record["role"] not in ROLES or not _known(record["corruption"], record["severity"]):
            raise ValueError(
                f"{where}: {record['role']!r} {record['corruption']!r} at severity "
                f"{record['severity']}: not a role, corruption and severity of `gaqat corrupt`"
            )
        rows.append(Row(**{key: record[key] for key in _ROW}))
    return CorruptionResult(settings, tuple(rows))


def _known(corruption: str, severity: int) -> bool:
    """Whether ``corruption`` at ``severity`` is one that :func:`evaluate_corruptions` writes."""
    if corruption == CLEAN:
        return severity == 0
    return corruption in CORRUPTION_SETS["all"] and severity in SEVERITIES


def _write(folder: Path, settings: dict, rows: Sequence[Row]) -> None:
    """The settings line, then one line per row, replacing the file atomically: an
    interrupted evaluation leaves the old file or none, never half of one."""
    lines = [json.dumps(settings), *(json.dumps(row.record()) for row in rows)]
    replace_atomic(folder / CORRUPTIONS, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


# --- evaluating runs ----------------------------------------------------------------------


@dataclass
class _Run:
    """A run folder to evaluate: what its checkpoint says, and what it still lacks."""

    folder: Path
    args: dict
    meta: dict
    settings: dict
    kept: list[Row]
    missing: list[tuple[str, int]]

    @property
    def images_key(self) -> tuple:
        """What runs evaluated on the same images (and so sharing the work) agree on."""
        a = self.args
        return (
            a["dataset"],
            a.get("dataset_path"),
            a.get("dataset_fingerprint"),
            a.get("data_dir"),
            a.get("class_map"),
            tuple(self.meta["domains"]),
            tuple(sorted(self.meta["test_envs"])),
            a["trial_seed"],
            a.get("holdout_fraction", 0.2),
            a.get("image_size"),
        )


def _open_run(folder: Path, settings: dict, wanted: list[tuple[str, int]], overwrite: bool) -> _Run:
    """Check a run folder and its ``corruptions.jsonl`` before any work: a usage error
    for a folder without a checkpoint, a checkpoint without the run's arguments, or a file
    evaluated under other settings (without ``overwrite``)."""
    from gaqat.checkpoint import load_checkpoint

    if not (folder / CHECKPOINT).is_file():
        raise UsageError(
            f"{folder}: not a run folder (no {CHECKPOINT}); give folders written by `gaqat train`"
        )
    with as_usage_errors():
        checkpoint = load_checkpoint(folder / CHECKPOINT)
        if not checkpoint.get("args"):
            raise ValueError(
                f"{folder / CHECKPOINT}: no 'args' with the run's trial seed and holdout, "
                f"which drawing its evaluation images needs; give a run of `gaqat train`"
            )
    meta = checkpoint["meta"]
    settings = {
        **settings,
        "step": checkpoint.get("step"),
        "algorithm": meta.get("algorithm"),
        "bits": meta.get("bits"),
    }
    old = None
    if not overwrite:
        with as_usage_errors():
            old = load_corruptions(folder)
    kept: list[Row] = []
    if old is not None:
        for key in _COMPARED:
            if old.settings.get(key) != settings[key]:
                raise UsageError(
                    f"{folder / CORRUPTIONS} was evaluated with {key} "
                    f"{old.settings.get(key)!r}, this evaluation's is {settings[key]!r}; "
                    f"pass --overwrite to evaluate the run again and replace it"
                )
        kept = list(old.rows)
    have = {(row.corruption, row.severity) for row in kept}
    missing = [condition for condition in wanted if condition not in have]
    return _Run(folder, checkpoint["args"], meta, settings, kept, missing)


def _check_baseline(baseline: _Run, runs: Sequence[_Run]) -> None:
    """mCE compares errors on the same images: a baseline of another dataset is refused."""
    for run in runs:
        ours = (run.args["dataset"], run.meta["domains"])
        theirs = (baseline.args["dataset"], baseline.meta["domains"])
        if ours != theirs:
            raise UsageError(
                f"--baseline {baseline.folder} was trained on {theirs[0]} (domains "
                f"{', '.join(theirs[1])}), {run.folder} on {ours[0]} (domains "
                f"{', '.join(ours[1])}); choose a baseline trained on the same dataset"
            )


def _evaluate_group(
    runs: list[_Run], data_dir: str | Path | None, device: str, per_domain: int, show: bool
) -> dict[Path, list[Row]]:
    """Every missing condition of runs sharing their images: each batch is read and
    corrupted once, and every model that lacks that condition classifies it."""
    import torch

    from gaqat.checkpoint import load_model
    from gaqat.export.evaluate import run_splits
    from gaqat.progress import progress

    first = runs[0]
    with as_usage_errors():  # the data is not the run's: a --data-dir to give
        splits = run_splits({"args": first.args, "meta": first.meta}, str(first.folder), data_dir)
    models = {}
    for run in runs:
        model, _ = load_model(run.folder / CHECKPOINT, map_location=device)
        models[run.folder] = model.to(device).eval()
    conditions = sorted({c for run in runs for c in run.missing}, key=_condition_order)
    chosen = _evaluated_images(splits, per_domain)
    correct: dict[tuple, int] = defaultdict(int)
    total = sum(len(images.indices) for images in chosen) * len(conditions)
    bar = progress(total, "gaqat corrupt", show, unit="images")
    with bar, torch.no_grad():
        for images in chosen:
            for start in range(0, len(images.indices), BATCH):
                indices = images.indices[start : start + BATCH]
                raws = [images.domain.raw(int(i)) for i in indices]
                labels = torch.as_tensor(images.domain.labels[indices])
                for name, severity in conditions:
                    batch = raws
                    if severity:
                        batch = [
                            corrupt_image(
                                raw, name, severity, image_seed(name, severity, images.env, int(i))
                            )
                            for raw, i in zip(raws, indices)
                        ]
                    x = torch.stack([images.transform(image) for image in batch]).to(device)
                    for run in runs:
                        if (name, severity) in run.missing:
                            predicted = models[run.folder](x).argmax(1).cpu()
                            key = (run.folder, images.env, name, severity)
                            correct[key] += int((predicted == labels).sum())
                    bar.update(len(indices))
            bar.set_postfix(done=f"{images.domain_name} ({images.role})")  # a line in a log
    return {
        run.folder: [
            Row(
                images.env,
                images.domain_name,
                images.role,
                name,
                severity,
                len(images.indices),
                correct[run.folder, images.env, name, severity],
            )
            for images in chosen
            for name, severity in run.missing
        ]
        for run in runs
    }


def _condition_order(condition: tuple[str, int]) -> tuple[int, int]:
    """Clean first, then ImageNet-C's order, severities rising."""
    name, severity = condition
    return (CLEAN, *CORRUPTION_SETS["all"]).index(name), severity


def _row_order(row: Row) -> tuple:
    return (row.env, *_condition_order((row.corruption, row.severity)))


def evaluate_corruptions(
    run_folders: Sequence[str | Path],
    corruptions: str | Sequence[str] = "benchmark",
    severities: Sequence[int] = SEVERITIES,
    per_domain: int = 1000,
    data_dir: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    baseline: str | Path | None = None,
    progress: bool = False,
) -> dict[Path, CorruptionResult]:
    """Each run's accuracy on its evaluation images, clean and under ``corruptions`` at
    ``severities``, with ``per_domain`` images of each held-out domain and validation split
    (0: all). Rows a run's ``corruptions.jsonl`` already holds under the same settings are
    re-used, the missing ones evaluated and the file rewritten; other settings need
    ``overwrite``. ``baseline`` (evaluated too) must share the runs' dataset. Every check
    comes before any work; each evaluated run folder is locked while it is written.
    Returns the results of the conditions asked for, keyed by the folders as given.

    >>> evaluate_corruptions(["not-a-run"])
    Traceback (most recent call last):
    ...
    gaqat.errors.UsageError: not-a-run: not a run folder (no checkpoint.pt); ...
    """
    from gaqat.arguments import _device  # train's check of --device

    names = corruption_names(corruptions)
    severities = check_severities(severities)
    if per_domain < 0:
        raise UsageError(f"--per-domain {per_domain}: expected 0 (all) or more images")
    device = str(_device(device))
    folders: dict[Path, Path] = {}  # resolved -> as given
    for folder in [*run_folders, *([baseline] if baseline is not None else [])]:
        folders.setdefault(Path(folder).resolve(), Path(folder))
    if not folders:
        raise UsageError("give at least one run folder")
    wanted = [(CLEAN, 0), *((name, s) for name in names for s in severities)]
    settings = {
        "kind": "settings",
        "per_domain": per_domain,
        "library": LIBRARY,
        "library_version": library_version(),  # a usage error when it is not installed
        "gaqat_version": __version__,
    }
    runs = [_open_run(given, settings, wanted, overwrite) for given in folders.values()]
    if baseline is not None:
        base = runs[list(folders).index(Path(baseline).resolve())]
        _check_baseline(base, runs)
    todo: dict[tuple, list[_Run]] = defaultdict(list)
    for run in runs:
        if run.missing:
            todo[run.images_key].append(run)
    with ExitStack() as stack:
        for group in todo.values():
            for run in group:
                stack.enter_context(locked(run.folder))
        for group in todo.values():
            new = _evaluate_group(group, data_dir, device, per_domain, progress)
            for run in group:
                run.kept = sorted([*run.kept, *new[run.folder]], key=_row_order)
                _write(run.folder, run.settings, run.kept)
    return {
        run.folder: CorruptionResult(run.settings, tuple(run.kept)).only(names, severities)
        for run in runs
    }


# --- the table and the figure -------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _labels(results: Mapping[Path, CorruptionResult]) -> dict[Path, str]:
    """Each run by its folder's name; by its path where two names are alike."""
    names = [Path(folder).name for folder in results]
    return {
        folder: Path(folder).name if names.count(Path(folder).name) == 1 else str(folder)
        for folder in results
    }


def corruption_table(
    results: Mapping[Path, CorruptionResult],
    baseline: str | Path | None = None,
    per_corruption: bool = False,
) -> str:
    """A markdown table, a row per run: clean and mean corrupted accuracy per role, and
    with ``baseline`` (one of the results' folders) mCE and relative mCE in percent; with
    ``per_corruption``, a table per run and role of the accuracy at each severity.

    >>> from pathlib import Path
    >>> runs = {Path("erm"): CorruptionResult.from_accuracies(0.9, {"fog": [0.8, 0.6]})}
    >>> print(corruption_table(runs).splitlines()[-1])
    | erm | – | 32 | 90.0 | 70.0 |
    """
    labels = _labels(results)
    roles = [role for role in ROLES if any(role in r.roles for r in results.values())]
    base = None
    if baseline is not None:
        match = [f for f in results if Path(f).resolve() == Path(baseline).resolve()]
        if not match:
            raise ValueError(f"baseline {baseline} is not among the results")
        base = results[match[0]]
    first = next(iter(results.values()))
    header = ["Run", "Algorithm", "Bits"]
    for role in roles:
        header += [f"{role} clean", f"{role} corrupted"]
        if base is not None:
            header += [f"{role} mCE", f"{role} rel. mCE"]
    lines = [
        f"Top-1 accuracy (%) of each run's last checkpoint, clean and corrupted (mean over "
        f"{len(first.corruptions)} corruptions × severities "
        f"{', '.join(map(str, first.severities))}), at most "
        f"{first.settings.get('per_domain') or 'all'} images per domain"
        + (f"; mCE and relative mCE (%) against {labels[match[0]]}" if base is not None else "")
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for folder, result in results.items():
        cells = [labels[folder], result.algorithm, str(result.bits)]
        for role in roles:
            if role not in result.roles:
                cells += ["–"] * (4 if base is not None else 2)
                continue
            cells += [_percent(result.clean_accuracy(role)), _percent(result.mean_accuracy(role))]
            if base is not None:
                both = role in base.roles
                cells += [
                    _percent(mce(result, base, role) if both else None),
                    _percent(relative_mce(result, base, role) if both else None),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    if per_corruption:
        for folder, result in results.items():
            for role in result.roles:
                lines += ["", f"#### {labels[folder]}: {role}", ""]
                head = ["Corruption", "Group", *map(str, result.severities), "Mean"]
                lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                for name in result.corruptions:
                    accs = [result.accuracy(role, name, s) for s in result.severities]
                    cells = [name, group_of(name), *map(_percent, accs), _percent(np.mean(accs))]
                    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_corruptions(results: Mapping[Path, CorruptionResult], out: str | Path) -> Path:
    """Accuracy against severity (0: clean), a panel per corruption, a line per run:
    solid for the held-out domains, dashed for training-domain validation.

    >>> from pathlib import Path
    >>> runs = {Path("erm"): CorruptionResult.from_accuracies(0.9, {"fog": [0.8, 0.6]})}
    >>> plot_corruptions(runs, "robustness.png").name
    'robustness.png'
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    labels = _labels(results)
    names = sorted(
        {n for r in results.values() for n in r.corruptions}, key=CORRUPTION_SETS["all"].index
    )
    cols = min(5, max(len(names), 1))
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(2.6 * cols, 2.2 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    styles = {"held out": "-", "validation": "--"}
    colors = [f"C{i % 10}" for i in range(len(results))]
    for ax, name in zip(axes.flat, names):
        for color, result in zip(colors, results.values()):
            if name not in result.corruptions:
                continue
            for role in result.roles:
                x = [0, *result.severities]
                y = [100 * result.clean_accuracy(role)]
                y += [100 * result.accuracy(role, name, s) for s in result.severities]
                ax.plot(x, y, styles[role], color=color, marker="o", markersize=3)
        ax.set_title(f"{name} ({group_of(name)})", fontsize=9)
        ax.set_xticks(range(6))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    for ax in axes[-1, :]:
        ax.set_xlabel("severity (0: clean)")
    handles = [Line2D([], [], color=c, label=labels[f]) for c, f in zip(colors, results)]
    handles += [Line2D([], [], color="gray", linestyle=s, label=r) for r, s in styles.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
