"""The ``onnx`` format: a QDQ graph, integers where the trained model has them.

Weights are int8 initializers of the codes followed by DequantizeLinear (the form ONNX
Runtime's own quantizer writes: the file stores integers and the codes are those of the
int file, bit for bit); input activations go through QuantizeLinear -> Clip ->
DequantizeLinear ("QCDQ", as brevitas exports) with the learned step size and zero point
0. QuantizeLinear only knows 8-bit (and, from opset 21, 4-bit) types, so a b-bit range is
the 8-bit type clipped in the integer domain to [q_min, q_max]: exact for any b in 2..8.
Clip takes integer tensors from opset 12 and QuantizeLinear takes a per-channel ``axis``
from opset 13, so models are written at opset 12, or 13 with per-channel weight scales:
the lowest opsets that express them. Float layers stay float. With ``int4_weights`` every
weight whose codes fit in 4 bits (4-bit and 3-bit layers) is stored as a packed INT4
initializer instead, at opset 21 (the first with 4-bit DequantizeLinear): the same
integers, half the bytes.

Biases are what the quantized layers add in eval mode (``gaqat.quant.BiasQuantizer``):
with integer kernels, int32 codes of the step s_x·s_w followed by DequantizeLinear,
which onnxruntime's integer convolutions add as they are (codes that an int32 cannot
hold are refused); in the plain QDQ graph, those values in float.

Rounding: the fake quantizer computes ``x * (1/s)``, QuantizeLinear ``x / s``, and ONNX
Runtime's convolutions (the stem fused with its BN) sum in another order; any of these
moves a value by an ulp, which changes an activation code only where the value sits on a
.5 tie. The tests measure the effect on the logits on DigitsDG: a few images in a
thousand differ at all, and none in top-1.

The torch.export-based ONNX exporter needs onnxscript, which gaqat does not depend on;
the TorchScript exporter (``dynamo=False``) writes these graphs through the ``symbolic``
methods below.
"""

from __future__ import annotations

import io
import json
import warnings
from copy import deepcopy
from pathlib import Path

import torch
from torch import fx, nn

from gaqat.bn_folding import data_flow, deployable, fold_keeping_codes
from gaqat.efficientnet_lite import SamePad
from gaqat.export.extra import require
from gaqat.export.layers import quantized_layers, weight_codes
from gaqat.export.output import write_outputs
from gaqat.export.rewrite import pads_into_convs, quantize_before_flatten
from gaqat.quant import (
    MIN_STEP,
    BiasQuantizer,
    LsqQuantizer,
    QuantConv2d,
    QuantLinear,
    bias_codes,
    lsq_quantize,
    quantizers,
)

INT32_MAX = 2**31 - 1


def onnx_opset(model: nn.Module, integer_kernels: bool = False) -> int:
    """The lowest opset expressing the model's QDQ graph: 12 (Clip on integer tensors),
    13 when some weight has per-channel step sizes (QuantizeLinear's ``axis``), as any
    weight with a batch norm folded into it has."""
    return _opset(onnx_ready(model, integer_kernels))


def _opset(ready: nn.Module) -> int:
    """``onnx_opset`` of a model ``onnx_ready`` prepared."""
    weights = [m for m in ready.modules() if isinstance(m, _ExportedWeight)]
    return 13 if any(w.per_channel for w in weights) else 12


class _Dequantize(torch.autograd.Function):
    """codes * step in PyTorch; DequantizeLinear in ONNX (int8 weight codes, int32 bias
    codes)."""

    @staticmethod
    def forward(ctx, codes, step, per_channel):
        shape = (-1,) + (1,) * (codes.dim() - 1) if per_channel else ()
        return codes.to(step.dtype) * step.view(shape)

    @staticmethod
    def symbolic(g, codes, step, per_channel):
        dtype = torch.int32 if codes.type().scalarType() == "Int" else torch.int8
        zero = g.op("Constant", value_t=torch.zeros(step.type().sizes(), dtype=dtype))
        if per_channel:
            return g.op("DequantizeLinear", codes, step, zero, axis_i=0)
        return g.op("DequantizeLinear", codes, step, zero)


