"""Checking an export: a seeded probe batch, and the logits ONNX Runtime computes from
the written file, to hold against PyTorch's."""

from __future__ import annotations

from pathlib import Path

import torch

from gaqat.export.extra import require
from gaqat.export.rewrite import int4_to_int8

PROBE_BATCH = 8


def probe_inputs(input_size: int, n: int = PROBE_BATCH) -> torch.Tensor:
    """A seeded N(0,1) batch: the scale of normalised images, the same on every machine."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, input_size, input_size, generator=generator)


def onnx_session(model: str | Path | bytes, int8_weights: bool = False):
    """An ONNX Runtime CPU session on an exported file or its bytes (all graph
    optimisations on, as a deployment runs it).

    ``int8_weights``: the INT4 weight codes of an ``--int4-weights`` file widened to INT8
    in memory, once (``rewrite.int4_to_int8``): the same values, and onnxruntime builds
    its integer convolutions instead of dequantizing the 4-bit weights on every run. The
    file stays small on disk; in memory it takes the int8 file's size.

    >>> import tempfile, torch
    >>> from gaqat.export import export_onnx, onnx_session
    >>> from gaqat.models import ModelConfig, build_model
    >>> from gaqat.prepare import QuantConfig, quantize_model
    >>> model = quantize_model(build_model(ModelConfig()), QuantConfig(4, 4))
    >>> _ = model(torch.randn(4, 3, 32, 32))  # the first batch sets the step sizes
    >>> path = tempfile.mkdtemp() + "/int4.onnx"
    >>> export_onnx(model.eval(), path, 32, int4_weights=True, integer_kernels=True)
    21
    >>> session = onnx_session(path, int8_weights=True)
    >>> session.run(None, {"images": torch.zeros(1, 3, 32, 32).numpy()})[0].shape
    (1, 10)
    """
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    # Idle threads spinning for work cost more than they save on a shared CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if int8_weights:
        onnx = require("onnx")
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
        int4_to_int8(proto)
        model = proto.SerializeToString()
    model = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnx_logits(path_or_session, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits of an exported model (a path, or an ``onnx_session`` to reuse) under ONNX
    Runtime, ``batch_size`` images a run."""
    session = path_or_session
    if isinstance(session, (str, Path)):
        session = onnx_session(session)
    return torch.cat(
        [
            torch.from_numpy(session.run(None, {"images": batch.cpu().numpy()})[0])
            for batch in images.split(batch_size)
        ]
    )
