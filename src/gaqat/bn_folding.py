"""Batch-norm folding, all of it: which BN follows which conv, and the five places a BN
is folded into the convolution before it.

A deployed integer kernel multiplies weights that already hold the batch norm's factor
f = γ/σ and adds a bias that holds its shift β − μ·f. Where that factor goes depends on
the kind of conv and on the moment:

1. Training, quantized convs (Jacob et al., CVPR 2018, section 3.2; torch.ao's ConvBn QAT
   modules): :func:`fold_into_quantized_convs` swaps each quantized conv + BN pair for a
   :class:`QuantConvBn2d`, whose weight quantizer sees W·f, the very weights the deployed
   kernel multiplies. ``gaqat.prepare.quantize_model`` calls it when
   ``QuantConfig.fold_batch_norm`` is set.
2. Training schedule: :class:`FoldedStatistics` trains the folded pairs on live batch
   statistics for the first ``bn_freeze_at`` of the steps and on the running ones after
   (``gaqat.algorithms.Algorithm.update`` drives it); while live, the running statistics
   move after each step (:func:`update_running_statistics`), not inside its passes.
3. Export of a network trained folded: :func:`deployable` turns every
   :class:`QuantConvBn2d` back into a plain ``QuantConv2d`` holding W·f and the folded
   bias, with the same quantizers, which is what the exporters write.
4. Export, float convs (``gaqat export --fold-bn``, ``gaqat.export.load_int``):
   :func:`fold_into_float_convs` folds a BN into the float conv before it. A BN after a
   quantized conv stays: folding it into the float weights would change their integer
   codes, a different model from the one trained.
5. Export, ONNX integer kernels (``gaqat.export.qdq.onnx_ready``): :func:`fold_keeping_codes`
   folds a BN after a quantized conv without touching its codes: the shift goes into the
   bias, the factor into the weight's (then per-channel) step sizes.
6. Evaluation of an unfolded pair (:func:`round_folded_shifts`, which
   ``gaqat.prepare.quantize_model`` calls): the shift that 5 makes an int32 bias is
   rounded as the runtime rounds it, so that the trained network in eval mode computes
   what its integer-kernel export does (:class:`ShiftRounding`).

:func:`conv_batchnorm_pairs` finds each BN that a convolution alone feeds (traced with
torch.fx, so the pairing is the real data flow) for all of them. Folding moves a conv's
outputs by an ulp or so, which flips the rare activation code that sits on a rounding tie.

:class:`QuantConvBn2d` computes, with f = γ / sqrt(running_var + ε) and x̂ the quantized
input:

- in training while the statistics are live: BN(conv(x̂, Q(W·f)) / f + b) with the batch's
  statistics, which normalise as in float training; dividing by f undoes the factor the
  quantizer saw. The running statistics move after the step, not during it, so that f is
  one constant through every pass and backward of a step;
- in eval mode, and in training once its statistics are frozen: conv(x̂, Q(W·f)) + β +
  (b − μ)·f, the deployed layer's arithmetic (in eval mode with that bias on its int32
  grid, ``gaqat.quant.BiasQuantizer``). A channel whose γ is 0 outputs β, as its
  unfolded pair would.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from gaqat.distributed import batch_statistics, normalise
from gaqat.quant import BiasQuantizer, LsqQuantizer, QuantConv2d, QuantLinear, integer_bias


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
        return conv._conv_forward(x, weight, conv.quantized_bias(self.folded_bias()))

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
    """Treats quantized layers, quantizers (the residual stream's, ``gaqat.residual``), and
    modules with neither children nor parameters (such as EfficientNet's shape-dependent
    padding), as opaque calls: only the data flow between modules matters. ``leaves``:
    more module types to keep opaque (``gaqat.residual`` asks which wrapped block feeds
    which, whatever is inside them)."""

    def __init__(self, leaves: tuple[type, ...] = ()):
        super().__init__()
        self.leaves = (QuantConv2d, QuantLinear, QuantConvBn2d, LsqQuantizer, *leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        stateless = next(m.children(), None) is None and next(m.parameters(), None) is None
        return isinstance(m, self.leaves) or stateless or super().is_leaf_module(m, qualname)


def data_flow(
    model: nn.Module, leaves: tuple[type, ...] = ()
) -> tuple[fx.Graph, dict[str, nn.Module], Counter]:
    """``model`` traced with :class:`_Tracer` (``leaves``: more opaque module types), its
    modules by name, and how many times the graph calls each (a module called twice
    cannot be rewritten for one call alone)."""
    graph = _Tracer(leaves).trace(model)
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


def fold_into_quantized_convs(model: nn.Module) -> dict[str, str]:
    """Swap each quantized conv + affine BN pair for a :class:`QuantConvBn2d` (at the conv's
    name; the BN becomes Identity), in place, to train folded; returns the {BN name: conv
    name} folded."""
    pairs = {
        bn: conv
        for bn, conv in conv_batchnorm_pairs(model, QuantConv2d).items()
        if model.get_submodule(bn).affine
    }
    for bn_name, conv_name in pairs.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        conv.bias_quantizer = BiasQuantizer()  # its bias is the folded one now
        model.set_submodule(conv_name, QuantConvBn2d(conv, bn))
        model.set_submodule(bn_name, nn.Identity())
    return pairs


def update_running_statistics(model: nn.Module) -> None:
    """Apply the batch statistics that each folded pair of ``model`` staged in the last
    step's first pass: call it once after every optimizer step (:class:`FoldedStatistics`
    does), as nn.BatchNorm2d would have updated them during that pass."""
    for module in model.modules():
        if isinstance(module, QuantConvBn2d):
            module.update_running_statistics()


def freeze_statistics(model: nn.Module, frozen: bool = True) -> None:
    """Train every folded pair of ``model`` on its running statistics (or live ones again)."""
    for module in model.modules():
        if isinstance(module, QuantConvBn2d):
            module.statistics_frozen = frozen


class FoldedStatistics:
    """When a folded network's pairs train on live batch statistics and when on the running
    ones: live before step ``freeze_step`` (counted from 0), frozen from it on.

    Call :meth:`before_step` with the step's index before each optimizer step (it sets the
    layers on the first call, also after a resume, and once more when they freeze) and
    :meth:`after_step` after it (it applies the statistics the step staged while live).
    ``frozen``: as the layers were last set, None before the first step.
    """

    def __init__(self, model: nn.Module, freeze_step: int):
        self.model = model
        self.freeze_step = freeze_step
        self.frozen: bool | None = None

    def before_step(self, step: int) -> None:
        frozen = step >= self.freeze_step
        if frozen != self.frozen:
            freeze_statistics(self.model, frozen)
            self.frozen = frozen

    def after_step(self) -> None:
        if self.frozen is False:  # the folded layers staged their batch statistics
            update_running_statistics(self.model)


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


@torch.no_grad()
def fold_into_float_convs(model: nn.Module, pairs: dict[str, str] | None = None) -> dict[str, str]:
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


def folded_shift(
    bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor γ/σ, shift β − μ·γ/σ + b·γ/σ) of ``bn`` after a conv with ``bias`` (or
    none), on the running statistics: the one computation of what :func:`fold_keeping_codes`
    writes and :class:`ShiftRounding` rounds, so that both give the same bits."""
    factor = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * factor
    if bn.affine:
        factor, shift = factor * bn.weight, shift * bn.weight + bn.bias
    if bias is not None:
        shift = shift + bias * factor
    return factor, shift


