"""Disorder-guided selective freezing of quantizer step sizes, and GAQAT = SAGM + freezer.

A step size whose task gradient keeps its direction over a window (D_task < τ) is
frozen (METHOD.md §6). Decisions are taken at window ends, after ``warmup_windows``
windows (the first window's step sizes drift steadily away from their initialisation,
which reads as order, not as convergence), and apply from the step that closes the
window on. Only the step sizes handed in are ever touched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gaqat.disorder import METRICS, DisorderTracker
from gaqat.names import FREEZE_MODES
from gaqat.optim import SAGM


class Freezer:
    """Tracks the step sizes' disorder, decides which are frozen, edits their gradients.

    mode "task": a frozen step size's gradient becomes ½·g_smooth (the task part dropped).
    mode "all": its gradient is set to None, so the optimizer skips it and its value stays
    bit-for-bit (a zero gradient would still move it through Adam's momentum).
    With ``unfreeze`` a frozen step size is released when its D_task is ≥ τ again.
    """

    def __init__(self, step_sizes: Mapping[str, nn.Parameter], tau: float = 0.3,
                 window: int = 350, mode: str = "task", unfreeze: bool = False,
                 warmup_windows: int = 1, metric: str = "sign_flip"):
        if not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
            raise ValueError(f"Freezer.tau: expected a number in [0, 1] (0 never freezes), got {tau!r}")
        if mode not in FREEZE_MODES:
            raise ValueError(f"Freezer.mode: {mode!r} is not one of {FREEZE_MODES}")
        if not isinstance(warmup_windows, int) or warmup_windows < 0:
            raise ValueError(f"Freezer.warmup_windows: expected an integer >= 0, got {warmup_windows!r}")
        if metric not in METRICS:
            raise ValueError(f"Freezer.metric: {metric!r} is not one of {list(METRICS)}")
        self.step_sizes = dict(step_sizes)
        self.tau = float(tau)
        self.mode = mode
        self.unfreeze = bool(unfreeze)
        self.warmup_windows = warmup_windows
        self.tracker = DisorderTracker(self.step_sizes, window, metric)
        self.frozen: set[str] = set()
        self.windows_done = 0
        self._records: list[dict] = []

    def observe(self, step: int, g_task: Mapping[str, torch.Tensor],
                g_smooth: Mapping[str, torch.Tensor]) -> None:
        """Record one step's components; at a window's end, log it and decide."""
        summaries = self.tracker.record(g_task, g_smooth)
        if summaries is None:
            return
        self.windows_done += 1
        self._records += [{"kind": "window", "step": step, "window": self.windows_done,
                           **s.to_dict(), "frozen": s.name in self.frozen} for s in summaries]
        if self.windows_done <= self.warmup_windows:
            return
        for s in summaries:
            if s.name not in self.frozen and s.d_task < self.tau:
                self.frozen.add(s.name)
                kind = "freeze"
            elif s.name in self.frozen and self.unfreeze and s.d_task >= self.tau:
                self.frozen.discard(s.name)
                kind = "unfreeze"
            else:
                continue
            self._records.append({"kind": kind, "step": step, "name": s.name,
                                  "d_task": s.d_task, "d_smooth": s.d_smooth})

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
        """Window summaries and decisions logged since the last call (JSON-ready)."""
        records, self._records = self._records, []
        return records

    def state_dict(self) -> dict:
        return {"frozen": sorted(self.frozen), "windows_done": self.windows_done,
                "records": list(self._records), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["frozen"]) - set(self.step_sizes)
        if unknown:
            raise ValueError(f"Freezer.load_state_dict: checkpoint freezes unknown step sizes "
                             f"{sorted(unknown)}")
        self.tracker.load_state_dict(state["tracker"])
        self.frozen = set(state["frozen"])
        self.windows_done = state["windows_done"]
        self._records = list(state["records"])


class GAQAT(SAGM):
    """SAGM whose step-size gradients feed a :class:`Freezer`: one ``step(closure)`` per step.

    ``tau=0`` never freezes, which turns this into LSQ+SAGM that still logs the windows.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module,
                 step_sizes: Mapping[str, nn.Parameter], rho: float = 0.05, alpha: float = 1e-3, tau: float = 0.3, window: int = 350,
                 mode: str = "task", unfreeze: bool = False, metric: str = "sign_flip",
                 warmup_windows: int = 1, perturbed_pass_rng: str = "replay"):
        super().__init__(base_optimizer, model, rho, alpha, watch=step_sizes,
                         perturbed_pass_rng=perturbed_pass_rng)
        self.freezer = Freezer(step_sizes, tau, window, mode, unfreeze, warmup_windows, metric)
        self.steps = 0

    @property
    def frozen(self) -> set[str]:
        """Names of the step sizes frozen now (a copy)."""
        return set(self.freezer.frozen)

    def _before_base_step(self) -> None:
        self.steps += 1
        self.freezer.observe(self.steps, self.g_task, self.g_smooth)
        self.freezer.edit_grads(self.g_smooth)

    def pop_records(self) -> list[dict]:
        """``{"kind": "window", "step", "window", "name", "g_task", "g_smooth", "d_task",
        "d_smooth", "frozen"}`` per step size and window ("frozen": during that window), then
        ``{"kind": "freeze" | "unfreeze", "step", "name", "d_task", "d_smooth"}`` per decision;
        ``step`` counts this optimizer's steps from 1."""
        return self.freezer.pop_records()

    def state_dict(self) -> dict:
        return {"base": super().state_dict(), "freezer": self.freezer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict["base"])
        self.freezer.load_state_dict(state_dict["freezer"])
        self.steps = state_dict["steps"]
