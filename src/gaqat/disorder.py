"""Gradient disorder (docs/method.md §5) and the per-window tracker of step-size gradients.

Disorder measures how erratically a gradient's direction moves over a window of steps:
0 for a constant direction, about 0.5 for random signs, 1 for strict alternation.
The tracker keeps each window's per-step components on the gradients' device and
synchronises with the host once per window, when it summarises. Summaries (sums and
disorders) are computed in float64: in float32, 7 flips in 20 steps give
D = 0.3499999940, which a freezer with τ = 0.35 would wrongly read as below τ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from gaqat.names import DISORDER_METRICS


def _sign_flips(seq: torch.Tensor) -> torch.Tensor:
    """Fraction of consecutive steps whose sign differs, along dim 0 (sign(0) = 0)."""
    signs = torch.sign(seq)
    return (signs[1:] != signs[:-1]).to(seq.dtype).mean(dim=0)


def _cancellation(seq: torch.Tensor) -> torch.Tensor:
    """1 − |Σ g| / Σ |g| along dim 0: the share of the gradient mass that cancels out.

    An all-zero sequence has nothing to cancel: its disorder is 0.
    """
    mass = seq.abs().sum(dim=0)
    ratio = seq.sum(dim=0).abs() / mass.clamp_min(torch.finfo(seq.dtype).tiny)
    return torch.where(mass > 0, (1 - ratio).clamp(0, 1), torch.zeros_like(mass))


METRICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = dict(
    zip(DISORDER_METRICS, (_sign_flips, _cancellation), strict=True)
)


def _as_sequence(sequence: object, who: str) -> torch.Tensor:
    if isinstance(sequence, torch.Tensor):
        seq = sequence.detach().to("cpu", torch.float64)
    else:
        try:
            seq = torch.from_numpy(np.asarray(sequence, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{who}: expected a sequence of numbers ({error})") from None
    if seq.dim() != 1 or len(seq) < 2:
        raise ValueError(
            f"{who}: expected a 1-D sequence of at least 2 gradients, got shape {tuple(seq.shape)}"
        )
    if not torch.isfinite(seq).all():
        raise ValueError(f"{who}: the sequence contains NaN or infinite values")
    return seq


def sign_flip_disorder(sequence: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """D = (1/(n−1)) Σ_{t≥2} 1[sign g_t ≠ sign g_{t−1}], in [0, 1] (docs/method.md §5)."""
    return float(_sign_flips(_as_sequence(sequence, "sign_flip_disorder")))


def cancellation_disorder(sequence: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """D' = 1 − |Σ g_t| / Σ |g_t|, in [0, 1]; 0 for an all-zero sequence."""
    return float(_cancellation(_as_sequence(sequence, "cancellation_disorder")))


@dataclass(frozen=True)
class WindowSummary:
    """One step size over one window: summed components and their disorder.

    A per-channel step size is tracked channel by channel; its sums and disorders are
    the means over its channels.
    """

    name: str
    g_task: float
    g_smooth: float
    d_task: float
    d_smooth: float

    def to_dict(self) -> dict:
        return asdict(self)


class DisorderTracker:
    """Records g_task and g_smooth of named step sizes each step; summarises each window."""

    def __init__(
        self, step_sizes: Mapping[str, torch.Tensor], window: int, metric: str = "sign_flip"
    ):
        if not step_sizes:
            raise ValueError("DisorderTracker: step_sizes is empty")
        if not isinstance(window, int) or window < 2:
            raise ValueError(
                f"DisorderTracker.window: expected an integer >= 2 (disorder "
                f"compares consecutive steps), got {window!r}"
            )
        if metric not in METRICS:
            raise ValueError(f"DisorderTracker.metric: {metric!r} is not one of {list(METRICS)}")
        self.names = list(step_sizes)
        self.window = window
        self.metric = metric
        channels = [max(p.numel(), 1) for p in step_sizes.values()]
        self._width = sum(channels)
        # owner[i]: which step size column i of a recorded row belongs to.
        self._owner = torch.repeat_interleave(torch.arange(len(channels)), torch.tensor(channels))
        self._channels = torch.tensor(channels)
        self._rows: torch.Tensor | None = None  # [window, 2 * width]: task columns, then smooth
        self._filled = 0

    def record(
        self, g_task: Mapping[str, torch.Tensor], g_smooth: Mapping[str, torch.Tensor]
    ) -> list[WindowSummary] | None:
        """Store one step's components; at the end of a window return its summaries."""
        parts = [g_task[n].reshape(-1) for n in self.names] + [
            g_smooth[n].reshape(-1) for n in self.names
        ]
        rows = self._rows_on(parts[0])
        torch.cat(parts, out=rows[self._filled])
        self._filled += 1
        if self._filled < self.window:
            return None
        self._filled = 0
        return self._summarise(rows)

    def _rows_on(self, like: torch.Tensor) -> torch.Tensor:
        """The window buffer on ``like``'s device (moving a resumed partial window there)."""
        if self._rows is None or self._rows.device != like.device:
            dtype = torch.promote_types(torch.float32, like.dtype)
            rows = torch.empty(self.window, 2 * self._width, dtype=dtype, device=like.device)
            if self._rows is not None:
                rows[: self._filled] = self._rows[: self._filled]
            self._rows = rows
        return self._rows

    def _summarise(self, rows: torch.Tensor) -> list[WindowSummary]:
        rows = rows.to(torch.float64)
        per_column = torch.stack([rows.sum(dim=0), METRICS[self.metric](rows)])  # [2, 2*width]
        owner = self._owner.to(rows.device)
        per_size = torch.zeros(2, 2, len(self.names), dtype=rows.dtype, device=rows.device)
        per_size.index_add_(2, owner, per_column.view(2, 2, self._width))
        per_size /= self._channels.to(rows.device, rows.dtype)
        (g_task, g_smooth), (d_task, d_smooth) = per_size.tolist()
        return [
            WindowSummary(*fields) for fields in zip(self.names, g_task, g_smooth, d_task, d_smooth)
        ]

    def state_dict(self) -> dict:
        """The partial window, so that a resumed run summarises the same steps."""
        rows = None if self._rows is None else self._rows[: self._filled].cpu().clone()
        return {
            "names": list(self.names),
            "window": self.window,
            "metric": self.metric,
            "filled": self._filled,
            "rows": rows,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("names", "window", "metric"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"DisorderTracker.load_state_dict: checkpoint {key} "
                    f"{state[key]!r} differs from this tracker's {getattr(self, key)!r}"
                )
        rows = state["rows"]
        filled = state["filled"]
        if rows is None:
            self._rows, self._filled = None, 0
            return
        if tuple(rows.shape) != (filled, 2 * self._width):
            raise ValueError(
                f"DisorderTracker.load_state_dict: checkpoint rows have shape "
                f"{tuple(rows.shape)}, expected ({filled}, {2 * self._width})"
            )
        self._rows = torch.empty(self.window, 2 * self._width, dtype=rows.dtype)
        self._rows[:filled] = rows
        self._filled = filled
