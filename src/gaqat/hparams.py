"""Hyperparameters: each declared once, its default beside its random-search range and
the values it may take.

As DomainBed's registry: :func:`_declare` lists, per (algorithm, dataset), every
hyperparameter as a default and a draw (a function of a ``numpy`` RandomState). Each
draw gets its own RandomState seeded by a stable hash of (seed, trial seed, name), so
adding or removing a hyperparameter changes no other one's draw. A hyperparameter that
is a protocol choice or an ablation switch rather than a searched value (architecture,
schedule, step count, freeze mode, ...) has no range: its draw is its default. Every
one also declares its valid values (a :class:`Range` for numbers, the names for names):
a user's override outside them is refused before a run starts, instead of failing deep
inside an optimizer or freezer after the output folder is claimed.

Defaults: on the five image datasets, SAGM's published per-dataset learning rate,
weight decay and alpha (from the SAGM release) with ResNet-50, frozen batch norm, dropout 0.5 and
32 images per domain; DomainBed's ranges for the random search. On ``digits`` (the
offline DigitsDG, small CNN) the settings a feasibility run found: Adam 1e-3 for
float training, 3e-4 for QAT, cosine decay because a constant rate left the last
checkpoints swinging by several points. A dataset not listed (a user's own folder in
DomainBed's layout) gets DomainBed's generic image-dataset defaults.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gaqat.fields import is_a
from gaqat.names import (
    ARCHITECTURES,
    BITS_RANGE,
    BN_FOLDING,
    DISORDER_METRICS,
    FIRST_LAST_POLICIES,
    FREEZE_MODES,
    FREEZE_SCOPES,
    LR_SCHEDULES,
    PERTURBED_PASS_RNG,
    Recipe,
    canonical_dataset,
    get_recipe,
)
from gaqat.seeding import seed_hash

# SAGM's released per-dataset settings: learning rate, weight decay, alpha.
_SAGM_PUBLISHED = {
    "PACS": (3e-5, 1e-4, 1e-3),
    "VLCS": (1e-5, 1e-4, 1e-3),
    "OfficeHome": (1e-5, 1e-4, 5e-4),
    "TerraIncognita": (1e-5, 1e-4, 1e-3),
    "DomainNet": (3e-5, 1e-6, 5e-4),
}
# A dataset SAGM did not publish: DomainBed's generic lr and weight decay, SAGM's alpha.
_GENERIC_IMAGE = (5e-5, 0.0, 1e-3)

# GAQAT's window: the paper's figures use 350 steps on PACS and 2111 on DomainNet.
# VLCS, OfficeHome and TerraIncognita train 5000 steps with PACS's batches, so PACS's
# 350 gives them the same ~14 windows per run. DigitsDG: 50 (~20 windows in
# a 1000-step run).
_WINDOW = {"digits": 50, "DomainNet": 2111}
_DEFAULT_WINDOW = 350


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric hyperparameter: finite, from ``low`` to ``high``, an
    end excluded where ``low_open`` / ``high_open`` say so."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def describe(self, kind: type) -> str:
        noun = "an integer" if kind is int else "a number"
        if self.high == math.inf:
            noun = noun if kind is int else "a finite number"
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        if kind is int:
            return f"{noun} from {self.low:g} to {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # a share of something, both ends included
AT_LEAST_ONE = Range(1)
MAX_BATCH_SIZE = 65536  # images per domain and step: more is a typo, not a batch


@dataclass(frozen=True)
class Hparam:
    default: Any
    draw: Callable[[np.random.RandomState], Any]
    valid: Range | tuple | None = None  # numbers: a Range; names: the choices; bool: None

    def accepts(self, value: Any) -> bool:
        """The JSON rule of ``gaqat.fields`` (the default's type, floats accept ints), then
        the valid values."""
        if not is_a(value, type(self.default)):
            return False
        return self.valid is None or value in self.valid

    def describe(self) -> str:
        kind = type(self.default)
        if isinstance(self.valid, Range):
            return self.valid.describe(kind)
        if isinstance(self.valid, tuple):
            return "one of " + ", ".join(map(repr, self.valid))
        return {bool: "true or false", int: "an integer", float: "a number"}.get(
            kind, f"a {kind.__name__}"
        )


Declare = Callable[..., None]


def _declare(algorithm: str, dataset: str) -> dict[str, Hparam]:
    """The registry: every hyperparameter of (algorithm, dataset), default beside range,
    in the order records list them.

    Which keys a method has follows its recipe (``gaqat.algorithms``): the flatness
    objective's ``rho`` (and SAGM's ``alpha``), the quantizers', the freezer's,
    the weight average's.
    """
    recipe = get_recipe(algorithm)  # an unknown name is an error listing the choices
    dataset = canonical_dataset(dataset)
    hp: dict[str, Hparam] = {}

    def declare(
        name: str, default: Any, draw: Callable | None = None, valid: Range | tuple | None = None
    ) -> None:
        """``draw`` None: not searched, every draw is the default. A number needs its valid
        range, a name its choices: no value goes unchecked."""
        if not isinstance(default, bool) and valid is None:
            raise TypeError(f"hyperparameter {name!r}: declare its valid values")
        hp[name] = Hparam(default, draw if draw is not None else (lambda r: default), valid)

    _model_and_optimisation(declare, dataset, recipe.quantized)
    _run_length(declare, dataset)
    _method(declare, dataset, recipe)
    _averaging(declare, recipe)
    return hp


def _model_and_optimisation(declare: Declare, dataset: str, quantized: bool) -> None:
    digits = dataset == "digits"
    lr, weight_decay, _ = _SAGM_PUBLISHED.get(dataset, _GENERIC_IMAGE)
    batch_sizes = Range(1, MAX_BATCH_SIZE)

    # Model.
    declare("arch", "small_cnn" if digits else "resnet50", valid=ARCHITECTURES)
    declare(
        "resnet_dropout",
        0.0 if digits else 0.5,
        lambda r: r.choice([0.0, 0.1, 0.5]),
        Range(0, 1, high_open=True),  # 1 would drop every feature
    )
    declare("freeze_bn", not digits)  # ImageNet statistics kept for ResNets, as DomainBed

    # Optimisation.
    if digits and quantized:
        declare("lr", 3e-4, lambda r: 10 ** r.uniform(-4.5, -3), POSITIVE)
    elif digits:
        declare("lr", 1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5), POSITIVE)
    else:
        declare("lr", lr, lambda r: 10 ** r.uniform(-5, -3.5), POSITIVE)
    if digits:
        declare("weight_decay", 0.0, valid=NON_NEGATIVE)
    else:
        declare("weight_decay", weight_decay, lambda r: 10 ** r.uniform(-6, -2), NON_NEGATIVE)
    if digits:
        declare("batch_size", 32, lambda r: int(2 ** r.uniform(3, 6)), batch_sizes)
    elif dataset == "DomainNet":
        declare("batch_size", 32, lambda r: int(2 ** r.uniform(3, 5)), batch_sizes)
    else:
        declare("batch_size", 32, lambda r: int(2 ** r.uniform(3, 5.5)), batch_sizes)
    declare("lr_schedule", "cosine" if digits else "constant", valid=LR_SCHEDULES)


def _run_length(declare: Declare, dataset: str) -> None:
    """DomainBed's steps and checkpoint frequencies; digits: 1000 steps, which a
    feasibility run found enough for the small CNN."""
    if dataset == "digits":
        declare("steps", 1000, valid=AT_LEAST_ONE)
        declare("checkpoint_freq", 100, valid=AT_LEAST_ONE)
    elif dataset == "DomainNet":
        declare("steps", 15000, valid=AT_LEAST_ONE)
        declare("checkpoint_freq", 1000, valid=AT_LEAST_ONE)
    else:
        declare("steps", 5000, valid=AT_LEAST_ONE)
        declare("checkpoint_freq", 300, valid=AT_LEAST_ONE)


def _method(declare: Declare, dataset: str, recipe: Recipe) -> None:
    """The keys of the recipe's parts: flatness objective, quantizers, freezer."""
    digits = dataset == "digits"
    if recipe.objective in ("sam", "sagm"):
        declare("rho", 0.05, lambda r: 10 ** r.uniform(-2, -1), NON_NEGATIVE)  # 0: no ascent
        # "replay": both passes draw the same dropout masks (gaqat.optim); "fresh": SAGM's code.
        declare("perturbed_pass_rng", "replay", valid=PERTURBED_PASS_RNG)
    if recipe.objective == "sagm":
        alpha = 1e-3 if digits else _SAGM_PUBLISHED.get(dataset, _GENERIC_IMAGE)[2]
        declare("alpha", alpha, lambda r: 10 ** r.uniform(-4, -2.5), NON_NEGATIVE)

    if recipe.quantized:
        _quantizers(declare, recipe)

    if recipe.freezing:
        window = _WINDOW.get(dataset, _DEFAULT_WINDOW)
        declare("tau", 0.3, lambda r: r.uniform(0.1, 0.5), FRACTION)  # 0 never freezes
        # Disorder compares consecutive steps: a window needs two.
        declare("window", window, lambda r: int(window * 2 ** r.uniform(-1, 1)), Range(2))
        declare("freeze_mode", "task", valid=FREEZE_MODES)
        # "layer": a layer's step sizes freeze together (a reading of FQAT; method.md §6).
        declare("freeze_scope", "step_size", valid=FREEZE_SCOPES)
        declare("unfreeze", False)
        declare("disorder_metric", "sign_flip", valid=DISORDER_METRICS)
        # Zero a step size's Adam momentum when it freezes (not in the paper).
        declare("freeze_resets_momentum", False)


