"""One training run under the DomainBed protocol, crash-safe and resumable.

The output folder holds what DomainBed's tools and ours read:

- ``results.jsonl``: one record per checkpoint (DomainBed's keys, plus ``bits`` and
  ``n_frozen`` for QAT runs, ``val_loss`` for averaging runs), and for a run that
  averages its weights (``gaqat.averaging``) one more at the last step, the averaged
  network's, flagged ``"averaged": true``: the run's result;
- ``gradients.jsonl``: GAQAT's window summaries and freeze decisions (the figures' data);
- ``checkpoint.pt``: model, optimizer (freezer, tracker and weight average included),
  scheduler, RNG states and step, replaced atomically at every checkpoint; at the end of
  an averaging run its model is the averaged one;
- ``done``: written last; a folder with it is a finished run.

A run goes in three stages. :func:`check` (:mod:`gaqat.arguments`) validates every
argument and loads what the run starts from, touching no output file, so a typo never
costs a finished run. Then the folder is locked against a second process and claimed: a
finished run is replaced only with ``overwrite`` (and set aside until the new run has its
first checkpoint), an unfinished one is continued only with ``resume`` and only by the
same run. Then the loop trains. Lines of the two JSONL files are written before the
checkpoint that covers them, so resuming drops every line newer than the checkpoint and
the run rewrites them: a killed run resumed gives the same files and weights as a run
that was never killed.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from gaqat import distributed
from gaqat.algorithms import Algorithm
from gaqat.arguments import Plan, TrainConfig, check, check_arguments, resolve_hparams
from gaqat.checkpoint import load_checkpoint, save_atomic
from gaqat.data import check_same_data, dataset_record
from gaqat.data.loaders import DomainLoaders, make_loaders
from gaqat.errors import UsageError, as_usage_errors
from gaqat.hparams import default_hparams
from gaqat.progress import progress
from gaqat.quant import check_step_sizes
from gaqat.runfolder import (
    CHECKPOINT,
    DONE,
    GRADIENTS,
    PREVIOUS,
    RESULTS,
    append_jsonl,
    locked,
    read_jsonl,
    run_state,
    set_aside,
    settle,
    truncate_jsonl,
)
from gaqat.seeding import seed_hash

__all__ = [  # the arguments' names too, so that callers import a run's API from one place
    "CheckpointWriteError",
    "NonFiniteLossError",
    "Plan",
    "RunInterrupted",
    "TrainConfig",
    "check",
    "check_arguments",
    "evaluate",
    "resolve_hparams",
    "run",
    "run_summary",
    "set_deterministic",
]


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
    # A hyperparameter added after the run was written: the run had its default behaviour.
    hparams = {**default_hparams(meta["algorithm"], meta["dataset"]), **checkpoint["hparams"]}
    return {
        "dataset": meta["dataset"],
        "algorithm": meta["algorithm"],
        "bits": meta["bits"],
        "test_envs": sorted(meta["test_envs"]),
        "trial_seed": args["trial_seed"],
        "hparams_seed": args["hparams_seed"],
        "image_size": args.get("image_size"),
        "precision": args.get("precision", "fp32"),  # runs from before the option: fp32
        **{f"hparams.{k}": v for k, v in hparams.items()},
    }


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
    """Build, restore, then step; every ``checkpoint_freq`` steps and at the last, the
    ranks close the window together and rank 0 evaluates and writes a checkpoint."""
    loop = _build(config, plan, out)
    _restore(loop, resume_from)
    steps, freq, world = plan.hparams["steps"], plan.hparams["checkpoint_freq"], plan.world
    bar = progress(steps, config.algorithm, config.progress and world.main, initial=loop.start)
    batches = loop.loaders.train_batches(loop.start, shard=world.shard)
    loop.tic = time.perf_counter()
    step = loop.start
    try:
        for step in range(loop.start, steps):
            stats = _step(loop, next(batches))
            bar.update(1)
            done = step + 1
            if done % freq and done != steps:
                continue
            window = _close_window(loop, done)  # every rank: the collectives
            records = _records(loop, done, window, stats)  # rank 0's lines; [] on the others
            if world.main:  # the others wait at the barrier while rank 0 writes
                _save(loop, done, window, records)
                shown = {"loss": f"{window.loss:.3f}"}
                if records:  # none in QT-DoG's float warm-up
                    targets = [records[-1][f"env{e}_in_acc"] for e in config.test_envs]
                    shown["target"] = f"{np.mean(targets):.3f}"
                bar.set_postfix(**shown)
            distributed.barrier(world)
            loop.losses, loop.tic = [], time.perf_counter()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_stopped_at(loop, step + 1, steps)) from None
    finally:
        bar.close()
    if world.main:
        (out / DONE).write_text("done\n")


@dataclass
class _Loop:
    """What the training loop carries from one checkpoint to the next."""

    config: TrainConfig
    plan: Plan
    out: Path
    algorithm: Algorithm
    loaders: DomainLoaders
    meta: dict  # what the model is, for the checkpoint (``gaqat.checkpoint``)
    args: dict  # the run's arguments, in every record and checkpoint
    steps_per_epoch: float
    start: int = 0  # the first step to take: 0, or the resumed checkpoint's step
    saved_step: int | None = None  # the last checkpoint's step; None before the first
    lr_changes: list = field(default_factory=list)  # [step, base rate] per --new-lr
    losses: list[torch.Tensor] = field(default_factory=list)  # since the last checkpoint
    tic: float = 0.0  # when the steps since the last checkpoint began


class _Window(NamedTuple):
    """What the ranks agree on at the end of a window of steps."""

    loss: float  # mean over the window's steps and the ranks
    step_time: float  # seconds per step
    gradient_records: list  # GAQAT's window summaries, for gradients.jsonl
    rng_ranks: list | None  # every rank's random state, where there are several


def _build(config: TrainConfig, plan: Plan, out: Path) -> _Loop:
    """Seed, then the loaders and the algorithm as at step 0, and the records' headers."""
    if config.deterministic:
        set_deterministic()
    _seed_everything(config.trial_seed)
    loaders = make_loaders(
        plan.dataset,
        list(config.test_envs),
        plan.hparams["batch_size"],
        seed=config.trial_seed,
        num_workers=config.num_workers,
        image_size=config.image_size,
    )
    algorithm = Algorithm(
        config.algorithm,
        plan.model_config,
        plan.hparams,
        plan.hparams["steps"],
        plan.bits,
        plan.init_state,
        precision=config.precision,
        channels_last=config.channels_last,
        compile=config.compile,
    ).to(plan.device)
    meta, args = _headers(config, plan, out, loaders)
    steps_per_epoch = (
        min(
            len(split.in_indices)
            for i, split in enumerate(loaders.splits)
            if i not in config.test_envs
        )
        / plan.hparams["batch_size"]
    )
    return _Loop(config, plan, out, algorithm, loaders, meta, args, steps_per_epoch)


