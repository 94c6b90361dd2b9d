"""Preparing a float model for quantization-aware training: the one call a user makes.

``quantize_model`` puts the steps in order, as torchao's ``qat/api.py`` sits on top of
its layers: first ``gaqat.quant`` swaps the layers for quantized ones, then, when
``QuantConfig.residual_bits`` says so, ``gaqat.residual`` puts quantizers on the
residual stream of the residual blocks (mobile nets' and ResNet's), then, with the first
and last layers at 8 bits (``first_last`` "int8"), ``gaqat.head`` puts an 8-bit quantizer
on the last convolution's activation (so that the whole network is one integer region),
then, when ``QuantConfig.fold_batch_norm`` says so, ``gaqat.bn_folding`` folds each batch
norm into the quantized convolution before it, and each batch norm left after one
evaluates with the shift its integer-kernel export rounds. The layers know nothing of
folding; folding builds on the layers; this module builds on both. A weights-only config
(``QuantConfig.act_bits`` None, QT-DoG's) folds nothing and rounds no shift: with float
inputs there is no integer kernel whose arithmetic evaluation should match.
"""

from __future__ import annotations

from torch import nn

from gaqat.bn_folding import fold_into_quantized_convs, round_folded_shifts
from gaqat.head import quantize_head
from gaqat.quant import QuantConfig, quantize_layers
from gaqat.residual import quantize_residuals

__all__ = ["QuantConfig", "quantize_model"]


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says, batch norm folded included; returns it.

    Build the optimizer afterwards: the step sizes are new parameters
    (``gaqat.quant.check_optimizer`` says when it was not).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gaqat.prepare import QuantConfig, quantize_model
        >>> model = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...     nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...     nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        >>> model = quantize_model(model, QuantConfig(4, 4, fold_batch_norm=True))
        >>> [type(m).__name__ for m in model]  # first conv and last linear stay float
        ['Conv2d', 'BatchNorm2d', 'ReLU', 'QuantConvBn2d', 'Identity', 'ReLU', 'Flatten', 'Linear']
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)  # holds the step sizes
        >>> model(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    quantize_layers(model, config)
    if config.residual_bits is not None:
        quantize_residuals(model, config.residual_bits)
    if config.first_last == "int8" and config.act_bits is not None:  # not in weights-only
        quantize_head(model)
    if config.fold_batch_norm:
        fold_into_quantized_convs(model)
    if config.act_bits is not None:  # float inputs (weights only): no integer kernel to match
        round_folded_shifts(model)  # eval mode: the unfolded pairs' shifts as deployed
    return model
