"""A quantizer on the head's output: the last integer kernel of a network in one region.

A backbone ends in a convolution (MobileNetV2's and EfficientNet-Lite0's 1x1 head to
1280 channels, the small CNN's last 3x3) whose batch norm and ReLU (ReLU6) feed the
global average pooling, then the classifier. Nothing quantizes that convolution's
output, so an integer runtime keeps it in float: onnxruntime fuses a convolution into
QLinearConv only where a QuantizeLinear takes its output. With the first and last layers
at 8 bits (``QuantConfig.first_last`` "int8", the usual convention for an integer
deployment), :class:`QuantHead` wraps that activation and puts an 8-bit LSQ quantizer
after it, unsigned (its input is a ReLU's) as ResNet's post-ReLU residual quantizers are
(``gaqat.residual``)::

    out = output_quantizer(relu6(bn(conv(x))))

The integer-kernel export then moves the ReLU6's clip into the quantizer's range
(``gaqat.export.qdq``), onnxruntime drops the ReLU into the QuantizeLinear and runs the
convolution as QLinearConv; the pooling then reads integer codes and the classifier's
own 8-bit input quantizer requantizes the pooled mean. The quantizer is a
:class:`gaqat.quant.LsqQuantizer`, initialised like every activation quantizer on the
first batch, listed by ``quantizers`` / ``step_sizes`` (the optimizer's step-size group,
GAQAT's freezer), saved with the model.

Which activation (:func:`head_activation`): torch.fx traces the model, takes the last
convolution of the data flow and follows it through a batch norm to a ReLU or ReLU6
module, each called once and each the only reader of what came before. ResNet's last
convolution meets the residual add instead (its output is quantized by the residual
quantizers) and MobileNetV3's is followed by a Hardswish: neither gets a head quantizer.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from gaqat.bn_folding import QuantConvBn2d, data_flow
from gaqat.quant import LsqQuantizer, QuantConv2d, check_bits

HEAD_BITS = 8
"""The head quantizer's width: the first/last layers' 8 bits (``first_last`` "int8")."""

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)  # non-negative outputs: an unsigned quantizer fits


class QuantHead(nn.Module):
    """An activation module (``activation``) followed by an unsigned LSQ quantizer of its
    output (``output_quantizer``); see the module docstring."""

    def __init__(self, activation: nn.Module, bits: int, dtype: torch.dtype | None = None):
        super().__init__()
        if type(activation) not in _ACTIVATIONS:
            raise ValueError(
                f"QuantHead: expected a ReLU or ReLU6 (its output is quantized unsigned), "
                f"got {type(activation).__name__}"
            )
        check_bits(bits, "QuantHead.bits")
        self.activation = activation
        self.output_quantizer = LsqQuantizer(bits, signed=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self.activation(x))


def head_activation(model: nn.Module) -> str | None:
    """The name of the ReLU/ReLU6 module that follows ``model``'s last convolution (through
    a batch norm, each called once and the only reader of the one before), if that
    convolution is a quantized one with quantized inputs; else None (also when torch.fx
    cannot trace the model: then no head quantizer, the network as without one)."""
    try:
        graph, modules, calls = data_flow(model)
    except Exception:  # whatever stops the tracer: no data flow is known
        return None

    def module(node: fx.Node) -> nn.Module | None:
        return modules[node.target] if node.op == "call_module" else None

    convs = [n for n in graph.nodes if isinstance(module(n), (nn.Conv2d, QuantConvBn2d))]
    if not convs or not _quantized(module(convs[-1])):
        return None
    after = _only_reader(convs[-1], calls)
    if after is not None and type(module(after)) is nn.BatchNorm2d:  # optional
        after = _only_reader(after, calls)
    if after is None or type(module(after)) not in _ACTIVATIONS:
        return None
    return after.target


def _only_reader(node: fx.Node, calls) -> fx.Node | None:
    """The one module call that reads ``node``'s output, if ``node`` is called once and
    read once and that module is called once (a module called twice, as ResNet's ReLU,
    cannot take a quantizer for one of its calls alone); else None."""
    users = list(node.users)
    if len(users) != 1 or calls[node.target] != 1:
        return None
    reader = users[0]
    return reader if reader.op == "call_module" and calls[reader.target] == 1 else None


def _quantized(conv: nn.Module) -> bool:
    """Whether ``conv`` is a quantized convolution with quantized inputs (its output then
    is an integer kernel's, once quantized)."""
    layer = conv.conv if isinstance(conv, QuantConvBn2d) else conv
    return isinstance(layer, QuantConv2d) and isinstance(layer.input_quantizer, LsqQuantizer)


def quantize_head(model: nn.Module, bits: int = HEAD_BITS) -> str | None:
    """Wrap ``model``'s :func:`head_activation` in a :class:`QuantHead` of ``bits``, in
    place; returns its name (None: no such activation, the model is unchanged)."""
    name = head_activation(model)
    if name is not None:
        dtype = next(model.parameters()).dtype
        model.set_submodule(name, QuantHead(model.get_submodule(name), bits, dtype))
    return name
