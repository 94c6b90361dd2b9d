"""Quantizers on the residual stream: one integer region per mobile network.

An inverted-residual block computes x + branch(x), and its branch ends in a 1x1
projection with no activation after it. Without a quantizer on that projection's output
and on the add's, an integer runtime keeps the projection and the add in float (their
outputs are no integer kernel's), and dequantizes and requantizes around each.
:class:`QuantResidual` wraps such a block and puts LSQ quantizers of their own bit width
(``QuantConfig.residual_bits``) on the residual stream, trained like every other one:

    s = skip_quantizer(x)        # only where x is not the previous block's output_quantizer's
    out = output_quantizer(s + projection_quantizer(branch(s)))

The stream has no ReLU, so the three are signed (int8 codes, zero point 0; the
``--integer-kernels`` export stores them as uint8 around 128, as other signed inputs),
and they initialise as activation quantizers do (2·mean|v|/sqrt(q_max), first batch).
They are :class:`gaqat.quant.LsqQuantizer` modules, so ``quantizers`` /
``step_sizes`` list them, and the optimizer's step-size group and GAQAT's freezer treat
them like the layers' (scope "layer": a block's two or three freeze together).

The blocks: torchvision's MobileNetV2 ``InvertedResidual`` (``conv`` branch; also
``mobilenet_v2_compact``), MobileNetV3's (``block`` branch) and EfficientNet-Lite0's
``MBConv`` (``branch``), each where it has its identity skip.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenetv2, mobilenetv3

from gaqat.efficientnet_lite import MBConv
from gaqat.quant import LsqQuantizer, check_bits

ROLES = ("skip_quantizer", "projection_quantizer", "output_quantizer")


def residual_branch(block: nn.Module) -> str | None:
    """The attribute naming ``block``'s branch (a submodule or a method) when ``block`` is a
    residual block with an identity skip that :class:`QuantResidual` wraps, else None."""
    if type(block) is mobilenetv2.InvertedResidual and block.use_res_connect:
        return "conv"
    if type(block) is mobilenetv3.InvertedResidual and block.use_res_connect:
        return "block"
    if type(block) is MBConv and block.skip:
        return "branch"
    return None


class QuantResidual(nn.Module):
    """A residual block with LSQ quantizers on its skip (``skip_quantizer``, None where the
    input already comes from another QuantResidual's output), its branch's output
    (``projection_quantizer``) and the sum (``output_quantizer``); see the module
    docstring. Holds the block as ``block``."""

    def __init__(self, block: nn.Module, bits: int, quantize_skip: bool = True):
        super().__init__()
        branch = residual_branch(block)
        if branch is None:
            raise ValueError(
                f"QuantResidual: {type(block).__name__} is not a residual block with an "
                f"identity skip"
            )
        check_bits(bits, "QuantConfig.residual_bits")
        self.block = block
        self.branch = branch
        dtype = next(block.parameters()).dtype
        self.skip_quantizer = (
            LsqQuantizer(bits, signed=True, dtype=dtype) if quantize_skip else None
        )
        self.projection_quantizer = LsqQuantizer(bits, signed=True, dtype=dtype)
        self.output_quantizer = LsqQuantizer(bits, signed=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip_quantizer is not None:
            x = self.skip_quantizer(x)
        y = getattr(self.block, self.branch)(x)
        return self.output_quantizer(x + self.projection_quantizer(y))


def quantize_residuals(model: nn.Module, bits: int) -> list[str]:
    """Wrap every residual block of ``model`` in a :class:`QuantResidual` of ``bits``, in
    place; returns the wrapped blocks' names. A block directly after another in the same
    nn.Sequential takes that block's output quantizer as its skip's."""
    check_bits(bits, "QuantConfig.residual_bits")
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        previous = None
        for child_name, child in list(parent.named_children()):
            if residual_branch(child) is not None:
                chained = isinstance(parent, nn.Sequential) and isinstance(previous, QuantResidual)
                previous = QuantResidual(child, bits, quantize_skip=not chained)
                setattr(parent, child_name, previous)
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
            else:
                previous = child
    return wrapped