def _quantizers(declare: Declare, recipe: Recipe) -> None:
    """The quantizers' keys. QT-DoG's (``Recipe.weights_only``, ``gaqat.qtdog``): its
    per-channel weight step sizes and every layer quantized but the classifier, which
    stays float whatever ``first_last`` says (that then sets the first convolution
    alone); no batch-norm folding or residual quantizers, which serve integer kernels on
    quantized activations; and ``quantize_at``, the share of the steps trained in float
    before quantization switches on."""
    weights_only = recipe.weights_only
    declare("per_channel", weights_only)
    declare("first_last", "same" if weights_only else "float", valid=FIRST_LAST_POLICIES)
    # Adam normalises LSQ's gradient scale away, so step sizes move by about lr per
    # step; a separate rate for them is the knob that is left.
    # Positive: at 0 the step sizes would stay at their initial values, which is not LSQ.
    declare("step_size_lr_scale", 1.0, lambda r: 10 ** r.uniform(-1, 0.5), POSITIVE)
    if not weights_only:
        # Batch norm folded into the quantized convolutions ("auto": for the mobile
        # backbones), its statistics frozen after this fraction of the steps.
        declare("fold_batch_norm", "auto", valid=BN_FOLDING)
        declare("bn_freeze_at", 0.5, valid=FRACTION)
        # 8-bit quantizers on the residual stream (mobile and ResNet blocks), so that
        # integer runtimes fuse every projection and add (gaqat.residual); 0: none.
        declare("residual_bits", 0, valid=(0, *range(BITS_RANGE[0], BITS_RANGE[1] + 1)))
    if recipe.float_warmup:
        # QT-DoG: 2,000 of 5,000 steps in float on the DomainBed sets. Below 1, so that
        # the run ends quantized (gaqat.qtdog.switch_step).
        declare("quantize_at", 0.4, lambda r: r.uniform(0.2, 0.6), Range(0, 1, high_open=True))


