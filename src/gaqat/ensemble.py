"""Ensembles of quantized models (EoQ, "ensembles of quantized models" in QT-DoG): K runs
that differ only by their trial seed, evaluated together by the mean of their members'
softmax outputs, as a run folder that ``gaqat report`` reads like any other.

Read top to bottom:

- the ensemble itself (:func:`mean_softmax`, :class:`Ensemble`) and its name
  (:func:`ensemble_name`: ``ens5_lsq_w4`` for five ``lsq`` runs at 4 bits, which the report
  shows as row ``ens5_lsq``, 4 bits, as it shows ``lsq_w4`` as ``lsq``);
- the members (:func:`open_member`, :func:`check_members`): finished runs (a ``done``
  file: their ``checkpoint.pt`` holds the final model, the averaged one for SWA/SWAD
  runs), loaded as ``gaqat corrupt`` loads them (``gaqat.checkpoint.load_model``), that
  agree on every field of :func:`identity` (dataset, domains and classes, held-out
  domains, algorithm, bits, hyperparameters, architecture, quantization) and differ in
  their trial seeds; anything else is a usage error naming the run folder and the field;
- the size (:func:`ensemble_sizes`): K times one member's deployed size, as ``gaqat
  export`` counts it (``gaqat.export.model_sizes``), against one float32 model;
- the evaluation: every split the members' runs evaluated, drawn again as ``gaqat export
  --evaluate`` draws them (``gaqat.export.evaluate.run_splits``), with the same accuracy
  keys as a ``results.jsonl`` record (``env0_in_acc``, ...), each member's accuracy beside;
- the folder (:func:`build_ensemble`): ``results.jsonl`` holding one record, flagged
  ``"averaged": true`` as a SWAD run flags its averaged network's (every selection
  method scores that record alone: the ensemble is a result of the final models), then
  ``done``; with ``onnx``, ``ensemble.onnx`` (``gaqat.export.ensemble``) and its
  ``ensemble.eval.json``; an existing ensemble is replaced only with ``overwrite``;
- a sweep (:func:`find_groups`, :func:`build_sweep_ensembles`): every set of finished runs
  below some folders that differ only by trial seed becomes an ensemble.

The splits are those of the member with the lowest trial seed (the record's
``args.trial_seed``). The held-out domains' accuracies are clean: no member trained on
them. A training domain's validation split is not: the members of other trial seeds drew
other splits and trained on most of its images, so the training-domain validation
accuracy of an ensemble is optimistic. It only ranks an ensemble against other
hyperparameter draws, and each draw's ensemble has the same bias.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from gaqat.errors import UsageError, as_usage_errors
from gaqat.fields import check_fields
from gaqat.hparams import default_hparams
from gaqat.runfolder import (
    CHECKPOINT,
    DONE,
    LOCK,
    RESULTS,
    check_output_folder,
    locked,
    read_jsonl,
    run_state,
)

if TYPE_CHECKING:
    from gaqat.export.ensemble import EnsembleExport
    from gaqat.export.evaluate import RunSplits

ONNX_FILE = "ensemble.onnx"
EVAL_FILE = "ensemble.eval.json"  # gaqat.export.evaluate.evaluation_path(ONNX_FILE)
OUTPUTS = (RESULTS, ONNX_FILE, EVAL_FILE)  # what an ensemble writes before its ``done``
AVERAGING = "ensemble"  # the record's "averaging", beside SWA's and SWAD's
# What a member's record must hold for its run to be grouped and its ensemble named.
_RECORD_FIELDS = {
    "step": int,
    "args": dict,
    "hparams": dict,
    "args.dataset": str,
    "args.algorithm": str,
    "args.test_envs": list,
    "args.trial_seed": int,
    "args.hparams_seed": int,
}


# --- the ensemble -------------------------------------------------------------------------


def mean_softmax(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ensemble's output: the mean over members of their softmax over classes.

    >>> import torch
    >>> mean_softmax([torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 100.0]])])
    tensor([[0.2500, 0.7500]])
    """
    probabilities = [member.softmax(dim=1) for member in logits]
    # A sum and a division, not stack and mean: their ONNX ops (Add, Div) read the same at
    # every opset, where Unsqueeze's and ReduceMean's changed (an --int4-weights file is
    # traced at opset 12 or 13 and then raised to 21).
    return sum(probabilities[1:], probabilities[0]) / len(probabilities)


