"""Every name gaqat accepts, in one torch-free module.

The methods (each a name and the recipe it stands for), the datasets with their
aliases, and the values of the options and hyperparameters that take a name. The
command line's choices, the hyperparameter registry, the report's row order and the
dataset registry all read them here, so a new method or dataset is named once, and
reading these costs no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

# Which weights a run reports: the last step's, or an average over steps (gaqat.averaging).
AVERAGING = ("none", "swa", "swad")


@dataclass(frozen=True)
class Recipe:
    """A method as independent choices: float or quantized model, the objective
    ("erm", "sam" or "sagm"), whether step sizes are frozen by their disorder, which
    weights the run reports (``AVERAGING``: the last step's, SWA's or SWAD's average),
    and, for a quantized model, QT-DoG's two (``gaqat.qtdog``): ``weights_only``, weights
    quantized and activations float, the classifier float; ``float_warmup``, quantization
    switched on after a float warm-up inside the run."""

    quantized: bool
    objective: str
    freezing: bool = False
    averaging: str = "none"
    weights_only: bool = False
    float_warmup: bool = False

    def __post_init__(self) -> None:
        if self.averaging not in AVERAGING:
            raise ValueError(
                f"Recipe.averaging: {self.averaging!r} is not one of {', '.join(AVERAGING)}"
            )
        if (self.weights_only or self.float_warmup) and not self.quantized:
            raise ValueError("Recipe: weights_only and float_warmup are for quantized models")
        # The freezer's and the average's state are built on the quantized network's
        # parameters at the start, and activation quantizers would initialise on each
        # rank's shard at the switch: the warm-up is QT-DoG's, weights only, alone.
        if self.float_warmup and (
            not self.weights_only or self.freezing or self.averaging != "none"
        ):
            raise ValueError(
                "Recipe.float_warmup: needs weights_only, without freezing or averaging"
            )


# The methods: the paper's table (float, QAT baselines, GAQAT), then weight averaging on top.
ALGORITHMS: dict[str, Recipe] = {
    "erm": Recipe(quantized=False, objective="erm"),
    "sagm": Recipe(quantized=False, objective="sagm"),
    "lsq": Recipe(quantized=True, objective="erm"),
    "lsq_sam": Recipe(quantized=True, objective="sam"),
    "lsq_sagm": Recipe(quantized=True, objective="sagm"),
    "gaqat": Recipe(quantized=True, objective="sagm", freezing=True),
    "swa": Recipe(quantized=False, objective="erm", averaging="swa"),
    "swad": Recipe(quantized=False, objective="erm", averaging="swad"),  # DomainBed's SWAD
    "lsq_swa": Recipe(quantized=True, objective="erm", averaging="swa"),
    "lsq_swad": Recipe(quantized=True, objective="erm", averaging="swad"),
    "lsq_sam_swad": Recipe(quantized=True, objective="sam", averaging="swad"),
    "lsq_sagm_swad": Recipe(quantized=True, objective="sagm", averaging="swad"),
    "gaqat_swad": Recipe(quantized=True, objective="sagm", freezing=True, averaging="swad"),
    # QT-DoG (Javed et al., ICML 2025): ERM, LSQ weights only, after a float warm-up.
    "qtdog": Recipe(quantized=True, objective="erm", weights_only=True, float_warmup=True),
}


def get_recipe(name: str) -> Recipe:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choices: {', '.join(ALGORITHMS)}") from None


# Named datasets (DomainBed's spelling) with their domains in index order, and the other
# names they go by, in any case.
DATASETS: dict[str, tuple[str, ...]] = {
    "digits": ("mnist", "mnist_m", "syn", "optdigits"),
    "PACS": ("art_painting", "cartoon", "photo", "sketch"),
    "VLCS": ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
    "OfficeHome": ("Art", "Clipart", "Product", "Real World"),
    "TerraIncognita": ("location_100", "location_38", "location_43", "location_46"),
    "DomainNet": ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
}
DATASET_ALIASES = {"digitsdg": "digits"}


def canonical_dataset(name: str) -> str:
    """The registry's spelling of a dataset name given in any case (``pacs`` -> ``PACS``,
    ``DigitsDG`` -> ``digits``); any other name (a folder) comes back unchanged."""
    spellings = {d.lower(): d for d in DATASETS} | DATASET_ALIASES
    return spellings.get(name.lower(), name)


# Values of the options and hyperparameters that take one of a few names.
BITS_RANGE = (2, 8)
ARCHITECTURES = (
    "small_cnn",
    "mobilenet_v2_compact",
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_lite0",
)
LR_SCHEDULES = ("constant", "cosine")
FIRST_LAST_POLICIES = ("float", "int8", "same")
PERTURBED_PASS_RNG = ("replay", "fresh")
PRECISIONS = ("fp32", "bf16")  # bf16: autocast of the forward passes, fp32 weights
FREEZE_MODES = ("task", "all")
# What freezes together: each step size alone, or a layer's (its weight and input ones).
FREEZE_SCOPES = ("step_size", "layer")
BN_FOLDING = ("auto", "on", "off")  # auto: on for FOLDED_BY_DEFAULT
# The mobile backbones, which deploy to integer runtimes: QAT folds their batch norm.
FOLDED_BY_DEFAULT = (
    "mobilenet_v2_compact",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_lite0",
)
# The networks built for 32x32 images and trained from scratch: no pretrained weights.
SCRATCH_ARCHITECTURES = ("small_cnn", "mobilenet_v2_compact")
DISORDER_METRICS = ("sign_flip", "cancellation")
