"""onnxruntime latency of gaqat's deployed files against float and onnxruntime's own PTQ.

For each network, five ONNX files of the same float weights, timed in the same paired,
interleaved rounds (``timing.time_interleaved``):

- ``float``: the network with every quantizer removed (batch norm folded in where it
  trained folded): the float graph a deployment starts from;
- ``qdq``: ``gaqat export --format onnx``; ``integer``: with ``--integer-kernels`` (batch
  norm folded so that onnxruntime runs QLinearConv); ``int4``: integer kernels plus
  ``--int4-weights``, as written (the INT4 weights dequantized on every run);
- ``ptq``: what a user gets from onnxruntime alone: ``quant_pre_process`` (shape
  inference and graph optimisation, as onnxruntime's quantization docs recommend) of the
  float file, then ``quantize_static`` in QDQ format, per channel, uint8 activations and
  int8 weights, MinMax-calibrated on 32 images read by a ``CalibrationDataReader``.

Each runs under onnxruntime's full graph optimisation on the CPU, at batch 1 and 32,
with 1 and 2 intra-op threads (``--batches``, ``--threads``). The table gives median
float time / file time per file, and ``integer/ptq``: median PTQ time / integer time, the
speed of gaqat's integer file as a fraction of the PTQ file's (issue #23's goal: >= 0.9
at batch 1, 1 thread). The node counts of every file's optimised graph
(``gaqat.export.nodes``) say what runs as integer kernels. Top-1 agreement: gaqat's
files against the PyTorch model they export, the PTQ file against the float network.

- ``small_cnn`` (32x32): with ``--checkpoint``, a QAT run's checkpoint (e.g. a
  ``gaqat_w4`` run of the DigitsDG study; ``--data-dir`` its DigitsDG cache), checked on
  its held-out domain and calibrated on its training domains; without, an untrained W4
  small CNN (batch norm folded) whose step sizes and batch-norm statistics come from the
  32 calibration images: latency, not accuracy.
- ``mobilenet_v2``, ``efficientnet_lite0``, ``resnet18`` (224x224): the ImageNet networks
  (when their weights are at hand: torchvision's cache, the ``[lite]`` extra; else
  random, with batch-norm statistics from the calibration images), W4 with batch norm
  folded and 8-bit residual quantizers (``--residual-bits``), step sizes initialised on
  32 views of scikit-image's photos, the PTQ's calibration images too, without training;
  checked on the photos.

Results go to ``results/deploy_latency.json`` (``--quick``: ``deploy_latency_quick``;
``--name``: another name, for a run that should not replace the full grid's).

    python benchmarks/deploy_latency.py [--checkpoint runs/.../checkpoint.pt] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from timing import print_table, time_interleaved, write_json
from torch import nn

from gaqat import export
from gaqat.bn_folding import deployable, update_running_statistics
from gaqat.checkpoint import load_model
from gaqat.data import load_dataset
from gaqat.data.loaders import make_loaders
from gaqat.efficientnet_lite import SamePad
from gaqat.export.nodes import OPS, optimized_node_counts
from gaqat.head import QuantHead
from gaqat.models import ModelConfig, build_model
from gaqat.optim import frozen_running_stats
from gaqat.prepare import QuantConfig, quantize_model
from gaqat.quant import QuantConv2d, QuantLinear
from gaqat.residual import QuantResidual

CASES = ("small_cnn", "mobilenet_v2", "efficientnet_lite0", "resnet18")
VARIANTS = {"qdq": {}, "integer": {"integer_kernels": True}}
VARIANTS["int4"] = {"integer_kernels": True, "int4_weights": True}
FILES = ("float", *VARIANTS, "ptq")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "cat")
HELD_OUT = 1  # DigitsDG's mnist_m, for an untrained small CNN


@dataclasses.dataclass
class Case:
    """One network: its quantized model (eval mode), the float twin, the images the files
    are checked on, and the calibration images (onnxruntime's PTQ reads them)."""

    label: str
    model: nn.Module
    twin: nn.Module
    images: torch.Tensor
    calibration: torch.Tensor


def float_twin(model: nn.Module, size: int | None = None) -> nn.Module:
    """The same float weights (batch norm folded in, if it was trained folded) with every
    quantizer removed: each quantized layer a float one holding its weight and bias,
    each residual block with quantizers the block alone, the head's activation without
    its quantizer (``gaqat.head``). With ``size``, EfficientNet's
    "same" padding fixed at that image side, as gaqat's integer file fixes it."""
    twin = deployable(copy.deepcopy(model)).eval()
    for name, module in reversed(list(twin.named_modules())):  # a block after its layers
        if isinstance(module, (QuantConv2d, QuantLinear)):
            layer = float_layer(module)
        elif isinstance(module, QuantResidual):
            layer = module.block
        elif isinstance(module, QuantHead):
            layer = module.activation
        elif isinstance(module, SamePad) and size is not None:
            layer = nn.ZeroPad2d(module.amounts(size, size))
        else:
            continue
        twin.set_submodule(name, layer)
    return twin


def float_layer(layer: QuantConv2d | QuantLinear) -> nn.Conv2d | nn.Linear:
    """The float layer of ``layer``'s shape, holding its weight and bias."""
    if isinstance(layer, QuantLinear):
        twin = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    else:
        twin = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
        )
    twin.weight, twin.bias = layer.weight, layer.bias
    return twin


