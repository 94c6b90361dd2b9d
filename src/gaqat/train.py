"""One training run under the DomainBed protocol, crash-safe and resumable.

The output folder holds what DomainBed's tools and ours read:

- ``results.jsonl``: one record per checkpoint (DomainBed's keys, plus ``bits`` and
  ``n_frozen`` for QAT runs);
- ``gradients.jsonl``: GAQAT's window summaries and freeze decisions (the figures' data);
- ``checkpoint.pt``: model, optimizer (freezer and tracker included), scheduler, RNG
  states and step, replaced atomically at every checkpoint;
- ``done``: written last; a folder with it is a finished run.

A run goes in three stages. :func:`check` validates every argument and loads what the
run starts from, touching no output file, so a typo never costs a finished run. Then
the folder is locked against a second process and claimed: a finished run is replaced
only with ``overwrite`` (and set aside until the new run has its first checkpoint), an
unfinished one is continued only with ``resume`` and only by the same run. Then the
loop trains. Lines of the two JSONL files are written before the checkpoint that covers
them, so resuming drops every line newer than the checkpoint and the run rewrites them:
a killed run resumed gives the same files and weights as a run that was never killed.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from gaqat import distributed
from gaqat import hparams as hparams_registry
from gaqat.algorithms import Algorithm
from gaqat.checkpoint import load_checkpoint, save_atomic
from gaqat.data import check_run_data, check_same_data, dataset_record, load_dataset, make_loaders
from gaqat.data.multidomain import MultiDomainDataset
from gaqat.errors import UsageError, as_usage_errors
from gaqat.models import ModelConfig
from gaqat.names import BITS_RANGE, PRECISIONS, Recipe, get_recipe
from gaqat.progress import progress
from gaqat.quant import check_bits, check_step_sizes
from gaqat.runfolder import (
    CHECKPOINT,
    DONE,
    GRADIENTS,
    OWN_FILES,
    PREVIOUS,
    RESULTS,
    append_jsonl,
    check_output,
    locked,
    read_jsonl,
    run_state,
    set_aside,
    settle,
    truncate_jsonl,
)
from gaqat.seeding import seed_hash


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; the message says what was kept, and ``kept``
    names it for the advice of the command line: "checkpoint" (this run's, to resume),
    "previous" (the run it was overwriting, back in place) or "nothing"."""

    def __init__(self, message: str, kept: str):
        super().__init__(message)
        self.kept = kept


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, most often); the last one is kept."""


@dataclass
class TrainConfig:
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
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        args["test_envs"] = list(self.test_envs)
        return args


def resolve_hparams(config: TrainConfig) -> dict:
    if config.hparams_seed == 0:
        hp = hparams_registry.default_hparams(config.algorithm, config.dataset)
    else:
        hp = hparams_registry.random_hparams(
            config.algorithm, config.dataset, config.hparams_seed, config.trial_seed
        )
    hp = hparams_registry.apply_overrides(hp, config.hparams, config.algorithm, config.dataset)
    if config.steps is not None:
        hp["steps"] = config.steps
    if config.checkpoint_freq is not None:
        hp["checkpoint_freq"] = config.checkpoint_freq
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


# The fields of a checkpoint that resuming reads, so that a hand-edited one is refused by
# name (``gaqat.checkpoint.load_checkpoint``) instead of failing with a KeyError.
RESUME_FIELDS = {
    "args": dict,
    "args.trial_seed": int,
    "args.hparams_seed": int,
    "hparams": dict,
    "meta.dataset": str,
    "meta.algorithm": str,
    "meta.test_envs": list,
    "step": int,
    "training": dict,
}


def _stored_identity(checkpoint: dict) -> dict:
    meta, args = checkpoint["meta"], checkpoint["args"]
    return {
        "dataset": meta["dataset"],
        "algorithm": meta["algorithm"],
        "bits": meta["bits"],
        "test_envs": sorted(meta["test_envs"]),
        "trial_seed": args["trial_seed"],
        "hparams_seed": args["hparams_seed"],
        "image_size": args.get("image_size"),
        "precision": args.get("precision", "fp32"),  # runs from before the option: fp32
        **{f"hparams.{k}": v for k, v in checkpoint["hparams"].items()},
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
            f"--bits is for the QAT methods (lsq, lsq_sam, lsq_sagm, gaqat)"
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
    check_output(
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
        weights = "imagenet" if hp["arch"] != "small_cnn" and config.init is None else None
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise UsageError(
            f"--weights {weights}: no such file (expected imagenet, none, or a state_dict file)"
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
        if recipe.quantized and model_config.weights is None and not config.from_scratch:
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
    return checkpoint["model"]


def _claim(out: Path, config: TrainConfig, plan: Plan) -> dict | None:
    """Take the (locked) folder for this run; return the checkpoint to resume from, if any.

    Every refusal comes before any change. An overwritten run is set aside, not deleted.
    """
    settle(out, keep_new=(out / CHECKPOINT).exists())  # an overwrite killed early, if any
    state = run_state(out)
    if state == "new" or config.overwrite:
        if state != "new":
            set_aside(out)
        return None
    if state == "done":
        raise UsageError(
            f"{out} holds a finished run ({DONE} exists); pass --overwrite to "
            f"replace it (it is kept until the new run's first checkpoint)"
        )
    if not config.resume:
        raise UsageError(
            f"{out} holds an unfinished run; pass --resume to continue it or "
            f"--overwrite to start again"
        )
    if not (out / CHECKPOINT).exists():
        return None  # killed before its first checkpoint: nothing to continue
    checkpoint = load_checkpoint(out / CHECKPOINT, plan.device, require=RESUME_FIELDS)
    stored, wanted = _stored_identity(checkpoint), plan.identity(config)
    shown = lambda d, key: repr(d[key]) if key in d else "(absent)"  # noqa: E731
    differences = [
        f"{key}: {shown(stored, key)} in the run, {shown(wanted, key)} in this command"
        for key in sorted(set(stored) | set(wanted))
        if stored.get(key) != wanted.get(key)
    ]
    if differences:
        raise UsageError(
            f"--resume: {out} holds another run than this command asks for ("
            + "; ".join(differences)
            + "). Resume with the run's own arguments "
            "(to change the learning rate, add --new-lr), or train into another "
            "folder"
        )
    with as_usage_errors():  # the same dataset name may be another folder: compare files
        check_same_data(
            checkpoint["args"],
            plan.dataset,
            f"--resume: {out}",
            "resume with --dataset set to the run's folder, or train into another folder",
        )
    return checkpoint


def _rng_state() -> dict:
    """Every generator's state, in types that ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore_rng(checkpoint: dict, world: distributed.World, trial_seed: int, step: int) -> None:
    """Set this rank's random state to resume with: its own when the checkpoint has one
    (saved by as many ranks), else rank 0's stream for rank 0 and a fresh one per other
    rank."""
    ranks = checkpoint.get("rng_ranks")
    if ranks is not None and len(ranks) == world.size:
        _set_rng_state(ranks[world.rank])
    elif world.main:
        _set_rng_state(checkpoint["rng"])
    else:
        _seed_everything(seed_hash(trial_seed, "rank", world.rank, step))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    """PyTorch's deterministic algorithms and cuDNN settings (an error where an operation
    has no deterministic implementation, rather than silent run-to-run variation)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before use
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory of the device (CUDA) or of the process (POSIX); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


@torch.no_grad()
def accuracy(algorithm: Algorithm, loader, device: torch.device) -> float:
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += (algorithm.predict(x).argmax(1) == y).sum()
        total += len(y)
    return float(correct) / total


def evaluate(algorithm: Algorithm, loaders: dict, device: torch.device) -> dict[str, float]:
    """``{"env0_in_acc": ..., "env0_out_acc": ...}`` over every split (DomainBed's keys)."""
    check_step_sizes(algorithm.network)  # warns if an optimizer drove one to the floor
    return {f"{name}_acc": accuracy(algorithm, loader, device) for name, loader in loaders.items()}


def _change_lr(algorithm: Algorithm, new_lr: float) -> float:
    """Rescale every group's learning rate (and its schedule) so the base rate is ``new_lr``;
    returns the old base rate. Group ratios (the step sizes' scale) are kept."""
    scheduler = algorithm.scheduler
    old = scheduler.base_lrs[0]
    factor = new_lr / old
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] *= factor
        group["lr"] *= factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return old


