"""Weight averaging (gaqat.averaging): the running average against a float64 reference,
SWA's start, SWAD's window against a transcription of its release's rule, batch-norm
statistics against torch's update_bn, and the average's state across a checkpoint."""

from __future__ import annotations

import io
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from gaqat.averaging import (
    LossValley,
    RunningSum,
    SwaRule,
    WeightAverage,
    recompute_batch_norm,
    swa_first_step,
    weight_average,
)
from gaqat.bn_folding import QuantConvBn2d
from gaqat.models import ModelConfig, build_model
from gaqat.prepare import quantize_model
from gaqat.quant import QuantConfig


def _trajectory(model, steps, seed=0):
    """Train ``model`` ``steps`` Adam steps on random data; its parameters after each step
    as float64 copies, by name."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        yield {n: p.detach().double().clone() for n, p in model.named_parameters()}


def _reference_mean(recorded, first, last):
    """The float64 mean of the recorded parameters over steps first..last (1-based),
    summed in step order."""
    chosen = recorded[first - 1 : last]
    means = {}
    for name in chosen[0]:
        total = chosen[0][name].clone()
        for r in chosen[1:]:
            total += r[name]
        means[name] = total / len(chosen)
    return means


def _tiny():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_a_running_sum_is_the_float64_sum_of_the_steps_in_order():
    model = _tiny()
    total, recorded = RunningSum(), []
    for step, params in enumerate(_trajectory(model, 9), start=1):
        recorded.append(params)
        total.add(dict(model.named_parameters()), step)
    reference = _reference_mean(recorded, 1, 9)
    assert (total.first, total.last, total.count) == (1, 9, 9)
    for name, mean in total.mean().items():
        assert mean.dtype == torch.float64 and torch.equal(mean, reference[name]), name


def test_swa_averages_every_step_from_its_start_as_a_float64_reference():
    model = _tiny()
    average, recorded = WeightAverage(model, SwaRule(first_step=5)), []
    for step, params in enumerate(_trajectory(model, 12), start=1):
        recorded.append(params)
        average.after_step(step)
        if step % 3 == 0:  # checkpoints: the open stretch joins the window
            average.after_evaluation(step, loss=None)
    window = average.apply()
    assert (window.first, window.last, window.count) == (5, 12, 8)
    reference = _reference_mean(recorded, 5, 12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(window.mean()[name], reference[name], rtol=1e-15, atol=1e-15)
        assert p.dtype == torch.float32 and torch.equal(p.detach(), reference[name].float()), name


@pytest.mark.parametrize(
    ("swa_start", "steps", "first"), [(0.75, 1000, 751), (0.0, 10, 1), (1.0, 10, 10), (0.5, 3, 3)]
)
def test_swa_starts_after_its_fraction_of_the_steps_and_never_after_the_last(
    swa_start, steps, first
):
    assert swa_first_step(swa_start, steps) == first
    rule = SwaRule(first)
    assert not rule.takes(first - 1) and rule.takes(first) and rule.takes(steps)


def test_swa_start_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"swa_start: expected a fraction in \[0, 1\], got 1.5"):
        swa_first_step(1.5, 100)


# --- SWAD's window ----------------------------------------------------------------------


def released_window(losses, n_converge=3, n_tolerance=6, tolerance_ratio=0.3):
    """The first and last segment that khanrc/swad's ``LossValley`` (domainbed/swad.py)
    averages for these checkpoint losses, segment k being the steps up to checkpoint k:
    its ``update_and_evaluate`` and ``get_final_model`` step by step, tracking which
    segments go into its average instead of weights; and whether its rule is well defined
    here: its buffer was full at convergence, and its last call added the segment that
    ``get_final_model`` drops as added (else it drops one it never added and adds others
    from before the window's start)."""
    converge_q, smooth_q = deque(maxlen=n_converge), deque(maxlen=n_tolerance)
    added, converge, threshold, dead = [], None, None, False
    well_defined = True
    for k in range(len(losses)):
        if dead:
            break  # the release's trainer stops at a dead valley
        reached = False
        converge_q.append(k)
        smooth_q.append(k)
        if converge is None:
            if len(converge_q) < n_converge:
                continue
            window = [losses[i] for i in converge_q]
            if int(np.argmin(window)) == 0:
                converge = converge_q[0]
                threshold = np.mean(window) * (1.0 + tolerance_ratio)
                well_defined = len(smooth_q) == n_tolerance
                if n_tolerance > n_converge:
                    q = list(smooth_q)[: n_tolerance - n_converge + 1]
                    start_idx = 0
                    for i in reversed(range(len(q))):
                        if losses[q[i]] > threshold:
                            start_idx = i + 1
                            break
                    added += q[start_idx + 1 :]
            continue
        if smooth_q[0] < converge:
            continue
        if min(losses[i] for i in smooth_q) > threshold:
            dead = True
            continue
        added.append(smooth_q[0])
        reached = True
    if converge is None:
        return (converge_q[-1], converge_q[-1]), True
    if not dead:
        well_defined &= reached
        smooth_q.popleft()
        while smooth_q and min(losses[i] for i in smooth_q) <= threshold:
            added.append(smooth_q.popleft())
    added = added or [converge]  # its average starts as segment c, replaced at the first add
    return (min(added), max(added)), well_defined


def _window(losses, **kwargs):
    """LossValley's final window on these losses, as (first, last) checkpoint index, with
    a checkpoint every 10 steps."""
    valley = LossValley(**kwargs)
    for k, loss in enumerate(losses):
        valley.observe(10 * (k + 1), loss)
    after, through = valley.window(final=True)
    return (after // 10, through // 10 - 1), valley


def test_a_loss_that_never_stops_falling_averages_the_last_segment():
    losses = [10.0 - k for k in range(8)]
    (first, last), valley = _window(losses)
    assert valley.window() is None and valley.threshold is None
    assert (first, last) == (7, 7) == released_window(losses)[0]


def test_a_valley_that_never_closes_averages_to_the_last_loss_under_the_threshold():
    losses = [9.0, 8.0, 7.0, 2.0, 2.1, 2.2, 2.0, 2.05, 2.9, 2.1, 2.8]  # threshold 2.73
    (first, last), valley = _window(losses)
    assert valley.threshold == pytest.approx(1.3 * 2.1) and not valley.closed
    assert (first, last) == (3, 9) == released_window(losses)[0]


def test_a_valley_closes_after_n_tolerance_losses_above_the_threshold_and_stays_closed():
    losses = [9.0, 8.0, 7.0, 2.0, 2.1, 2.2, 2.0] + [5.0] * 6 + [1.0, 1.0]
    (first, last), valley = _window(losses)
    assert valley.closed and (first, last) == (3, 6) == released_window(losses)[0]
    five = _window(losses[:12])[1]  # five losses above: still open
    assert not five.closed and five.window(final=True) == (30, 70)


@pytest.mark.parametrize(
    ("before", "start"),
    [
        ([2.5, 2.4, 2.3], 2),  # all under the threshold (2.6): two back, not three
        ([8.5, 2.4, 2.3], 3),  # c - 3 above: one back
        ([2.5, 8.0, 2.3], 4),  # c - 2 above: from c
        ([2.5, 2.4, 8.0], 4),  # c - 1 above: from c
    ],
)
def test_the_window_reaches_back_before_convergence_as_the_release_does(before, start):
    losses = [9.0, *before] + [2.0] * 7  # converges at checkpoint c = 4
    (first, last), _ = _window(losses)
    assert (first, last) == (start, 10) == released_window(losses)[0]


@settings(max_examples=500, deadline=None)
@given(
    falling=st.integers(0, 9),
    rest=st.lists(st.floats(0.5, 3.0), min_size=1, max_size=30),
    n_converge=st.integers(1, 4),
    n_tolerance=st.integers(3, 8),
)
def test_the_window_is_the_released_rules_wherever_its_buffers_are_full(
    falling, rest, n_converge, n_tolerance
):
    """A falling start (which cannot converge) fills the release's buffer first."""
    losses = [3.0 + 0.05 * (falling - i) for i in range(falling)] + rest
    expected, well_defined = released_window(losses, n_converge, n_tolerance)
    assume(well_defined and n_tolerance > n_converge)
    assert _window(losses, n_converge=n_converge, n_tolerance=n_tolerance)[0] == expected


def _loss_curve():
    """Losses that converge at checkpoint 2, leave the valley at 5, come back at 7."""
    return [5.0, 4.0, 3.0, 3.5, 3.2, 4.5, 4.4, 3.1, 3.0]


@pytest.mark.parametrize("stop_at", [1, 2, 3, 5, 6, 8])
def test_a_swad_average_checkpointed_and_restored_ends_bit_identical(stop_at):
    """The sums and the window state survive torch.save / load(weights_only=True) at any
    checkpoint, before and after convergence and with stretches pending."""
    losses, per = _loss_curve(), 4
    hparams = {"n_converge": 3, "n_tolerance": 6, "tolerance_ratio": 0.3}

    def feed(average, model, start, end):
        for step in range(start, end):
            with torch.no_grad():
                for p, value in zip(model.parameters(), params[step]):
                    p.copy_(value)
            average.after_step(step + 1)
            if (step + 1) % per == 0:
                average.after_evaluation(step + 1, losses[step // per])

    torch.manual_seed(2)
    params = [[torch.randn(3, 2), torch.randn(3)] for _ in range(per * len(losses))]
    model = nn.Linear(2, 3)
    straight = weight_average(model, "swad", hparams, per * len(losses))
    feed(straight, model, 0, len(params))

    other = nn.Linear(2, 3)
    first = weight_average(other, "swad", hparams, per * len(losses))
    feed(first, other, 0, per * stop_at)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = weight_average(other, "swad", hparams, per * len(losses))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    feed(resumed, other, per * stop_at, len(params))

    a, b = straight.result(), resumed.result()
    assert (a.first, a.last, a.count) == (b.first, b.last, b.count) == (9, 36, 28)
    assert all(torch.equal(a.sums[n], b.sums[n]) for n in a.sums)


def test_swad_keeps_only_the_stretches_it_may_still_need():
    model = nn.Linear(2, 2)
    average = WeightAverage(model, LossValley())
    for k, loss in enumerate([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]):  # never converges
        average.after_step(k + 1)
        average.after_evaluation(k + 1, loss)
    assert [part.last for part in average.pending] == [4, 5, 6, 7]  # c - 2 .. k at best
    for k, loss in enumerate([3.0, 3.0, 9.0, 9.0], start=7):  # converges at 7; 3 above
        average.after_step(k + 1)
        average.after_evaluation(k + 1, loss)
    assert [(p.first, p.last) for p in average.pending] == [(10, 11)]  # one merged stretch
    assert (average.total.first, average.total.last) == (7, 9)


def test_weight_average_names_an_unknown_averaging():
    with pytest.raises(ValueError, match="Recipe.averaging: 'ema' is not one of none, swa, swad"):
        weight_average(nn.Linear(1, 1), "ema", {}, 10)


# --- Batch-norm statistics ----------------------------------------------------------------


def _batches(n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 32, 32, generator=g) for _ in range(n)]


def test_batch_norm_statistics_are_torchs_update_bn():
    torch.manual_seed(0)
    ours = build_model(ModelConfig(dropout=0.5))
    with torch.no_grad():  # statistics away from their initial values
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    reference = build_model(ModelConfig(dropout=0.5))
    reference.load_state_dict(ours.state_dict())
    ours.eval()
    rng = torch.get_rng_state()
    assert recompute_batch_norm(ours, _batches()) == 4
    assert torch.equal(torch.get_rng_state(), rng) and not ours.training
    torch.optim.swa_utils.update_bn(_batches(), reference)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(m.momentum == 0.1 for m in ours.modules() if isinstance(m, nn.BatchNorm2d))


def test_batch_norm_kept_in_eval_or_given_no_batch_keeps_its_statistics():
    model = build_model(ModelConfig(freeze_bn=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recompute_batch_norm(model, _batches()) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model = build_model(ModelConfig())  # no batch (bn_recompute_steps 0): nothing changes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recompute_batch_norm(model, []) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_folded_pairs_recompute_live_statistics_and_keep_frozen_ones():
    """A live folded pair ends with the cumulative mean of the statistics it staged for
    each batch; a frozen one keeps its statistics, which its later steps trained on."""
    torch.manual_seed(0)
    model = quantize_model(
        build_model(ModelConfig()), QuantConfig(weight_bits=4, act_bits=4, fold_batch_norm=True)
    )
    model.train()
    with torch.no_grad():
        model(_batches(1, seed=9)[0])  # initialises the quantizers
    folded = [m for m in model.modules() if isinstance(m, QuantConvBn2d)]
    assert len(folded) >= 2
    frozen, live = folded[0], folded[1:]
    frozen.statistics_frozen = True
    kept = (frozen.bn.running_mean.clone(), frozen.bn.running_var.clone())
    staged = {id(m): [] for m in live}

    def capture(module, args, output):
        if id(module) in staged:
            staged[id(module)].append((module.staged_mean.clone(), module.staged_var.clone()))

    hooks = [m.register_forward_hook(capture) for m in live]
    inside = [m.bn for m in folded]
    plain = [m for m in model.modules() if type(m) is nn.BatchNorm2d and m not in inside]
    assert len(plain) == 1  # after the first convolution, which stays float
    assert recompute_batch_norm(model, _batches()) == len(live) + len(plain)
    for hook in hooks:
        hook.remove()
    assert torch.equal(frozen.bn.running_mean, kept[0]) and torch.equal(
        frozen.bn.running_var, kept[1]
    )
    for m in live:
        means, variances = zip(*staged[id(m)])
        assert int(m.bn.num_batches_tracked) == 3 and m.bn.momentum == 0.1
        torch.testing.assert_close(m.bn.running_mean, torch.stack(means).mean(0))
        torch.testing.assert_close(m.bn.running_var, torch.stack(variances).mean(0))
