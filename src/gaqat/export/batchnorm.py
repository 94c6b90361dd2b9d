"""Batch-norm folding into a *float* convolution (here), or into a quantized one's
per-channel weight scales (the ONNX export's ``integer_kernels``, in ``qdq``).

Folding a BN into a quantized convolution's float weights would change their integer
codes: a different model from the one trained. In this module those BNs stay as they
are; ``quantized_batchnorms`` finds them for the exporter, which keeps the codes and
moves the BN's per-channel factor into the weight's step sizes instead. Folding
moves the conv's outputs by an ulp or so, which flips the rare activation code that sits
on a rounding tie. The ONNX exporter fuses a float conv + BN pair on its own (ONNX
Runtime would at load time), so folding first matters mostly for the int file.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from gaqat.export.layers import QUANTIZED_TYPES


class _Tracer(fx.Tracer):
    """Treats quantized layers, and modules with neither children nor parameters (such as
    EfficientNet's shape-dependent padding), as opaque calls: only the data flow between
    modules matters."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        stateless = next(m.children(), None) is None and next(m.parameters(), None) is None
        return isinstance(m, QUANTIZED_TYPES) or stateless or super().is_leaf_module(m, qualname)


def foldable_batchnorms(model: nn.Module, conv_type: type = nn.Conv2d) -> dict[str, str]:
    """{BN name: conv name} for each BatchNorm2d whose only input is a ``conv_type`` (a
    float nn.Conv2d by default) used nowhere else (traced with torch.fx, so the pairing
    is the real data flow)."""
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.BatchNorm2d:
            continue
        src = node.args[0]
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and type(modules[src.target]) is conv_type
            and len(src.users) == 1
            and calls[src.target] == calls[node.target] == 1
            and modules[node.target].track_running_stats
        ):
            pairs[node.target] = src.target
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: dict[str, str] | None = None) -> dict[str, str]:
    """Fold each BN that follows a float conv into it, in place, with the running statistics
    (inference only); returns the folded {BN name: conv name}.

    ``pairs`` folds those alone; each must be one that ``foldable_batchnorms`` finds.
    ``load_int`` folds a freshly built model this way to give a folded file's tensors
    their places (a conv bias, Identity for the BN).
    """
    foldable = foldable_batchnorms(model)
    pairs = foldable if pairs is None else pairs
    wrong = {bn: conv for bn, conv in pairs.items() if foldable.get(bn) != conv}
    if wrong:
        raise ValueError(
            f"cannot fold {wrong}: a BatchNorm2d folds only into the float "
            f"Conv2d that alone feeds it (foldable here: {foldable})"
        )
    for bn_name, conv_name in pairs.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        # fuse_conv_bn_weights freezes a bias the conv lacked; it should train like the weight.
        conv.weight, conv.bias = weight, bias.requires_grad_(weight.requires_grad)
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    return dict(pairs)
