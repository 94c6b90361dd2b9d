"""A training run's arguments: :class:`TrainConfig`, the checks that validate them, and
the :class:`Plan` they resolve to.

The checks come before anything is written, so a typo never costs a finished run:
:func:`check_arguments` reads no file (a sweep runs it on all its jobs before the first);
:func:`check` also loads the data and the checkpoint the run starts from. Both raise
:class:`UsageError` naming the argument at fault.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gaqat import distributed
from gaqat import hparams as hparams_registry
from gaqat.checkpoint import load_checkpoint
from gaqat.data import load_dataset
from gaqat.data.loaders import check_run_data
from gaqat.data.multidomain import MultiDomainDataset
from gaqat.errors import UsageError, as_usage_errors
from gaqat.models import ModelConfig
from gaqat.names import (
    ALGORITHMS,
    BITS_RANGE,
    PRECISIONS,
    SCRATCH_ARCHITECTURES,
    Recipe,
    canonical_dataset,
    get_recipe,
)
from gaqat.quant import check_bits
from gaqat.runfolder import CHECKPOINT, DONE, OWN_FILES, RESULTS, check_output_folder, run_state


@dataclass
class TrainConfig:
    """One run, as ``gaqat train`` takes it (its options, by name)."""

    dataset: str
    output: Path
    test_envs: tuple[int, ...]
    algorithm: str = "erm"
    bits: int | None = None
    data_dir: Path | None = None
    class_map: Path | None = None  # JSON {domain: {folder: class}} for an image folder
    steps: int | None = None  # None: the registry's default for the dataset
    checkpoint_freq: int | None = None  # None: the registry's default
    trial_seed: int = 0
    hparams_seed: int = 0  # 0: defaults; otherwise a random-search draw
    hparams: dict = field(default_factory=dict)  # overrides, applied last
    init: Path | None = None  # float checkpoint that QAT starts from
    from_scratch: bool = False  # QAT of a randomly initialised network, knowingly
    weights: str | None = "default"  # ResNets: "imagenet", a file, None; "default" decides
    resume: bool = False
    overwrite: bool = False
    new_lr: float | None = None  # with resume: continue at this base learning rate
    num_workers: int = 0
    image_size: int | None = None  # None: the dataset's (224 photos, 32 digits)
    device: str | None = None
    deterministic: bool = False  # PyTorch's deterministic algorithms, cuDNN included
    precision: str = "fp32"  # "bf16": bfloat16 autocast of the forward passes
    channels_last: bool = False  # NHWC memory layout (GPU convolutions prefer it)
    compile: bool = False  # torch.compile the training passes
    progress: bool = True

    def to_args(self) -> dict:
        """The config as plain JSON values (a record's ``args``)."""
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        args["test_envs"] = list(self.test_envs)
        return args


def resolve_hparams(config: TrainConfig) -> dict:
    """The run's hyperparameters: the defaults or the draw, then the overrides, then
    ``steps`` and ``checkpoint_freq`` where given."""
    if config.hparams_seed == 0:
        hp = hparams_registry.default_hparams(config.algorithm, config.dataset)
    else:
        hp = hparams_registry.random_hparams(
            config.algorithm, config.dataset, config.hparams_seed, config.trial_seed
        )
    hp = hparams_registry.apply_overrides(hp, config.hparams, config.algorithm, config.dataset)
    for key, value in (("steps", config.steps), ("checkpoint_freq", config.checkpoint_freq)):
        if value is None:
            continue
        if key in config.hparams and config.hparams[key] != value:
            option = "--" + key.replace("_", "-")
            raise UsageError(
                f"{option} {value} and --hparams {key} {config.hparams[key]!r} disagree: "
                f"give one of them"
            )
        hp[key] = value
    return hp


@dataclass(frozen=True)
class Plan:
    """What :func:`check` derives from a config: everything the run needs to start."""

    recipe: Recipe
    bits: int | None
    hparams: dict
    dataset: MultiDomainDataset
    model_config: ModelConfig
    init_state: dict | None
    device: torch.device
    world: distributed.World  # this process among the run's ranks (one, unless started by torchrun)

    def identity(self, config: TrainConfig) -> dict:
        """What a resumed run must share with the run it continues."""
        return {
            "dataset": self.dataset.name,
            "algorithm": config.algorithm,
            "bits": self.bits,
            "test_envs": sorted(config.test_envs),
            "trial_seed": config.trial_seed,
            "hparams_seed": config.hparams_seed,
            "image_size": config.image_size,
            "precision": config.precision,
            **{f"hparams.{k}": v for k, v in self.hparams.items()},
        }


def _positive(value: object, option: str, kind: type = int) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
        and (kind is float or isinstance(value, int))
    )
    if not ok:
        raise UsageError(
            f"{option}: expected a positive {'number' if kind is float else 'integer'}, "
            f"got {value!r}"
        )