def _checkpoint(
    algorithm: Algorithm, plan: Plan, meta: dict, step: int, args: dict, lr_changes: list
) -> dict:
    """What ``gaqat.checkpoint`` documents, plus everything a resumed run needs."""
    quant = algorithm.quant_config
    return {
        "model": algorithm.network.state_dict(),
        "model_config": plan.model_config.to_dict(),
        "quant_config": asdict(quant) if quant else None,
        "meta": meta,
        "step": step,
        "training": algorithm.optimizer_state(),
        "rng": _rng_state(),
        "hparams": plan.hparams,
        "args": args,
        "lr_changes": lr_changes,
    }


def run(config: TrainConfig) -> Path:
    """Train one (algorithm, dataset, test domains, seed) run; returns the output folder.

    Started by ``torchrun`` with several processes, every rank calls it; rank 0 owns the
    folder and tells the others whether to resume (``gaqat.distributed``).
    """
    plan = check(config)
    out, world = Path(config.output), plan.world
    distributed.start(world, plan.device)
    try:
        if not world.main:
            refusal, resuming = distributed.broadcast(None, world)
            if refusal:
                raise UsageError(f"rank {world.rank}: rank 0 refused the run: {refusal}")
            resume_from = load_checkpoint(out / CHECKPOINT, plan.device) if resuming else None
            _train(config, plan, out, resume_from)
            return out
        with locked(out):
            try:
                resume_from = _claim(out, config, plan)
            except UsageError as error:
                distributed.broadcast((str(error), False), world)
                raise
            distributed.broadcast((None, resume_from is not None), world)
            try:
                _train(config, plan, out, resume_from)
            except BaseException as error:
                restored = (out / PREVIOUS).is_dir() and not (out / CHECKPOINT).exists()
                settle(out, keep_new=(out / CHECKPOINT).exists())
                if isinstance(error, KeyboardInterrupt):
                    raise _interrupted(error, out, restored) from None
                raise
        return out
    finally:
        distributed.stop(world)


