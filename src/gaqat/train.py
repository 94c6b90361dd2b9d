"""One training run under the DomainBed protocol, crash-safe and resumable.

The output folder holds what DomainBed's tools and ours read:

- ``results.jsonl``: one record per checkpoint (DomainBed's keys, plus ``bits`` and
  ``n_frozen`` for QAT runs);
- ``gradients.jsonl``: GAQAT's window summaries and freeze decisions (the figures' data);
- ``checkpoint.pt``: model, optimizer (freezer and tracker included), scheduler, RNG
  states and step, replaced atomically at every checkpoint;
- ``done``: written last; a folder with it is a finished run.

Lines of the two JSONL files are written before the checkpoint that covers them, so
resuming drops every line newer than the checkpoint and the run rewrites them: a killed
run resumed gives the same files and weights as a run that was never killed.
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gaqat import hparams as hparams_registry
from gaqat.algorithms import Algorithm, get_recipe
from gaqat.checkpoint import load_checkpoint, save_atomic
from gaqat.data import load_dataset, make_loaders
from gaqat.runfolder import (CHECKPOINT, DONE, GRADIENTS, RESULTS, append_jsonl, run_state,
                             truncate_jsonl)
from gaqat.models import ModelConfig
from gaqat.quant import check_step_sizes



class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    dataset: str
    output: Path
    test_envs: tuple[int, ...]
    algorithm: str = "erm"
    bits: int | None = None
    data_dir: Path | None = None
    steps: int | None = None            # None: the registry's default for the dataset
    checkpoint_freq: int | None = None  # None: the registry's default
    trial_seed: int = 0
    hparams_seed: int = 0               # 0: defaults; otherwise a random-search draw
    hparams: dict = field(default_factory=dict)  # overrides, applied last
    init: Path | None = None            # float checkpoint that QAT starts from
    weights: str | None = "default"     # ResNets: "imagenet", a file, None; "default" decides
    resume: bool = False
    overwrite: bool = False
    num_workers: int = 0
    image_size: int | None = None       # None: the dataset's (224 photos, 32 digits)
    device: str | None = None
    progress: bool = True

    def to_args(self) -> dict:
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        args["test_envs"] = list(self.test_envs)
        return args


def resolve_hparams(config: TrainConfig) -> dict:
    if config.hparams_seed == 0:
        hp = hparams_registry.default_hparams(config.algorithm, config.dataset)
    else:
        hp = hparams_registry.random_hparams(config.algorithm, config.dataset,
                                              config.hparams_seed, config.trial_seed)
    hp = hparams_registry.apply_overrides(hp, config.hparams)
    if config.steps is not None:
        hp["steps"] = config.steps
    if config.checkpoint_freq is not None:
        hp["checkpoint_freq"] = config.checkpoint_freq
    return hp


def _prepare_output(config: TrainConfig) -> Path | None:
    """Refuse to clobber a run; return the checkpoint to resume from, if any."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT
    state = run_state(out)
    if config.overwrite:
        for name in (RESULTS, GRADIENTS, CHECKPOINT, DONE):
            (out / name).unlink(missing_ok=True)
    elif state == "done":
        raise ValueError(f"{out} holds a finished run ({DONE} exists); pass --overwrite to replace it")
    elif config.resume:
        return checkpoint if checkpoint.exists() else None
    elif state == "incomplete":
        raise ValueError(f"{out} holds an unfinished run; pass --resume to continue it or "
                         f"--overwrite to start again")
    return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
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


def _model_config(config: TrainConfig, hp: dict, num_classes: int) -> ModelConfig:
    weights = config.weights
    if weights == "default":
        # QAT starts from --init; float ResNets from ImageNet weights (DomainBed).
        weights = "imagenet" if hp["arch"] != "small_cnn" and config.init is None else None
    return ModelConfig(arch=hp["arch"], num_classes=num_classes, weights=weights,
                       freeze_bn=hp["freeze_bn"], dropout=hp["resnet_dropout"])


def _init_state(config: TrainConfig, model_config: ModelConfig) -> dict | None:
    if config.init is None:
        return None
    checkpoint = load_checkpoint(config.init)
    if checkpoint["quant_config"] is not None:
        raise ValueError(f"--init {config.init}: QAT starts from a float checkpoint, this one "
                         f"is quantized ({checkpoint['meta'].get('algorithm')})")
    stored = checkpoint["model_config"]
    for key in ("arch", "num_classes"):
        if stored[key] != getattr(model_config, key):
            raise ValueError(f"--init {config.init}: model_config.{key} is {stored[key]!r}, "
                             f"this run needs {getattr(model_config, key)!r}")
    return checkpoint["model"]