def check(config: TrainConfig) -> Plan:
    """Validate every argument and load the data and init the run starts from.

    Raises :class:`UsageError` naming the argument; touches no output file.
    """
    with as_usage_errors():
        hp = check_arguments(config)
        recipe = get_recipe(config.algorithm)
        dataset = load_dataset(config.dataset, config.data_dir, config.class_map)
        bad = [e for e in config.test_envs if not 0 <= e < len(dataset)]
        if bad or not config.test_envs:
            listing = ", ".join(f"{i}={name}" for i, name in enumerate(dataset.domains))
            raise UsageError(
                f"--test-envs: {bad or 'none given'} not among {dataset.name}'s domains ({listing})"
            )
        if len(set(config.test_envs)) == len(dataset):
            raise UsageError(
                f"--test-envs {list(config.test_envs)} leave no training domain in {dataset.name}"
            )
        check_run_data(dataset, config.test_envs)  # domains too small, unseen held-out classes
        model_config = _model_config(config, hp, dataset.num_classes)
        world = distributed.world_from_environment()
        if hp["batch_size"] % world.size:
            raise UsageError(
                f"hparams.batch_size: {hp['batch_size']} images per domain do not split "
                f"into {world.size} equal shards, one per process; give a batch size "
                f"divisible by {world.size}"
            )
        device = distributed.device_for(world, _device(config.device))
        if config.precision == "bf16" and device.type == "cuda":
            if not torch.cuda.is_bf16_supported():
                raise UsageError(
                    f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16"
                )
        return Plan(
            recipe,
            config.bits if recipe.quantized else None,
            hp,
            dataset,
            model_config,
            _init_state(config, model_config, recipe),
            device,
            world,
        )


def check_arguments(config: TrainConfig) -> dict:
    """The checks that read no file (what a sweep runs on all its jobs before the first);
    returns the resolved hyperparameters."""
    with as_usage_errors():
        return _check_arguments(config)


_QAT_METHODS = [name for name, recipe in ALGORITHMS.items() if recipe.quantized]


def _check_arguments(config: TrainConfig) -> dict:
    recipe = get_recipe(config.algorithm)
    if recipe.quantized:
        if config.bits is None:
            raise UsageError(
                f"--algorithm {config.algorithm} is a QAT method: give --bits "
                f"({BITS_RANGE[0]}..{BITS_RANGE[1]})"
            )
        check_bits(config.bits, "--bits")
    elif config.bits is not None:
        raise UsageError(
            f"--bits {config.bits}: {config.algorithm} trains a float model; "
            f"--bits is for the QAT methods ({', '.join(_QAT_METHODS)})"
        )
    for option, value in (
        ("--steps", config.steps),
        ("--checkpoint-freq", config.checkpoint_freq),
        ("--image-size", config.image_size),
    ):
        if value is not None:
            _positive(value, option)
    if config.num_workers < 0:
        raise UsageError(f"--num-workers: expected an integer >= 0, got {config.num_workers}")
    if config.precision not in PRECISIONS:
        raise UsageError(f"--precision: {config.precision!r} is not one of {', '.join(PRECISIONS)}")
    for option, seed in (("--seed", config.trial_seed), ("--hparams-seed", config.hparams_seed)):
        if not 0 <= seed < 2**31:
            raise UsageError(f"{option}: expected an integer from 0 to 2**31 - 1, got {seed}")
    if config.new_lr is not None:
        if not config.resume:
            raise UsageError(
                "--new-lr changes the learning rate of a run being resumed: use it with --resume"
            )
        _positive(config.new_lr, "--new-lr", float)
    if config.resume and config.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    repeated = sorted({e for e in config.test_envs if list(config.test_envs).count(e) > 1})
    if repeated:  # the report would match the run to no table
        raise UsageError(
            f"--test-envs {' '.join(map(str, config.test_envs))}: "
            f"{', '.join(map(str, repeated))} given more than once; name each held-out domain once"
        )
    _check_run_folder(Path(config.output))
    _device(config.device)
    return resolve_hparams(config)  # the registry checks every override's value


