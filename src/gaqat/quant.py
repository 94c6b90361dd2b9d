"""LSQ fake quantization (Esser et al., ICLR 2020) and quantization of whole models.

docs/method.md §2 fixes the rules: v_hat = round(clamp(v/s, q_min, q_max)) * s with a learned
step size s, LSQ's clamp-then-round gradients, gradient scale 1/sqrt(N*q_max), and the
2*mean|v|/sqrt(q_max) initialisation on the first forward pass.

The quantizers sit on the training hot path, so the autograd function does its forward
in a handful of fused-in-place elementwise passes, saves a one-byte mask instead of
recomputing it, and reduces the step-size gradient with dot products instead of
building per-element temporaries. Nothing reads a tensor back to the host once a
quantizer is initialised.

Step sizes stay positive without re-projection: the forward pass uses max(s, MIN_STEP)
while the gradient still reaches the raw parameter (straight-through), so a step size
that an optimizer pushed below the floor keeps receiving the gradient that brings it
back. ``check_step_sizes`` reports (with a warning) any raw step size at or below the
floor; call it where one host sync costs nothing, e.g. at each evaluation.

A quantized layer's bias trains in float; in eval mode it is the int32 bias that an
integer runtime adds (:func:`bias_codes`, docs/method.md §2), so that evaluating the model
is evaluating its deployment.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gaqat.names import BITS_RANGE, FIRST_LAST_POLICIES

MIN_STEP = 1e-8
"""Floor applied to step sizes in the forward pass (see the module docstring)."""


def _sum_product(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum(a * b) reduced to ``shape`` (a scale's shape); one read-only pass when per-tensor."""
    if math.prod(shape) == 1 and a.dtype == b.dtype and a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1)).view(shape)
    return (a * b).sum_to_size(shape)


