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
  statistics, which normalise as in float training; dividing by f undoes the factor the
  quantizer saw. The running statistics move after the step, not during it
  (:func:`update_running_statistics`), so that f is one constant through every pass and
  backward of a step;
- in eval mode, and in training once its statistics are frozen: conv(x̂, Q(W·f)) + β +
  (b − μ)·f, the deployed layer's arithmetic. ``Algorithm`` freezes them after the
  ``bn_freeze_at`` fraction of the steps, so the rest of training sees no difference
  between batch and running statistics.

``conv_batchnorm_pairs`` finds each BN that a convolution alone feeds (traced with
torch.fx, so the pairing is the real data flow); ``quantize_model`` with
``QuantConfig.fold_batch_norm`` calls ``fold_batch_norm``; a channel whose γ is 0 outputs
β, as its unfolded pair would; ``deployable`` turns every
folded pair back into a plain ``QuantConv2d`` with the folded weights and bias (the
same quantizers), which is what the exporters write.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from gaqat.distributed import batch_statistics, normalise
from gaqat.quant import QuantConv2d, QuantLinear


class QuantConvBn2d(nn.Module):
    """A quantized convolution and the batch norm after it, trained folded (see the module
    docstring). Holds the two modules as ``conv`` and ``bn``; ``statistics_frozen``:
    training uses the running statistics, as eval mode does.

    On live statistics, a training forward stages the batch's statistics instead of
    updating the running ones, and :func:`update_running_statistics` applies them after
    the step. The running variance is part of the function being trained (it sets f), so
    it must hold still through every pass of a step: a two-pass step's perturbed pass
    then folds with the same f as its first pass, and a compiled backward reads the f
    its forward used. The perturbed pass, run with the batch norm's
    ``track_running_stats`` off (``gaqat.optim.frozen_running_stats``), stages nothing.
    """

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
        # Transient (not in the state dict): they live from a step's first pass to its end.
        self.register_buffer("staged_mean", torch.zeros_like(bn.running_mean), persistent=False)
        self.register_buffer("staged_var", torch.ones_like(bn.running_var), persistent=False)
        self.register_buffer("staged", torch.zeros((), dtype=torch.long), persistent=False)

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
            # A channel with γ = 0 has f = 0 and all-zero weights: dividing by 1 instead
            # keeps its conv output 0 (and the batch norm's output β) instead of 0/0.
            divisor = torch.where(factor == 0, torch.ones_like(factor), factor)
            y = conv._conv_forward(x, weight, None) / divisor.view(1, -1, 1, 1)
            if conv.bias is not None:
                y = y + conv.bias.view(1, -1, 1, 1)
            return self._normalise(y)
        return conv._conv_forward(x, weight, self.folded_bias())

    def _normalise(self, y: torch.Tensor) -> torch.Tensor:
        """Batch norm of ``y`` with its batch statistics, staged for the running ones."""
        mean, var, count = batch_statistics(y)
        if self.bn.track_running_stats:
            with torch.no_grad():
                self.staged_mean.copy_(mean)
                self.staged_var.copy_(var * count / (count - 1))
                self.staged.fill_(1)
        return normalise(y, mean, var, self.bn)

    @torch.no_grad()
    def update_running_statistics(self) -> None:
        """nn.BatchNorm2d's update, r ← (1 − m)·r + m·batch (m = momentum, or 1/n for a
        cumulative average), with the staged statistics; nothing when none are staged.
        On the device: no host synchronisation."""
        bn, dtype = self.bn, self.bn.running_mean.dtype
        bn.num_batches_tracked.add_(self.staged)
        momentum = (
            bn.num_batches_tracked.clamp_min(1).to(dtype).reciprocal()
            if bn.momentum is None
            else bn.momentum
        )
        weight = self.staged.to(dtype) * momentum
        bn.running_mean.mul_(1 - weight).add_(self.staged_mean * weight)
        bn.running_var.mul_(1 - weight).add_(self.staged_var * weight)
        self.staged.zero_()


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


def update_running_statistics(model: nn.Module) -> None:
    """Apply the batch statistics that each folded pair of ``model`` staged in the last
    step's first pass: call it once after every optimizer step (``Algorithm.update``
    does), as nn.BatchNorm2d would have updated them during that pass."""
    for module in model.modules():
        if isinstance(module, QuantConvBn2d):
            module.update_running_statistics()


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
