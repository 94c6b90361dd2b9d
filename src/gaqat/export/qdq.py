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
from gaqat.quant import QuantConv2d, QuantLinear, lsq_quantize


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
    """codes * step in PyTorch; DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, codes, step, per_channel):
        shape = (-1,) + (1,) * (codes.dim() - 1) if per_channel else ()
        return codes.to(step.dtype) * step.view(shape)

    @staticmethod
    def symbolic(g, codes, step, per_channel):
        zero = g.op("Constant", value_t=torch.zeros(step.type().sizes(), dtype=torch.int8))
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

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _Dequantize.apply(self.codes, self.step, self.per_channel)


class _ExportedInput(nn.Module):
    """Stands in for an input quantizer, with a fixed step size and signedness.

    ``unsigned_storage``: a signed range stored as uint8 with zero point 128.
    ``ceiling``: the input comes from a ReLU6 (now a ReLU): its upper clip moves into the
    integer range, q_max = min(q_max, round(6/s)), which is exact because rounding is
    monotone: round(min(y, 6)/s) = min(round(y/s), round(6/s))."""

    def __init__(
        self,
        layer: QuantConv2d | QuantLinear,
        unsigned_storage: bool = False,
        ceiling: float | None = None,
    ):
        super().__init__()
        q = layer.input_quantizer
        step = q.step_size()
        self.q_min, self.q_max = q.q_min, q.q_max
        if ceiling is not None:
            self.q_max = min(self.q_max, int(torch.round(ceiling * step.reciprocal())))
        self.offset = 128 if unsigned_storage and self.q_min < 0 else 0
        self.register_buffer("step", step.view(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FakeQuantize.apply(x, self.step, self.q_min, self.q_max, self.offset)


def onnx_ready(model: nn.Module, integer_kernels: bool = False) -> nn.Module:
    """A CPU eval copy whose quantizers export as QDQ nodes; in PyTorch it computes the
    same logits as ``model`` bit for bit.

    ``integer_kernels``: the graph onnxruntime's x86 kernels fuse into QLinearConv, whose
    pattern is DequantizeLinear -> Conv -> (Relu) -> QuantizeLinear on uint8 activations.
    Each batch norm that alone follows a quantized convolution is folded into it
    (``gaqat.bn_folding.fold_keeping_codes``), its factor into the weight's (then
    per-channel) step sizes and its shift into the bias (the codes stay); each ReLU6 that
    only feeds quantized layers becomes a ReLU, its clip at 6 moved into their integer
    ranges; signed activations are stored as uint8 with zero point 128. The logits move
    by float rounding only (as any BN folding)."""
    ready = deployable(deepcopy(model).cpu().eval())
    layers = quantized_layers(ready)
    factors = fold_keeping_codes(ready) if integer_kernels else {}
    ceilings = _relu6_into_quantizers(ready) if integer_kernels else {}
    for name in layers:
        layer = ready.get_submodule(name)
        layer.weight_quantizer = _ExportedWeight(layer, factors.get(name))
        layer.input_quantizer = _ExportedInput(layer, integer_kernels, ceilings.get(name))
    return ready


def _relu6_into_quantizers(model: nn.Module) -> dict[str, float]:
    """Replace by ReLU each ReLU6 module whose output reaches only quantized layers (through
    zero padding at most); return {layer name: 6.0} for those layers' input quantizers."""
    graph, modules, calls = data_flow(model)

    def consumers(node: fx.Node) -> list[str] | None:
        """The quantized layers ``node`` feeds, or None if it feeds anything else."""
        found = []
        for user in node.users:
            module = modules.get(user.target) if user.op == "call_module" else None
            if module is None or calls[user.target] != 1:
                return None
            if isinstance(module, (QuantConv2d, QuantLinear)):
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
        layers = consumers(node) if calls[node.target] == 1 else None
        if layers:
            model.set_submodule(node.target, nn.ReLU())
            ceilings.update(dict.fromkeys(layers, 6.0))
    return ceilings


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
        if codes.dtype.kind != "i" or codes.min() < -8 or codes.max() > 7:
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
    (``onnx_ready``), so that onnxruntime runs them as integer convolutions."""
    onnx = require("onnx")
    ready = onnx_ready(model, integer_kernels)
    opset = _opset(ready)
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
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(traced.getvalue())
    if int4_weights and _int4_weights(proto):
        opset = 21
        for entry in proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in (properties or {}).items()})
    onnx.checker.check_model(proto)
    return proto.SerializeToString(), opset
