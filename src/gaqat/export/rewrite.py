"""Rewrites of an exported ONNX graph, on its protobuf: what tracing cannot write.

- :func:`pads_into_convs`: a constant zero Pad in front of a convolution (EfficientNet's
  stride-2 "same" padding, fixed at the export's input size) becomes the convolution's
  own ``pads``, moved through the input quantizer between them, so that onnxruntime
  fuses the convolution into an integer kernel (a Pad between them stops it).
- :func:`quantize_before_flatten`: a QuantizeLinear that reads a Flatten's output (the
  classifier's input quantizer after the global average pooling) moves in front of the
  Flatten, so that onnxruntime fuses the pooling between two quantizers into
  QLinearGlobalAveragePool (a Flatten between them stops it; onnxruntime moves a
  quantizer back over a Reshape, not over a Flatten).
- :func:`int4_to_int8`: the packed INT4 weight codes of an ``--int4-weights`` file as
  INT8, once at load (``onnx_session(..., int8_weights=True)``): onnxruntime has integer
  convolution kernels for 8-bit weights only, and dequantizes 4-bit ones to float on
  every run.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from gaqat.export.extra import require

_QUANTIZER_OPS = ("QuantizeLinear", "Clip", "DequantizeLinear")


def _constants(graph) -> dict[str, np.ndarray]:
    """Every constant tensor of ``graph`` by name: its initializers and Constant nodes."""
    numpy_helper = require("onnx").numpy_helper
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _attribute(node, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (ints as a list), else ``default``."""
    helper = require("onnx").helper
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def _spatial_zero_padding(pad, constants: dict) -> list[int] | None:
    """A 4-D Pad's [top, left, bottom, right] (a Conv's ``pads`` order) when it pads only
    height and width, with zeros, by constant amounts; else None."""
    inputs = list(pad.input) + ["", ""]  # data, pads, [constant_value, [axes]]
    if _attribute(pad, "mode", b"constant") != b"constant" or inputs[3]:
        return None
    amounts = constants.get(inputs[1])
    value = constants.get(inputs[2]) if inputs[2] else 0
    if amounts is None or amounts.shape != (8,) or value is None or np.any(value != 0):
        return None
    if np.any(amounts[[0, 1, 4, 5]] != 0):  # batch and channels
        return None
    return [int(v) for v in amounts[[2, 3, 6, 7]]]


def _maps_zero_to_zero(nodes, constants: dict) -> bool:
    """Whether a QuantizeLinear / Clip / DequantizeLinear sequence with constant per-tensor
    parameters turns an input 0 into 0, so that padding before it is padding after it."""
    value = 0.0
    for node in nodes:
        names = list(node.input[1:])
        params = [constants.get(name) if name else None for name in names]
        if any(name and (p is None or p.size != 1) for name, p in zip(names, params)):
            return False  # a computed or a per-channel parameter
        first, second = ([None if p is None else p.item() for p in params] + [None, None])[:2]
        if node.op_type == "QuantizeLinear":  # round(x / s) + zero point
            value = round(value / first) + (second or 0)
        elif node.op_type == "Clip":
            low = value if first is None else first
            value = min(max(value, low), value if second is None else second)
        else:  # DequantizeLinear: (q - zero point) * s
            value = (value - (second or 0)) * first
    return value == 0


def _path_to_conv(pad, consumers: dict, outputs: set, constants: dict) -> list | None:
    """The nodes from ``pad``'s output to the Conv whose input it is, each the only user of
    the one before, through quantizer nodes that keep zeros zero; else None."""
    path, tensor = [], pad.output[0]
    while True:
        users = consumers.get(tensor, [])
        if len(users) != 1 or tensor in outputs or users[0].input[0] != tensor:
            return None
        node = users[0]
        path.append(node)
        if node.op_type == "Conv":
            break
        if node.op_type not in _QUANTIZER_OPS:
            return None
        tensor = node.output[0]
    return path if _maps_zero_to_zero(path[:-1], constants) else None


