"""Batch-norm folding into a *float* convolution (here), or into a quantized one's
per-channel weight scales (the ONNX export's ``integer_kernels``, in ``qdq``).

Folding a BN into a quantized convolution's float weights would change their integer
codes: a different model from the one trained. In this module those BNs stay as they
are; the ONNX exporter keeps the codes and moves the BN's per-channel factor into the
weight's step sizes instead (a network trained with ``QuantConfig.fold_batch_norm``
has no such BN left: ``gaqat.bn_folding``). Folding
moves the conv's outputs by an ulp or so, which flips the rare activation code that sits
on a rounding tie. The ONNX exporter fuses a float conv + BN pair on its own (ONNX
Runtime would at load time), so folding first matters mostly for the int file.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from gaqat.bn_folding import conv_batchnorm_pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: dict[str, str] | None = None) -> dict[str, str]:
    """Fold each BN that follows a float conv into it, in place, with the running statistics
    (inference only); returns the folded {BN name: conv name}.

    ``pairs`` folds those alone; each must be one that ``conv_batchnorm_pairs`` finds.
    ``load_int`` folds a freshly built model this way to give a folded file's tensors
    their places (a conv bias, Identity for the BN).
    """
    foldable = conv_batchnorm_pairs(model)
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
        model.set_submodule(bn_name, nn.Identity())
    return dict(pairs)