class _FakeQuantize(torch.autograd.Function):
    """LSQ's fake quantization in PyTorch; QuantizeLinear -> Clip -> DequantizeLinear in ONNX.

    ``offset``: the zero point, added to the codes' range: 128 stores a signed range as
    uint8 (the same values: (q + 128 - 128)·s), which x86 integer kernels need."""

    @staticmethod
    def forward(ctx, x, step, q_min, q_max, offset):
        return lsq_quantize(x, step, q_min, q_max, 1.0)

    @staticmethod
    def symbolic(g, x, step, q_min, q_max, offset):
        q_min, q_max = q_min + offset, q_max + offset
        dtype = torch.int8 if q_min < 0 else torch.uint8
        info = torch.iinfo(dtype)
        zero = g.op("Constant", value_t=torch.tensor(offset, dtype=dtype))
        q = g.op("QuantizeLinear", x, step, zero)
        if (q_min, q_max) != (info.min, info.max):
            bounds = [
                g.op("Constant", value_t=torch.tensor(v, dtype=dtype)) for v in (q_min, q_max)
            ]
            q = g.op("Clip", q, *bounds)
        return g.op("DequantizeLinear", q, step, zero)


class _ExportedWeight(nn.Module):
    """Stands in for a weight quantizer: holds the codes, ignores the float weight.

    ``channel_factor``: a batch norm's per-output-channel factor γ/σ folded into the step
    sizes (which become per-channel); a negative factor flips that channel's codes, so
    the scales stay positive and the integers keep their magnitudes."""

    def __init__(self, layer: QuantConv2d | QuantLinear, channel_factor=None):
        super().__init__()
        q = layer.weight_quantizer
        codes, step = weight_codes(layer), q.step_size()
        self.per_channel = q.per_channel or channel_factor is not None
        if channel_factor is not None:
            shape = (-1,) + (1,) * (codes.dim() - 1)
            codes = codes * channel_factor.sign().to(codes.dtype).view(shape)
            step = step.flatten().expand(codes.shape[0]) * channel_factor.abs()
        self.register_buffer("codes", codes)
        self.register_buffer("step", step.flatten() if self.per_channel else step.view(()))

    def step_size(self) -> torch.Tensor:
        return self.step

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _Dequantize.apply(self.codes, self.step, self.per_channel)


class _ExportedBias(nn.Module):
    """Stands in for a bias quantizer with the bias the layer adds in eval mode: int32
    ``values`` (codes) of ``step`` followed by DequantizeLinear, as an integer kernel adds
    it, or, without ``step``, float values."""

    def __init__(self, values: torch.Tensor, step: torch.Tensor | None = None):
        super().__init__()
        self.per_channel = step is not None and step.numel() > 1
        self.register_buffer("values", values)
        self.register_buffer("step", step if step is None or self.per_channel else step.view(()))

    def forward(self, bias, input_quantizer, weight_quantizer) -> torch.Tensor:
        if self.step is None:
            return self.values
        return _Dequantize.apply(self.values, self.step, self.per_channel)


class _ZeroPad(torch.autograd.Function):
    """F.pad with zeros in PyTorch; in ONNX one Pad whose amounts are a Constant (F.pad's
    own export computes them with a chain of nodes), which ``pads_into_convs`` reads."""

    @staticmethod
    def forward(ctx, x, amounts):
        return torch.nn.functional.pad(x, amounts)

    @staticmethod
    def symbolic(g, x, amounts):
        left, right, top, bottom = amounts
        pads = torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64)
        return g.op("Pad", x, g.op("Constant", value_t=pads), mode_s="constant")


class _FixedPad(nn.Module):
    """Stands in for a SamePad with the amounts it pads at the export's input size."""

    def __init__(self, amounts: tuple[int, int, int, int]):
        super().__init__()
        self.amounts = amounts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ZeroPad.apply(x, self.amounts)


class _ExportedInput(nn.Module):
    """Stands in for an activation quantizer (a layer's input quantizer, one on the
    residual stream, ``gaqat.residual``, or the head's, ``gaqat.head``), with a fixed step
    size and signedness.

    ``unsigned_storage``: a signed range stored as uint8 with zero point 128.
    ``ceiling``: the input comes from a ReLU6 (now a ReLU): its upper clip moves into the
    integer range, q_max = min(q_max, round(6/s)), which is exact because rounding is
    monotone: round(min(y, 6)/s) = min(round(y/s), round(6/s))."""

    def __init__(
        self,
        q: LsqQuantizer,
        unsigned_storage: bool = False,
        ceiling: float | None = None,
    ):
        super().__init__()
        step = q.step_size()
        self.q_min, self.q_max = q.q_min, q.q_max
        if ceiling is not None:
            self.q_max = min(self.q_max, int(torch.round(ceiling * step.reciprocal())))
        self.offset = 128 if unsigned_storage and self.q_min < 0 else 0
        self.register_buffer("step", step.view(()))

    def step_size(self) -> torch.Tensor:
        return self.step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FakeQuantize.apply(x, self.step, self.q_min, self.q_max, self.offset)


