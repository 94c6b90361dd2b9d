"""onnxruntime latency of the deployed files: float graph, QDQ, integer kernels, INT4 weights.

For each network, four ONNX files of the same weights: ``float`` (the network without
its quantizers), ``qdq`` (``gaqat export --format onnx``), ``integer`` (with
``--integer-kernels``: batch norm folded so that onnxruntime runs QLinearConv) and
``int4`` (integer kernels plus ``--int4-weights``). Each runs under onnxruntime's full
graph optimisation on the CPU, at batch 1 and 32, with 1 and 2 intra-op threads;
latencies are medians of interleaved rounds. Top-1 agreement of every quantized file
with the PyTorch model is measured on real images: DigitsDG's held-out domain for the
small CNN, scikit-image's photos for the ImageNet nets.

- ``small_cnn`` (32x32) comes from ``--checkpoint``, a QAT run's checkpoint (e.g. a
  ``gaqat_w4`` run of the DigitsDG study), with ``--data-dir`` its DigitsDG cache.
- ``mobilenet_v2`` and ``efficientnet_lite0`` (224x224) are the ImageNet networks (when
  their weights are at hand: torchvision's cache, the ``[lite]`` extra; else random),
  quantized at 4 bits with batch norm folded (their training default) and step sizes
  initialised on the photos, without training: latency and agreement, not accuracy.

Goal (issue "Edge deployment"): the integer graph at least 1.5x faster than float at
batch 1, with 100% top-1 agreement on DigitsDG.

    python benchmarks/deploy_latency.py --checkpoint runs/.../checkpoint.pt [--quick]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from timing import print_table, time_interleaved, write_json

from gaqat import export
from gaqat.bn_folding import deployable
from gaqat.checkpoint import load_model
from gaqat.data import load_dataset
from gaqat.data.loaders import make_loaders
from gaqat.export.layers import quantized_modules
from gaqat.models import ModelConfig, build_model
from gaqat.optim import frozen_running_stats
from gaqat.prepare import QuantConfig, quantize_model

VARIANTS = {"qdq": {}, "integer": {"integer_kernels": True}}
VARIANTS["int4"] = {"integer_kernels": True, "int4_weights": True}
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "cat")


def float_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same float weights (batch norm folded in, if it was trained folded) with every
    quantizer removed: the float graph a deployment starts from."""
    twin = deployable(copy.deepcopy(model)).eval()
    for layer in quantized_modules(twin).values():
        layer.weight_quantizer = layer.input_quantizer = torch.nn.Identity()
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


def imagenet_case(arch: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    try:
        model = build_model(ModelConfig(arch=arch, num_classes=1000, weights="imagenet"))
    except RuntimeError as error:  # no download here, no [lite] extra: random weights
        print(f"{arch}: {str(error)[:120]}... using random weights")
        model = build_model(ModelConfig(arch=arch, num_classes=1000))
    images = photos(224)
    quantize_model(model, QuantConfig(4, 4, fold_batch_norm=True))
    model.train()
    with torch.no_grad(), frozen_running_stats(model):
        model(images)  # step sizes from the photos, ImageNet's statistics kept
    return model.eval(), float_twin(model), images


def digits_case(checkpoint: Path, data_dir: Path | None):
    model, saved = load_model(checkpoint)
    test_env = saved["meta"]["test_envs"][0]
    dataset = load_dataset("digits", data_dir)
    loaders = make_loaders(dataset, [test_env], batch_size=32)
    images = torch.cat([x for x, _ in loaders.eval[f"env{test_env}_in"]])
    return model.eval(), float_twin(model), images


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def files(model, twin, size: int, folder: Path) -> dict[str, Path]:
    paths = {"float": folder / "float.onnx"}
    torch.onnx.export(
        twin,
        (torch.zeros(1, 3, size, size),),
        str(paths["float"]),
        dynamo=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    for name, options in VARIANTS.items():
        paths[name] = folder / f"{name}.onnx"
        export.export_onnx(model, paths[name], size, **options)
    return paths


def measure(label, model, twin, images, rounds, folder) -> list[dict]:
    size = images.shape[-1]
    paths = files(model, twin, size, folder)
    with torch.no_grad():
        expected = torch.cat([model(chunk) for chunk in images.split(64)]).argmax(1)
    rows = []
    for threads in (1, 2):
        sessions = {name: session(path, threads) for name, path in paths.items()}
        for batch in (1, 32):
            x = images.repeat(batch // len(images) + 1, 1, 1, 1)[:batch].numpy()
            runs = {
                name: (lambda s=s, x=x: s.run(None, {"images": x})) for name, s in sessions.items()
            }
            timings = time_interleaved(runs, rounds=rounds, warmup=3)
            base = timings["float"].median_ms
            for name, timing in timings.items():
                rows.append(
                    {
                        "case": label,
                        "threads": threads,
                        "batch": batch,
                        "file": name,
                        "median_ms": timing.median_ms,
                        "speedup_vs_float": base / timing.median_ms,
                        "bytes": paths[name].stat().st_size,
                    }
                )
        if threads == 1:  # the float twin is another model: only the quantized files agree
            for name, s in sessions.items():
                if name == "float":
                    continue
                got = np.concatenate(
                    [s.run(None, {"images": c.numpy()})[0] for c in images.split(64)]
                ).argmax(1)
                agreement = float((torch.from_numpy(got) == expected).float().mean())
                for row in rows:
                    if row["file"] == name:
                        row["top1_agreement"] = agreement
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a small_cnn QAT checkpoint")
    parser.add_argument("--data-dir", type=Path, help="DigitsDG cache folder")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="small_cnn only, 5 rounds")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            model, twin, images = digits_case(args.checkpoint, args.data_dir)
            rows += measure("small_cnn_32", model, twin, images, rounds, Path(tmp))
        if not args.quick:
            for arch in ("mobilenet_v2", "efficientnet_lite0"):
                (Path(tmp) / arch).mkdir()
                model, twin, images = imagenet_case(arch)
                rows += measure(f"{arch}_224", model, twin, images, rounds, Path(tmp) / arch)
    print_table(rows, title=f"onnxruntime {ort.__version__} CPU latency, {rounds} rounds")
    summary = [
        {"case": r["case"], "integer_speedup_b1_t1": r["speedup_vs_float"]}
        for r in rows
        if r["file"] == "integer" and r["batch"] == 1 and r["threads"] == 1
    ]
    path = write_json(
        "deploy_latency_quick" if args.quick else "deploy_latency",
        {
            "onnxruntime": ort.__version__,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "rounds": rounds,
            "rows": rows,
            "summary": summary,
        },
    )
    speedups = ", ".join(f"{s['case']} {s['integer_speedup_b1_t1']:.2f}x" for s in summary)
    print(f"\nwrote {path}; integer vs float at batch 1, 1 thread: {speedups}")


if __name__ == "__main__":
    main()