def _headers(
    config: TrainConfig, plan: Plan, out: Path, loaders: DomainLoaders
) -> tuple[dict, dict]:
    """The checkpoint's ``meta`` and the records' ``args``. DomainBed's tools group runs by
    ``args.algorithm`` and ignore bits, so the name carries the bit width; they also read
    ``output_dir`` and ``holdout_fraction``."""
    dataset, bits, world = plan.dataset, plan.bits, plan.world
    meta = {
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "domains": list(dataset.domains),
        "algorithm": config.algorithm,
        "bits": bits,
        "test_envs": list(config.test_envs),
    }
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
    return meta, args


def _restore(loop: _Loop, resume_from: dict | None) -> None:
    """Continue from ``resume_from`` (weights, optimizer, random state, learning rate), or
    start each rank but 0 on its own dropout stream; then share the model among the ranks
    and drop the lines newer than the checkpoint."""
    config, algorithm = loop.config, loop.algorithm
    world, device = loop.plan.world, loop.plan.device
    if resume_from is not None:
        algorithm.resume_at(resume_from["step"])  # QT-DoG: quantized by then, or still float
        algorithm.network.load_state_dict(resume_from["model"])
        algorithm.load_optimizer_state(resume_from["training"])
        loop.start = loop.saved_step = resume_from["step"]
        _resume_rng(resume_from, world, config.trial_seed, loop.start)
        loop.lr_changes = list(resume_from.get("lr_changes", []))
        if config.new_lr is not None:
            _change_lr(algorithm, config.new_lr)
            loop.lr_changes.append([loop.start, config.new_lr])
    elif not world.main:  # the model is built; this rank's dropout draws its own stream
        _seed_everything(seed_hash(config.trial_seed, "rank", world.rank, 0))
    if world.size > 1:
        if resume_from is None:  # each rank sees a shard: step sizes from the whole batch
            whole = next(loop.loaders.train_batches(0))
            algorithm.prime([(x.to(device), y.to(device)) for x, y in whole])
        algorithm.distribute(device)
    if world.main:
        for name in (RESULTS, GRADIENTS):
            truncate_jsonl(loop.out / name, loop.start)