class Ensemble(nn.Module):
    """K networks as one: class probabilities, the mean of their softmax outputs
    (:func:`mean_softmax`). Its argmax is the ensemble's prediction; a module, so that the
    ONNX export writes the K members and the averaging as one file.

    >>> import torch
    >>> members = [torch.nn.Linear(3, 2) for _ in range(3)]
    >>> x = torch.randn(4, 3)
    >>> by_hand = sum(m(x).softmax(1) for m in members) / 3
    >>> torch.allclose(Ensemble(members)(x), by_hand)
    True
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_softmax([member(x) for member in self.members])


def ensemble_name(algorithm: str, k: int) -> str:
    """The ensemble's ``args.algorithm``: K, then its members' (``lsq_w4``, bits included).

    >>> ensemble_name("lsq_w4", 5)
    'ens5_lsq_w4'
    """
    return f"ens{k}_{algorithm}"


def _method(args: dict) -> str:
    """A record's method, without the bit width its name carries (``lsq_w4`` -> ``lsq``)."""
    bits = args.get("bits")
    return args["algorithm"] if bits is None else args["algorithm"].removesuffix(f"_w{bits}")


# --- the members --------------------------------------------------------------------------


def identity(args: dict, hparams: dict) -> dict:
    """What the members of an ensemble share, from a run's recorded ``args`` and resolved
    ``hparams``: everything that makes the run but its trial seed (and where its files
    are). The checkpoint adds the classes and the model and quantization configs. A
    hyperparameter added after a run was written counts at its declared default, the
    behaviour the run had (as resuming it reads it, ``gaqat.train``)."""
    try:
        hparams = {**default_hparams(_method(args), args["dataset"]), **hparams}
    except ValueError:  # a method or dataset this version does not know: as recorded
        pass
    return {
        "dataset": args["dataset"],
        "dataset_fingerprint": args.get("dataset_fingerprint"),
        "class_map": args.get("class_map"),
        "domains": args.get("domains"),
        "test_envs": sorted(args["test_envs"]),
        "algorithm": args["algorithm"],
        "bits": args.get("bits"),
        "hparams_seed": args["hparams_seed"],
        "image_size": args.get("image_size"),
        "holdout_fraction": args.get("holdout_fraction", 0.2),
        "precision": args.get("precision", "fp32"),
        "weights": args.get("weights"),
        **{f"hparams.{key}": value for key, value in sorted(hparams.items())},
    }


@dataclass
class Member:
    """A finished run, its final model loaded (in eval mode, on the evaluation device)."""

    folder: Path
    checkpoint: dict  # its fields but the weights: args, meta, hparams, configs, step
    record: dict  # the last line of its results.jsonl: the final model's evaluation
    model: nn.Module

    @property
    def trial_seed(self) -> int:
        return self.checkpoint["args"]["trial_seed"]

    def identity(self) -> dict:
        ck = self.checkpoint
        configs = {
            **{f"model_config.{k}": v for k, v in ck["model_config"].items()},
            **{f"quant_config.{k}": v for k, v in (ck["quant_config"] or {}).items()},
        }
        classes = {"classes": ck["meta"].get("classes")}
        return {**identity(ck["args"], ck["hparams"]), **classes, **configs}


def _last_record(folder: Path) -> dict:
    records = read_jsonl(folder / RESULTS) if (folder / RESULTS).is_file() else []
    if not records:
        raise UsageError(f"{folder}: no records in {RESULTS}; give a run of `gaqat train`")
    where, record = records[-1]
    return check_fields(record, _RECORD_FIELDS, where)


def check_finished(folder: Path) -> None:
    """A usage error, naming the folder, unless it holds a finished run with a checkpoint."""
    state = run_state(folder)
    if state == "incomplete":
        raise UsageError(
            f"{folder}: the run has not finished (no `{DONE}` file), so its {CHECKPOINT} "
            f"is not its final model; finish it (`gaqat train ... --resume`, or launch its "
            f"sweep again) or leave it out of the ensemble"
        )
    if state == "new" or not (folder / CHECKPOINT).is_file():
        raise UsageError(
            f"{folder}: not a run folder (no {CHECKPOINT}); an ensemble's members are "
            f"folders written by `gaqat train`"
        )


