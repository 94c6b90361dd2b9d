"""Disorder-guided selective freezing of quantizer step sizes (docs/method.md §6).

A step size whose task gradient keeps its direction over a window (D_task < τ) is
frozen. Decisions are taken at window ends, after ``warmup_windows`` windows (the first
window's step sizes drift steadily away from their initialisation, which reads as order,
not as convergence), and apply from the step that closes the window on. Only the step
sizes handed in are ever touched. :class:`GAQAT`, the method's optimizer, is SAGM
(``gaqat.optim``) feeding a freezer the components of every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import fmean

import torch
from torch import nn

from gaqat.disorder import DisorderTracker, WindowSummary
from gaqat.names import FREEZE_MODES, FREEZE_SCOPES
from gaqat.optim import SAGM, Closure


def layer_of(name: str) -> str:
    """The module that holds a step size's quantizer, i.e. its conv or linear layer:
    ``featurizer.3.weight_quantizer`` -> ``featurizer.3`` ("" for a name without a dot)."""
    return name.rpartition(".")[0]


class Freezer:
    """Tracks the step sizes' disorder, decides which are frozen, edits their gradients.

    mode "task": a frozen step size's gradient becomes ½·g_smooth (the task part dropped).
    mode "all": its gradient is set to None, so the optimizer skips it and its value stays
    bit-for-bit (a zero gradient would still move it through Adam's momentum).
    With ``unfreeze`` a frozen step size is released when its D_task is ≥ τ again.
    scope "layer": a layer's step sizes (grouped by :func:`layer_of`) freeze and unfreeze
    together, on the mean of their D_task (docs/method.md §6, "Layer-wise freezing").
    """

    def __init__(
        self,
        step_sizes: Mapping[str, nn.Parameter],
        tau: float = 0.3,
        window: int = 350,
        mode: str = "task",
        unfreeze: bool = False,
        warmup_windows: int = 1,
        metric: str = "sign_flip",
        scope: str = "step_size",
    ):
        if not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
            raise ValueError(
                f"Freezer.tau: expected a number in [0, 1] (0 never freezes), got {tau!r}"
            )
        if mode not in FREEZE_MODES:
            raise ValueError(f"Freezer.mode: {mode!r} is not one of {FREEZE_MODES}")
        if scope not in FREEZE_SCOPES:
            raise ValueError(f"Freezer.scope: {scope!r} is not one of {FREEZE_SCOPES}")
        if not isinstance(warmup_windows, int) or warmup_windows < 0:
            raise ValueError(
                f"Freezer.warmup_windows: expected an integer >= 0, got {warmup_windows!r}"
            )
        self.step_sizes = dict(step_sizes)
        self.tau = float(tau)
        self.mode = mode
        self.unfreeze = bool(unfreeze)
        self.warmup_windows = warmup_windows
        self.scope = scope
        self.units: dict[str, list[str]] = {}  # what freezes together, in step-size order
        for name in self.step_sizes:
            self.units.setdefault(layer_of(name) if scope == "layer" else name, []).append(name)
        self.tracker = DisorderTracker(self.step_sizes, window, metric)  # checks both
        self.frozen: set[str] = set()
        self.windows_done = 0
        self._records: list[dict] = []

    def observe(
        self, g_task: Mapping[str, torch.Tensor], g_smooth: Mapping[str, torch.Tensor]
    ) -> set[str]:
        """Record one step's components; at a window's end, log it and decide. Returns the
        step sizes that froze at this step (none on most steps)."""
        summaries = self.tracker.record(g_task, g_smooth)
        if summaries is None:
            return set()
        self.windows_done += 1
        step = self.windows_done * self.tracker.window  # windows are back to back from step 1
        self._records += [
            {
                "kind": "window",
                "step": step,
                "window": self.windows_done,
                **s.to_dict(),
                "frozen": s.name in self.frozen,
            }
            for s in summaries
        ]
        if self.windows_done <= self.warmup_windows:
            return set()
        return self._decide({s.name: s for s in summaries}, step)

    def _decide(self, summaries: Mapping[str, WindowSummary], step: int) -> set[str]:
        """Freeze (or release) each unit on its D_task, the mean over its step sizes (the
        step size's own D_task when a unit is one step size). Returns those frozen now."""
        frozen_now: set[str] = set()
        for unit, members in self.units.items():
            rows = [summaries[name] for name in members]
            d_task = fmean(r.d_task for r in rows)
            frozen = [r for r in rows if r.name in self.frozen]
            thawed = [r for r in rows if r.name not in self.frozen]
            if thawed and d_task < self.tau:
                self.frozen.update(r.name for r in thawed)
                frozen_now.update(r.name for r in thawed)
                self._log("freeze", step, thawed, unit, rows)
            elif frozen and self.unfreeze and d_task >= self.tau:
                self.frozen.difference_update(r.name for r in frozen)
                self._log("unfreeze", step, frozen, unit, rows)
        return frozen_now

    def _log(
        self,
        kind: str,
        step: int,
        changed: list[WindowSummary],
        unit: str,
        rows: list[WindowSummary],
    ) -> None:
        """One record per step size changed; with scope "layer", also the layer and the
        means that decided, so a reader needs no grouping rule of its own."""
        layer = {}
        if self.scope == "layer":
            layer = {
                "layer": unit,
                "layer_d_task": fmean(r.d_task for r in rows),
                "layer_d_smooth": fmean(r.d_smooth for r in rows),
            }
        self._records += [
            {
                "kind": kind,
                "step": step,
                "name": r.name,
                "d_task": r.d_task,
                "d_smooth": r.d_smooth,
                **layer,
            }
            for r in changed
        ]

    def edit_grads(self, g_smooth: Mapping[str, torch.Tensor]) -> None:
        """Apply the freeze to the frozen step sizes' ``.grad`` before the optimizer steps."""
        if not self.frozen:
            return
        names = sorted(self.frozen)
        if self.mode == "all":
            for name in names:
                self.step_sizes[name].grad = None
            return
        halves = torch._foreach_mul([g_smooth[name] for name in names], 0.5)
        for name, half in zip(names, halves):
            self.step_sizes[name].grad = half

    def pop_records(self) -> list[dict]:
        """The records logged since the last call, JSON-ready.

        ``{"kind": "window", "step", "window", "name", "g_task", "g_smooth", "d_task",
        "d_smooth", "frozen"}`` per step size and window ("frozen": during that window), then
        ``{"kind": "freeze" | "unfreeze", "step", "name", "d_task", "d_smooth"}`` per step size
        and decision, with scope "layer" also ``"layer"``, ``"layer_d_task"`` and
        ``"layer_d_smooth"`` (the layer's means, which decided); ``step`` counts observed
        steps from 1 (docs/method.md §7).
        """
        records, self._records = self._records, []
        return records

    def state_dict(self) -> dict:
        return {
            "frozen": sorted(self.frozen),
            "windows_done": self.windows_done,
            "records": list(self._records),
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["frozen"]) - set(self.step_sizes)
        if unknown:
            raise ValueError(
                f"Freezer.load_state_dict: checkpoint freezes unknown step sizes {sorted(unknown)}"
            )
        self.tracker.load_state_dict(state["tracker"])
        self.frozen = set(state["frozen"])
        self.windows_done = state["windows_done"]
        self._records = list(state["records"])


class GAQAT(SAGM):
    """SAGM whose step sizes' task and smoothness components drive a :class:`Freezer`.

    The freezer holds the step sizes, the decisions and the records
    (``freezer.pop_records()``); the base optimizer must hold every step size. A freezer
    with ``tau=0`` never freezes, which turns this into LSQ+SAGM that still logs windows.
    As SAM's and SAGM's, its step zeroes the gradients itself (``gaqat.optim``).
    ``reset_momentum``: zero a step size's first-moment buffer when it freezes (off by
    default, as the paper does not; docs/method.md §6).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gaqat.freezing import GAQAT, Freezer
        >>> from gaqat.prepare import QuantConfig, quantize_model
        >>> from gaqat.quant import step_sizes
        >>> _ = torch.manual_seed(0)
        >>> model = quantize_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                        QuantConfig(4, 4, first_last="same"))
        >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
        >>> def closure():
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> freezer = Freezer(step_sizes(model), tau=1.0, window=2)  # τ = 1: freezes at once
        >>> opt = GAQAT(torch.optim.Adam(model.parameters(), lr=1e-3), model, freezer)
        >>> for _ in range(4):  # window 1 is the warm-up, window 2 decides
        ...     loss = opt.step(closure)
        >>> sorted({record["kind"] for record in freezer.pop_records()})
        ['freeze', 'window']
        >>> len(freezer.frozen) > 0  # these step sizes now train on ½·g_smooth alone
        True
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        model: nn.Module,
        freezer: Freezer,
        rho: float = 0.05,
        alpha: float = 1e-3,
        *,
        perturbed_pass_rng: str = "replay",
        reset_momentum: bool = False,
    ):
        super().__init__(base_optimizer, model, rho, alpha, perturbed_pass_rng=perturbed_pass_rng)
        self.reset_momentum = bool(reset_momentum)
        held = {id(p) for group in self.param_groups for p in group["params"]}
        for name, param in freezer.step_sizes.items():
            if id(param) not in held:
                raise ValueError(
                    f"GAQAT: step size {name!r} is not in the base optimizer's "
                    "param_groups (build the optimizer after quantize_model so "
                    "that it holds every step size)"
                )
        self.freezer = freezer

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:
        """SAGM's step, with the step sizes' components handed to the freezer before the
        base optimizer steps."""
        passes = self.two_passes(closure)
        g_task, g_smooth = passes.components(self.freezer.step_sizes)
        self._final_gradient(passes)  # ½·(g + g_p)
        frozen_now = self.freezer.observe(g_task, g_smooth)  # windows and freeze decisions
        if self.reset_momentum:
            self._forget_momentum(frozen_now)
        self.freezer.edit_grads(g_smooth)  # a frozen step size: ½·g_smooth, or no update
        self.base_optimizer.step()
        return passes.loss

    def _forget_momentum(self, names: set[str]) -> None:
        """Zero the first-moment buffers (Adam's ``exp_avg``, SGD's ``momentum_buffer``) of
        step sizes that freeze now: otherwise the momentum of their earlier task gradients
        keeps moving them after freezing dropped the task gradient."""
        for name in names:
            state = self.state.get(self.freezer.step_sizes[name], {})
            for key in ("exp_avg", "momentum_buffer"):
                if isinstance(state.get(key), torch.Tensor):
                    state[key].zero_()

    def state_dict(self) -> dict:
        return {"base": super().state_dict(), "freezer": self.freezer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict["base"])
        self.freezer.load_state_dict(state_dict["freezer"])
