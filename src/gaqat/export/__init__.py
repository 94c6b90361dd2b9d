"""Deployment: a quantized checkpoint as an integer file and as an ONNX QDQ model.

A fake-quantized checkpoint holds float weights that the forward pass rounds on the fly;
a deployed model holds the rounded integers. ``export_checkpoint`` (``gaqat export``)
loads a QAT checkpoint, optionally folds batch norm into float convolutions, writes one
of two formats and checks what it wrote. One module per part:

- ``layers``: the quantized layers, their integer weight codes, the deployed size;
- ``intfile``: the ``int`` format (safetensors), ``export_int`` and ``load_int``;
- ``qdq``: the ``onnx`` format, a QuantizeLinear/DequantizeLinear graph;
- ``rewrite``: rewrites of the ONNX graph (zero padding into convolutions, INT4 weights
  widened to INT8 at load);
- ``verify``: the probe batch and ONNX Runtime's logits;
- ``evaluate``: the exported file's accuracy on every split of its run, beside PyTorch's;
- ``output``: where an export may write, and writing all its files or none;
- ``extra``: the optional packages (``pip install "gaqat[export]"``), imported when needed.

Batch-norm folding, at export as in training, lives in ``gaqat.bn_folding``
(``deployable``, ``fold_into_float_convs``, ``fold_keeping_codes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gaqat.bn_folding import conv_batchnorm_pairs, deployable, fold_into_float_convs
from gaqat.checkpoint import load_model
from gaqat.errors import UsageError
from gaqat.export.evaluate import (
    RunSplits,
    SplitAccuracy,
    evaluate_export,
    evaluation_json,
    evaluation_path,
    evaluation_table,
    run_splits,
)
from gaqat.export.intfile import (
    INT_FORMAT,
    INT_FORMAT_VERSION,
    export_int,
    int_bytes,
    int_metadata,
    load_int,
)
from gaqat.export.layers import model_sizes, quantized_layers, weight_codes
from gaqat.export.output import check_output_file, write_outputs
from gaqat.export.qdq import export_onnx, fixes_input_size, onnx_bytes, onnx_opset, onnx_ready
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
    "fold_into_float_convs",
    "INT_FORMAT",
    "INT_FORMAT_VERSION",
    "export_int",
    "int_bytes",
    "int_metadata",
    "load_int",
    "onnx_opset",
    "onnx_ready",
    "export_onnx",
    "onnx_bytes",
    "PROBE_BATCH",
    "probe_inputs",
    "onnx_session",
    "onnx_logits",
    "SplitAccuracy",
    "evaluate_export",
]

FORMATS = ("int", "onnx")
#: Input side used to trace the ONNX graph and to probe it, per architecture (the
#: small CNN is built for 32x32 DigitsDG, ResNets for 224x224 photos).
INPUT_SIZES = {
    "small_cnn": 32,
    "mobilenet_v2_compact": 32,
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


def _check_options(fmt: str, input_size: int | None, onnx_only: dict, data_dir) -> None:
    """UsageError for options that do not go together, before anything is read."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    given = [option for option, value in onnx_only.items() if value]
    if given and fmt != "onnx":
        raise UsageError(
            f"{', '.join(given)}: options of the onnx format (--format onnx; the int file "
            f"reloads with PyTorch's own logits)"
        )
    if data_dir is not None and not onnx_only["--evaluate"]:
        raise UsageError("--data-dir: the data of --evaluate, which was not given")
    if input_size is not None and input_size < 1:
        raise UsageError(f"--input-size: expected a positive image side, got {input_size}")


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
    overwrite: bool = False,
) -> ExportSummary:
    """``gaqat export``: load a QAT checkpoint, optionally fold BN into float convs,
    write the ``int`` or ``onnx`` file, and say what was written and how it checks; with
    ``evaluate``, also the ONNX file's accuracy on every split of the run (data from
    ``data_dir``, else where the run found it), written beside it as ``<name>.eval.json``.

    An existing output is replaced only with ``overwrite``, a run's files never
    (``gaqat.export.output``); the outputs are written once everything else has succeeded.

    Example: an untrained 4-bit small CNN (one batch sets its step sizes), saved with the
    fields ``gaqat train`` writes, exported as an int file and reloaded with the same
    logits::

        >>> import tempfile
        >>> from dataclasses import asdict
        >>> from pathlib import Path
        >>> import torch
        >>> from gaqat.checkpoint import save_atomic
        >>> from gaqat.export import export_checkpoint, load_int
        >>> from gaqat.models import ModelConfig, build_model
        >>> from gaqat.prepare import QuantConfig, quantize_model
        >>> quant = QuantConfig(weight_bits=4, act_bits=4)
        >>> model = quantize_model(build_model(ModelConfig()), quant)  # 32x32 inputs
        >>> x = torch.randn(2, 3, 32, 32)
        >>> _ = model(x)  # the first batch initializes the step sizes (LSQ)
        >>> meta = {"dataset": "digits", "classes": list("0123456789"), "bits": 4,
        ...         "domains": ["mnist", "mnist_m", "syn", "optdigits"], "algorithm": "lsq",
        ...         "test_envs": [1]}
        >>> folder = Path(tempfile.mkdtemp())
        >>> save_atomic({"model": model.state_dict(), "model_config": ModelConfig().to_dict(),
        ...              "quant_config": asdict(quant), "meta": meta}, folder / "checkpoint.pt")
        >>> summary = export_checkpoint(folder / "checkpoint.pt", "int", folder / "model.int")
        >>> print(summary)  # doctest: +ELLIPSIS
        wrote .../model.int (int, ... bytes on disk)
        deployed size: 134080 bytes with bit-packed codes vs 972712 bytes in float32 (7.25x smaller)
        >>> deployed = load_int(folder / "model.int")
        >>> torch.equal(deployed(x), model.eval()(x))
        True
    """
    onnx_only = {
        "--int4-weights": int4_weights,
        "--integer-kernels": integer_kernels,
        "--evaluate": evaluate,
    }
    _check_options(fmt, input_size, onnx_only, data_dir)
    checkpoint_path, out = Path(checkpoint_path), Path(out)
    outputs = {out: "--out", **({evaluation_path(out): "--evaluate"} if evaluate else {})}
    for path, option in outputs.items():
        check_output_file(path, option, checkpoint_path, overwrite)
    model, checkpoint = _load_qat(checkpoint_path)
    splits = run_splits(checkpoint, str(checkpoint_path), data_dir) if evaluate else None
    input_size = _input_size(model, checkpoint, splits, input_size, integer_kernels)
    summary = _fold_into_float_convs(model, input_size) if fold_bn else {}
    if fmt == "int":
        files = {out: int_bytes(model, checkpoint, summary.get("folded_bn"))}
    else:
        onnx_options = {"int4_weights": int4_weights, "integer_kernels": integer_kernels}
        files = _onnx_files(model, checkpoint, out, input_size, splits, onnx_options, summary)
        if evaluate:
            rows, run = summary["evaluation"], (checkpoint_path, checkpoint)
            files[evaluation_path(out)] = _evaluation_file(rows, out, run, onnx_options)
    write_outputs(files)
    return ExportSummary(out, fmt, len(files[out]), **model_sizes(model), **summary)