def open_member(folder: str | Path, device: str | torch.device = "cpu") -> Member:
    """A finished run's final model and what it was trained with; a usage error, naming
    the folder, for a folder that holds no run, a run that has not finished, or a
    checkpoint without the run's arguments."""
    from gaqat.checkpoint import load_checkpoint, model_from_checkpoint

    folder = Path(folder)
    check_finished(folder)
    with as_usage_errors():
        record = _last_record(folder)
        checkpoint = load_checkpoint(folder / CHECKPOINT, map_location=device)
        if not checkpoint.get("args") or not isinstance(checkpoint.get("hparams"), dict):
            raise ValueError(
                f"{folder / CHECKPOINT}: no 'args' and 'hparams' of the run, which an "
                f"ensemble compares and evaluates with; give a run of `gaqat train`"
            )
        model = model_from_checkpoint(checkpoint, folder / CHECKPOINT).to(device).eval()
    checkpoint.pop("model")
    checkpoint.pop("training", None)  # optimizer moments: not needed, maybe large
    return Member(folder, checkpoint, record, model)


def check_members(members: Sequence[Member]) -> None:
    """A usage error unless ``members`` are at least two runs of distinct trial seeds that
    agree on every field of their :meth:`Member.identity`; it names the run folders and
    the first field that differs."""
    if len(members) < 2:
        folders = ", ".join(str(m.folder) for m in members) or "none"
        raise UsageError(
            f"an ensemble needs runs of at least 2 trial seeds, got {len(members)} ({folders})"
        )
    first, wanted = members[0], members[0].identity()
    seeds: dict[int, Member] = {}
    for member in members:
        other = seeds.setdefault(member.trial_seed, member)
        if other is not member:
            raise UsageError(
                f"{other.folder} and {member.folder} are both trial seed {member.trial_seed}; "
                f"an ensemble's members are runs of different trial seeds (give each run once)"
            )
        mine = member.identity()
        for key in sorted(wanted.keys() | mine.keys()):
            if mine.get(key) != wanted.get(key):
                raise UsageError(_mixed(member, first, key, mine.get(key), wanted.get(key)))


def _mixed(member: Member, first: Member, key: str, value: object, wanted: object) -> str:
    """The message for a member that differs from the first in field ``key``."""
    seed = first.checkpoint["args"]["hparams_seed"]
    draw = (
        f" (hparams seed {seed} is a random draw, drawn anew for each trial seed as "
        f"DomainBed draws it: ensemble runs of hparams seed 0 or of the same --hparams)"
        if key.startswith("hparams.") and seed
        else ""
    )
    return (
        f"{member.folder} cannot join an ensemble with {first.folder}: field {key} is "
        f"{value!r} there and {wanted!r} in {first.folder}; an ensemble's members differ "
        f"only by trial seed (same dataset, held-out domains, algorithm, bits, "
        f"hyperparameters and architecture){draw}"
    )


# --- the size -----------------------------------------------------------------------------


def ensemble_sizes(model: nn.Module, k: int) -> dict[str, int]:
    """Bytes of K members like ``model`` deployed, against one float32 model: a quantized
    member as ``gaqat export`` counts it (bit-packed codes, every float tensor at 32 bits,
    batch norm folded as the export folds it: ``gaqat.export.model_sizes``), a float
    member at 32 bits.

    >>> import torch
    >>> from gaqat.models import ModelConfig, build_model
    >>> from gaqat.prepare import QuantConfig, quantize_model
    >>> w4 = quantize_model(build_model(ModelConfig()), QuantConfig(4, 4))  # small_cnn
    >>> _ = w4(torch.randn(2, 3, 32, 32))  # the first batch sets the step sizes
    >>> ensemble_sizes(w4, 5)  # five W4 members: 0.69 of one float model
    {'members': 5, 'member_bytes': 134080, 'ensemble_bytes': 670400, 'float_bytes': 972712}
    >>> ensemble_sizes(build_model(ModelConfig()), 5)["ensemble_bytes"]  # five float ones
    4863560
    """
    from gaqat.bn_folding import deployable
    from gaqat.export.layers import model_sizes, quantized_modules

    if quantized_modules(model):
        sizes = model_sizes(deployable(deepcopy(model)))
        member, float_ = sizes["packed_bytes"], sizes["float_bytes"]
    else:
        state = model.state_dict().values()
        member = float_ = sum(4 * t.numel() for t in state if t.is_floating_point())
    return {
        "members": k,
        "member_bytes": member,
        "ensemble_bytes": k * member,
        "float_bytes": float_,
    }


