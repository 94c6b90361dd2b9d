"""Weight averaging (SWA, SWAD): the weights a run reports are the mean of its weights
over a window of steps (docs/method.md §9).

An average is dense: every step in the window counts once, as in SWAD's release
(github.com/khanrc/swad). Four parts, one concept:

- :class:`RunningSum`: the float64 sum of every parameter over consecutive steps (an
  average over 10^4 steps summed in float32 would lose about four digits);
- the rules that choose the window: :class:`SwaRule` (every step from a fraction of the
  run on) and :class:`LossValley` (SWAD's, from the validation loss at each checkpoint);
- :class:`WeightAverage`: the sums a rule still needs, fed every step and every
  checkpoint, checkpointed with the run so that a resumed run ends bit-identical;
- :func:`recompute_batch_norm`: running statistics for the averaged weights, which no
  training step ever saw (``torch.optim.swa_utils.update_bn``; folded pairs through
  ``gaqat.bn_folding``'s own update).

The average covers every parameter: for a quantized network the float weights, the
quantizers' step sizes, biases and batch-norm affine parameters, so the averaged network
is itself a quantized network with its own integer codes. Buffers are the last step's,
but for the batch-norm statistics that :func:`recompute_batch_norm` recomputes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gaqat.bn_folding import QuantConvBn2d
from gaqat.names import AVERAGING


class RunningSum:
    """The float64 sums of named tensors over consecutive steps, their first and last
    step and how many: what a uniform average over those steps needs.

    Example::

        >>> import torch
        >>> from gaqat.averaging import RunningSum
        >>> total = RunningSum()
        >>> for step, w in enumerate([1.0, 2.0, 6.0], start=1):
        ...     total.add({"w": torch.tensor([w])}, step)
        >>> total.mean()["w"].item(), (total.first, total.last, total.count)
        (3.0, (1, 3, 3))
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.first: int | None = None
        self.last: int | None = None

    @torch.no_grad()
    def add(self, tensors: Mapping[str, torch.Tensor], step: int) -> None:
        if not self.count:
            self.sums = {n: t.detach().to(torch.float64, copy=True) for n, t in tensors.items()}
            self.first = step
        else:
            for name, t in tensors.items():
                self.sums[name].add_(t.detach())
        self.count += 1
        self.last = step

    @torch.no_grad()
    def extend(self, later: RunningSum) -> None:
        """Add the steps of ``later``, which follow these."""
        if not later.count:
            return
        if not self.count:
            self.sums, self.first = later.sums, later.first
        else:
            for name, s in later.sums.items():
                self.sums[name].add_(s)
        self.count += later.count
        self.last = later.last

    def mean(self) -> dict[str, torch.Tensor]:
        return {name: s / self.count for name, s in self.sums.items()}

    def state_dict(self) -> dict:
        return {"sums": self.sums, "count": self.count, "first": self.first, "last": self.last}

    @classmethod
    def from_state(cls, state: Mapping) -> RunningSum:
        part = cls()
        part.sums = dict(state["sums"])
        part.count, part.first, part.last = state["count"], state["first"], state["last"]
        return part


class SwaRule:
    """SWA's window: every step from ``first_step`` to the end of the run (Izmailov et al.,
    2018, with the learning rate the run's own schedule gives, no cyclic one).

    A rule answers :class:`WeightAverage`'s questions: may a step's weights enter
    (``takes``), which steps are in the window so far (``window``: (after, through), the
    steps s with after < s ≤ through), and before which step nothing is needed any more
    (``needed_after``). ``observe`` receives each checkpoint's validation loss.
    """

    def __init__(self, first_step: int):
        if not isinstance(first_step, int) or first_step < 1:
            raise ValueError(f"SwaRule.first_step: expected an integer >= 1, got {first_step!r}")
        self.first_step = first_step

    def takes(self, step: int) -> bool:
        return step >= self.first_step

    def observe(self, step: int, loss: float | None) -> None:
        """SWA's window does not depend on the loss."""

    def window(self, final: bool = False) -> tuple[float, float]:
        return self.first_step - 1, math.inf

    def needed_after(self) -> float:
        return self.first_step - 1

    def state_dict(self) -> dict:
        return {"first_step": self.first_step}

    def load_state_dict(self, state: Mapping) -> None:
        self.first_step = state["first_step"]


