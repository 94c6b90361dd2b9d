"""Checking an export: a seeded probe batch, and the logits ONNX Runtime computes from
the written file, to hold against PyTorch's."""

from __future__ import annotations

from pathlib import Path

import torch

from gaqat.export.extra import require

PROBE_BATCH = 8


def probe_inputs(input_size: int, n: int = PROBE_BATCH) -> torch.Tensor:
    """A seeded N(0,1) batch: the scale of normalised images, the same on every machine."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, input_size, input_size, generator=generator)


def onnx_session(model: str | Path | bytes):
    """An ONNX Runtime CPU session on an exported file or its bytes (all graph
    optimisations on, as a deployment runs it)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    # Idle threads spinning for work cost more than they save on a shared CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