# --- the evaluation -----------------------------------------------------------------------


@torch.no_grad()
def evaluate_ensemble(
    models: Sequence[nn.Module],
    splits: RunSplits,
    device: torch.device,
    precision: str,
    show: bool,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Accuracy of the ensemble on every split of ``splits`` (``RunSplits``), as
    ``{"env0_in_acc": ...}`` (a results.jsonl record's keys), and each member's. Evaluated
    as training evaluates (``gaqat.train.evaluate``): eval mode, under bfloat16 autocast
    for ``precision`` "bf16", top-1 of float logits (here, of the mean softmax)."""
    from gaqat.progress import progress

    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
    accs, member_accs = {}, {}
    total = sum(len(loader.dataset) for loader in splits.loaders.values())
    with progress(total, "gaqat ensemble", show, unit="images") as bar:
        for name, loader in splits.loaders.items():
            right = torch.zeros((), dtype=torch.long, device=device)
            members_right = torch.zeros(len(models), dtype=torch.long, device=device)
            images = 0
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast:
                    logits = [model(x).float() for model in models]
                right += (mean_softmax(logits).argmax(1) == y).sum()
                members_right += torch.stack([(out.argmax(1) == y).sum() for out in logits])
                images += len(y)
                bar.update(len(y))
            accs[f"{name}_acc"] = int(right) / images
            member_accs[f"{name}_acc"] = [int(r) / images for r in members_right.tolist()]
    return accs, member_accs


# --- the folder ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsembleResult:
    """What :func:`build_ensemble` wrote (or, ``kept``, found written with these members)."""

    folder: Path
    record: dict
    splits: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # domain, role, images
    onnx: EnsembleExport | None = None
    kept: bool = False

    @property
    def name(self) -> str:
        return self.record["args"]["algorithm"]

    def __str__(self) -> str:
        return ensemble_table(self)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def ensemble_table(result: EnsembleResult) -> str:
    """What ``gaqat ensemble`` prints: the ensemble's accuracy per split beside its
    members' (mean, min, max), its size, and how its ONNX file checks."""
    info, args = result.record["ensemble"], result.record["args"]
    domains = args.get("domains") or []
    held_out = ", ".join(domains[e] if e < len(domains) else f"env{e}" for e in args["test_envs"])
    seeds = ", ".join(map(str, info["trial_seeds"]))
    head = f"{result.name}: {info['members']} members (trial seeds {seeds}), held out {held_out}"
    if result.kept:
        return f"{head}: kept {result.folder} (the same members; --overwrite evaluates again)"
    lines = [
        f"{head} -> {result.folder}",
        f"{'split':<10} {'domain':<14} {'role':<10} {'images':>7} {'ensemble':>9}   "
        f"members: mean [min, max]",
    ]
    for split, (domain, role, images) in result.splits.items():
        acc, members = result.record[f"{split}_acc"], info["member_accs"][f"{split}_acc"]
        spread = f"{_percent(sum(members) / len(members))}% [{_percent(min(members))}, "
        lines.append(
            f"{split:<10} {domain:<14} {role:<10} {images:>7} {_percent(acc):>8}%   "
            f"{spread}{_percent(max(members))}]"
        )
    bits = args.get("bits")
    kind = f"{bits}-bit codes bit-packed" if bits is not None else "float32"
    lines.append(
        f"size: {info['members']} x {info['member_bytes']:,} = {info['ensemble_bytes']:,} "
        f"bytes ({kind}) vs {info['float_bytes']:,} bytes for one float32 model "
        f"({info['ensemble_bytes'] / info['float_bytes']:.2f}x)"
    )
    if result.onnx is not None:
        from gaqat.export.evaluate import evaluation_table

        lines.append(result.onnx.describe(str(result.folder / ONNX_FILE)))
        lines.append(f"accuracy, PyTorch vs ONNX Runtime (also in {EVAL_FILE}):")
        lines.append(evaluation_table(result.onnx.evaluation))
    return "\n".join(lines)


def _ensemble_record(members: Sequence[Member], out: Path, accs: dict, extra: dict) -> dict:
    """The results.jsonl line: the accuracies, the step, the flags a SWAD record carries,
    the members, and the args and hparams of the member whose splits were evaluated."""
    anchor = members[0]
    args = {k: v for k, v in anchor.record["args"].items() if k != "init"}  # each has its own
    args.update(
        algorithm=ensemble_name(args["algorithm"], len(members)),
        output=str(out),
        output_dir=str(out),
    )
    record = {
        **accs,
        "step": anchor.record["step"],
        **({"epoch": anchor.record["epoch"]} if "epoch" in anchor.record else {}),
        "averaged": True,
        "averaging": AVERAGING,
        "ensemble": {
            "members": len(members),
            "runs": [str(m.folder) for m in members],
            "trial_seeds": [m.trial_seed for m in members],
            "split_trial_seed": anchor.trial_seed,
            **extra,
        },
        "hparams": anchor.record["hparams"],
        "args": args,
    }
    if args.get("bits") is not None:
        record["bits"] = args["bits"]
    return record


def _check_output(out: Path, overwrite: bool) -> None:
    """An ensemble goes into a folder of its own: new, empty, or an ensemble's (replaced
    only with ``overwrite``); never a run's, nor among other files."""
    check_output_folder(
        out,
        "--output",
        ours=lambda entry: entry.name in (*OUTPUTS, DONE, LOCK),
        what="an ensemble's folder",
    )
    if not (out / RESULTS).is_file():
        return
    with as_usage_errors():
        records = [record for _, record in read_jsonl(out / RESULTS)]
    if not all(isinstance(r, dict) and "ensemble" in r for r in records):
        raise UsageError(
            f"--output {out}: its {RESULTS} is not an ensemble's; choose a new or empty folder"
        )
    if not overwrite:
        raise UsageError(f"--output {out} holds an ensemble already; add --overwrite to replace it")


def _write(out: Path, files: dict[str, bytes]) -> None:
    """The ensemble's files, each written whole (a temporary file renamed over it), with
    ``done`` removed first and written last: an interrupted write leaves a folder that
    reads as unfinished, never a mix that reads as finished. Files of an earlier ensemble
    that this one does not write (its ONNX file) go."""
    from gaqat.export.output import write_outputs

    with locked(out):
        (out / DONE).unlink(missing_ok=True)
        for name in OUTPUTS:
            if name not in files:
                (out / name).unlink(missing_ok=True)
        write_outputs({out / name: data for name, data in files.items()})
        (out / DONE).write_text("done\n")


def _onnx_properties(record: dict, member: Member) -> dict:
    """The ONNX file's metadata: what a single model's export holds, for the ensemble."""
    ck = member.checkpoint
    return {
        **ck["meta"],
        "algorithm": record["args"]["algorithm"],
        "model_config": ck["model_config"],
        "quant_config": ck["quant_config"],
        "ensemble": {k: record["ensemble"][k] for k in ("members", "runs", "trial_seeds")},
        "output": "probabilities: the mean of the members' softmax outputs",
    }


def _check_onnx(members: Sequence[Member]) -> None:
    """--onnx writes quantized members, as ``gaqat export`` writes QAT checkpoints only."""
    first = members[0]
    if first.checkpoint["quant_config"] is None:
        raise UsageError(
            f"--onnx: {first.folder} is a float run ({first.checkpoint['args']['algorithm']}); "
            f"the ONNX export writes ensembles of QAT runs"
        )


def _open_all(run_folders: Sequence[str | Path], device: torch.device) -> list[Member]:
    """The members, each folder once, in trial-seed order, checked (:func:`check_members`)."""
    folders: dict[Path, Path] = {}  # resolved -> as given first
    for folder in run_folders:
        folders.setdefault(Path(folder).resolve(), Path(folder))
    members = sorted((open_member(f, device) for f in folders.values()), key=lambda m: m.trial_seed)
    check_members(members)
    return members


def build_ensemble(
    run_folders: Sequence[str | Path],
    output: str | Path,
    *,
    data_dir: str | Path | None = None,
    device: str | None = None,
    overwrite: bool = False,
    onnx: bool = False,
    int4_weights: bool = False,
    integer_kernels: bool = False,
    progress: bool = False,
) -> EnsembleResult:
    """``gaqat ensemble RUN... --output OUT``: the finished runs ``run_folders``, which
    differ only by trial seed, evaluated as one ensemble on every split of their runs, into
    the folder ``output`` (``results.jsonl`` with one record, ``done``; with ``onnx``, the
    ensemble as one ONNX file, checked and evaluated under ONNX Runtime). Every check comes
    before any work; an existing ensemble in ``output`` is replaced only with ``overwrite``.

    >>> build_ensemble(["not-a-run", "nor-this"], "ens")
    Traceback (most recent call last):
    ...
    gaqat.errors.UsageError: not-a-run: not a run folder (no checkpoint.pt); ...
    """
    from gaqat.arguments import _device  # train's check of --device
    from gaqat.export.evaluate import evaluation_json, run_splits

    out, device = Path(output), _device(device)
    _check_output(out, overwrite)
    members = _open_all(run_folders, device)
    if onnx:
        _check_onnx(members)
    anchor = members[0]
    with as_usage_errors():  # the data is not the run's: a --data-dir to give
        splits = run_splits(anchor.checkpoint, str(anchor.folder), data_dir)
    precision = anchor.checkpoint["args"].get("precision", "fp32")
    models = [m.model for m in members]
    accs, member_accs = evaluate_ensemble(models, splits, device, precision, progress)
    extra = {"member_accs": member_accs, **ensemble_sizes(models[0], len(models))}
    record = _ensemble_record(members, out, accs, extra)
    files = {RESULTS: (json.dumps(record) + "\n").encode()}
    exported = None
    if onnx:
        from gaqat.export.ensemble import ensemble_onnx

        ensemble = Ensemble([deepcopy(model).cpu() for model in models]).eval()
        properties = _onnx_properties(record, anchor)
        options = {"int4_weights": int4_weights, "integer_kernels": integer_kernels}
        exported = ensemble_onnx(ensemble, splits.image_size, properties, splits, **options)
        files[ONNX_FILE] = exported.data
        about = {"file": str(out / ONNX_FILE), **record["ensemble"], **options}
        about.pop("member_accs")
        files[EVAL_FILE] = evaluation_json(exported.evaluation, about)
    _write(out, files)
    shown = {
        s: (splits.domain(s), splits.role(s), len(ld.dataset)) for s, ld in splits.loaders.items()
    }
    return EnsembleResult(out, record, shown, exported)


# --- a sweep ------------------------------------------------------------------------------


def _run_folders(dirs: Sequence[str | Path]) -> list[Path]:
    """Every folder below ``dirs`` with a ``results.jsonl``, each once, in sorted order,
    following symbolic links as the report does; hidden folders (a run set aside while it
    is overwritten, ``.previous``) are not searched."""
    found: dict[Path, None] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UsageError(f"{d}: no such folder")
        for root, subdirs, files in os.walk(d, followlinks=True):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            if RESULTS in files:
                found.setdefault(Path(root).resolve(), None)
    return sorted(found)


def find_groups(
    dirs: Sequence[str | Path], algorithms: Sequence[str] | None = None
) -> tuple[list[list[Path]], list[str]]:
    """The runs below ``dirs`` (of ``algorithms`` only, when given: names such as ``lsq``)
    grouped by everything but their trial seed (:func:`identity` of their last record),
    each group of two runs or more, and a note for each run left alone. Ensembles found
    there are not runs; unfinished runs are grouped, and :func:`open_member` refuses them.
    Grouped from the records alone (no checkpoint is loaded), so a sweep of large models
    is sorted quickly; :func:`check_members` checks each group's checkpoints again.

    >>> import tempfile
    >>> find_groups([tempfile.mkdtemp()])  # a folder without runs
    ([], [])
    """
    groups: dict[str, list[Path]] = {}
    for folder in _run_folders(dirs):
        with as_usage_errors():
            records = read_jsonl(folder / RESULTS)
            if not records or "ensemble" in records[-1][1]:
                continue
            where, record = records[-1]
            check_fields(record, _RECORD_FIELDS, where)
        if algorithms and _method(record["args"]) not in algorithms:
            continue
        key = json.dumps(identity(record["args"], record["hparams"]), sort_keys=True)
        groups.setdefault(key, []).append(folder)
    notes = [
        f"{folders[0]}: no run of another trial seed with its settings, so no ensemble"
        for folders in groups.values()
        if len(folders) == 1
    ]
    return [folders for folders in groups.values() if len(folders) > 1], notes


def _sweep_folder(output: Path, folders: Sequence[Path]) -> Path:
    """``OUTPUT/ens3_lsq_w4_env1_<hash>``: name, held-out domains, hparams seed when not 0,
    and a hash of the settings and trial seeds (two seed sets get two folders)."""
    from gaqat.sweep import job_hash

    records = [_last_record(folder) for folder in folders]
    args = records[0]["args"]
    key = {
        **identity(args, records[0]["hparams"]),
        "trial_seeds": sorted(r["args"]["trial_seed"] for r in records),
    }
    envs = "+".join(map(str, sorted(args["test_envs"])))
    hp = f"_hp{args['hparams_seed']}" if args["hparams_seed"] else ""
    name = ensemble_name(args["algorithm"], len(folders))
    return output / f"{name}_env{envs}{hp}_{job_hash(key)}"


def _same_members(out: Path, folders: Sequence[Path]) -> dict | None:
    """The record of a finished ensemble in ``out`` of exactly these runs, else None."""
    if run_state(out) != "done" or not (out / RESULTS).is_file():
        return None
    records = [record for _, record in read_jsonl(out / RESULTS)]
    runs = records[-1].get("ensemble", {}).get("runs", []) if records else []
    return records[-1] if sorted(Path(r).resolve() for r in runs) == sorted(folders) else None


def build_sweep_ensembles(
    dirs: Sequence[str | Path],
    output: str | Path,
    algorithms: Sequence[str] | None = None,
    overwrite: bool = False,
    **options,
) -> tuple[list[EnsembleResult], list[str]]:
    """``gaqat ensemble DIR... --sweep --output OUT``: an ensemble of every group of
    :func:`find_groups`, each into ``OUT/<name>_env<i>_<hash>`` (:func:`build_ensemble`,
    ``options`` its own). A group whose ensemble is there, finished with the same runs, is
    kept unless ``overwrite``. The members' ``done`` files and every output folder are
    checked before the first ensemble is evaluated. Returns the results and the notes.

    >>> build_sweep_ensembles(["no-such-sweep"], "ens")
    Traceback (most recent call last):
    ...
    gaqat.errors.UsageError: no-such-sweep: no such folder
    """
    groups, notes = find_groups(dirs, algorithms)
    if not groups:
        raise UsageError(
            f"no runs below {', '.join(map(str, dirs))} that differ only by trial seed"
            + (f" among {', '.join(algorithms)}" if algorithms else "")
            + (f" ({len(notes)} runs without a partner)" if notes else "")
        )
    plan = []
    for folders in groups:
        out = _sweep_folder(Path(output), folders)
        for folder in folders:
            check_finished(folder)
        if options.get("onnx") and _last_record(folders[0])["args"].get("bits") is None:
            raise UsageError(
                f"--onnx: {folders[0]} and its other trial seeds are float runs, which the "
                f"ONNX export does not write; leave their method out with --algorithms"
            )
        kept = None if overwrite else _same_members(out, folders)
        if kept is None:
            _check_output(out, overwrite)
        plan.append((folders, out, kept))
    results = [
        EnsembleResult(out, kept, kept=True)
        if kept is not None
        else build_ensemble(folders, out, overwrite=overwrite, **options)
        for folders, out, kept in plan
    ]
    return results, notes
