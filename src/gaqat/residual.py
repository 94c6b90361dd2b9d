"""Quantizers on the residual stream: one integer region per residual network.

A residual block computes skip(x) + branch(x), and its branch ends in a convolution (a
1x1 projection in the mobile nets) with no activation before the add. Without a
quantizer on that convolution's output and on the add's, an integer runtime keeps the
convolution and the add in float (their outputs are no integer kernel's), and
dequantizes and requantizes around each. :class:`QuantResidual` wraps such a block and
puts LSQ quantizers of their own bit width (``QuantConfig.residual_bits``) on the
residual stream, trained like every other one:

    s = skip_quantizer(x)        # only where x is not another wrapped block's output
    t = s, or shortcut_quantizer(downsample(s)) where the skip has a convolution
    out = output_quantizer(relu?(t + projection_quantizer(branch(s))))

The mobile nets' stream has no ReLU, so their quantizers are signed (int8 codes, zero
point 0; the ``--integer-kernels`` export stores them as uint8 around 128, as other
signed inputs). A ResNet block ends in a ReLU after the add, and its input is the
previous block's output or the stem's ReLU: there the skip and output quantizers are
unsigned, after the ReLU (uint8 with zero point 0, twice the signed range's codes for
the same values, and the form onnxruntime fuses into the add: Add -> Relu ->
QuantizeLinear with zero point 0 drops the Relu, then the add is a QLinearAdd; quantizing
the sum before the ReLU instead would leave a Relu between two quantized tensors, and a
QuantizeLinear more for the next block's skip). The projection and shortcut outputs
(batch norm outputs) are signed. All initialise as activation quantizers do
(2·mean|v|/sqrt(q_max), first batch). They are :class:`gaqat.quant.LsqQuantizer`
modules, so ``quantizers`` / ``step_sizes`` list them, and the optimizer's step-size group
and GAQAT's freezer treat them like the layers' (scope "layer": a block's freeze
together).

The blocks (:func:`residual_layout`): torchvision's MobileNetV2 ``InvertedResidual``
(``conv`` branch; also ``mobilenet_v2_compact``), MobileNetV3's (``block`` branch) and
EfficientNet-Lite0's ``MBConv`` (``branch``), each where it has its identity skip; and
torchvision's ResNet ``BasicBlock`` and ``Bottleneck``, with their identity or
``downsample`` skip.

The layers that read the stream read its codes (:func:`read_stream_codes`): a quantized
layer whose input is a skip or output quantizer's output (a block's expand convolution,
ResNet's first convolution and ``downsample``, the first convolution of the block after a
run) gets a :class:`StreamInput` instead of an input quantizer of its own. Its input
then is the stream at ``residual_bits`` (8 by default: finer than the layers' 4), and
an integer runtime feeds the stream's codes straight into the layer's integer kernel; a
quantizer of its own would requantize them, a DequantizeLinear -> QuantizeLinear -> Clip
chain before every block (15 of them in MobileNetV2).

In evaluation a block computes its sum as onnxruntime's QLinearAdd does
(:func:`runtime_add`), so that the accuracy a run reports is its integer file's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import fx, nn
from torchvision.models import mobilenetv2, mobilenetv3, resnet

from gaqat.bn_folding import data_flow
from gaqat.efficientnet_lite import MBConv
from gaqat.quant import LsqQuantizer, QuantConv2d, QuantLinear, check_bits, integer_evaluation

ROLES = ("skip_quantizer", "projection_quantizer", "shortcut_quantizer", "output_quantizer")


class Layout(NamedTuple):
    """How :class:`QuantResidual` runs a block, by the names of its attributes (plain
    strings: the wrapper holds no second reference to the block's modules, which folding
    and export replace in place): ``branch``, the submodules (or methods) the branch
    applies in turn; ``shortcut``, the submodule on the skip (ResNet's ``downsample``),
    None for an identity skip; ``relu``, the submodule applied to the sum (ResNet's), None
    for none, in which case the stream is signed."""

    branch: tuple[str, ...]
    shortcut: str | None = None
    relu: str | None = None


# A ResNet block's branch: conv-bn pairs with the block's ReLU between them.
_BASIC = ("conv1", "bn1", "relu", "conv2", "bn2")
_BOTTLENECK = (*_BASIC, "relu", "conv3", "bn3")


def residual_layout(block: nn.Module) -> Layout | None:
    """``block``'s :class:`Layout` when it is a residual block that :class:`QuantResidual`
    wraps, else None. The types are matched exactly: a subclass may compute otherwise."""
    if type(block) is mobilenetv2.InvertedResidual and block.use_res_connect:
        return Layout(("conv",))
    if type(block) is mobilenetv3.InvertedResidual and block.use_res_connect:
        return Layout(("block",))
    if type(block) is MBConv and block.skip:
        return Layout(("branch",))
    if type(block) in (resnet.BasicBlock, resnet.Bottleneck):
        branch = _BASIC if type(block) is resnet.BasicBlock else _BOTTLENECK
        shortcut = None if block.downsample is None else "downsample"
        return Layout(branch, shortcut, "relu")
    return None


class QuantResidual(nn.Module):
    """A residual block with LSQ quantizers on its skip (``skip_quantizer``, None where the
    input already comes from another QuantResidual's output), its branch's output
    (``projection_quantizer``), its skip's convolution's output (``shortcut_quantizer``,
    None for an identity skip) and the sum (``output_quantizer``); see the module
    docstring. Holds the block as ``block`` and its :class:`Layout` as ``layout``."""

    def __init__(self, block: nn.Module, bits: int, quantize_skip: bool = True):
        super().__init__()
        layout = residual_layout(block)
        if layout is None:
            raise ValueError(
                f"QuantResidual: {type(block).__name__} is not a residual block that "
                f"gaqat.residual knows (MobileNetV2/V3 and EfficientNet-Lite blocks with an "
                f"identity skip, ResNet's BasicBlock and Bottleneck)"
            )
        check_bits(bits, "QuantConfig.residual_bits")
        self.block = block
        self.layout = layout
        dtype = next(block.parameters()).dtype
        signed_stream = layout.relu is None  # else the block's input and output follow a ReLU

        def quantizer(signed: bool, present: bool = True) -> LsqQuantizer | None:
            return LsqQuantizer(bits, signed=signed, dtype=dtype) if present else None

        self.skip_quantizer = quantizer(signed_stream, quantize_skip)
        self.projection_quantizer = quantizer(True)
        self.shortcut_quantizer = quantizer(True, layout.shortcut is not None)
        self.output_quantizer = quantizer(signed_stream)
        # The quantizer whose codes the skip carries where skip_quantizer is None: the
        # previous block's output quantizer (set by quantize_residuals; a reference).
        object.__setattr__(self, "skip_source", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip_quantizer is not None:
            x = self.skip_quantizer(x)
        y = x
        for name in self.layout.branch:
            y = getattr(self.block, name)(y)
        skip_quantizer = self.skip_source if self.skip_quantizer is None else self.skip_quantizer
        skip = x
        if self.layout.shortcut is not None:
            skip = self.shortcut_quantizer(getattr(self.block, self.layout.shortcut)(x))
            skip_quantizer = self.shortcut_quantizer
        projection = self.projection_quantizer(y)
        addends = ((skip, skip_quantizer), (projection, self.projection_quantizer))
        quantizers = (skip_quantizer, self.projection_quantizer, self.output_quantizer)
        # torch.fx traces the float add: the data flow it records is the graph's
        if not isinstance(skip, fx.Proxy) and integer_evaluation(self, *quantizers):
            return runtime_add(*addends, self.output_quantizer)  # a ReLU: the clip at code 0
        total = skip + projection
        if self.layout.relu is not None:
            total = getattr(self.block, self.layout.relu)(total)
        return self.output_quantizer(total)


def runtime_add(a, b, output: LsqQuantizer) -> torch.Tensor:
    """``output(a + b)`` for two quantized tensors ``a`` = (values, quantizer), ``b`` as
    onnxruntime's x86 QLinearAdd computes it (1.32, AVX-512), to the bit: on the uint8
    codes u_a, u_b the integer-kernel export stores (zero point z: 128 for a signed
    quantizer, else 0), with float32 ratios r_a = s_a/s_c, r_b = s_b/s_c and offset
    z_c - (r_a·z_a + r_b·z_b), u_c = rint(fma(r_a, u_a, fma(r_b, u_b, offset))) clipped to
    [0, 255]: the form that matches the runtime on every pair of 8-bit codes for drawn
    step sizes (``tests/test_residual.py``), where a float sum of the values takes the
    other code near .5 ties. Its codes, clipped to the output's range, times s_c."""
    f32 = torch.float32
    (x, qa), (y, qb) = a, b
    zero = {q: 128.0 if q.signed else 0.0 for q in (qa, qb, output)}
    ua, ub = qa.codes(x).double() + zero[qa], qb.codes(y).double() + zero[qb]
    ra, rb = (q.step_size().to(f32) / output.step_size().to(f32) for q in (qa, qb))
    offset = zero[output] - (ra * zero[qa] + rb * zero[qb])

    def fma(r, u, z):  # one rounding to float32: the product and the sum exact in float64
        return (r.double() * u + z.double()).to(f32)

    codes = torch.round(fma(ra, ua, fma(rb, ub, offset))).clamp(0, 255) - zero[output]
    codes = codes.clamp(output.q_min, output.q_max)
    return codes.to(x.dtype) * output.step_size().to(x.dtype)


class StreamInput(nn.Module):
    """A quantized layer's input quantizer where its input is already on the residual
    stream: the identity, with the step size, range and state of the stream's quantizer
    (``source``), which the bias's int32 grid s_x·s_w and the export read as the layer's.
    It holds no tensor (the stream's quantizer is its block's, saved and trained there)
    and is no ``LsqQuantizer``: ``quantizers`` / ``step_sizes`` list the source once."""

    SHARED = ("step_size", "scale", "initialized", "bits", "signed", "q_min", "q_max")

    def __init__(self, source: LsqQuantizer):
        super().__init__()
        object.__setattr__(self, "source", source)  # a reference, not a submodule

    def __getattr__(self, name: str):
        if name in StreamInput.SHARED:
            return getattr(self.__dict__["source"], name)
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"reads the residual stream's codes, bits={self.source.bits}"


def quantize_residuals(model: nn.Module, bits: int) -> list[str]:
    """Wrap every residual block of ``model`` in a :class:`QuantResidual` of ``bits``, in
    place; returns the wrapped blocks' names. A block whose input is another wrapped
    block's output (:func:`chained_blocks`) takes that block's output quantizer as its
    skip's, and the layers that read the stream read its codes (:func:`read_stream_codes`)."""
    check_bits(bits, "QuantConfig.residual_bits")
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if residual_layout(child) is not None:
                setattr(parent, child_name, QuantResidual(child, bits))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    for name, previous in (chained_blocks(model) if wrapped else {}).items():
        block = model.get_submodule(name)
        block.skip_quantizer = None
        object.__setattr__(block, "skip_source", model.get_submodule(previous).output_quantizer)
    if wrapped:
        read_stream_codes(model)
    return wrapped


def chained_blocks(model: nn.Module) -> dict[str, str]:
    """The :class:`QuantResidual` blocks of ``model`` whose input is another one's output,
    {block: that other block}, as torch.fx traces the data flow (so across the Sequentials
    of a ResNet's stages, as within one): their skip is quantized already, and a second
    quantizer would only cost a requantization. A model that torch.fx cannot trace has
    none (each block then quantizes its own skip: correct, a quantizer more)."""
    try:
        graph, modules, _ = data_flow(model, leaves=(QuantResidual,))
    except Exception:  # whatever stops the tracer: no data flow is known
        return {}

    def is_block(node) -> bool:
        return (
            isinstance(node, fx.Node)
            and node.op == "call_module"
            and isinstance(modules[node.target], QuantResidual)
        )

    return {
        node.target: node.args[0].target
        for node in graph.nodes
        if is_block(node) and is_block(node.args[0])
    }


def read_stream_codes(model: nn.Module) -> list[str]:
    """Give each quantized layer (with quantized inputs, called once) whose input is the
    output of a :class:`QuantResidual`'s skip or output quantizer a :class:`StreamInput`
    of that quantizer, in place; returns the layers' names. As torch.fx traces the data
    flow; a model it cannot trace keeps the layers' own quantizers (correct: a
    requantization more per block)."""
    try:
        graph, modules, calls = data_flow(model)
    except Exception:  # whatever stops the tracer: no data flow is known
        return []
    stream = {
        f"{name}.{role}"
        for name, m in modules.items()
        if isinstance(m, QuantResidual)
        for role in ("skip_quantizer", "output_quantizer")
        if getattr(m, role) is not None
    }
    readers = []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, (QuantConv2d, QuantLinear)) or calls[node.target] != 1:
            continue
        source = node.args[0]
        if (
            isinstance(layer.input_quantizer, LsqQuantizer)  # not float inputs
            and isinstance(source, fx.Node)
            and source.op == "call_module"
            and source.target in stream
        ):
            layer.input_quantizer = StreamInput(modules[source.target])
            readers.append(node.target)
    return readers