def swa_first_step(swa_start: float, total_steps: int) -> int:
    """The first step SWA averages: the one after ``swa_start`` of the run (0.75 of 1000
    steps: 751), the last step at most, so that the window is never empty."""
    if not 0.0 <= swa_start <= 1.0:
        raise ValueError(f"hparams.swa_start: expected a fraction in [0, 1], got {swa_start!r}")
    return min(total_steps, round(swa_start * total_steps) + 1)


class LossValley:
    """SWAD's window rule, fed (step, validation loss) at every checkpoint: ``LossValley``
    of SWAD's release (khanrc/swad, ``domainbed/swad.py``), on evaluation indices.

    Checkpoint k closes segment k, the steps since checkpoint k − 1, with loss L_k.

    - Opens at the first checkpoint k at which the oldest of the last ``n_converge``
      losses is their minimum (ties count: it has not improved for ``n_converge`` − 1
      checkpoints). Converged segment c = k − n_converge + 1; threshold
      (1 + ``tolerance_ratio``) · mean(L_c … L_k).
    - Starts at c, or earlier: the release also averages the segments before c whose loss
      and whose predecessor's loss are at most the threshold, looking back over at most
      ``n_tolerance`` − ``n_converge`` of them, less one (its ``Q[start_idx + 1:]``). So,
      with the defaults, at c − 2 when L_{c−3}, L_{c−2}, L_{c−1} are all under the
      threshold.
    - Ends at the last checkpoint whose loss is at most the threshold, and closes for good
      once ``n_tolerance`` consecutive losses exceed it (the release's "dead valley",
      at which its trainer also stops; a gaqat run trains on).
    - Never converged by the end: the last segment alone (the release's fallback).

    Where fewer than ``n_tolerance`` checkpoints precede convergence, the release's buffer
    is not yet full and it adds segments out of order and some twice; this class keeps the
    rule above. It also counts each step once where the release counts segment c twice.

    Example, with the defaults and a checkpoint every 100 steps: the loss converges at
    step 400 (no lower one in the next two checkpoints), so the threshold is 1.3 × mean(3.0,
    3.1, 3.2); the window reaches back two checkpoints, to step 101, and ends at step 700,
    the last loss under the threshold; the six losses above it close the valley::

        >>> from gaqat.averaging import LossValley
        >>> valley = LossValley()
        >>> for k, loss in enumerate([4.0, 3.5, 3.2, 3.0, 3.1, 3.2, 3.0] + [9.0] * 6):
        ...     valley.observe(step=100 * (k + 1), loss=loss)
        >>> valley.window(), valley.closed  # (after, through): steps 101-700
        ((100, 700), True)
    """

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
        for name, value in (("n_converge", n_converge), ("n_tolerance", n_tolerance)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LossValley.{name}: expected an integer >= 1, got {value!r}")
        if not (isinstance(tolerance_ratio, (int, float)) and tolerance_ratio >= 0):
            raise ValueError(
                f"LossValley.tolerance_ratio: expected a number >= 0, got {tolerance_ratio!r}"
            )
        self.n_converge, self.n_tolerance = n_converge, n_tolerance
        self.tolerance_ratio = float(tolerance_ratio)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.threshold: float | None = None  # set when the loss converges
        self.start: int | None = None  # the window's first and last checkpoint (indices)
        self.end: int | None = None
        self.closed = False

    def takes(self, step: int) -> bool:
        return not self.closed

    def observe(self, step: int, loss: float) -> None:
        if self.closed:
            return
        self.steps.append(int(step))
        self.losses.append(float(loss))
        k = len(self.losses) - 1
        if self.threshold is None:
            self._converge(k)
        elif self.losses[k] <= self.threshold:
            self.end = k
        if self.end is not None and k - self.end >= self.n_tolerance:
            self.closed = True

    def _converge(self, k: int) -> None:
        n = self.n_converge
        recent = self.losses[k + 1 - n :] if k + 1 >= n else []
        if not recent or recent[0] > min(recent):
            return
        c = k + 1 - n
        self.threshold = float(np.mean(recent)) * (1.0 + self.tolerance_ratio)
        under = 0  # losses at most the threshold just before c, within the look-back
        while (
            under < self.n_tolerance - n
            and c - under > 0
            and self.losses[c - under - 1] <= self.threshold
        ):
            under += 1
        self.start = c - max(0, under - 1)
        self.end = max((i for i in range(c, k + 1) if self.losses[i] <= self.threshold), default=c)

    def _after(self, index: int) -> int:
        """The step before segment ``index``'s first."""
        return self.steps[index - 1] if index > 0 else 0

    def window(self, final: bool = False) -> tuple[int, int] | None:
        """(after, through) in steps; None until the loss converges, or at the end
        (``final``) of a run that never converged, the last segment."""
        if self.start is not None:
            return self._after(self.start), self.steps[self.end]
        if final and self.steps:
            return self._after(len(self.steps) - 1), self.steps[-1]
        return None

    def needed_after(self) -> float:
        """Segments that end at or before this step never enter the window: once closed,
        none; once open, those before its end; before that, those older than the
        earliest start a convergence at the next checkpoint could choose."""
        if self.closed:
            return math.inf
        if self.end is not None:
            return self.steps[self.end]
        k = len(self.steps) - 1
        reach = self.n_converge - 1 + max(0, self.n_tolerance - self.n_converge - 1)
        return self._after(max(0, min(k, k + 1 - reach)))

    def state_dict(self) -> dict:
        return {
            "steps": list(self.steps),
            "losses": list(self.losses),
            "threshold": self.threshold,
            "start": self.start,
            "end": self.end,
            "closed": self.closed,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.steps, self.losses = list(state["steps"]), list(state["losses"])
        self.threshold, self.start, self.end = state["threshold"], state["start"], state["end"]
        self.closed = state["closed"]


class WeightAverage:
    """A network's parameters averaged over the steps its rule chooses.

    Call :meth:`after_step` after every optimizer step with the number of steps done,
    :meth:`after_evaluation` at every checkpoint with its validation loss, and
    :meth:`apply` at the end. It keeps the sums the rule may still need: the window's
    so far, the stretches the rule has not decided on (SWAD, before convergence: one per
    checkpoint it may still reach back to; after: one), and the steps since the last
    checkpoint.

    Example::

        >>> import torch
        >>> from gaqat.averaging import SwaRule, WeightAverage
        >>> layer = torch.nn.Linear(1, 1, bias=False)
        >>> average = WeightAverage(layer, SwaRule(first_step=3))
        >>> for step in range(1, 5):  # the weight is 1, 2, 3, 4 after steps 1-4
        ...     _ = layer.weight.data.fill_(step)
        ...     average.after_step(step)
        >>> average.after_evaluation(4, loss=None)
        >>> window = average.apply()  # the mean over steps 3 and 4
        >>> layer.weight.item(), (window.first, window.last)
        (3.5, (3, 4))
    """

    def __init__(self, network: nn.Module, rule: SwaRule | LossValley):
        self.parameters = dict(network.named_parameters())
        self.rule = rule
        self.total = RunningSum()  # the steps in the window so far
        self.pending: list[RunningSum] = []  # stretches the rule has not decided on
        self.open = RunningSum()  # the steps since the last checkpoint

    def after_step(self, step: int) -> None:
        if self.rule.takes(step):
            self.open.add(self.parameters, step)

    def after_evaluation(self, step: int, loss: float | None) -> None:
        self.rule.observe(step, loss)
        self._settle(self.rule.window())

    def _settle(self, window: tuple[float, float] | None) -> None:
        """Close the open stretch; add to the window the stretches inside it, in order;
        drop those the rule no longer needs; merge those after an open window's end,
        which the rule decides on together (all in at the next loss under the threshold,
        all out when the valley closes or the run ends)."""
        if self.open.count:
            self.pending.append(self.open)
            self.open = RunningSum()
        needed, kept = self.rule.needed_after(), []
        for part in self.pending:
            if window is not None and part.first > window[0] and part.last <= window[1]:
                self.total.extend(part)
            elif part.last > needed:
                if kept and window is not None and kept[-1].first > window[1]:
                    kept[-1].extend(part)
                else:
                    kept.append(part)
        self.pending = kept

    def result(self) -> RunningSum:
        """The sums over the final window (idempotent)."""
        self._settle(self.rule.window(final=True))
        if not self.total.count:
            raise RuntimeError("WeightAverage: no step was averaged; call after_step first")
        return self.total

    @torch.no_grad()
    def apply(self) -> RunningSum:
        """Set the network's parameters to their mean over the final window, each in its
        own dtype; returns the window's sums (its first and last step, how many)."""
        window = self.result()
        for name, mean in window.mean().items():
            self.parameters[name].copy_(mean)
        return window

    def state_dict(self) -> dict:
        return {
            "rule": self.rule.state_dict(),
            "total": self.total.state_dict(),
            "pending": [part.state_dict() for part in self.pending],
            "open": self.open.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.rule.load_state_dict(state["rule"])
        self.total = RunningSum.from_state(state["total"])
        self.pending = [RunningSum.from_state(part) for part in state["pending"]]
        self.open = RunningSum.from_state(state["open"])


def weight_average(
    network: nn.Module, averaging: str, hparams: Mapping, total_steps: int
) -> WeightAverage | None:
    """The average a recipe's ``averaging`` names ("none": None), with its hyperparameters
    (``gaqat.hparams``)."""
    if averaging == "none":
        return None
    if averaging == "swa":
        return WeightAverage(network, SwaRule(swa_first_step(hparams["swa_start"], total_steps)))
    if averaging == "swad":
        rule = LossValley(hparams["n_converge"], hparams["n_tolerance"], hparams["tolerance_ratio"])
        return WeightAverage(network, rule)
    raise ValueError(f"Recipe.averaging: {averaging!r} is not one of {', '.join(AVERAGING)}")


@torch.no_grad()
def recompute_batch_norm(network: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Recompute the running statistics of ``network``'s batch norms on ``inputs`` (training
    batches), as ``torch.optim.swa_utils.update_bn`` does: each statistic becomes the
    plain mean over the batches of the batch statistics, in train mode, without gradient.
    Returns how many layers were recomputed.

    Only statistics that training kept live are recomputed. A batch norm kept in eval mode
    (``freeze_bn``) keeps its statistics; so does a folded pair whose statistics froze
    (``bn_freeze_at``): its running statistics are then constants of the function every
    later step trained. A live folded pair is recomputed with its own update
    (``QuantConvBn2d.update_running_statistics``, which ``gaqat.bn_folding``'s
    ``FoldedStatistics`` applies after each step); a batch folds the weights with the
    current running variance, so the count restarts but the estimate is kept until the
    first batch replaces it. The global random state is left as it was.

    Example::

        >>> import torch
        >>> from gaqat.averaging import recompute_batch_norm
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> recompute_batch_norm(net, [torch.randn(8, 2) for _ in range(3)])
        1
        >>> int(net[1].num_batches_tracked)
        3
    """
    inputs = iter(inputs)
    first = next(inputs, None)
    was_training = network.training
    network.train()
    plain, live = _live_statistics(network)
    momenta = {bn: bn.momentum for bn in plain + [m.bn for m in live]}
    if first is None or not momenta:  # no batch, or nothing to recompute: leave them
        network.train(was_training)
        return 0
    try:
        for bn in plain:
            bn.reset_running_stats()
        for m in live:
            m.bn.num_batches_tracked.zero_()
        for bn in momenta:
            bn.momentum = None  # a cumulative mean over the batches
        with torch.random.fork_rng():
            for x in itertools.chain([first], inputs):
                network(x)
                for m in live:  # what the batch staged (gaqat.bn_folding)
                    m.update_running_statistics()
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        network.train(was_training)
    return len(momenta)


def _live_statistics(network: nn.Module) -> tuple[list[_BatchNorm], list[QuantConvBn2d]]:
    """The batch norms of ``network`` (in train mode) whose statistics training kept live:
    plain ones in train mode that track statistics, folded pairs not frozen."""
    folded = [m for m in network.modules() if isinstance(m, QuantConvBn2d)]
    inside = {id(m.bn) for m in folded}
    plain = [m for m in network.modules() if isinstance(m, _BatchNorm) and id(m) not in inside]
    live = [m for m in folded if not m.statistics_frozen]
    return [m for m in plain if m.training and m.track_running_stats], live
