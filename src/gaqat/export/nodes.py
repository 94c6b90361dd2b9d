"""The graph onnxruntime runs: node counts by op type, before and after its optimisations.

An exported file says what a runtime may fuse; what it does fuse shows only in the graph
it optimised, which onnxruntime writes out when asked
(``SessionOptions.optimized_model_filepath``). Counting that graph's nodes tells which
parts of a network run as integer kernels (QLinearConv, QLinearAdd, QGemm,
QLinearGlobalAveragePool) and which stay float (Conv, FusedConv, Add, Gemm,
GlobalAveragePool, with the QuantizeLinear, DequantizeLinear and Clip around them), and
so where a file's time goes.

Counts are by op type alone, over the top-level graph: onnxruntime's x86 layout
transforms (its NCHWc convolutions, ReorderInput/ReorderOutput, the Transposes around
NHWC integer kernels) keep the names Conv and Transpose but depend on the CPU, so
compare the integer and quantize ops across machines, the layout ops only on one.

Example: a 4-bit small CNN with integer kernels runs two of its three quantized
convolutions as QLinearConv (the third feeds the float pooling and head)::

    >>> import tempfile, torch
    >>> from gaqat.export import export_onnx
    >>> from gaqat.export.nodes import node_counts, optimized_node_counts
    >>> from gaqat.models import ModelConfig, build_model
    >>> from gaqat.prepare import QuantConfig, quantize_model
    >>> model = quantize_model(build_model(ModelConfig()), QuantConfig(4, 4))
    >>> _ = model(torch.randn(4, 3, 32, 32))  # the first batch sets the step sizes
    >>> path = tempfile.mkdtemp() + "/integer.onnx"
    >>> export_onnx(model.eval(), path, 32, integer_kernels=True)
    13
    >>> node_counts(path)["QLinearConv"]  # the file as written: QDQ around float Conv
    0
    >>> counts = optimized_node_counts(path)
    >>> counts["QLinearConv"], counts["Conv"] + counts["FusedConv"]
    (2, 2)
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from gaqat.export.extra import require

#: The op types that tell integer regions from float ones, in the order tables show them.
OPS = (
    "QLinearConv",
    "QLinearAdd",
    "QGemm",
    "QLinearGlobalAveragePool",
    "Conv",
    "FusedConv",
    "Add",
    "Gemm",
    "GlobalAveragePool",
    "QuantizeLinear",
    "DequantizeLinear",
    "Clip",
    "Transpose",
)


def node_counts(model) -> Counter:
    """Nodes of an ONNX graph by op type: ``model`` a file's path, its bytes or an
    ``onnx.ModelProto``; the top-level graph as written, without optimisation."""
    onnx = require("onnx")
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    elif not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return Counter(node.op_type for node in model.graph.node)


def optimized_node_counts(model: str | Path | bytes) -> Counter:
    """Nodes by op type of the graph onnxruntime's CPU provider runs for ``model`` (a
    file's path or its bytes) under all graph optimisations, as a deployment (and
    ``gaqat.export.onnx_session``) runs it."""
    ort = require("onnxruntime")
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.log_severity_level = 3  # not the warning that NCHWc graphs are CPU-specific
        source = model if isinstance(model, bytes) else str(model)
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return node_counts(Path(options.optimized_model_filepath))