def _input_size(model, checkpoint: dict, splits, asked: int | None, integer_kernels: bool) -> int:
    """The side the file is traced at: ``--input-size``, else the run's images' when it is
    evaluated, else the architecture's; refused where a fixed-size file could not take
    the run's images."""
    default = splits.image_size if splits else INPUT_SIZES[checkpoint["model_config"]["arch"]]
    size = asked or default
    if splits and size != splits.image_size and fixes_input_size(model, integer_kernels):
        raise UsageError(
            f"--input-size {size}: with --integer-kernels this network's file takes "
            f"only images of the side it is exported at (its stride-2 'same' padding "
            f"becomes fixed convolution padding), but the run's images are "
            f"{splits.image_size} a side; --evaluate needs --input-size {splits.image_size}"
        )
    return size


def _load_qat(checkpoint_path: Path) -> tuple[nn.Module, dict]:
    """The checkpoint's model in eval mode, as plain quantized layers (a network trained
    with batch norm folded is made deployable); a float checkpoint is refused."""
    model, checkpoint = load_model(checkpoint_path)
    deployable(model)
    if checkpoint["quant_config"] is None:
        raise ValueError(
            f"checkpoint {checkpoint_path} is a float model (quant_config is "
            f"None, algorithm {checkpoint['meta'].get('algorithm')!r}): export "
            f"writes QAT checkpoints (e.g. gaqat train --algorithm gaqat --bits 4)"
        )
    if checkpoint["quant_config"].get("act_bits") is None:
        raise ValueError(
            f"checkpoint {checkpoint_path} quantizes weights only (algorithm "
            f"{checkpoint['meta'].get('algorithm')!r}: its activations stay float), and "
            f"gaqat's files hold integer activation codes; export a run that quantizes both "
            f"(lsq, lsq_sam, lsq_sagm, gaqat)"
        )
    model.eval()
    quantized_layers(model)  # refuses a model whose quantizers never saw a batch
    return model, checkpoint


def _fold_into_float_convs(model: nn.Module, input_size: int) -> dict:
    """``--fold-bn``: what was folded, and how far it moved the probe batch's logits."""
    probe = probe_inputs(input_size)
    before = model(probe)
    folded = fold_into_float_convs(model)
    return {"folded_bn": folded, "fold_max_abs_change": float((model(probe) - before).abs().max())}


def _evaluation_file(
    rows: list[SplitAccuracy], out: Path, run: tuple[Path, dict], options: dict
) -> bytes:
    """The ``.eval.json`` beside ``out``: the file, its run (checkpoint path and dict) and
    the export's options, then every split's row."""
    checkpoint_path, checkpoint = run
    meta = checkpoint["meta"]
    about = {
        "file": str(out),
        "checkpoint": str(checkpoint_path),
        **{k: meta.get(k) for k in ("dataset", "algorithm", "bits")},
        "test_envs": meta["test_envs"],
        "trial_seed": checkpoint["args"]["trial_seed"],
        "integer_kernels": options["integer_kernels"],
        "int4_weights": options["int4_weights"],
    }
    return evaluation_json(rows, about)


def _onnx_files(
    model: nn.Module,
    checkpoint: dict,
    out: Path,
    input_size: int,
    splits: RunSplits | None,
    options: dict,
    summary: dict,
) -> dict[Path, bytes]:
    """The ONNX file's bytes, checked under onnxruntime on the probe batch and, with
    ``splits``, evaluated on the run's data (both into ``summary``)."""
    header = {
        **checkpoint["meta"],
        "model_config": checkpoint["model_config"],
        "quant_config": checkpoint["quant_config"],
    }
    data, summary["opset"] = onnx_bytes(model, input_size, header, **options)
    session = onnx_session(data)  # one session for the probe and the evaluation
    probe = probe_inputs(input_size)
    summary["onnx_max_abs_diff"] = float((onnx_logits(session, probe) - model(probe)).abs().max())
    if splits is not None:
        summary["evaluation"] = evaluate_export(session, model, splits)
    return {out: data}
