"""The two-pass optimizers SAM and SAGM, each wrapping an ordinary torch optimizer.
GAQAT, SAGM with selective freezing, builds on them in ``gaqat.freezing``, beside its
freezing policy; this module knows nothing of freezing.

One ``step(closure)`` reads top to bottom:

1. :meth:`SAM.two_passes`: the closure (forward + backward on the step's minibatch) runs
   at θ, giving g; θ moves by e = (ρ / (‖g‖₂ + 1e-12) − α)·g; the closure runs again at
   θ + e, giving g_p; θ is restored bit for bit (docs/method.md §3).
2. A subclass may read the step's components here (:meth:`TwoPasses.components`):
   GAQAT hands the step sizes' g_task = g and g_smooth = g_p − g (§4) to its
   :class:`~gaqat.freezing.Freezer`, which tracks their disorder (§5), decides which
   step sizes are frozen and edits their gradients (§6).
3. The base optimizer steps with the final gradient: SAM's g_p, SAGM's ½·(g + g_p).

Gradients: the step zeroes them (to None) before each of its two passes itself, so its
caller need not call ``zero_grad`` first, while a plain optimizer's caller must
(``gaqat.algorithms.Algorithm.update`` zeroes for ERM alone). The wrappers share the base
optimizer's ``param_groups`` and ``state``, so learning-rate schedulers and checkpoints
see one optimizer.

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
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from gaqat.names import PERTURBED_PASS_RNG

_NORM_EPS = 1e-12
Closure = Callable[[], torch.Tensor]


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
            raise ValueError(
                f"{type(module).__name__} with track_running_stats=True is not "
                "supported by SAM/SAGM: its running statistics would change "
                "during the perturbed pass"
            )
    switched = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for module in switched:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in switched:
            module.track_running_stats = True


@dataclass
class TwoPasses:
    """What one step's two passes computed: the loss at θ and, for each parameter that had
    a gradient at θ, g (at θ) and g_p (at θ + e). ``g_p`` are those parameters' ``.grad``,
    which the final gradient overwrites in place."""

    loss: torch.Tensor
    params: list[nn.Parameter]
    g: list[torch.Tensor]
    g_p: list[torch.Tensor]

    def components(
        self,
        named: Mapping[str, nn.Parameter],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(g_task, g_smooth)`` of the named parameters: g and g_p − g, by name
        (docs/method.md §4); zeros for one that had no gradient at θ. Take them before the
        final gradient overwrites g_p."""
        index = {id(p): i for i, p in enumerate(self.params)}
        g_task, g_p = {}, []
        for name, param in named.items():
            i = index.get(id(param))
            g_task[name] = self.g[i] if i is not None else torch.zeros_like(param)
            g_p.append(self.g_p[i] if i is not None else torch.zeros_like(param))
        g_smooth = dict(zip(named, torch._foreach_sub(g_p, list(g_task.values()))))
        return g_task, g_smooth


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation (Foret et al., 2021): the base optimizer steps with g_p.

    ``model``: the module being trained, whose batch-norm running statistics the perturbed
    pass leaves alone. ``perturbed_pass_rng``: "replay" the first pass's dropout masks in
    the perturbed pass, or draw "fresh" ones (module docstring).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gaqat.optim import SAM
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
        >>> def closure():  # runs twice a step; the step zeroes the gradients itself
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.05)
        >>> loss = opt.step(closure)  # the loss at θ, before the update
        >>> int(model[1].num_batches_tracked)  # the perturbed pass moved no statistics
        1
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        model: nn.Module,
        rho: float = 0.05,
        *,
        perturbed_pass_rng: str = "replay",
    ):
        if not isinstance(base_optimizer, torch.optim.Optimizer) or isinstance(base_optimizer, SAM):
            raise ValueError(
                f"{type(self).__name__}: base_optimizer must be a plain "
                f"torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{type(self).__name__}: model must be the nn.Module being trained "
                f"(its batch norm is left alone in the perturbed pass), got "
                f"{type(model).__name__}"
            )
        if perturbed_pass_rng not in PERTURBED_PASS_RNG:
            raise ValueError(
                f"{type(self).__name__}.perturbed_pass_rng: {perturbed_pass_rng!r} "
                f"is not one of {PERTURBED_PASS_RNG}"
            )
        self.base_optimizer = base_optimizer
        self.model = model
        self.rho = self._non_negative("rho", rho)
        self.alpha = 0.0
        self.perturbed_pass_rng = perturbed_pass_rng
        super().__init__(base_optimizer.param_groups, dict(base_optimizer.defaults))
        self._share_base()

    def _non_negative(self, field: str, value: float) -> float:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(
                f"{type(self).__name__}.{field}: expected a finite number >= 0, got {value!r}"
            )
        return float(value)

    def _share_base(self) -> None:
        """Point at the base optimizer's groups and state (which its load_state_dict replaces)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:
        """One step: the two passes, then the base optimizer with the final gradient.
        ``closure`` runs forward and backward on the step's minibatch and returns the loss;
        the step zeroes the gradients before each pass, so the caller need not."""
        passes = self.two_passes(closure)
        self._final_gradient(passes)
        self.base_optimizer.step()
        return passes.loss

    @torch.no_grad()
    def two_passes(self, closure: Closure | None) -> TwoPasses:
        """g at θ and g_p at θ + e, θ restored bit for bit.

        Afterwards ``.grad`` is g_p for every parameter that had a gradient at θ (zeros where
        the perturbed pass left none) and None for the others, which are not updated.
        """
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure that runs forward and "
                "backward on the step's minibatch and returns the loss"
            )
        everything = [p for group in self.param_groups for p in group["params"]]
        rng = _replayable_rng_state() if self.perturbed_pass_rng == "replay" else None

        # Pass 1, at θ.
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        params = [p for p in everything if p.grad is not None]
        if not params:
            raise RuntimeError(
                f"{type(self).__name__}.step: the closure left no gradients "
                "(does it call loss.backward()?)"
            )
        g = [p.grad for p in params]

        # Pass 2, at θ + e: the same random numbers, the model's batch norm left alone.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        theta = torch._foreach_mul(params, 1.0)  # an exact copy, to restore θ bit for bit
        e = torch._foreach_mul(g, self.rho / (norm + _NORM_EPS) - self.alpha)
        self.zero_grad(set_to_none=True)
        if rng is not None:
            _replay_rng_state(rng)
        try:  # θ comes back even when the perturbed pass raises
            torch._foreach_add_(params, e)
            with torch.enable_grad(), frozen_running_stats(self.model):
                closure()
        finally:
            torch._foreach_copy_(params, theta)

        held = {id(p) for p in params}
        for p in everything:  # the update moves exactly the parameters with a gradient at θ
            if id(p) not in held:
                p.grad = None
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
        return TwoPasses(loss, params, g, [p.grad for p in params])

    def _final_gradient(self, passes: TwoPasses) -> None:
        """Write the gradient the base optimizer steps with into ``.grad``: SAM's is g_p,
        which the perturbed pass left there."""

    def state_dict(self) -> dict:
        """The base optimizer's state dict: ρ and α are construction arguments, not state."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Asked by an enabled GradScaler before it steps an optimizer: refuse it here."""
        raise RuntimeError(
            f"{type(self).__name__} does not support fp16 GradScaler: a two-pass "
            "step cannot be loss-scaled (see gaqat.optim); use "
            "torch.autocast(dtype=torch.bfloat16) without a scaler"
        )


