"""SAM and SAGM: two-pass flatness optimizers that wrap an ordinary torch optimizer.

One ``step(closure)`` runs the closure (forward + backward on the step's minibatch) at θ,
perturbs θ by e = (ρ / (‖g‖₂ + 1e-12) − α)·g, runs it again at θ + e, restores θ
bit-for-bit, writes the final gradient (SAM: g_p; SAGM: ½·(g + g_p), METHOD.md §3) and
calls the base optimizer. The wrappers share the base optimizer's ``param_groups`` and
``state``, so learning-rate schedulers and checkpoints see one optimizer.

Randomness: g_p − g should measure how the loss bends around θ, but if the two passes
draw different dropout masks (or other random numbers) it also carries that noise.
``perturbed_pass_rng`` chooses:

- ``"replay"`` (default): the step saves torch's CPU random state (and every CUDA
  device's, when CUDA is already initialised) before the first pass and restores it
  before the perturbed one, so both passes draw the same masks. At ρ = α = 0 the final
  gradient is then a plain single pass's and g_smooth is exactly 0 (bit for bit where
  the kernels are deterministic). Draws from a ``torch.Generator`` of your own are not
  replayed.
- ``"fresh"``: the perturbed pass draws new masks, as SAGM's released code does.

Watched parameters (the quantizers' step sizes) keep the two components of METHOD.md §4
after every step, ``g_task = g`` and ``g_smooth = g_p − g``, as device tensors: they fall
out of the two passes, cost no extra pass and no host synchronisation.

Batch norm: the perturbed pass must not move running statistics, so the wrappers take the
model being trained and run that pass inside :func:`frozen_running_stats` (davda54/sam's
``disable_running_stats``/``enable_running_stats`` as one context): its batch-norm layers
still normalise with the batch's statistics, exactly as in training, but leave
running_mean, running_var and num_batches_tracked alone. Nothing outside the model is
touched.

Mixed precision: bfloat16 autocast inside the closure works unchanged (bf16 has fp32's
exponent range, so no loss scaling is needed, and gradients land in the parameters'
dtype). fp16 with ``GradScaler`` is refused: the scaler checks for inf/NaN and updates
its scale once per optimizer step, but here the perturbation is built from the first
pass's gradients before the scaler could unscale or inspect them, an overflow in either
pass would have to abandon the whole two-pass step, and α·g is not invariant to the loss
scale. ``GradScaler.step(wrapper, closure)`` therefore raises; use bfloat16 instead.

GradScaler offers an optimizer no public way to learn that a scaler drives it. The one
thing an enabled scaler's ``step`` asks of every optimizer, before it unscales or checks
anything, is ``getattr(optimizer, "_step_supports_amp_scaling", False)`` (torch's opt-in
for fused optimizers that unscale themselves). The wrappers answer that question with the
error: they read and write none of the scaler's state, and a disabled scaler
(``enabled=False``, which calls ``step`` directly) keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from gaqat.freezing import Freezer
from gaqat.names import PERTURBED_PASS_RNG

_NORM_EPS = 1e-12


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Keep ``model``'s batch-norm running statistics unchanged while the block runs.

    Each batch-norm layer that tracks them is switched to ``track_running_stats=False``:
    in training mode it still normalises with the batch's statistics but updates nothing,
    in eval mode it still uses the running ones. Instance norm with running statistics
    would update them from the batch either way, so it is refused.
    """
    for module in model.modules():
        if isinstance(module, _InstanceNorm) and module.training and module.track_running_stats:
            raise ValueError(f"{type(module).__name__} with track_running_stats=True is not "
                             "supported by SAM/SAGM: its running statistics would change "
                             "during the perturbed pass")
    switched = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for module in switched:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in switched:
            module.track_running_stats = True


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation (Foret et al., 2021): the base optimizer steps with g_p.

    ``model``: the module being trained, whose batch-norm running statistics the perturbed
    pass leaves alone (module docstring).
    ``watch`` maps names to parameters whose components are kept after each step in
    ``g_task`` and ``g_smooth`` (name -> tensor shaped like the parameter).
    ``perturbed_pass_rng``: "replay" the first pass's dropout masks in the perturbed pass,
    or draw "fresh" ones (module docstring).
    """

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Asked by an enabled GradScaler before it steps an optimizer: refuse it here."""
        raise RuntimeError(f"{type(self).__name__} does not support fp16 GradScaler: a two-pass "
                           "step cannot be loss-scaled (see gaqat.optim); use "
                           "torch.autocast(dtype=torch.bfloat16) without a scaler")

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, rho: float = 0.05,
                 *, watch: Mapping[str, nn.Parameter] | None = None,
                 perturbed_pass_rng: str = "replay"):
        if not isinstance(base_optimizer, torch.optim.Optimizer) or isinstance(base_optimizer, SAM):
            raise ValueError(f"{type(self).__name__}: base_optimizer must be a plain "
                             f"torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"{type(self).__name__}: model must be the nn.Module being trained "
                             f"(its batch norm is left alone in the perturbed pass), got "
                             f"{type(model).__name__}")
        if perturbed_pass_rng not in PERTURBED_PASS_RNG:
            raise ValueError(f"{type(self).__name__}.perturbed_pass_rng: {perturbed_pass_rng!r} "
                             f"is not one of {PERTURBED_PASS_RNG}")
        self.base_optimizer = base_optimizer
        self.model = model
        self.rho = self._non_negative("rho", rho)
        self.alpha = 0.0
        self.perturbed_pass_rng = perturbed_pass_rng
        super().__init__(base_optimizer.param_groups, dict(base_optimizer.defaults))
        self._share_base()
        self.watch = dict(watch or {})
        self._check_watch()
        self.g_task: dict[str, torch.Tensor] = {}
        self.g_smooth: dict[str, torch.Tensor] = {}

    def _non_negative(self, field: str, value: float) -> float:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{type(self).__name__}.{field}: expected a finite number >= 0, "
                             f"got {value!r}")
        return float(value)

    def _share_base(self) -> None:
        """Point at the base optimizer's groups and state (which its load_state_dict replaces)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _check_watch(self) -> None:
        held = {id(p) for group in self.param_groups for p in group["params"]}
        for name, param in self.watch.items():
            if id(param) not in held:
                raise ValueError(f"{type(self).__name__}: watched parameter {name!r} is not in the "
                                 "base optimizer's param_groups (build the optimizer after "
                                 "quantize_model so that it holds every step size)")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One two-pass step; ``closure`` runs forward and backward and returns the loss."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that runs forward and "
                             "backward on the step's minibatch and returns the loss")
        params = [p for group in self.param_groups for p in group["params"]]
        rng = _rng_state() if self.perturbed_pass_rng == "replay" else None
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        has_grad = [p.grad is not None for p in params]
        moved = [p for p, h in zip(params, has_grad) if h]
        if not moved:
            raise RuntimeError(f"{type(self).__name__}.step: the closure left no gradients "
                               "(does it call loss.backward()?)")
        g = [p.grad for p in moved]
        g_watch = [_grad_or_zeros(p) for p in self.watch.values()]

        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        theta = torch._foreach_mul(moved, 1.0)  # an exact copy, to restore θ bit-for-bit
        e = torch._foreach_mul(g, self.rho / (norm + _NORM_EPS) - self.alpha)
        self.zero_grad(set_to_none=True)
        if rng is not None:
            _set_rng_state(rng)
        try:  # θ comes back even when the perturbed pass raises
            torch._foreach_add_(moved, e)
            with torch.enable_grad(), frozen_running_stats(self.model):
                closure()
        finally:
            torch._foreach_copy_(moved, theta)
        for p, h in zip(params, has_grad):
            if not h:  # no gradient at θ: SAM/SAGM has no update for it
                p.grad = None
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
        g_p = [p.grad for p in moved]

        if self.watch:
            names = list(self.watch)
            gp_watch = [_grad_or_zeros(p) for p in self.watch.values()]
            self.g_task = dict(zip(names, g_watch))
            self.g_smooth = dict(zip(names, torch._foreach_sub(gp_watch, g_watch)))
        self._combine(g, g_p)
        self._before_base_step()
        self.base_optimizer.step()
        return loss

    def _combine(self, g: list[torch.Tensor], g_p: list[torch.Tensor]) -> None:
        """Turn the gradients written by the perturbed pass (``g_p``, in place) into the final one."""

    def _before_base_step(self) -> None:
        """Last chance to edit ``.grad`` before the base optimizer steps (GAQAT's freezer)."""

    def state_dict(self) -> dict:
        """The base optimizer's state dict: ρ and α are construction arguments, not state."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()


class SAGM(SAM):
    """Sharpness-aware gradient matching (Wang et al., CVPR 2023): steps with ½·(g + g_p).

    The perturbation subtracts α·g from SAM's ascent step (METHOD.md §3).
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, rho: float = 0.05,
                 alpha: float = 1e-3, *, watch: Mapping[str, nn.Parameter] | None = None,
                 perturbed_pass_rng: str = "replay"):
        super().__init__(base_optimizer, model, rho, watch=watch,
                         perturbed_pass_rng=perturbed_pass_rng)
        self.alpha = self._non_negative("alpha", alpha)

    def _combine(self, g: list[torch.Tensor], g_p: list[torch.Tensor]) -> None:
        torch._foreach_add_(g_p, g)
        torch._foreach_mul_(g_p, 0.5)