def _averaging(declare: Declare, recipe: Recipe) -> None:
    """The weight average's keys (``gaqat.averaging``): SWA's start, SWAD's window rule with
    the defaults of its release (khanrc/swad's config.yaml; SWAD fixes them, so they are
    not searched), and the training batches its batch-norm statistics are recomputed on
    (SWAD's release: 500; 0 keeps the last step's statistics)."""
    if recipe.averaging == "swa":
        declare("swa_start", 0.75, lambda r: r.uniform(0.5, 0.9), FRACTION)  # of the steps
    if recipe.averaging == "swad":
        declare("n_converge", 3, valid=AT_LEAST_ONE)
        declare("n_tolerance", 6, valid=AT_LEAST_ONE)
        declare("tolerance_ratio", 0.3, valid=NON_NEGATIVE)
    if recipe.averaging != "none":
        declare("bn_recompute_steps", 500, valid=NON_NEGATIVE)


def default_hparams(algorithm: str, dataset: str) -> dict[str, Any]:
    return {name: h.default for name, h in _declare(algorithm, dataset).items()}


def random_hparams(algorithm: str, dataset: str, seed: int, trial_seed: int = 0) -> dict[str, Any]:
    """One random-search draw; each value depends only on (seed, trial_seed, its name).

    Values have the type of their default (Python scalars, JSON-ready).
    """
    return {
        name: type(h.default)(h.draw(np.random.RandomState(seed_hash(seed, trial_seed, name))))
        for name, h in _declare(algorithm, dataset).items()
    }


def _checked(name: str, value: Any, declared: Hparam) -> Any:
    """``value`` if it is valid for ``name``, else an error quoting the user's override."""
    if not declared.accepts(value):
        given = json.dumps({name: value}, default=str)
        raise ValueError(f"--hparams '{given}': {name} must be {declared.describe()}")
    return float(value) if isinstance(declared.default, float) else value


def apply_overrides(
    hparams: dict[str, Any], overrides: str | dict | None, algorithm: str, dataset: str
) -> dict[str, Any]:
    """A copy of ``hparams`` (of ``algorithm`` on ``dataset``) with user overrides (a JSON
    object string, or a dict) applied, each checked against its declared valid values.

    Unknown keys are an error listing the valid ones: a misspelt key must not be ignored.
    """
    if overrides is None:
        return dict(hparams)
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides) if overrides.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"--hparams: not valid JSON ({error}): {overrides!r}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--hparams: expected a JSON object, got {overrides!r}")
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        raise ValueError(
            f"--hparams: unknown key(s) {', '.join(unknown)}; "
            f"valid keys for this algorithm and dataset: {', '.join(sorted(hparams))}"
        )
    declared = _declare(algorithm, dataset)
    return {**hparams, **{k: _checked(k, v, declared[k]) for k, v in overrides.items()}}
