"""The accuracy of an exported ONNX file on its run's own data: what a device will deliver.

A QAT checkpoint is the fake-quantized model; the ONNX file is what a runtime executes.
The model evaluates with the runtime's int32 biases (``gaqat.quant.bias_codes``), so the
two agree up to float rounding, which moves an activation code only where it sits on a
.5 tie; the deployed accuracy is measured rather than assumed. Every split the run
itself evaluated (DomainBed's ``env{i}_in`` and ``env{i}_out``, drawn with the run's
trial seed and holdout fraction) goes through both, and each row holds PyTorch's
accuracy, the file's, and their top-1 agreement; the held-out domains are the rows that
tell how the file generalises.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gaqat.data import load_recorded
from gaqat.data.loaders import make_loaders
from gaqat.export.verify import onnx_logits
from gaqat.fields import check_fields

ROLES = {"in": "training", "out": "validation"}
# What drawing the run's splits again reads from its checkpoint.
_RUN_FIELDS = {
    "args.dataset": str,
    "args.trial_seed": int,
    "meta.domains": list,
    "meta.test_envs": list,
}


@dataclass(frozen=True)
class SplitAccuracy:
    """One split through the PyTorch model and the exported file."""

    split: str  # DomainBed's key: env0_in, env0_out, ...
    domain: str
    role: str  # "held out", or "training" / "validation" for a training domain's splits
    images: int
    pytorch_acc: float
    onnx_acc: float
    agreement: float  # share of images with the same top-1 class


@dataclass(frozen=True)
class RunSplits:
    """The splits a run evaluated: DomainBed's ``env{i}_in`` / ``env{i}_out`` loaders, of
    images ``image_size`` pixels a side."""

    domains: tuple[str, ...]
    test_envs: tuple[int, ...]
    loaders: dict[str, DataLoader]
    image_size: int

    def role(self, split: str) -> str:
        env, part = _env_part(split)
        return "held out" if env in self.test_envs else ROLES[part]

    def domain(self, split: str) -> str:
        return self.domains[_env_part(split)[0]]


def _env_part(split: str) -> tuple[int, str]:
    """``"env2_out"`` → ``(2, "out")``."""
    env, part = split.removeprefix("env").split("_")
    return int(env), part


def run_splits(checkpoint: dict, source: str, data_dir: str | Path | None) -> RunSplits:
    """The run's evaluation loaders, rebuilt from the ``args`` and ``meta`` its checkpoint
    stores (``data_dir`` replaces the one the run was trained with). Called before the
    export writes anything, so that a checkpoint or data it cannot use fails first."""
    if not checkpoint.get("args"):
        raise ValueError(
            f"{source}: the checkpoint has no 'args' with the run's trial seed and holdout, "
            f"which evaluating the export needs to draw the run's own splits; evaluate a "
            f"checkpoint.pt written by `gaqat train`"
        )
    check_fields(checkpoint, _RUN_FIELDS, f"checkpoint {source}")
    args, meta = checkpoint["args"], checkpoint["meta"]
    dataset = load_recorded(args, data_dir, source)  # a folder dataset by its recorded path
    if list(dataset.domains) != list(meta["domains"]):
        raise ValueError(
            f"{source}: the run was trained on {args['dataset']} domains "
            f"{list(meta['domains'])}, but the data found has {list(dataset.domains)}; "
            f"pass the data directory it was trained on (--data-dir)"
        )
    loaders = make_loaders(
        dataset,
        meta["test_envs"],
        batch_size=1,  # the training stream is never drawn here
        seed=args["trial_seed"],
        holdout_fraction=args.get("holdout_fraction", 0.2),
        augment=False,
        image_size=args.get("image_size"),
    )
    image_size = args.get("image_size") or dataset.image_size
    return RunSplits(tuple(dataset.domains), tuple(meta["test_envs"]), loaders.eval, image_size)


@torch.no_grad()
def evaluate_export(session, model: torch.nn.Module, splits: RunSplits) -> list[SplitAccuracy]:
    """Every split of the run through ``model`` (in eval mode) and the exported file's
    ``onnx_session``, counting the images each gets right and those they agree on."""
    rows = []
    for name, loader in splits.loaders.items():
        images = right = right_onnx = same = 0
        for x, y in loader:
            ours = model(x).argmax(1)
            theirs = onnx_logits(session, x, len(x)).argmax(1)
            right += int((ours == y).sum())
            right_onnx += int((theirs == y).sum())
            same += int((ours == theirs).sum())
            images += len(y)
        rows.append(
            SplitAccuracy(
                name,
                splits.domain(name),
                splits.role(name),
                images,
                right / images,
                right_onnx / images,
                same / images,
            )
        )
    return rows


def evaluation_table(rows: list[SplitAccuracy]) -> str:
    """A plain-text table, percentages to two decimals."""
    lines = [
        f"{'split':<10} {'domain':<14} {'role':<10} {'images':>7} {'pytorch':>8} "
        f"{'onnx':>8} {'agree':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.split:<10} {r.domain:<14} {r.role:<10} {r.images:>7} "
            f"{100 * r.pytorch_acc:>7.2f}% {100 * r.onnx_acc:>7.2f}% {100 * r.agreement:>7.2f}%"
        )
    return "\n".join(lines)


def evaluation_path(exported: Path) -> Path:
    """Where the evaluation of an exported file goes: ``model.onnx`` → ``model.eval.json``."""
    return exported.with_suffix(".eval.json")


def evaluation_json(rows: list[SplitAccuracy], about: dict) -> bytes:
    """The rows as JSON, with ``about`` (file, checkpoint, run): the ``evaluation_path``
    file's content."""
    return (json.dumps({**about, "splits": [asdict(r) for r in rows]}, indent=1) + "\n").encode()