class GAQAT(SAGM):
    """SAGM whose step sizes' task and smoothness components drive a :class:`Freezer`.

    One ``step(closure)`` per training step; the freezer holds the step sizes, the decisions
    and the records (``freezer.pop_records()``). A freezer with ``tau=0`` never freezes,
    which turns this into LSQ+SAGM that still logs the windows.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, freezer: Freezer,
                 rho: float = 0.05, alpha: float = 1e-3, *, perturbed_pass_rng: str = "replay"):
        super().__init__(base_optimizer, model, rho, alpha, watch=freezer.step_sizes,
                         perturbed_pass_rng=perturbed_pass_rng)
        self.freezer = freezer

    def _before_base_step(self) -> None:
        self.freezer.observe(self.g_task, self.g_smooth)
        self.freezer.edit_grads(self.g_smooth)

    def state_dict(self) -> dict:
        return {"base": super().state_dict(), "freezer": self.freezer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict["base"])
        self.freezer.load_state_dict(state_dict["freezer"])


def _grad_or_zeros(param: nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


_RngState = tuple[torch.Tensor, list[torch.Tensor] | None]


def _rng_state() -> _RngState:
    """Torch's global generators: the CPU one, and CUDA's only when CUDA is initialised
    (asking for them would initialise it, and a CPU run must not need a GPU)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: _RngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