def onnx_ready(model: nn.Module, integer_kernels: bool = False) -> nn.Module:
    """A CPU eval copy whose quantizers export as QDQ nodes; in PyTorch it computes the
    same features as ``model`` bit for bit, and the same logits up to the float rounding
    of a quantized linear layer (``model`` evaluates those with the integer kernel's
    arithmetic, ``QuantLinear``; the copy with the float form the graph is traced from).

    ``integer_kernels``: the graph onnxruntime's x86 kernels fuse into QLinearConv, whose
    pattern is DequantizeLinear -> Conv -> (Relu) -> QuantizeLinear on uint8 activations.
    Each batch norm that alone follows a quantized convolution is folded into it
    (``gaqat.bn_folding.fold_keeping_codes``), its factor into the weight's (then
    per-channel) step sizes and its shift into the bias (the codes stay); each ReLU6 that
    only feeds quantizers (quantized layers, the head's, ``gaqat.head``) becomes a ReLU,
    its clip at 6 moved into their integer ranges; signed activations (the residual
    stream's included, ``gaqat.residual``) are stored as uint8 with zero point 128, so
    that the residual adds fuse into QLinearAdd. The logits move by float rounding only
    (as any BN folding)."""
    ready = deployable(deepcopy(model).cpu().eval())
    layers = quantized_layers(ready)
    factors = fold_keeping_codes(ready) if integer_kernels else {}
    ceilings = _relu6_into_quantizers(ready) if integer_kernels else {}
    for name in layers:
        layer = ready.get_submodule(name)
        layer.weight_quantizer = _ExportedWeight(layer, factors.get(name))
    # The weights' are exported: the quantizers left are the activations' (the layers'
    # inputs, the residual stream's, the head's).
    for name, q in quantizers(ready).items():
        ready.set_submodule(name, _ExportedInput(q, integer_kernels, ceilings.get(name)))
    for name in layers:
        layer = ready.get_submodule(name)
        if layer.bias is not None or type(layer.bias_quantizer) is not BiasQuantizer:
            layer.bias_quantizer = _exported_bias(name, layer, integer_kernels)
    return ready


def _exported_bias(name: str, layer: QuantConv2d | QuantLinear, integer: bool) -> _ExportedBias:
    """The bias ``layer`` adds in eval mode (with its exported step sizes): int32 codes with
    ``integer`` kernels, unless the BN after it was left unfolded, else float values."""
    values = layer.quantized_bias(layer.bias)
    if not integer or type(layer.bias_quantizer) is not BiasQuantizer:
        return _ExportedBias(values)
    input_step, weight_step = layer.input_quantizer.step_size(), layer.weight_quantizer.step
    codes, step = bias_codes(layer.bias, input_step, weight_step)
    _check_int32(name, codes, input_step, weight_step)
    return _ExportedBias(codes.to(torch.int32), step)


def _check_int32(name: str, codes: torch.Tensor, input_step, weight_step) -> None:
    """ValueError naming ``name`` when a bias code does not fit an int32."""
    channel = int(codes.abs().nan_to_num(float("inf")).argmax())
    largest = float(codes.flatten()[channel].abs())
    if largest <= INT32_MAX:
        return
    weight_step = weight_step.flatten()[channel if weight_step.numel() > 1 else 0]
    raise ValueError(
        f"layer {name}: its int32 bias needs a code of {largest:.4g} (channel {channel}), "
        f"beyond the int32 range (|code| <= 2^31 - 1 = {INT32_MAX}): the codes are "
        f"b / (s_x·s_w) with input step size s_x = {float(input_step):.3g} and weight step "
        f"size s_w = {float(weight_step):.3g} (a folded batch norm's |γ/σ| included), "
        f"so the step sizes have collapsed towards their floor ({MIN_STEP:g}) or a batch "
        f"norm's γ is 0; retrain with larger step sizes (fewer steps, a lower learning "
        f"rate), keep this layer in float (QuantConfig.skip), or export without "
        f"--integer-kernels (float biases)"
    )