def _interrupted(error: KeyboardInterrupt, out: Path, restored: bool) -> RunInterrupted:
    """What a stopped run says it kept: an interrupt before the first step has no message
    of its own, and one during an overwrite gives the overwritten run back."""
    reason = str(error) or "interrupted before the first training step."
    if restored:
        return RunInterrupted(
            f"{reason} Nothing of the new run was kept: the run it was overwriting is "
            f"back in {out}, unchanged.",
            "previous",
        )
    return RunInterrupted(reason, "checkpoint" if (out / CHECKPOINT).exists() else "nothing")


def _train(config: TrainConfig, plan: Plan, out: Path, resume_from: dict | None) -> None:
    hp, dataset, device, world = plan.hparams, plan.dataset, plan.device, plan.world
    if config.deterministic:
        set_deterministic()
    _seed_everything(config.trial_seed)
    loaders = make_loaders(
        dataset,
        list(config.test_envs),
        hp["batch_size"],
        seed=config.trial_seed,
        num_workers=config.num_workers,
        image_size=config.image_size,
    )
    steps, freq = hp["steps"], hp["checkpoint_freq"]
    algorithm = Algorithm(
        config.algorithm,
        plan.model_config,
        hp,
        steps,
        plan.bits,
        plan.init_state,
        precision=config.precision,
        channels_last=config.channels_last,
        compile=config.compile,
    ).to(device)

    start, saved_step, lr_changes = 0, None, []
    if resume_from is not None:
        algorithm.network.load_state_dict(resume_from["model"])
        algorithm.load_optimizer_state(resume_from["training"])
        start = saved_step = resume_from["step"]
        _restore_rng(resume_from, world, config.trial_seed, start)
        lr_changes = list(resume_from.get("lr_changes", []))
        if config.new_lr is not None:
            _change_lr(algorithm, config.new_lr)
            lr_changes.append([start, config.new_lr])
    elif not world.main:  # the model is built; this rank's dropout draws its own stream
        _seed_everything(seed_hash(config.trial_seed, "rank", world.rank, 0))
    if world.size > 1:
        if resume_from is None:  # each rank sees a shard: step sizes from the whole batch
            whole = next(loaders.train_batches(0))
            algorithm.prime([(x.to(device), y.to(device)) for x, y in whole])
        algorithm.distribute(device)
    if world.main:
        for name in (RESULTS, GRADIENTS):
            truncate_jsonl(out / name, start)

    meta = {
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "domains": list(dataset.domains),
        "algorithm": config.algorithm,
        "bits": plan.bits,
        "test_envs": list(config.test_envs),
    }
    # DomainBed's tools group runs by args.algorithm and ignore bits, so the name carries the
    # bit width; they also read output_dir and holdout_fraction.
    bits = plan.bits
    args = {
        **config.to_args(),
        "dataset": dataset.name,
        **dataset_record(dataset, config.class_map),  # where the data is, to check it again
        "bits": bits,
        "domains": meta["domains"],
        "algorithm": config.algorithm if bits is None else f"{config.algorithm}_w{bits}",
        "output_dir": str(out),
        "holdout_fraction": loaders.holdout_fraction,
        **({"world_size": world.size} if world.size > 1 else {}),
    }
    steps_per_epoch = (
        min(
            len(split.in_indices)
            for i, split in enumerate(loaders.splits)
            if i not in config.test_envs
        )
        / hp["batch_size"]
    )

    bar = progress(steps, config.algorithm, config.progress and world.main, initial=start)
    batches = loaders.train_batches(start, shard=world.shard)
    # The losses stay on the device until a checkpoint reads them all at once: a per-step
    # read would make the host wait for every step's kernels. So step_time is the wall
    # time of the steps since the last checkpoint, and a non-finite loss stops the run at
    # the next checkpoint, which is then not written.
    losses: list[torch.Tensor] = []
    tic = time.perf_counter()
    step = start
    try:
        for step in range(start, steps):
            minibatches = [
                (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                for x, y in next(batches)
            ]
            stats = algorithm.update(minibatches)
            losses.append(stats["loss"])
            bar.update(1)
            done_steps = step + 1
            if done_steps % freq and done_steps != steps:
                continue

            # Every rank: the collectives of a checkpoint. Then rank 0 alone evaluates and
            # writes while the others wait for it.
            values = torch.stack(losses).tolist()
            step_time = (time.perf_counter() - tic) / len(values)
            loss = distributed.mean(sum(values) / len(values), world)
            if not math.isfinite(loss):
                bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
                at = done_steps - len(values) + 1 + bad if bad is not None else done_steps
                lr = algorithm.scheduler.base_lrs[0]
                value = values[bad] if bad is not None else loss
                raise NonFiniteLossError(_nan_message(value, at, saved_step, out, lr))
            gradient_records = algorithm.pop_gradient_records()
            if algorithm.freezer is not None:
                distributed.agree(sorted(algorithm.freezer.frozen), world, "frozen step sizes")
            rng_ranks = distributed.gather(_rng_state(), world) if world.size > 1 else None
            if not world.main:
                distributed.barrier(world)
                losses, tic = [], time.perf_counter()
                continue

            record = evaluate(algorithm, loaders.eval, device)
            record.update(
                step=done_steps,
                epoch=done_steps / steps_per_epoch,
                loss=loss,
                step_time=step_time,
                mem_gb=_peak_memory_gb(device),
                hparams=hp,
                args=args,
            )
            if plan.recipe.quantized:
                record.update(bits=plan.bits, n_frozen=stats.get("n_frozen", 0))
            if lr_changes:
                record["lr_changes"] = lr_changes
            checkpoint = _checkpoint(algorithm, plan, meta, done_steps, args, lr_changes)
            if rng_ranks is not None:
                checkpoint["rng_ranks"] = rng_ranks
            _write_checkpoint(out, checkpoint, gradient_records, record, saved_step)
            settle(out, keep_new=True)  # an overwritten run goes once this one has a checkpoint
            distributed.barrier(world)
            saved_step = done_steps
            targets = [record[f"env{e}_in_acc"] for e in config.test_envs]
            bar.set_postfix(loss=f"{record['loss']:.3f}", target=f"{np.mean(targets):.3f}")
            losses, tic = [], time.perf_counter()
    except KeyboardInterrupt:
        kept = (
            f"{out / CHECKPOINT} keeps step {saved_step}"
            if saved_step is not None
            else "no checkpoint had been written yet"
        )
        raise KeyboardInterrupt(f"interrupted at step {step + 1} of {steps}: {kept}.") from None
    finally:
        bar.close()
    if world.main:
        (out / DONE).write_text("done\n")


def _write_checkpoint(
    out: Path, checkpoint: dict, gradient_records: list, record: dict, saved_step: int | None
) -> None:
    """The lines first, then the checkpoint that covers them. A failed write (torch reports
    a full disk as ``[enforce fail at inline_container.cc]``) becomes one paragraph that
    says what is kept and how to go on; lines beyond the kept checkpoint are dropped on
    resume."""
    try:
        append_jsonl(out / GRADIENTS, gradient_records)
        append_jsonl(out / RESULTS, [record])
        save_atomic(checkpoint, out / CHECKPOINT)
    except (OSError, RuntimeError) as error:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        going_on = (
            f"{out / CHECKPOINT} keeps step {saved_step}; free some space, then continue "
            f"with the same command plus --resume (without --overwrite)"
            if saved_step is not None
            else "no checkpoint of this run had been written; free some space, then run "
            "the same command again"
        )
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {checkpoint['step']} into {out} "
            f"({cause}); the disk may be full. {going_on}"
        ) from error


