"""Deployment: a quantized checkpoint as an integer file and as an ONNX QDQ model.

A fake-quantized checkpoint holds float weights that the forward pass rounds on the fly;
a deployed model holds the rounded integers. ``export_checkpoint`` (``gaqat export``)
loads a QAT checkpoint, optionally folds batch norm into float convolutions, writes one
of two formats and checks what it wrote. One module per part:

- ``layers``: the quantized layers, their integer weight codes, the deployed size;
- ``batchnorm``: folding BN into the float convolution before it, never a quantized one;
- ``intfile``: the ``int`` format (safetensors), ``export_int`` and ``load_int``;
- ``qdq``: the ``onnx`` format, a QuantizeLinear/DequantizeLinear graph;
- ``verify``: the probe batch and ONNX Runtime's logits;
- ``evaluate``: the exported file's accuracy on every split of its run, beside PyTorch's;
- ``extra``: the optional packages (``pip install "gaqat[export]"``), imported when needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gaqat.bn_folding import conv_batchnorm_pairs, deployable
from gaqat.checkpoint import load_model
from gaqat.export.batchnorm import fold_batchnorm
from gaqat.export.evaluate import (
    SplitAccuracy,
    evaluate_export,
    evaluation_path,
    evaluation_table,
    run_splits,
    write_evaluation,
)
from gaqat.export.intfile import INT_FORMAT, INT_FORMAT_VERSION, export_int, int_metadata, load_int
from gaqat.export.layers import model_sizes, quantized_layers, weight_codes
from gaqat.export.qdq import export_onnx, onnx_opset, onnx_ready
from gaqat.export.verify import PROBE_BATCH, onnx_logits, onnx_session, probe_inputs

__all__ = [
    "FORMATS",
    "INPUT_SIZES",
    "ExportSummary",
    "export_checkpoint",
    "quantized_layers",
    "weight_codes",
    "model_sizes",
    "conv_batchnorm_pairs",
    "fold_batchnorm",
    "INT_FORMAT",
    "INT_FORMAT_VERSION",
    "export_int",
    "int_metadata",
    "load_int",
    "onnx_opset",
    "onnx_ready",
    "export_onnx",
    "PROBE_BATCH",
    "probe_inputs",
    "onnx_logits",
    "SplitAccuracy",
    "evaluate_export",
]

FORMATS = ("int", "onnx")
#: Input side used to trace the ONNX graph and to probe it, per architecture (the
#: small CNN is built for 32x32 DigitsDG, ResNets for 224x224 photos).
INPUT_SIZES = {
    "small_cnn": 32,
    "resnet18": 224,
    "resnet50": 224,
    "mobilenet_v2": 224,
    "mobilenet_v3_large": 224,
    "efficientnet_lite0": 224,
}


@dataclass
class ExportSummary:
    """What ``export_checkpoint`` did, for the command line and for callers."""

    path: Path
    format: str
    file_bytes: int
    packed_bytes: int
    float_bytes: int
    opset: int | None = None
    folded_bn: dict[str, str] = field(default_factory=dict)
    fold_max_abs_change: float | None = None
    onnx_max_abs_diff: float | None = None
    evaluation: list[SplitAccuracy] | None = None

    def __str__(self) -> str:
        lines = [
            f"wrote {self.path} ({self.format}, {self.file_bytes} bytes on disk)",
            f"deployed size: {self.packed_bytes} bytes with bit-packed codes vs "
            f"{self.float_bytes} bytes in float32 ({self.float_bytes / self.packed_bytes:.2f}x "
            f"smaller)",
        ]
        if self.opset is not None:
            lines.append(
                f"ONNX opset {self.opset}; ONNX Runtime vs PyTorch on {PROBE_BATCH} "
                f"seeded N(0,1) inputs: max abs logit difference "
                f"{self.onnx_max_abs_diff:.3g}"
            )
        if self.fold_max_abs_change is not None:
            lines.append(
                f"folded batch norm {sorted(self.folded_bn)} into float convs; max abs "
                f"logit change on the probe inputs {self.fold_max_abs_change:.3g}"
            )
        if self.evaluation is not None:
            lines.append(
                f"accuracy on the run's splits, PyTorch vs ONNX Runtime "
                f"(also in {evaluation_path(self.path)}):\n{evaluation_table(self.evaluation)}"
            )
        return "\n".join(lines)


@torch.no_grad()
def export_checkpoint(
    checkpoint_path: str | Path,
    fmt: str,
    out: str | Path,
    fold_bn: bool = False,
    input_size: int | None = None,
    int4_weights: bool = False,
    integer_kernels: bool = False,
    evaluate: bool = False,
    data_dir: str | Path | None = None,
) -> ExportSummary:
    """``gaqat export``: load a QAT checkpoint, optionally fold BN into float convs,
    write the ``int`` or ``onnx`` file, and say what was written and how it checks; with
    ``evaluate``, also the ONNX file's accuracy on every split of the run (data from
    ``data_dir``, else where the run found it), written beside it as ``<name>.eval.json``."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {FORMATS}")
    if (int4_weights or integer_kernels or evaluate) and fmt != "onnx":
        raise ValueError(
            "int4 weights, integer kernels and evaluation are options of the onnx format "
            "(--format onnx; the int file reloads with PyTorch's own logits)"
        )
    if input_size is not None and input_size < 1:
        raise ValueError(f"input size: expected a positive image side, got {input_size}")
    model, checkpoint = load_model(checkpoint_path)
    deployable(model)  # a network trained with batch norm folded: as plain quantized layers
    if checkpoint["quant_config"] is None:
        raise ValueError(
            f"checkpoint {checkpoint_path} is a float model (quant_config is "
            f"None, algorithm {checkpoint['meta'].get('algorithm')!r}): export "
            f"writes QAT checkpoints (e.g. gaqat train --algorithm gaqat --bits 4)"
        )
    model.eval()
    quantized_layers(model)
    splits = run_splits(checkpoint, str(checkpoint_path), data_dir) if evaluate else None
    input_size = input_size or INPUT_SIZES[checkpoint["model_config"]["arch"]]
    probe = probe_inputs(input_size)
    summary = {}
    if fold_bn:
        before = model(probe)
        summary["folded_bn"] = fold_batchnorm(model)
        summary["fold_max_abs_change"] = float((model(probe) - before).abs().max())
    out = Path(out)
    if fmt == "int":
        export_int(model, out, checkpoint, summary.get("folded_bn"))
    else:
        summary["opset"] = export_onnx(
            model,
            out,
            input_size,
            {
                **checkpoint["meta"],
                "model_config": checkpoint["model_config"],
                "quant_config": checkpoint["quant_config"],
            },
            int4_weights=int4_weights,
            integer_kernels=integer_kernels,
        )
        session = onnx_session(out)  # one session for the probe and the evaluation
        diff = onnx_logits(session, probe) - model(probe)
        summary["onnx_max_abs_diff"] = float(diff.abs().max())
        if evaluate:
            rows = evaluate_export(session, model, splits)
            summary["evaluation"] = rows
            about = {
                "file": str(out),
                "checkpoint": str(checkpoint_path),
                **{k: checkpoint["meta"][k] for k in ("dataset", "algorithm", "bits", "test_envs")},
                "trial_seed": checkpoint["args"]["trial_seed"],
                "integer_kernels": integer_kernels,
                "int4_weights": int4_weights,
            }
            write_evaluation(rows, out, about)
    return ExportSummary(out, fmt, out.stat().st_size, **model_sizes(model), **summary)
