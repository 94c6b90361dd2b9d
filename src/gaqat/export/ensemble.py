"""One ONNX file for an ensemble: its K quantized members and the mean of their softmax
outputs (``gaqat.ensemble.Ensemble``), checked with ONNX Runtime like any export.

The ensemble goes through the export's own QDQ path: :func:`gaqat.export.qdq.onnx_bytes`
takes any module holding quantized layers, so each member's layers are written as a single
model's are (int8 or INT4 weight codes, QuantizeLinear -> Clip -> DequantizeLinear on their
inputs, ``--integer-kernels`` folding), under the member's index (``members.0.…``). The
averaging is plain float graph: Softmax per member, their sum, divided by K. The export names its
output ``logits``; this file's output holds probabilities, so it is renamed
``probabilities``. The check is the export's: the seeded probe batch through ONNX Runtime
against PyTorch (the members made ``deployable``, as ``gaqat export`` loads a checkpoint),
and, with a run's splits, both on every split with their top-1 agreement
(:func:`gaqat.export.evaluate.evaluate_export`).
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn

from gaqat.bn_folding import deployable
from gaqat.export.evaluate import RunSplits, SplitAccuracy, evaluate_export
from gaqat.export.extra import require
from gaqat.export.qdq import onnx_bytes
from gaqat.export.verify import PROBE_BATCH, onnx_logits, onnx_session, probe_inputs

OUTPUT = "probabilities"


@dataclass(frozen=True)
class EnsembleExport:
    """An ensemble's ONNX file and how it checks against PyTorch."""

    data: bytes
    opset: int
    max_abs_diff: float  # on the probe batch, in probability
    evaluation: list[SplitAccuracy] | None  # every split of the run, when given its splits

    def describe(self, name: str) -> str:
        return (
            f"{name}: ONNX opset {self.opset}, {len(self.data):,} bytes; ONNX Runtime vs "
            f"PyTorch on {PROBE_BATCH} seeded N(0,1) inputs: max abs probability difference "
            f"{self.max_abs_diff:.3g}"
        )


def rename_output(data: bytes, name: str = OUTPUT) -> bytes:
    """The ONNX model ``data`` with its single output renamed ``name`` (in the graph's
    outputs and in the node that writes it), checked again."""
    onnx = require("onnx")
    proto = onnx.load_from_string(data)
    (output,) = proto.graph.output
    old = output.name
    for node in proto.graph.node:
        node.output[:] = [name if out == old else out for out in node.output]
    output.name = name
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


@torch.no_grad()
def ensemble_onnx(
    ensemble: nn.Module,
    input_size: int,
    properties: dict | None = None,
    splits: RunSplits | None = None,
    int4_weights: bool = False,
    integer_kernels: bool = False,
) -> EnsembleExport:
    """``ensemble`` (quantized members, outputs probabilities) as one ONNX file traced at
    ``input_size``, with ``properties`` as its JSON metadata, checked under ONNX Runtime on
    the probe batch and, with ``splits``, on every split of the run.

    >>> import torch
    >>> from gaqat.ensemble import Ensemble
    >>> from gaqat.export.ensemble import ensemble_onnx
    >>> from gaqat.models import ModelConfig, build_model
    >>> from gaqat.prepare import QuantConfig, quantize_model
    >>> members = [quantize_model(build_model(ModelConfig()), QuantConfig(4, 4)) for _ in "ab"]
    >>> for member in members:
    ...     _ = member(torch.randn(4, 3, 32, 32))  # the first batch sets the step sizes
    >>> export = ensemble_onnx(Ensemble(members).eval(), 32)
    >>> export.opset, export.max_abs_diff < 1e-4
    (12, True)
    """
    data, opset = onnx_bytes(ensemble, input_size, properties, int4_weights, integer_kernels)
    data = rename_output(data)
    session = onnx_session(data)
    deployed = deployable(deepcopy(ensemble).cpu()).eval()
    probe = probe_inputs(input_size)
    diff = float((onnx_logits(session, probe) - deployed(probe)).abs().max())
    rows = evaluate_export(session, deployed, splits) if splits is not None else None
    return EnsembleExport(data, opset, diff, rows)