def _step(loop: _Loop, batch: list) -> dict:
    """One training step; its loss stays on the device until the window closes."""
    device = loop.plan.device
    minibatches = [
        (x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batch
    ]
    stats = loop.algorithm.update(minibatches)
    loop.losses.append(stats["loss"])
    return stats


def _close_window(loop: _Loop, done: int) -> _Window:
    """Every rank's collectives at a checkpoint: the mean loss, the frozen step sizes the
    ranks must agree on, and every rank's random state.

    The losses are read here all at once: a per-step read would make the host wait for
    every step's kernels. So step_time is the wall time of the window's steps, and a
    non-finite loss stops the run here, before its checkpoint is written."""
    algorithm, world = loop.algorithm, loop.plan.world
    values = torch.stack(loop.losses).tolist()
    step_time = (time.perf_counter() - loop.tic) / len(values)
    loss = distributed.mean(sum(values) / len(values), world)
    if not math.isfinite(loss):
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        at = done - len(values) + 1 + bad if bad is not None else done
        lr = algorithm.scheduler.base_lrs[0]
        value = values[bad] if bad is not None else loss
        raise NonFiniteLossError(_nan_message(value, at, loop.saved_step, loop.out, lr))
    gradient_records = algorithm.pop_gradient_records()
    if algorithm.freezer is not None:
        distributed.agree(sorted(algorithm.freezer.frozen), world, "frozen step sizes")
    rng_ranks = distributed.gather(_checkpoint_rng_state(), world) if world.size > 1 else None
    return _Window(loss, step_time, gradient_records, rng_ranks)


def _records(loop: _Loop, done: int, window: _Window, stats: dict) -> list[dict]:
    """The results.jsonl lines of the checkpoint at step ``done``, on rank 0: the network's;
    at the last step of a run that averages its weights, the averaged network's after it;
    none during QT-DoG's float warm-up (a quantized method's records are of its quantized
    network, so that model selection never picks a float one).

    Every rank keeps the weight average, fed rank 0's validation loss."""
    plan, average = loop.plan, loop.algorithm.average
    records = []
    if plan.world.main and not loop.algorithm.warming_up:
        timing = {"step_time": window.step_time, "mem_gb": _peak_memory_gb(plan.device)}
        records.append(_record(loop, done, stats, loss=window.loss, **timing))
    if average is not None:
        val_loss = records[0]["val_loss"] if records else None
        average.after_evaluation(done, distributed.broadcast(val_loss, plan.world))
        if done == plan.hparams["steps"]:
            records += _averaged_records(loop, done, stats)
    return records


def _averaged_records(loop: _Loop, done: int, stats: dict) -> list[dict]:
    """Every rank: the network takes its averaged weights, its batch norm recomputed on
    (its shard of) the training batches after step ``done``; rank 0: the averaged
    network's record, flagged."""
    plan = loop.plan
    batches = loop.loaders.train_batches(done, shard=plan.world.shard)
    window = loop.algorithm.use_average(
        itertools.islice(batches, plan.hparams["bn_recompute_steps"])
    )
    if not plan.world.main:
        return []
    flags = {
        "averaged": True,
        "averaging": plan.recipe.averaging,
        "average_start_step": window.first,
        "average_end_step": window.last,
        "averaged_steps": window.count,
    }
    return [_record(loop, done, stats, **flags)]


def _record(loop: _Loop, done: int, stats: dict, **fields) -> dict:
    """A results.jsonl line for the network as it is at step ``done``: its accuracies (and
    validation loss, in an averaging run), the step, ``fields``, the run's settings."""
    plan = loop.plan
    validation = loop.loaders.train_envs if plan.recipe.averaging != "none" else ()
    record = evaluate(loop.algorithm, loop.loaders.eval, plan.device, validation)
    record.update(
        step=done,
        epoch=done / loop.steps_per_epoch,
        **fields,
        hparams=plan.hparams,
        args=loop.args,
    )
    if plan.recipe.quantized:
        record.update(bits=plan.bits, n_frozen=stats.get("n_frozen", 0))
    if loop.lr_changes:
        record["lr_changes"] = loop.lr_changes
    return record


def _save(loop: _Loop, done: int, window: _Window, records: list[dict]) -> None:
    """Rank 0 writes the window's lines and the checkpoint of step ``done``; a run being
    overwritten goes once this one has a checkpoint."""
    checkpoint = _checkpoint(loop, done)
    if window.rng_ranks is not None:
        checkpoint["rng_ranks"] = window.rng_ranks
    _write_checkpoint(loop.out, checkpoint, window.gradient_records, records, loop.saved_step)
    settle(loop.out, keep_new=True)
    loop.saved_step = done


def _stopped_at(loop: _Loop, step: int, steps: int) -> str:
    """What Ctrl-C at ``step`` leaves: the last checkpoint, if any."""
    kept = (
        f"{loop.out / CHECKPOINT} keeps step {loop.saved_step}"
        if loop.saved_step is not None
        else "no checkpoint had been written yet"
    )
    return f"interrupted at step {step} of {steps}: {kept}."


def _checkpoint(loop: _Loop, step: int) -> dict:
    """What ``gaqat.checkpoint`` documents, plus everything a resumed run needs."""
    algorithm, plan = loop.algorithm, loop.plan
    quant = algorithm.quant_config
    return {
        "model": algorithm.network.state_dict(),
        "model_config": plan.model_config.to_dict(),
        "quant_config": asdict(quant) if quant else None,
        "meta": loop.meta,
        "step": step,
        "training": algorithm.optimizer_state(),
        "rng": _checkpoint_rng_state(),
        "hparams": plan.hparams,
        "args": loop.args,
        "lr_changes": loop.lr_changes,
    }


def _write_checkpoint(
    out: Path, checkpoint: dict, gradient_records: list, records: list, saved_step: int | None
) -> None:
    """The lines first, then the checkpoint that covers them. A failed write (torch reports
    a full disk as ``[enforce fail at inline_container.cc]``) becomes one paragraph that
    says what is kept and how to go on; lines beyond the kept checkpoint are dropped on
    resume."""
    try:
        append_jsonl(out / GRADIENTS, gradient_records)
        append_jsonl(out / RESULTS, records)
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


def _checkpoint_rng_state() -> dict:
    """Every generator's state (torch, numpy, Python, CUDA), for a checkpoint: in types
    that ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict) -> None:
    """Set every generator from what :func:`_checkpoint_rng_state` saved."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_rng(checkpoint: dict, world: distributed.World, trial_seed: int, step: int) -> None:
    """Set this rank's random state to resume with: its own when the checkpoint has one
    (saved by as many ranks), else rank 0's stream for rank 0 and a fresh one per other
    rank."""
    ranks = checkpoint.get("rng_ranks")
    if ranks is not None and len(ranks) == world.size:
        _restore_rng_state(ranks[world.rank])
    elif world.main:
        _restore_rng_state(checkpoint["rng"])
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
def _scores(algorithm: Algorithm, loader, device: torch.device) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over ``loader``."""
    correct = total = 0
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = algorithm.predict(x)
        correct += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits, y, reduction="sum")
        total += len(y)
    return float(correct) / total, float(loss) / total


def evaluate(
    algorithm: Algorithm, loaders: dict, device: torch.device, validation_envs: Sequence[int] = ()
) -> dict[str, float]:
    """``{"env0_in_acc": ..., "env0_out_acc": ...}`` over every split (DomainBed's keys);
    with ``validation_envs`` (the training domains) also ``val_loss``, the mean over them
    of the mean cross-entropy on their ``out`` split: the loss SWAD's window follows (its
    release's ``tr_outloss``)."""
    check_step_sizes(algorithm.network)  # warns if an optimizer drove one to the floor
    scores = {name: _scores(algorithm, loader, device) for name, loader in loaders.items()}
    record = {f"{name}_acc": acc for name, (acc, _) in scores.items()}
    if validation_envs:
        record["val_loss"] = float(np.mean([scores[f"env{i}_out"][1] for i in validation_envs]))
    return record


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


def run_summary(folder: Path) -> str:
    """What ``gaqat train`` prints at the end: held-out accuracy at the checkpoint that
    training-domain validation selects and at the last one (before them, an averaging
    run's result: its averaged weights'), and where the files are."""
    folder = Path(folder)
    records = [record for _, record in read_jsonl(folder / RESULTS)]
    averaged = [r for r in records if r.get("averaged")]
    records = [r for r in records if not r.get("averaged")]
    last = records[-1]
    domains, test_envs = last["args"]["domains"], last["args"]["test_envs"]
    train_envs = [i for i in range(len(domains)) if i not in test_envs]
    best = max(records, key=lambda r: np.mean([r[f"env{i}_out_acc"] for i in train_envs]))
    lines = [
        f"finished {folder}: {RESULTS}, {CHECKPOINT}"
        + (f", {GRADIENTS}" if (folder / GRADIENTS).exists() else "")
    ]
    average = averaged[-1] if averaged else None
    for e in test_envs:
        result = (
            f"{100 * average[f'env{e}_in_acc']:.1f}% with the {average['averaging'].upper()} "
            f"average of steps {average['average_start_step']}-{average['average_end_step']} "
            f"(the run's result); "
            if average
            else ""
        )
        lines.append(
            f"  held-out {domains[e]}: {result}{100 * best[f'env{e}_in_acc']:.1f}% at step "
            f"{best['step']} (training-domain validation), "
            f"{100 * last[f'env{e}_in_acc']:.1f}% at the last step {last['step']}"
        )
    return "\n".join(lines)
