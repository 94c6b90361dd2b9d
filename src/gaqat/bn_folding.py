"""Quantization-aware training with batch norm folded into the quantized convolution
(Jacob et al., CVPR 2018, section 3.2; torch.ao's ConvBn QAT modules).

An integer runtime executes a convolution whose weights already hold the batch norm's
factor f = γ/σ and whose bias holds its shift: no batch norm stands between a quantized
convolution and the next quantizer. Trained without folding, the weight quantizer learns
a grid for W and the export moves f into per-channel step sizes. Trained with folding,
the quantizer sees W·f, the very weights the deployed kernel multiplies, and the trained
network is the deployed one.

:class:`QuantConvBn2d` computes, with f = γ / sqrt(running_var + ε) and x̂ the quantized
input:

- in training while the statistics are live: BN(conv(x̂, Q(W·f)) / f + b) with the batch's
  statistics, which normalise (and update the running ones) as in float training;
  dividing by f undoes the factor the quantizer saw;
- in eval mode, and in training once its statistics are frozen: conv(x̂, Q(W·f)) + β +
  (b − μ)·f, the deployed layer's arithmetic. ``Algorithm`` freezes them after the
  ``bn_freeze_at`` fraction of the steps, so the rest of training sees no difference
  between batch and running statistics.

``conv_batchnorm_pairs`` finds each BN that a convolution alone feeds (traced with
torch.fx, so the pairing is the real data flow); ``quantize_model`` with
``QuantConfig.fold_batch_norm`` calls ``fold_batch_norm``; ``deployable`` turns every
folded pair back into a plain ``QuantConv2d`` with the folded weights and bias (the
same quantizers), which is what the exporters write.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from gaqat.quant import QuantConv2d, QuantLinear


class QuantConvBn2d(nn.Module):
    """A quantized convolution and the batch norm after it, trained folded (see the module
    docstring). Holds the two modules as ``conv`` and ``bn``; ``statistics_frozen``:
    training uses the running statistics, as eval mode does."""

    def __init__(self, conv: QuantConv2d, bn: nn.BatchNorm2d):
        super().__init__()
        if not (bn.affine and bn.track_running_stats):
            raise ValueError(
                "QuantConvBn2d: folding needs a batch norm with affine parameters and "
                "running statistics"
            )
        self.conv = conv
        self.bn = bn
        self.statistics_frozen = False

    def _factor(self) -> torch.Tensor:
        return self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)

    def folded_bias(self) -> torch.Tensor:
        """β + (b − μ)·f: the deployed convolution's bias."""
        bias = (
            -self.bn.running_mean
            if self.conv.bias is None
            else self.conv.bias - self.bn.running_mean
        )
        return self.bn.bias + bias * self._factor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        factor = self._factor()
        weight = conv.weight_quantizer(conv.weight * factor.view(-1, 1, 1, 1))
        x = conv.input_quantizer(x)
        if self.training and not self.statistics_frozen:
            y = conv._conv_forward(x, weight, None) / factor.view(1, -1, 1, 1)
            if conv.bias is not None:
                y = y + conv.bias.view(1, -1, 1, 1)
            return self.bn(y)
        return conv._conv_forward(x, weight, self.folded_bias())


class _Tracer(fx.Tracer):
    """Treats quantized layers, and modules with neither children nor parameters (such as
    EfficientNet's shape-dependent padding), as opaque calls: only the data flow between
    modules matters."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        stateless = next(m.children(), None) is None and next(m.parameters(), None) is None
        quantized = isinstance(m, (QuantConv2d, QuantLinear, QuantConvBn2d))
        return quantized or stateless or super().is_leaf_module(m, qualname)


def data_flow(model: nn.Module) -> tuple[fx.Graph, dict[str, nn.Module], Counter]:
    """``model`` traced with :class:`_Tracer`, its modules by name, and how many times
    the graph calls each (a module called twice cannot be rewritten for one call alone)."""
    graph = _Tracer().trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    return graph, dict(model.named_modules()), calls


def conv_batchnorm_pairs(model: nn.Module, conv_type: type = nn.Conv2d) -> dict[str, str]:
    """{BN name: conv name} for each BatchNorm2d with running statistics whose only input
    is a ``conv_type`` (exact type) used nowhere else."""
    graph, modules, calls = data_flow(model)
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


def fold_batch_norm(model: nn.Module) -> dict[str, str]:
    """Swap each quantized conv + affine BN pair for a :class:`QuantConvBn2d` (at the conv's
    name; the BN becomes Identity), in place; returns the {BN name: conv name} folded."""
    pairs = {
        bn: conv
        for bn, conv in conv_batchnorm_pairs(model, QuantConv2d).items()
        if model.get_submodule(bn).affine
    }
    for bn_name, conv_name in pairs.items():
        bn = model.get_submodule(bn_name)
        model.set_submodule(conv_name, QuantConvBn2d(model.get_submodule(conv_name), bn))
        model.set_submodule(bn_name, nn.Identity())
    return pairs


def freeze_statistics(model: nn.Module, frozen: bool = True) -> None:
    """Train every folded pair of ``model`` on its running statistics (or live ones again)."""
    for module in model.modules():
        if isinstance(module, QuantConvBn2d):
            module.statistics_frozen = frozen


@torch.no_grad()
def deployable(model: nn.Module) -> nn.Module:
    """Replace, in place, each :class:`QuantConvBn2d` by its ``conv`` with the folded weight
    W·f and bias, keeping its quantizers: the eval-mode network, as plain quantized layers.
    Returns ``model``."""
    folded = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantConvBn2d)]
    for name, module in folded:
        conv = module.conv
        weight = conv.weight * module._factor().view(-1, 1, 1, 1)
        conv.bias = nn.Parameter(module.folded_bias(), requires_grad=False)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        model.set_submodule(name, conv)
    return model