def _relu6_into_quantizers(model: nn.Module) -> dict[str, float]:
    """Replace by ReLU each ReLU6 module whose output reaches only quantizers (quantized
    layers' inputs, or a head quantizer, ``gaqat.head``; through zero padding at most);
    return {quantizer name: 6.0} for those quantizers."""
    graph, modules, calls = data_flow(model)

    def consumers(node: fx.Node) -> list[str] | None:
        """The quantizers ``node`` feeds, or None if it feeds anything else."""
        found = []
        for user in node.users:
            module = modules.get(user.target) if user.op == "call_module" else None
            if module is None or calls[user.target] != 1:
                return None
            if isinstance(module, (QuantConv2d, QuantLinear)):
                found.append(f"{user.target}.input_quantizer")
            elif isinstance(module, LsqQuantizer):
                found.append(user.target)
            elif isinstance(module, (SamePad, nn.ZeroPad2d)):  # pads zeros: relu6(0) = 0
                below = consumers(user)
                if below is None:
                    return None
                found += below
            else:
                return None
        return found

    ceilings = {}
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.ReLU6:
            continue
        names = consumers(node) if calls[node.target] == 1 else None
        if names:
            model.set_submodule(node.target, nn.ReLU())
            ceilings.update(dict.fromkeys(names, 6.0))
    return ceilings


def fixes_input_size(model: nn.Module, integer_kernels: bool) -> bool:
    """Whether the ONNX file of ``model`` takes one image side only, the export's: with
    ``integer_kernels``, EfficientNet's "same" padding (``SamePad``), which depends on the
    input's size, is written as fixed convolution padding."""
    return integer_kernels and any(isinstance(m, SamePad) for m in model.modules())


def _fix_same_padding(ready: nn.Module, input_size: int) -> bool:
    """Replace, in place, each SamePad of ``ready`` by the zero padding it gives an
    ``input_size`` image (found by running one), whose Pad ``pads_into_convs`` merges
    into the convolution. Returns whether there was one."""
    pads = {name: m for name, m in ready.named_modules() if isinstance(m, SamePad)}
    sizes = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: sizes.update({name: args[0].shape}))
        for name, m in pads.items()
    ]
    try:
        if pads:
            ready(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, module in pads.items():
        ready.set_submodule(name, _FixedPad(module.amounts(*sizes[name][-2:])))
    return bool(pads)


def _int4_weights(proto) -> int:
    """Store as INT4 every DequantizeLinear initializer (the weight codes) whose values fit
    in [-8, 7], with its zero point; returns how many. The graph then needs opset 21."""
    numpy_helper = require("onnx").numpy_helper
    int4 = require("ml_dtypes").int4  # onnx's own dependency: numpy's 4-bit type, packed raw
    initializers = {t.name: t for t in proto.graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
    converted = 0
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        codes = numpy_helper.to_array(initializers[node.input[0]])
        if codes.dtype != "int8" or codes.min() < -8 or codes.max() > 7:  # weights, not biases
            continue
        for tensor in (initializers[node.input[0]], constants[node.input[2]]):
            values = numpy_helper.to_array(tensor).astype(int4)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        converted += 1
    return converted


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: int,
    properties: dict | None = None,
    int4_weights: bool = False,
    integer_kernels: bool = False,
) -> int:
    """Write ``onnx_bytes`` to a file, atomically; returns the opset used."""
    data, opset = onnx_bytes(model, input_size, properties, int4_weights, integer_kernels)
    write_outputs({Path(path): data})
    return opset


def onnx_bytes(
    model: nn.Module,
    input_size: int,
    properties: dict | None = None,
    int4_weights: bool = False,
    integer_kernels: bool = False,
) -> tuple[bytes, int]:
    """The QDQ ONNX model (input "images" N x 3 x H x W, output "logits", batch and
    image side dynamic) with ``properties`` as JSON metadata, and the opset used.
    ``int4_weights``: 4-bit and 3-bit weight codes as INT4 initializers (opset 21).
    ``integer_kernels``: batch norm folded into the quantized convolutions before it
    (``onnx_ready``), so that onnxruntime runs them as integer convolutions, and zero
    padding merged into the convolutions (``rewrite.pads_into_convs``); EfficientNet's
    "same" padding is fixed at ``input_size``, which then is the file's only image side."""
    onnx = require("onnx")
    ready = onnx_ready(model, integer_kernels)
    opset = _opset(ready)
    fixed = integer_kernels and _fix_same_padding(ready, input_size)
    spatial = {} if fixed else {2: "height", 3: "width"}
    traced = io.BytesIO()
    dummy = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        # The torch.export-based exporter needs onnxscript; the TorchScript one does not,
        # and says (twice) that it is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            ready,
            (dummy,),
            traced,
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch", **spatial}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(traced.getvalue())
    if integer_kernels:
        pads_into_convs(proto)
        quantize_before_flatten(proto)
    if int4_weights and _int4_weights(proto):
        opset = 21
        for entry in proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in (properties or {}).items()})
    onnx.checker.check_model(proto)
    return proto.SerializeToString(), opset
