"""The quantized layers as a deployment sees them: which they are, their integer weight
codes, how a file describes them, and what the deployed model weighs."""

from __future__ import annotations

import math

import torch
from torch import nn

from gaqat.quant import QuantConv2d, QuantLinear, quantizers

QUANTIZED_TYPES = (QuantConv2d, QuantLinear)


def quantized_modules(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """Every quantized layer by qualified name, whether its quantizers saw a batch or not."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}


def quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The quantized layers by qualified name; ValueError for a float model or one whose
    quantizers never saw a batch (they have no step size or signedness yet)."""
    layers = quantized_modules(model)
    if not layers:
        raise ValueError(
            "the model has no quantized layer: export writes QAT models "
            "(train with a quantized algorithm, e.g. --algorithm lsq --bits 4)"
        )
    others = {name: q for name, q in quantizers(model).items() if _outside(name, layers)}
    fresh = [
        name
        for name, m in layers.items()
        if not (m.weight_quantizer.initialized and m.input_quantizer.initialized)
    ] + [name for name, q in others.items() if not q.initialized]
    if fresh:
        raise ValueError(
            f"quantizers of {fresh} were never initialised: run a forward pass "
            f"(train) before exporting"
        )
    broken = [
        f"{name}.{kind}"
        for name, m in layers.items()
        for kind in ("weight_quantizer", "input_quantizer")
        if not torch.isfinite(getattr(m, kind).scale).all()
    ] + [name for name, q in others.items() if not torch.isfinite(q.scale).all()]
    if broken:
        raise ValueError(f"step sizes of {broken} are not finite numbers: nothing to export")
    return layers


def _outside(name: str, layers: dict) -> bool:
    """Whether the quantizer ``name`` belongs to no quantized layer of ``layers`` (it is one
    of the residual stream's, ``gaqat.residual``, or the head's, ``gaqat.head``)."""
    return name.rpartition(".")[0] not in layers


def weight_codes(layer: QuantConv2d | QuantLinear) -> torch.Tensor:
    """int8 codes of the layer's weight, with the fake quantizer's arithmetic, so that
    ``codes * step`` equals the fake-quantized weight bit for bit."""
    return layer.weight_quantizer.codes(layer.weight).to(torch.int8)


def layer_info(layer: QuantConv2d | QuantLinear) -> dict:
    """What a file says about a quantized layer beyond its tensors."""
    w, x = layer.weight_quantizer, layer.input_quantizer
    return {
        "kind": type(layer).__name__,
        "weight_bits": w.bits,
        "per_channel": w.per_channel,
        "act_bits": x.bits,
        "input_signed": x.signed,
    }


def model_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of the deployed model against the float one.

    ``packed_bytes``: each quantized weight as b-bit codes packed without gaps,
    ``ceil(numel * b / 8)``, plus every floating-point tensor (step sizes, biases,
    batch norm, float layers) at 32 bits. ``float_bytes``: the same network in float32
    (no step sizes). Integer bookkeeping (BN's ``num_batches_tracked``, the quantizers'
    flags) is in neither: it plays no part in inference.
    """
    layers = quantized_layers(model)
    weights = {f"{name}.weight": layer.weight_quantizer.bits for name, layer in layers.items()}
    packed = float_ = 0
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        n = tensor.numel()
        packed += math.ceil(n * weights[key] / 8) if key in weights else 4 * n
        float_ += 0 if key.endswith("_quantizer.scale") else 4 * n
    return {"packed_bytes": packed, "float_bytes": float_}