def _scaled(
    x: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(floored step s, 1/s, x * (1/s)): x * (1/s), later q * s, is torch's fake-quant
    arithmetic, bit for bit."""
    step = scale.clamp_min(MIN_STEP)
    inv = step.reciprocal()
    return step, inv, x * inv


class _LsqQuantize(torch.autograd.Function):
    """Fake quantization with LSQ's straight-through gradients.

    With y = x/s, mask m = 1[q_min < y < q_max] and q = round(clamp(y)):
    d out/dx = m, and d out/ds = q - y*m (round(y) - y inside the range, q_min or q_max
    outside). Summed against the incoming gradient G, and with out = q*s,

        dL/ds = g * sum(G * (q - y*m)) = g / s * (<G, out> - <G*m, x>),

    two dot products over tensors that exist anyway (G*m is dL/dx).
    """

    @staticmethod
    def forward(ctx, x, scale, q_min, q_max, grad_scale):
        step, inv, y = _scaled(x, scale)
        mask = (y > q_min).logical_and_(y < q_max)
        out = y.round_().clamp_(q_min, q_max).mul_(step)
        ctx.grad_scale = grad_scale
        ctx.scale_shape = scale.shape
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(mask, x, out, inv)
        else:
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        mask = ctx.saved_tensors[0]
        # uint8 -> float is a fast vectorised cast on CPU (bool -> float and float * bool are
        # not), and multiplying in place allocates one tensor instead of two.
        grad_x = mask.view(torch.uint8).to(grad.dtype).mul_(grad)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            _, x, out, inv = ctx.saved_tensors
            shape = ctx.scale_shape
            total = _sum_product(grad, out, shape) - _sum_product(grad_x, x, shape)
            grad_scale = total * inv * ctx.grad_scale
        return (grad_x if ctx.needs_input_grad[0] else None), grad_scale, None, None, None


def _lsq_traceable(
    x: torch.Tensor, scale: torch.Tensor, q_min: int, q_max: int, grad_scale: float
) -> torch.Tensor:
    """_LsqQuantize in plain differentiable tensor ops, for torch.compile.

    A custom autograd Function is opaque to the compiler, which then runs its forward and
    backward as separate unfused kernels (slower than eager); these ops fuse into the
    surrounding convolution's kernels. Same forward values bit for bit, for every step
    size, negative ones included: the floored step plus ``(s - s.detach()) * grad_scale``
    adds an exact zero, and ``y + (round(y) - y).detach()`` is exact for |y| < 2^23. The
    gradients are LSQ's: the step size's through ``where`` (round(y) - y inside, q_min or
    q_max outside), scaled by ``grad_scale``, the floor straight through; the input's 1
    inside the open range and 0 outside.
    """
    step = scale.clamp_min(MIN_STEP).detach() + (scale - scale.detach()) * grad_scale
    y = x * step.reciprocal()
    inside = (y > q_min).logical_and_(y < q_max)
    y = torch.where(inside, y, y.detach().clamp(q_min, q_max))
    return (y + (y.round() - y).detach()) * step


def lsq_quantize(
    x: torch.Tensor, scale: torch.Tensor, q_min: int, q_max: int, grad_scale: float
) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with step size ``scale`` (one element, or broadcastable
    to ``x`` for per-channel scales); ``grad_scale`` multiplies the step-size gradient."""
    if not q_min < q_max:
        raise ValueError(f"lsq_quantize: expected q_min < q_max, got {q_min} and {q_max}")
    if x.dtype != scale.dtype:  # bf16 activations under autocast: quantize on the fp32 grid
        x = x.to(scale.dtype)
    if torch.compiler.is_compiling():
        return _lsq_traceable(x, scale, q_min, q_max, grad_scale)
    return _LsqQuantize.apply(x, scale, q_min, q_max, grad_scale)


def bias_codes(
    bias: torch.Tensor, input_step: torch.Tensor, weight_step: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, step): a bias as an integer kernel stores it, in int32 codes
    round(b / (s_x·s_w)) (half to even, as numpy and ONNX's Round) of the step s_x·s_w
    (one per output channel when the weight's step size is), in the bias's dtype: the
    arithmetic of onnxruntime's own bias quantization, which the ONNX export writes and
    the quantized layers evaluate with. The codes are floats; |codes| above 2^31 - 1 do
    not fit an int32 (``gaqat.export`` refuses them).

    >>> codes, step = bias_codes(torch.tensor([0.25, 0.75, -0.3]), torch.tensor([0.5]),
    ...                          torch.tensor([[1.0], [1.0], [0.2]]))  # per channel
    >>> codes.tolist()  # 0.5 and 1.5 round to even; -0.3 / 0.1 = -2.9999999 -> -3
    [0.0, 2.0, -3.0]
    """
    step = input_step.detach().reshape(()) * weight_step.detach().flatten()
    return torch.round(bias.detach() / step), step


def integer_bias(
    bias: torch.Tensor, input_step: torch.Tensor, weight_step: torch.Tensor
) -> torch.Tensor:
    """``bias`` on the int32 grid of :func:`bias_codes`, codes · s_x·s_w, with a
    straight-through gradient (an exact zero is added, so the values stay bit for bit)."""
    codes, step = bias_codes(bias, input_step, weight_step)
    rounded = codes * step
    if torch.is_grad_enabled() and bias.requires_grad:
        return rounded + (bias - bias.detach())
    return rounded


class BiasQuantizer(nn.Module):
    """The bias of a quantized layer: in training the float bias (gradients unchanged), in
    eval mode :func:`integer_bias` with the layer's input and weight step sizes. Holds no
    state; the ONNX export stands an int32 DequantizeLinear in for it."""

    def forward(self, bias: torch.Tensor | None, input_quantizer, weight_quantizer):
        if self.training or bias is None or isinstance(input_quantizer, nn.Identity):
            return bias  # float activations (weights-only): no integer kernel, float bias
        return integer_bias(bias, input_quantizer.step_size(), weight_quantizer.step_size())


def check_bits(bits: object, field: str) -> int:
    """``bits`` if it is a supported bit width, else a ValueError that names ``field``: the
    one rule that quantizers, configs and the command line (``--bits``) share."""
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int)
        or not BITS_RANGE[0] <= bits <= BITS_RANGE[1]
    ):
        raise ValueError(
            f"{field}: expected an integer from {BITS_RANGE[0]} to {BITS_RANGE[1]}, got {bits!r}"
        )
    return bits


class LsqQuantizer(nn.Module):
    """A learned-step-size fake quantizer for one tensor (a layer's weight or its input).

    Weight quantizers get ``weight_shape`` (so a per-channel step size has its shape,
    ``[C, 1, 1, 1]`` or ``[C, 1]``, before any optimizer is built) and are signed.
    Activation quantizers leave ``signed=None`` to decide on the first batch: unsigned
    when it has no negative value. The step size is initialised on the first forward
    pass, whatever the mode; ``is_initialized`` and ``signedness`` are buffers, so a
    loaded state_dict restores them and nothing is re-initialised. ``dtype``: the step
    size's, which quantized layers take from their weight (a float64 model gets float64
    step sizes and gradients).
    """

    def __init__(
        self,
        bits: int,
        signed: bool | None,
        per_channel: bool = False,
        weight_shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.bits = check_bits(bits, "LsqQuantizer.bits")
        self.per_channel = per_channel
        self.weight_shape = None if weight_shape is None else tuple(weight_shape)
        if per_channel and self.weight_shape is None:
            raise ValueError(
                "LsqQuantizer.per_channel: per-channel step sizes are for weights "
                "only; pass weight_shape"
            )
        scale_shape = (
            (self.weight_shape[0],) + (1,) * (len(self.weight_shape) - 1) if per_channel else (1,)
        )
        self.scale = nn.Parameter(torch.ones(scale_shape, dtype=dtype))
        self.register_buffer("is_initialized", torch.tensor(False))
        self.register_buffer(
            "signedness", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8)
        )
        self._initialized = False
        self._signed = signed
        # N of the gradient scale: a weight's elements (per channel), else one sample's.
        self._weight_numel = (
            None
            if self.weight_shape is None
            else math.prod(self.weight_shape[1 if per_channel else 0 :])
        )

    @property
    def initialized(self) -> bool:
        return self._initialized

    @property
    def signed(self) -> bool | None:
        return self._signed

    @property
    def q_min(self) -> int:
        return -(2 ** (self.bits - 1)) if self._require_signed() else 0

    @property
    def q_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self._require_signed() else 2**self.bits - 1

    def _require_signed(self) -> bool:
        if self._signed is None:
            raise RuntimeError(
                "LsqQuantizer: signedness is decided on the first batch; run a forward pass first"
            )
        return self._signed

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        if self._signed is None:
            self._signed = bool((x < 0).any())
            self.signedness.fill_(int(self._signed))
        v = x.detach().abs()
        mean = v.flatten(1).mean(1).view(self.scale.shape) if self.per_channel else v.mean()
        init = (2 * mean / math.sqrt(self.q_max)).clamp_min(MIN_STEP)
        self.scale.copy_(init.expand_as(self.scale))
        self.is_initialized.fill_(True)
        self._initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            self._initialize(x)
        if not torch.is_grad_enabled():  # evaluation: no mask, no saved tensors
            return self.codes(x).mul_(self.step_size())
        q_max = self.q_max
        n = self._weight_numel or (x[0].numel() if x.dim() > 1 else x.numel())
        return lsq_quantize(x, self.scale, self.q_min, q_max, 1.0 / math.sqrt(n * q_max))

    def step_size(self) -> torch.Tensor:
        """The step size the forward pass uses (floored at ``MIN_STEP``), without autograd."""
        return self.scale.detach().clamp_min(MIN_STEP)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer levels round(clamp(x/s)) (as floats), with the forward pass's
        arithmetic: ``codes(x) * step_size()`` is the fake-quantized ``x`` bit for bit."""
        _, _, y = _scaled(x.detach(), self.step_size())
        return y.round_().clamp_(self.q_min, self.q_max)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.is_initialized)
        sign = int(self.signedness)
        self._signed = None if sign < 0 else bool(sign)

    def extra_repr(self) -> str:
        kind = "weight" if self.weight_shape is not None else "activation"
        return (
            f"{kind}, bits={self.bits}, signed={self._signed}, "
            f"per_channel={self.per_channel}, initialized={self._initialized}"
        )


def integer_evaluation(module: nn.Module, *quantizers: nn.Module) -> bool:
    """Whether ``module`` evaluates with an integer kernel's arithmetic: in eval mode
    without autograd, every one of ``quantizers`` an LSQ quantizer (not a float input, not
    an export's stand-in, which traces to QDQ nodes), on a device with float64 (MPS has
    none) for the exact integer sums."""
    if module.training or torch.is_grad_enabled():
        return False
    if not all(isinstance(q, LsqQuantizer) for q in quantizers):
        return False
    return quantizers[0].scale.device.type != "mps"


class _QuantizedLayer:
    """What QuantConv2d and QuantLinear share: two quantizers, the bias's (eval mode: on
    the int32 grid s_x·s_w, :class:`BiasQuantizer`) and the swap from a float layer.

    Constructed like the float layer, plus ``weight_bits``, ``act_bits`` and ``per_channel``;
    ``act_bits`` None: the input stays float (``input_quantizer`` is an ``nn.Identity``).
    """

    weight: nn.Parameter

    def __init__(
        self,
        *args,
        weight_bits: int = 4,
        act_bits: int | None = 4,
        per_channel: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        dtype = self.weight.dtype
        self.weight_quantizer = LsqQuantizer(
            weight_bits,
            signed=True,
            per_channel=per_channel,
            weight_shape=self.weight.shape,
            dtype=dtype,
        )
        self.input_quantizer = (
            nn.Identity() if act_bits is None else LsqQuantizer(act_bits, signed=None, dtype=dtype)
        )
        self.bias_quantizer = BiasQuantizer()

    def quantized_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``bias`` as the forward pass adds it (call after the quantizers have run)."""
        return self.bias_quantizer(bias, self.input_quantizer, self.weight_quantizer)

    @classmethod
    def from_float(
        cls, layer: nn.Module, weight_bits: int, act_bits: int | None, per_channel: bool
    ):
        """A quantized layer holding ``layer``'s very weight and bias Parameter objects, and
        step sizes of their dtype.

        Built on the meta device first: no allocation and no draw from the global RNG.
        """
        args, kwargs = cls._float_arguments(layer)
        new = cls(
            *args,
            **kwargs,
            bias=layer.bias is not None,
            device="meta",
            dtype=layer.weight.dtype,
            weight_bits=weight_bits,
            act_bits=act_bits,
            per_channel=per_channel,
        )
        new.weight = layer.weight
        new.bias = layer.bias
        new.train(layer.training)
        return new.to(layer.weight.device)


class QuantConv2d(_QuantizedLayer, nn.Conv2d):
    """nn.Conv2d whose input and weight pass through LSQ quantizers."""

    @staticmethod
    def _float_arguments(conv: nn.Conv2d) -> tuple[tuple, dict]:
        return (
            (conv.in_channels, conv.out_channels, conv.kernel_size),
            {
                "stride": conv.stride,
                "padding": conv.padding,
                "dilation": conv.dilation,
                "groups": conv.groups,
                "padding_mode": conv.padding_mode,
            },
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.input_quantizer(x), self.weight_quantizer(self.weight)
        return self._conv_forward(x, weight, self.quantized_bias(self.bias))


class QuantLinear(_QuantizedLayer, nn.Linear):
    """nn.Linear whose input and weight pass through LSQ quantizers."""

    @staticmethod
    def _float_arguments(linear: nn.Linear) -> tuple[tuple, dict]:
        return (linear.in_features, linear.out_features), {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.input_quantizer(x), self.weight_quantizer(self.weight)
        if integer_evaluation(self, self.input_quantizer):
            return self._integer_forward(x)
        return F.linear(x, weight, self.quantized_bias(self.bias))

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation with an integer kernel's arithmetic (onnxruntime's QGemm): the codes'
        products summed exactly (float64), the int32 bias codes added, then one multiply
        by s_x·s_w in the layer's dtype. A float sum of the scaled values would round
        differently, so two classes whose integer scores are equal (it happens with 8-bit
        classifiers) could differ by an ulp and swap the file's top-1."""
        x_step, w_step = self.input_quantizer.step_size(), self.weight_quantizer.step_size()
        with torch.autocast(x.device.type, enabled=False):
            codes = self.input_quantizer.codes(x).double()
            acc = F.linear(codes, self.weight_quantizer.codes(self.weight).double())
        step = x_step.reshape(()) * w_step.flatten()
        if self.bias is not None:
            acc = acc + bias_codes(self.bias, x_step, w_step)[0].double()
        return acc.to(step.dtype) * step


_QUANTIZED = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model; ``dataclasses.asdict`` / ``QuantConfig(**d)`` round-trip.

    ``per_channel``: one weight step size per output channel in every layer;
    ``depthwise_per_channel``: in depthwise convolutions whatever ``per_channel`` says.
    ``first_last``: the first Conv2d and the last Linear (in module order) stay "float",
    get "int8" weights and inputs (and, with quantized activations, an 8-bit quantizer on
    the last convolution's ReLU, ``gaqat.head``), or the "same" bits as the rest.
    ``skip``: qualified module names (a layer, or a container whose layers all stay float).
    ``fold_batch_norm``: train each quantized conv with the batch norm after it folded in;
    ``residual_bits``: LSQ quantizers of that width on the residual stream of the
    residual blocks, mobile and ResNet, whose codes the layers that read the stream take
    as their inputs (``gaqat.residual``; None, the default of old checkpoints, or 0:
    none). Both read by ``gaqat.prepare.quantize_model``, not by this module's
    :func:`quantize_layers`. ``act_bits`` None: weights-only quantization (QT-DoG's,
    ``gaqat.qtdog``), every input float, no batch norm folded (folding is for the integer
    kernels that quantized inputs make possible).
    """

    weight_bits: int = 4
    act_bits: int | None = 4
    per_channel: bool = False
    first_last: str = "float"
    skip: tuple[str, ...] = ()
    depthwise_per_channel: bool = True  # last ones: positional construction stays as it was
    fold_batch_norm: bool = False
    residual_bits: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "QuantConfig.weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "QuantConfig.act_bits")
        elif self.fold_batch_norm:
            raise ValueError(
                "QuantConfig.fold_batch_norm: batch norm folds into integer kernels, which "
                "need quantized inputs; with act_bits None (weights only) keep it off"
            )
        if self.residual_bits == 0 and not isinstance(self.residual_bits, bool):
            object.__setattr__(self, "residual_bits", None)  # 0: off, stored as None
        if self.residual_bits is not None:
            check_bits(self.residual_bits, "QuantConfig.residual_bits")
        for name in ("per_channel", "depthwise_per_channel", "fold_batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"QuantConfig.{name}: expected true or false, got {getattr(self, name)!r}"
                )
        if self.first_last not in FIRST_LAST_POLICIES:
            raise ValueError(
                f"QuantConfig.first_last: expected one of {FIRST_LAST_POLICIES}, "
                f"got {self.first_last!r}"
            )
        names = self.skip
        if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
            raise ValueError(
                f"QuantConfig.skip: expected a list of module names, got {self.skip!r}"
            )
        object.__setattr__(self, "skip", tuple(self.skip))  # JSON gives a list back


def _layer_bits(
    name: str, is_first_or_last: bool, config: QuantConfig
) -> tuple[int, int | None] | None:
    """(weight bits, activation bits or None for float inputs) for one layer, or None to
    leave it float."""
    if any(name == s or name.startswith(s + ".") for s in config.skip):
        return None
    if is_first_or_last and config.first_last != "same":
        return None if config.first_last == "float" else (8, None if config.act_bits is None else 8)
    return config.weight_bits, config.act_bits


def quantize_layers(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every nn.Conv2d / nn.Linear (exact types) by its quantized twin, in place,
    and nothing else: ``gaqat.prepare.quantize_model``, the entry point, also folds batch
    norm as ``config`` says.

    Build the optimizer afterwards: the step sizes are new parameters.
    """
    if quantizers(model):
        raise ValueError("quantize_model: the model is already quantized")
    names = dict(model.named_modules())
    unknown = [s for s in config.skip if s not in names]
    if unknown:
        raise ValueError(
            f"QuantConfig.skip: {unknown} name no module of the model "
            f"(module names look like {list(names)[1:4]})"
        )
    layers = [(name, m) for name, m in names.items() if type(m) in _QUANTIZED]
    convs = [name for name, m in layers if type(m) is nn.Conv2d]
    linears = [name for name, m in layers if type(m) is nn.Linear]
    first_last = {convs[0] if convs else None, linears[-1] if linears else None}
    replaced: dict[nn.Module, nn.Module] = {}
    for name, layer in layers:
        bits = _layer_bits(name, name in first_last, config)
        if bits is not None:
            per_channel = config.per_channel or (config.depthwise_per_channel and _depthwise(layer))
            replaced[layer] = _QUANTIZED[type(layer)].from_float(layer, *bits, per_channel)
    # Swap every reference, so a layer shared between two parents is replaced in both.
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child in replaced:
                setattr(parent, child_name, replaced[child])
    return model


def _depthwise(layer: nn.Module) -> bool:
    """One filter per input channel: a per-tensor step size would have to cover filters
    whose ranges differ by orders of magnitude (per-tensor LSQ is known to fail there)."""
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels


def quantizers(model: nn.Module) -> dict[str, LsqQuantizer]:
    """Every quantizer by qualified name, e.g. ``featurizer.3.weight_quantizer``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LsqQuantizer)}


def step_sizes(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every step-size parameter, keyed like ``quantizers``."""
    return {name: q.scale for name, q in quantizers(model).items()}


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise ValueError when some step size of ``model`` is not trained by ``optimizer``.

    An optimizer built before ``quantize_model`` misses every step size and the
    quantizers silently keep their initial ranges.
    """
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise ValueError(f"check_optimizer: {type(optimizer).__name__} has no param_groups")
    held = {id(p) for group in groups for p in group["params"]}
    missing = [name for name, p in step_sizes(model).items() if id(p) not in held]
    if missing:
        raise ValueError(
            f"the optimizer does not hold {len(missing)} of the model's "
            f"{len(step_sizes(model))} quantizer step sizes (e.g. {missing[0]}): "
            f"build the optimizer after quantize_model"
        )


def check_step_sizes(model: nn.Module) -> list[str]:
    """Warn about (and return the names of) step sizes at or below ``MIN_STEP``.

    The forward pass already uses the floor, so training goes on, but an optimizer that
    drives a step size non-positive is a bug worth seeing. One host sync per call.
    """
    bad = [name for name, s in step_sizes(model).items() if bool((s <= MIN_STEP).any())]
    if bad:
        warnings.warn(
            f"{len(bad)} quantizer step size(s) fell to or below {MIN_STEP} and are "
            f"floored in the forward pass: {bad}",
            RuntimeWarning,
            stacklevel=2,
        )
    return bad
