"""How much of a float network a quantized copy keeps before QAT's first step.

    python benchmarks/lowbit_signal.py --checkpoint RUN/checkpoint.pt [--bits 8 4 3 2]
        [--halves] [--images 300] [--name lowbit_signal]

Quantization-aware training starts from the float model quantized as it is. Where that
copy still computes what the float model computes, QAT fine-tunes; where it does not, QAT
must train the network again, at low bits, in a few hundred steps. For an ``erm`` run's
checkpoint (DigitsDG) and each bit width (weights and activations, the ``lsq`` recipe's
QuantConfig for the architecture, step sizes initialised as LSQ does, from the first 96
images: the first training domain's; with ``--halves`` also each half alone, the other at
8 bits: ``W2A8``, ``W8A2``) this prints and writes to ``benchmarks/results/<name>.json``:

- ``acc``: top-1 on ``--images`` held-in images of the training domains (the float
  model's in the first row);
- ``cos@k``: per block k of the featurizer (its ``features`` or its children), the mean
  over images of the cosine between the float and the quantized block outputs, each
  centred on its batch mean: 1 keeps the float features, 0 keeps nothing of them;
- ``grad (batch stats)`` / ``grad (running stats)``: the norm of the cross-entropy
  gradient of the first convolution's weight (float in every recipe), quantized over
  float, with batch norm on batch statistics (as QAT's training steps until
  ``bn_freeze_at``) and on running ones. Far above 1: the quantized layers amplify
  the gradient on its way back, so the stem's update carries their rounding, not the
  task.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch
from timing import print_table, write_json
from torch import nn
from torch.nn import functional as F

from gaqat.algorithms import quant_config_for
from gaqat.checkpoint import load_model
from gaqat.data.digits import load_digits
from gaqat.data.loaders import make_loaders
from gaqat.hparams import default_hparams
from gaqat.prepare import quantize_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an erm run's checkpoint.pt")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    parser.add_argument("--halves", action="store_true", help="weights, activations alone")
    parser.add_argument("--images", type=int, default=300, help="held-in images, all domains")
    parser.add_argument("--data-dir", type=Path, default=None, help="DigitsDG's cache folder")
    parser.add_argument("--name", default="lowbit_signal", help="the JSON's name")
    return parser.parse_args()


def held_in_images(checkpoint: dict, n: int, data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (and labels) drawn evenly from the run's training domains' held-in
    splits, in a seeded random order (an evaluation split is ordered by class)."""
    test_envs = checkpoint["args"]["test_envs"]
    loaders = make_loaders(load_digits(data_dir), test_envs, 32, seed=0)
    generator = torch.Generator().manual_seed(0)
    images, labels = [], []
    for env in loaders.train_envs:
        view = loaders.eval[f"env{env}_in"].dataset
        for i in torch.randperm(len(view), generator=generator)[: n // len(loaders.train_envs)]:
            image, label = view[int(i)]
            images.append(image)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def blocks(model: nn.Module) -> list[nn.Module]:
    featurizer = model.featurizer
    return list(getattr(featurizer, "features", featurizer).children())


@torch.no_grad()
def block_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The eval-mode logits and every block's output."""
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in blocks(model)]
    try:
        logits = model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, outputs


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1), b.flatten(1)
    return float(F.cosine_similarity(a - a.mean(0), b - b.mean(0), dim=1).mean())


def stem_gradient(model: nn.Module, x, y, batch_statistics: bool) -> float:
    """Norm of the first convolution's weight gradient of the cross-entropy on (x, y),
    on a copy (a training-mode pass would move the batch norms' running statistics)."""
    model = copy.deepcopy(model).train(batch_statistics)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return float(stem.weight.grad.norm())


def widths(bit_widths, halves: bool) -> list[tuple[int, int]]:
    """(weight bits, activation bits) to measure: each width, and with ``halves`` each
    half of it alone."""
    pairs = [(b, b) for b in bit_widths]
    return pairs + [p for b in bit_widths if halves and b < 8 for p in ((b, 8), (8, b))]


def quantized_copy(model: nn.Module, arch: str, bits: tuple[int, int], x) -> nn.Module:
    """``model`` quantized as the lsq recipe does at (weight, activation) ``bits``, its
    step sizes initialised on ``x`` in eval mode (the batch norms' statistics untouched)."""
    config = quant_config_for(default_hparams("lsq", "digits"), bits[0], arch)
    config = dataclasses.replace(config, act_bits=bits[1])
    quantized = quantize_model(copy.deepcopy(model), config)
    with torch.no_grad():
        quantized.eval()(x)
    return quantized


def measure(path: Path, pairs, n: int, data_dir) -> tuple[list[dict], list[int]]:
    """The table's rows for each (weight bits, activation bits) of ``pairs``, and the
    blocks whose cosine they show."""
    model, checkpoint = load_model(path)
    arch = checkpoint["model_config"]["arch"]
    x, y = held_in_images(checkpoint, n, data_dir)
    # The images come domain by domain: with the default 300 this is the first training
    # domain's first 96 (as are x[:96], which initialise the step sizes).
    batch = slice(0, 32 * (len(x) // 96))
    logits, reference = block_outputs(model, x)
    shown = sorted({0, len(reference) // 4, len(reference) // 2, 3 * len(reference) // 4})
    shown = [k for k in shown if k > 0] + [len(reference) - 1]
    float_grads = [stem_gradient(model, x[batch], y[batch], b) for b in (True, False)]
    rows = [{"bits": "float", "acc": float((logits.argmax(1) == y).float().mean())}]
    for bits in pairs:
        quantized = quantized_copy(model, arch, bits, x[:96])
        q_logits, outputs = block_outputs(quantized, x)
        row = {
            "bits": "W{}A{}".format(*bits),
            "acc": float((q_logits.argmax(1) == y).float().mean()),
        }
        row |= {f"cos@{k}": centred_cosine(reference[k], outputs[k]) for k in shown}
        for stats, reference_grad in zip(("batch", "running"), float_grads):
            grad = stem_gradient(quantized, x[batch], y[batch], stats == "batch")
            row[f"grad ({stats} stats)"] = grad / reference_grad
        rows.append(row)
    return rows, shown


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    pairs = widths(args.bits, args.halves)
    rows, shown = measure(args.checkpoint, pairs, args.images, args.data_dir)
    print_table(rows, title=f"{args.checkpoint}: the quantized copy before QAT's first step")
    payload = {"checkpoint": str(args.checkpoint), "blocks_shown": shown, "rows": rows}
    print(f"\nwrote {write_json(args.name, payload)}")


if __name__ == "__main__":
    main()