def pads_into_convs(proto) -> int:
    """Merge into the convolution it feeds, in place, each Pad of ``proto`` that pads a
    4-D tensor's height and width with zeros by constant amounts, directly or through an
    input quantizer that keeps zeros zero (QuantizeLinear -> Clip -> DequantizeLinear:
    0 quantizes to the zero point, which dequantizes to 0). Returns how many: the graph
    computes the same values, and its convolutions meet their quantizers."""
    helper = require("onnx").helper
    graph, merged = proto.graph, 0
    constants, outputs = _constants(graph), {o.name for o in graph.output}
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        consumers = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)
        amounts = _spatial_zero_padding(pad, constants)
        path = None if amounts is None else _path_to_conv(pad, consumers, outputs, constants)
        conv = path[-1] if path else None
        if conv is None or _attribute(conv, "auto_pad", b"NOTSET") != b"NOTSET":
            continue
        pads = [a + b for a, b in zip(_attribute(conv, "pads", [0, 0, 0, 0]), amounts)]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("pads", pads)])
        path[0].input[0] = pad.input[0]
        stale = {pad.output[0], *(n.output[0] for n in path[:-1])}  # shapes before the merge
        kept_info = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
        graph.node.remove(pad)
        _drop_unused_constants(graph, pad.input[1:])
        merged += 1
    return merged


def quantize_before_flatten(proto) -> int:
    """Swap, in place, each Flatten of ``proto`` whose output only a per-tensor
    QuantizeLinear reads with that QuantizeLinear: x -> Flatten -> QuantizeLinear becomes
    x -> QuantizeLinear -> Flatten, the same values (a per-tensor quantization is
    elementwise, a Flatten only reshapes). Returns how many."""
    graph, moved = proto.graph, 0
    constants, outputs = _constants(graph), {o.name for o in graph.output}
    for flatten in [n for n in graph.node if n.op_type == "Flatten"]:
        users = [n for n in graph.node if flatten.output[0] in n.input]
        q = users[0] if len(users) == 1 else None
        if q is None or q.op_type != "QuantizeLinear" or flatten.output[0] in outputs:
            continue
        params = [constants.get(name) for name in q.input[1:] if name]
        if q.input[0] != flatten.output[0] or any(p is None or p.size != 1 for p in params):
            continue
        source, between, result = flatten.input[0], flatten.output[0], q.output[0]
        q.input[0], q.output[0] = source, between  # ``between``: now the codes
        flatten.input[0], flatten.output[0] = between, result
        # The Flatten now reads the QuantizeLinear's output: it moves to just after it.
        index = {n.output[0]: i for i, n in enumerate(graph.node) if n.output}
        at, after = index[result], index[between]
        copy = require("onnx").NodeProto()
        copy.CopyFrom(flatten)
        del graph.node[at]
        graph.node.insert(after, copy)  # ``after`` - 1 is the QuantizeLinear's place now
        for info in [v for v in graph.value_info if v.name == between]:  # float shapes
            graph.value_info.remove(info)
        moved += 1
    return moved


def _drop_unused_constants(graph, names) -> None:
    """Remove the Constant nodes producing ``names`` that nothing reads any more."""
    read = {name for node in graph.node for name in node.input}
    for node in [n for n in graph.node if n.op_type == "Constant"]:
        if node.output[0] in names and node.output[0] not in read:
            graph.node.remove(node)


def int4_to_int8(proto) -> int:
    """Widen, in place, every INT4 / UINT4 tensor that a DequantizeLinear reads (weight
    codes and their zero points, initializers or Constant nodes) to INT8 / UINT8: the same
    integers, so the same values. Returns how many DequantizeLinear nodes changed."""
    onnx = require("onnx")
    wider = {onnx.TensorProto.INT4: np.int8, onnx.TensorProto.UINT4: np.uint8}
    tensors = {t.name: t for t in proto.graph.initializer}
    tensors.update(
        {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
    )
    widened = 0
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        packed = [tensors.get(name) for name in node.input[::2]]  # codes, zero point
        packed = [t for t in packed if t is not None and t.data_type in wider]
        for tensor in packed:
            values = onnx.numpy_helper.to_array(tensor).astype(wider[tensor.data_type])
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
        widened += bool(packed)
    return widened