def _checkpoint(algorithm: Algorithm, model_config: ModelConfig, meta: dict, step: int,
                hp: dict, args: dict) -> dict:
    """What ``gaqat.checkpoint`` documents, plus everything a resumed run needs."""
    quant = algorithm.quant_config
    return {"model": algorithm.network.state_dict(), "model_config": model_config.to_dict(),
            "quant_config": asdict(quant) if quant else None, "meta": meta, "step": step,
            "training": algorithm.optimizer_state(), "rng": _rng_state(), "hparams": hp,
            "args": args}


def run(config: TrainConfig) -> Path:
    """Train one (algorithm, dataset, test domains, seed) run; returns the output folder."""
    recipe = get_recipe(config.algorithm)
    if recipe.quantized and config.bits is None:
        raise ValueError(f"algorithm {config.algorithm!r} is a QAT method: give --bits (2..8)")
    bits = config.bits if recipe.quantized else None
    out = Path(config.output)
    resume_from = _prepare_output(config)

    hp = resolve_hparams(config)
    dataset = load_dataset(config.dataset, config.data_dir)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _seed_everything(config.trial_seed)
    loaders = make_loaders(dataset, list(config.test_envs), hp["batch_size"], seed=config.trial_seed,
                           num_workers=config.num_workers, image_size=config.image_size)
    model_config = _model_config(config, hp, dataset.num_classes)
    steps, freq = hp["steps"], hp["checkpoint_freq"]
    algorithm = Algorithm(config.algorithm, model_config, hp, steps, bits,
                          _init_state(config, model_config)).to(device)

    start, saved_step = 0, None
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=device)
        algorithm.network.load_state_dict(state["model"])
        algorithm.load_optimizer_state(state["training"])
        _set_rng_state(state["rng"])
        start = saved_step = state["step"]
    for name in (RESULTS, GRADIENTS):
        truncate_jsonl(out / name, start)

    meta = {"dataset": dataset.name, "classes": list(dataset.classes), "domains": list(dataset.domains),
            "algorithm": config.algorithm, "bits": bits, "test_envs": list(config.test_envs)}
    # DomainBed's tools group runs by args.algorithm and ignore bits, so the name carries the
    # bit width; they also read output_dir and holdout_fraction.
    args = {**config.to_args(), "dataset": dataset.name, "bits": bits, "domains": meta["domains"],
            "algorithm": config.algorithm if bits is None else f"{config.algorithm}_w{bits}",
            "output_dir": str(out), "holdout_fraction": loaders.holdout_fraction}
    steps_per_epoch = min(len(split.in_indices) for i, split in enumerate(loaders.splits)
                          if i not in config.test_envs) / hp["batch_size"]

    bar = tqdm(total=steps, initial=start, disable=not config.progress, desc=config.algorithm,
               dynamic_ncols=True)
    batches = loaders.train_batches(start)
    loss_sum, step_time_sum, n_since = 0.0, 0.0, 0
    for step in range(start, steps):
        tic = time.perf_counter()
        minibatches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                       for x, y in next(batches)]
        stats = algorithm.update(minibatches)
        step_time_sum += time.perf_counter() - tic
        if not np.isfinite(stats["loss"]):
            bar.close()
            kept = (f"the last good checkpoint (step {saved_step}) is kept in {out / CHECKPOINT}"
                    if saved_step is not None else "no checkpoint had been written yet")
            raise NonFiniteLossError(f"the loss became {stats['loss']} at step {step + 1}; stopped: "
                                     f"{kept}. Lower the learning rate (--hparams '{{\"lr\": ...}}')")
        loss_sum += stats["loss"]
        n_since += 1
        bar.update(1)
        done_steps = step + 1
        if done_steps % freq and done_steps != steps:
            continue

        record = evaluate(algorithm, loaders.eval, device)
        record.update(step=done_steps, epoch=done_steps / steps_per_epoch, loss=loss_sum / n_since,
                      step_time=step_time_sum / n_since, mem_gb=_peak_memory_gb(device),
                      hparams=hp, args=args)
        if recipe.quantized:
            record.update(bits=bits, n_frozen=stats.get("n_frozen", 0))
        append_jsonl(out / GRADIENTS, algorithm.pop_gradient_records())
        append_jsonl(out / RESULTS, [record])
        save_atomic(_checkpoint(algorithm, model_config, meta, done_steps, hp, args),
                    out / CHECKPOINT)
        saved_step = done_steps
        targets = [record[f"env{e}_in_acc"] for e in config.test_envs]
        bar.set_postfix(loss=f"{record['loss']:.3f}", target=f"{np.mean(targets):.3f}")
        loss_sum, step_time_sum, n_since = 0.0, 0.0, 0
    bar.close()
    (out / DONE).write_text("done\n")
    return out
