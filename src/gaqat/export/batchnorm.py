"""Batch-norm folding: only into a *float* convolution.

Folding a BN into a quantized convolution would rescale its weights per channel, which
changes their integer codes (and makes a per-tensor step size wrong for every channel):
that is a different model from the one trained, so those BNs stay as they are. Folding
moves the conv's outputs by an ulp or so, which flips the rare activation code that sits
on a rounding tie. In ONNX graphs the exporter fuses a float conv + BN pair anyway (ONNX
Runtime would at load time), so folding changes the int file.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from gaqat.export.layers import QUANTIZED_TYPES


class _Tracer(fx.Tracer):
    """Treats quantized layers as opaque calls: only the data flow between modules matters."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANTIZED_TYPES) or super().is_leaf_module(m, qualname)


def foldable_batchnorms(model: nn.Module) -> dict[str, str]:
    """{BN name: conv name} for each BatchNorm2d whose only input is a float nn.Conv2d
    used nowhere else (traced with torch.fx, so the pairing is the real data flow)."""
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.BatchNorm2d:
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module"
                and type(modules[src.target]) is nn.Conv2d and len(src.users) == 1
                and calls[src.target] == calls[node.target] == 1
                and modules[node.target].track_running_stats):
            pairs[node.target] = src.target
    return pairs


def make_folded(model: nn.Module, pairs: dict[str, str]) -> None:
    """The structure of a folded model: each BN replaced by Identity, its conv given a bias."""
    for bn_name, conv_name in pairs.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[str, str]:
    """Fold each BN that follows a float conv into it, in place (inference only: the
    running statistics are used); returns the folded {BN name: conv name}."""
    pairs = foldable_batchnorms(model)
    folded = {}
    for bn_name, conv_name in pairs.items():
        bn, conv = model.get_submodule(bn_name), model.get_submodule(conv_name)
        gain = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * gain
        if bn.affine:
            gain, shift = gain * bn.weight, shift * bn.weight + bn.bias
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        folded[conv_name] = (conv.weight * gain.view(-1, 1, 1, 1),
                             shift if bias is None else shift + bias * gain)
    make_folded(model, pairs)
    for conv_name, (weight, bias) in folded.items():
        conv = model.get_submodule(conv_name)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return pairs