def _check_run_folder(out: Path) -> None:
    """A run goes into a folder of its own: one that holds a run, or is empty, or new."""
    is_run = out.is_dir() and run_state(out) != "new"
    check_output_folder(
        out,
        "--output",
        ours=lambda entry: is_run or entry.name in OWN_FILES,
        what=f"a gaqat run (it has no {RESULTS}, {CHECKPOINT} or {DONE})",
    )


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _model_config(config: TrainConfig, hp: dict, num_classes: int) -> ModelConfig:
    weights = config.weights
    if weights == "default":
        # QAT starts from --init; float ResNets from ImageNet weights (DomainBed).
        scratch = hp["arch"] in SCRATCH_ARCHITECTURES
        weights = "imagenet" if not scratch and config.init is None else None
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise UsageError(
            f"--weights {weights}: no such file (expected imagenet, none, or a state_dict file)"
        )
    if weights is not None and hp["arch"] in SCRATCH_ARCHITECTURES:
        raise UsageError(
            f"--weights {weights}: {hp['arch']} has no pretrained weights; train it from "
            f"scratch (--weights none) or start QAT from a float run (--init)"
        )
    if num_classes < 2:
        raise UsageError(
            f"--dataset {config.dataset}: {num_classes} class folder; classification "
            f"needs at least 2"
        )
    return ModelConfig(
        arch=hp["arch"],
        num_classes=num_classes,
        weights=weights,
        freeze_bn=hp["freeze_bn"],
        dropout=hp["resnet_dropout"],
    )


def _init_state(config: TrainConfig, model_config: ModelConfig, recipe: Recipe) -> dict | None:
    if config.init is None:
        needs_float = recipe.quantized and not recipe.float_warmup  # qtdog warms up itself
        if needs_float and model_config.weights is None and not config.from_scratch:
            raise UsageError(
                f"--algorithm {config.algorithm} quantizes a {model_config.arch} that has no float "
                f"starting point: give --init FLOAT_CHECKPOINT (the checkpoint.pt of an erm run "
                f"on the same data), or --from-scratch to quantize a randomly initialised "
                f"network on purpose"
            )
        return None
    if config.from_scratch:
        raise UsageError("--from-scratch and --init contradict each other: choose one")
    try:
        checkpoint = load_checkpoint(config.init)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--init: {error}") from None
    if checkpoint["quant_config"] is not None:
        raise UsageError(
            f"--init {config.init}: QAT starts from a float checkpoint, this one "
            f"is quantized ({checkpoint['meta'].get('algorithm')})"
        )
    stored = checkpoint["model_config"]
    for key in ("arch", "num_classes"):
        if stored[key] != getattr(model_config, key):
            raise UsageError(
                f"--init {config.init}: model_config.{key} is {stored[key]!r}, "
                f"this run needs {getattr(model_config, key)!r}"
            )
    _check_init_data(config, checkpoint["meta"])
    return checkpoint["model"]


def _check_init_data(config: TrainConfig, meta: dict) -> None:
    """The float init must have trained on this run's dataset with the same domains held
    out: one that saw a held-out domain would leak it into a domain-generalization
    result. (A checkpoint without these fields, from elsewhere, is not checked.)"""
    name = lambda d: canonical_dataset(Path(str(d)).name)  # noqa: E731 (a folder: its name)
    pairs = {
        "dataset": (meta.get("dataset"), config.dataset, name),
        "test_envs": (meta.get("test_envs"), config.test_envs, sorted),
    }
    differences = [
        f"{key} {norm(stored)!r} in the init, {norm(wanted)!r} in this run"
        for key, (stored, wanted, norm) in pairs.items()
        if stored is not None and norm(stored) != norm(wanted)
    ]
    if differences:
        raise UsageError(
            f"--init {config.init}: trained on other data or with other held-out domains "
            f"({'; '.join(differences)}); start from the float run of this dataset and "
            f"these --test-envs"
        )