class SAGM(SAM):
    """Sharpness-aware gradient matching (Wang et al., CVPR 2023): steps with ½·(g + g_p).

    The perturbation subtracts α·g from SAM's ascent step (docs/method.md §3).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gaqat.optim import SAGM
        >>> model = nn.Linear(4, 2)
        >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
        >>> def closure():
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> opt = SAGM(torch.optim.Adam(model.parameters(), lr=1e-3), model, rho=0.05, alpha=1e-3)
        >>> for _ in range(3):
        ...     loss = opt.step(closure)
        >>> opt.state_dict().keys() == opt.base_optimizer.state_dict().keys()
        True
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        model: nn.Module,
        rho: float = 0.05,
        alpha: float = 1e-3,
        *,
        perturbed_pass_rng: str = "replay",
    ):
        super().__init__(base_optimizer, model, rho, perturbed_pass_rng=perturbed_pass_rng)
        self.alpha = self._non_negative("alpha", alpha)

    def _final_gradient(self, passes: TwoPasses) -> None:
        """½·(g + g_p), in place of g_p."""
        torch._foreach_add_(passes.g_p, passes.g)
        torch._foreach_mul_(passes.g_p, 0.5)


_ReplayableRngState = tuple[torch.Tensor, list[torch.Tensor] | None]


def _replayable_rng_state() -> _ReplayableRngState:
    """What the perturbed pass replays of the first one's random draws: torch's global
    generators, the CPU one, and CUDA's only when CUDA is initialised (asking for them
    would initialise it, and a CPU run must not need a GPU)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _replay_rng_state(state: _ReplayableRngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