def _nan_message(loss: float, step: int, saved_step: int | None, out: Path, lr: float) -> str:
    """The advice after a non-finite loss: go on at a third of the base learning rate, or,
    where that is no usable rate (not finite and positive), at one the user chooses."""
    lower = lr / 3
    usable = math.isfinite(lower) and lower > 0
    current = (
        f"the current base rate is {lr:.3g}" if usable else f"the base rate {lr!r} is unusable"
    )
    if saved_step is not None:
        rate = f"--new-lr {lower:.3g}" if usable else "--new-lr with a finite, positive rate"
        kept = (
            f"the last good checkpoint (step {saved_step}) is kept in {out / CHECKPOINT}; "
            f"continue from it at a lower learning rate with the same command plus "
            f"--resume {rate} ({current})"
        )
    else:
        rate = f"'{{\"lr\": {lower:.3g}}}'" if usable else 'with a finite, positive "lr"'
        kept = (
            "no checkpoint had been written yet; start again with a lower learning rate "
            f"(--overwrite --hparams {rate}; {current})"
        )
    return f"the loss became {loss} at step {step}; stopped: {kept}"


def run_summary(folder: Path) -> str:
    """What ``gaqat train`` prints at the end: held-out accuracy at the checkpoint that
    training-domain validation selects and at the last one, and where the files are."""
    folder = Path(folder)
    records = [record for _, record in read_jsonl(folder / RESULTS)]
    last = records[-1]
    domains, test_envs = last["args"]["domains"], last["args"]["test_envs"]
    train_envs = [i for i in range(len(domains)) if i not in test_envs]
    best = max(records, key=lambda r: np.mean([r[f"env{i}_out_acc"] for i in train_envs]))
    lines = [
        f"finished {folder}: {RESULTS}, {CHECKPOINT}"
        + (f", {GRADIENTS}" if (folder / GRADIENTS).exists() else "")
    ]
    for e in test_envs:
        lines.append(
            f"  held-out {domains[e]}: {100 * best[f'env{e}_in_acc']:.1f}% at step "
            f"{best['step']} (training-domain validation), "
            f"{100 * last[f'env{e}_in_acc']:.1f}% at the last step {last['step']}"
        )
    return "\n".join(lines)