@torch.no_grad()
def fold_keeping_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold each BN that alone follows a quantized conv without changing the conv's weights
    or integer codes: its shift β − μ·γ/σ (plus the scaled old bias) becomes the conv's
    bias and the BN Identity, in place. Returns {conv name: factor γ/σ}, which the caller
    multiplies into that weight's step sizes (``gaqat.export.qdq``'s integer kernels)."""
    factors = {}
    for bn_name, conv_name in conv_batchnorm_pairs(model, QuantConv2d).items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        factor, shift = folded_shift(conv.bias, bn)
        conv.bias = nn.Parameter(shift, requires_grad=False)
        conv.bias_quantizer = BiasQuantizer()  # the folded shift is its bias now
        model.set_submodule(bn_name, nn.Identity())
        factors[conv_name] = factor
    return factors


class ShiftRounding(BiasQuantizer):
    """The bias quantizer of a quantized conv that an unfolded BN follows: in eval mode
    the conv adds b + d, d = (R − shift)/f, so that the BN after it outputs conv·f + R,
    where R is the BN's shift rounded to the int32 grid s_x·s_w·|f| that the
    integer-kernel export gives the folded conv (:func:`fold_keeping_codes`); in
    training, b (the float bias, or none). A channel whose f is 0 outputs β as before.
    Holds its BN outside the module tree (no state of its own)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.batch_norm = (bn,)  # a tuple: not a submodule, not in the state dict

    def forward(self, bias, input_quantizer, weight_quantizer):
        if self.training:
            return bias
        factor, shift = folded_shift(bias, self.batch_norm[0])
        weight_step = weight_quantizer.step_size().flatten() * factor.abs()
        rounded = integer_bias(shift, input_quantizer.step_size(), weight_step)
        correction = torch.where(factor == 0, 0.0, (rounded - shift) / factor)
        return correction if bias is None else bias + correction


def round_folded_shifts(model: nn.Module) -> dict[str, str]:
    """Give each quantized conv that a BN alone follows a :class:`ShiftRounding`, in place;
    returns the {BN name: conv name} pairs. A model that torch.fx cannot trace keeps
    float shifts: its integer-kernel export, which traces it too, fails anyway."""
    try:
        pairs = conv_batchnorm_pairs(model, QuantConv2d)
    except Exception:  # whatever stops the tracer: no pair is known
        return {}
    for bn_name, conv_name in pairs.items():
        conv = model.get_submodule(conv_name)
        conv.bias_quantizer = ShiftRounding(model.get_submodule(bn_name))
    return pairs