def photos(size: int) -> torch.Tensor:
    from skimage import color, data

    images = []
    for name in PHOTOS:
        image = getattr(data, name)()
        image = color.gray2rgb(image) if image.ndim == 2 else image[..., :3]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        images.append(torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear"))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.cat(images) - mean) / std


def views(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` calibration images: ``images`` themselves, then seeded random crops (half to
    all of the side) resized back, every other one flipped."""
    generator = torch.Generator().manual_seed(seed)
    side = images.shape[-1]
    out = list(images[:n])
    while len(out) < n:
        image = images[len(out) % len(images)]
        crop = int(side * (0.5 + 0.5 * torch.rand(1, generator=generator).item()))
        top, left = torch.randint(0, side - crop + 1, (2,), generator=generator).tolist()
        patch = image[None, :, top : top + crop, left : left + crop]
        patch = torch.nn.functional.interpolate(patch, size=(side, side), mode="bilinear")[0]
        out.append(patch.flip(-1) if len(out) % 2 else patch)
    return torch.stack(out)


def quantized(
    arch: str, residual_bits: int, weights: str | None = None, first_last: str = "float"
) -> tuple[nn.Module, bool]:
    """``arch`` at W4 with batch norm folded and ``residual_bits`` residual quantizers (0:
    none), its first and last layers as ``first_last`` says ("int8": with the head
    quantizer, ``gaqat.head``), with ``weights`` ("imagenet") when at hand; and whether
    they were."""
    config = ModelConfig(arch=arch, num_classes=10 if arch == "small_cnn" else 1000)
    try:
        model = build_model(dataclasses.replace(config, weights=weights))
    except RuntimeError as error:  # no download here, no [lite] extra: random weights
        print(f"{arch}: {str(error)[:120]}... using random weights")
        model, weights = build_model(config), None
    quant = QuantConfig(
        4, 4, first_last=first_last, fold_batch_norm=True, residual_bits=residual_bits
    )
    return quantize_model(model, quant), weights is not None


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, own_statistics: bool) -> nn.Module:
    """Step sizes from ``images`` (LSQ's first-batch initialisation); with
    ``own_statistics`` the batch norms take their statistics too (random weights), else
    they keep theirs (ImageNet's). Returns ``model`` in eval mode."""
    model.train()
    if own_statistics:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # a cumulative average: this one batch
        model(images)
        update_running_statistics(model)  # the folded pairs' staged statistics
    else:
        with frozen_running_stats(model):
            model(images)
    return model.eval()


def imagenet_case(arch: str, residual_bits: int, n_calibration: int, first_last: str) -> Case:
    model, pretrained = quantized(arch, residual_bits, weights="imagenet", first_last=first_last)
    images = photos(export.INPUT_SIZES[arch])
    calibration = views(images, n_calibration)
    calibrate(model, calibration, own_statistics=not pretrained)
    twin = float_twin(model, images.shape[-1])
    return Case(f"{arch}_224", model, twin, images, calibration)


def digits_images(data_dir: Path | None, test_env: int, n: int):
    """DigitsDG's held-out domain (its in-split images) and ``n`` calibration images drawn
    from the training domains in turn."""
    loaders = make_loaders(load_dataset("digits", data_dir), [test_env], batch_size=32)
    held_out = torch.cat([x for x, _ in loaders.eval[f"env{test_env}_in"]])
    first = [next(iter(loaders.eval[f"env{i}_in"]))[0] for i in loaders.train_envs]
    calibration = torch.stack([image for batch in zip(*first) for image in batch][:n])
    return held_out, calibration


def digits_case(
    checkpoint: Path | None, data_dir, residual_bits: int, n: int, first_last: str
) -> Case:
    """The small CNN of ``checkpoint`` (its own first and last layers), or an untrained one
    (``calibrate``d)."""
    if checkpoint is None:
        model, _ = quantized("small_cnn", residual_bits, first_last=first_last)
        images, calibration = digits_images(data_dir, HELD_OUT, n)
        calibrate(model, calibration, own_statistics=True)
    else:
        model, saved = load_model(checkpoint)
        images, calibration = digits_images(data_dir, saved["meta"]["test_envs"][0], n)
    return Case("small_cnn_32", model.eval(), float_twin(model), images, calibration)


class ImageReader(CalibrationDataReader):
    """The calibration images, one per run, as ``quantize_static`` reads them."""

    def __init__(self, images: torch.Tensor):
        self.batches = iter(images.split(1))

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch.numpy()}


def ptq_file(float_path: Path, calibration: torch.Tensor, out: Path) -> Path:
    """onnxruntime's static post-training quantization of ``float_path`` into ``out``:
    pre-processed (symbolic and ONNX shape inference, graph optimisation: the
    ``quant_pre_process`` step onnxruntime's quantization docs recommend), then QDQ,
    per-channel int8 weights, uint8 activations, MinMax ranges on ``calibration``."""
    prepared = out.with_name(f"{out.stem}_prepared.onnx")
    quant_pre_process(str(float_path), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        ImageReader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()
    return out


def float_file(twin: nn.Module, size: int, out: Path) -> Path:
    """The float network's ONNX file, of any batch size."""
    with warnings.catch_warnings():  # the TorchScript exporter says it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            twin,
            (torch.zeros(1, 3, size, size),),
            str(out),
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    return out


def files(case: Case, folder: Path) -> dict[str, Path]:
    size = case.images.shape[-1]
    paths = {"float": float_file(case.twin, size, folder / "float.onnx")}
    for name, options in VARIANTS.items():
        paths[name] = folder / f"{name}.onnx"
        export.export_onnx(case.model, paths[name], size, **options)
    paths["ptq"] = ptq_file(paths["float"], case.calibration, folder / "ptq.onnx")
    return paths


def session(path: Path, threads: int, profile: Path | None = None) -> ort.InferenceSession:
    """A CPU session under every graph optimisation; ``profile``: onnxruntime's profiler
    on, its file's name prefix."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch_of(case: Case, batch: int) -> np.ndarray:
    """``batch`` of the case's images, repeated as needed."""
    return case.images.repeat(batch // len(case.images) + 1, 1, 1, 1)[:batch].numpy()


def time_files(case: Case, paths: dict[str, Path], grid: dict, rounds: int) -> list[dict]:
    """A row per file, thread count and batch: median and IQR in ms, speed against the
    float file and against the PTQ file (the other's median time / this one's)."""
    rows = []
    for threads in grid["threads"]:
        sessions = {name: session(path, threads) for name, path in paths.items()}
        for batch in grid["batches"]:
            x = batch_of(case, batch)
            runs = {
                name: (lambda s=s, x=x: s.run(None, {"images": x})) for name, s in sessions.items()
            }
            timings = time_interleaved(runs, rounds=rounds, warmup=3)
            medians = {name: timing.median_ms for name, timing in timings.items()}
            rows += [
                {
                    "case": case.label,
                    "threads": threads,
                    "batch": batch,
                    "file": name,
                    "median_ms": medians[name],
                    "iqr_ms": timing.iqr_ms,
                    "speedup_vs_float": medians["float"] / medians[name],
                    "speed_vs_ptq": medians["ptq"] / medians[name],
                    "bytes": paths[name].stat().st_size,
                }
                for name, timing in timings.items()
            ]
    return rows


@torch.no_grad()
def agreement(case: Case, paths: dict[str, Path]) -> dict[str, dict]:
    """Top-1 agreement of each quantized file on ``case.images``: gaqat's with the PyTorch
    model they export, the PTQ file with the float network it quantizes."""
    references = {
        "model": torch.cat([case.model(chunk) for chunk in case.images.split(64)]).argmax(1),
        "float": torch.cat([case.twin(chunk) for chunk in case.images.split(64)]).argmax(1),
    }
    result = {}
    for name, path in paths.items():
        if name == "float":
            continue
        reference = "float" if name == "ptq" else "model"
        got = export.onnx_logits(path, case.images).argmax(1)
        result[name] = {
            "top1_agreement": float((got == references[reference]).float().mean()),
            "reference": reference,
            "images": len(case.images),
        }
    return result


def op_shares(path: Path, x: np.ndarray, threads: int, folder: Path, runs: int = 5) -> dict:
    """Each op type's share of the kernel time onnxruntime's profiler records over
    ``runs`` runs of ``x``, largest first (the first run, a warm-up, included: the
    profiler records from the session's start)."""
    s = session(path, threads, profile=folder / path.stem)
    for _ in range(runs):
        s.run(None, {"images": x})
    times = collections.Counter()
    for event in json.loads(Path(s.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values())
    return {op: t / total for op, t in times.most_common()}


def measure(case: Case, grid: dict, rounds: int, folder: Path, profile: bool) -> dict:
    paths = files(case, folder)
    nodes = {name: dict(optimized_node_counts(path)) for name, path in paths.items()}
    result = {
        "rows": time_files(case, paths, grid, rounds),
        "nodes": nodes,
        "agreement": agreement(case, paths),
    }
    if profile:  # at the grid's largest batch and thread count
        batch, threads = max(grid["batches"]), max(grid["threads"])
        x = batch_of(case, batch)
        result["profile"] = {
            "batch": batch,
            "threads": threads,
            "shares": {n: op_shares(paths[n], x, threads, folder) for n in ("integer", "ptq")},
        }
    return result


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per case, thread count and batch: the float file's median time, each
    file's speed-up against it, and the integer file's speed against the PTQ file's."""
    summary = {}
    for row in rows:
        key = (row["case"], row["threads"], row["batch"])
        line = summary.setdefault(key, dict(zip(("case", "threads", "batch"), key)))
        if row["file"] == "float":
            line["float_ms"] = row["median_ms"]
        else:
            line[row["file"]] = row["speedup_vs_float"]
        if row["file"] == "integer":
            line["integer/ptq"] = row["speed_vs_ptq"]
    return list(summary.values())


def node_rows(nodes: dict[str, dict[str, dict]]) -> tuple[list[dict], list[str]]:
    """Node counts as table rows (case, file, then the ops of ``OPS``, then any other op
    present), and the columns."""
    present = {op for files in nodes.values() for counts in files.values() for op in counts}
    ops = [op for op in OPS if op in present] + sorted(present - set(OPS))
    rows = [
        {"case": case, "file": name, **{op: counts.get(op, 0) for op in ops}}
        for case, files in nodes.items()
        for name, counts in files.items()
    ]
    return rows, ["case", "file", *ops]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a small_cnn QAT checkpoint")
    parser.add_argument("--data-dir", type=Path, help="DigitsDG cache folder")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="intra-op")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=32, help="calibration images")
    parser.add_argument("--residual-bits", type=int, default=8, help="0: no residual quantizers")
    parser.add_argument(
        "--first-last",
        choices=("float", "int8"),
        default="int8",
        help="first and last layers (int8: one integer region, as the PTQ file quantizes all)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also each op type's share of the integer and PTQ files' kernel time",
    )
    parser.add_argument("--quick", action="store_true", help="small_cnn only, 5 rounds")
    parser.add_argument("--name", help="results/<name>.json (default: deploy_latency[_quick])")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.rounds = ["small_cnn"], 5
    args.name = args.name or ("deploy_latency_quick" if args.quick else "deploy_latency")
    return args


def build_case(arch: str, args: argparse.Namespace) -> Case:
    if arch == "small_cnn":
        options = (args.residual_bits, args.calibration, args.first_last)
        return digits_case(args.checkpoint, args.data_dir, *options)
    return imagenet_case(arch, args.residual_bits, args.calibration, args.first_last)


def report(results: dict[str, dict], args: argparse.Namespace) -> Path:
    """Print the speed, node count and agreement tables; write them all to JSON."""
    rows = [row for result in results.values() for row in result["rows"]]
    summary = summary_rows(rows)
    columns = ["case", "threads", "batch", "float_ms", *FILES[1:], "integer/ptq"]
    title = f"onnxruntime {ort.__version__} CPU: float ms, then float time / file time"
    print_table(summary, columns, title=title)
    nodes = {label: result["nodes"] for label, result in results.items()}
    print_table(*node_rows(nodes), title="nodes after onnxruntime's graph optimisation")
    agreements = [
        {"case": label, "file": name, **values}
        for label, result in results.items()
        for name, values in result["agreement"].items()
    ]
    print_table(agreements, title="top-1 agreement (gaqat's files: the model; ptq: float)")
    profiles = {label: r["profile"] for label, r in results.items() if "profile" in r}
    if profiles:
        shares = [
            {"case": label, "batch": p["batch"], "threads": p["threads"], "file": name}
            | {op: f"{100 * v:.0f}%" for op, v in list(ops.items())[:5]}
            for label, p in profiles.items()
            for name, ops in p["shares"].items()
        ]
        print_table(shares, title="share of kernel time by op (onnxruntime's profiler)")
    payload = {
        "onnxruntime": ort.__version__,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "rounds": args.rounds,
        "batches": args.batches,
        "threads": args.threads,
        "residual_bits": args.residual_bits,
        "first_last": args.first_last,
        "calibration_images": args.calibration,
        "summary": summary,
        "nodes": nodes,
        "agreement": agreements,
        "profiles": profiles,
        "rows": rows,
    }
    return write_json(args.name, payload)


def main() -> None:
    args = parse_args()
    grid = {"batches": args.batches, "threads": args.threads}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.cases:
            case = build_case(arch, args)
            folder = Path(tmp) / arch
            folder.mkdir()
            results[case.label] = measure(case, grid, args.rounds, folder, args.profile)
            print(f"{case.label}: measured")
    print(f"\nwrote {report(results, args)}")


if __name__ == "__main__":
    main()
