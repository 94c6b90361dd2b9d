"""The freezer's decisions on synthetic gradients, and GAQAT's frozen updates on tiny models."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import (
    TinyConvBN,
    TinyMLP,
    capture_grads,
    closure_for,
    make,
    pass_counter,
    record_components,
    reference_grads,
)
from torch import nn

from gaqat.freezing import GAQAT, Freezer


def run_windows(freezer, task_values, window):
    """Feed one task-gradient value per window (repeated, or alternating if negative)."""
    zeros = {name: torch.zeros(()) for name in freezer.step_sizes}
    for value in task_values:
        for i in range(window):
            g = value if value >= 0 else (1.0 if i % 2 else -1.0)
            freezer.observe({name: torch.tensor(g) for name in freezer.step_sizes}, zeros)


def scalar_freezer(**kwargs):
    return Freezer({"s": nn.Parameter(torch.tensor(1.0))}, window=4, **kwargs)


def test_nothing_freezes_during_the_warm_up_window():
    freezer = scalar_freezer(tau=0.3)
    run_windows(freezer, [1.0], window=4)
    assert freezer.frozen == set()
    records = freezer.pop_records()
    assert [r["kind"] for r in records] == ["window"] and records[0]["d_task"] == 0.0
    run_windows(freezer, [1.0], window=4)
    assert freezer.frozen == {"s"}
    assert freezer.pop_records()[-1] == {
        "kind": "freeze",
        "step": 8,
        "name": "s",
        "d_task": 0.0,
        "d_smooth": 0.0,
    }


def test_longer_warm_up_and_orderly_windows_that_stay_unfrozen():
    freezer = scalar_freezer(tau=0.3, warmup_windows=2)
    run_windows(freezer, [1.0, 1.0, -1.0], window=4)
    assert freezer.frozen == set()
    run_windows(freezer, [1.0], window=4)
    assert freezer.frozen == {"s"}


@pytest.mark.parametrize("unfreeze", [False, True])
def test_unfreezing_happens_only_when_enabled(unfreeze):
    freezer = scalar_freezer(tau=0.3, unfreeze=unfreeze)
    run_windows(freezer, [1.0, 1.0, -1.0], window=4)
    kinds = [r["kind"] for r in freezer.pop_records() if r["kind"] != "window"]
    assert kinds == (["freeze", "unfreeze"] if unfreeze else ["freeze"])
    assert freezer.frozen == (set() if unfreeze else {"s"})


def test_window_records_say_whether_the_step_size_was_frozen_during_the_window():
    freezer = scalar_freezer(tau=0.3)
    run_windows(freezer, [1.0, 1.0, 1.0], window=4)
    windows = [r for r in freezer.pop_records() if r["kind"] == "window"]
    assert [(r["window"], r["step"], r["frozen"]) for r in windows] == [
        (1, 4, False),
        (2, 8, False),
        (3, 12, True),
    ]


def test_a_disorder_equal_to_tau_does_not_freeze():
    """7 flips in 20 transitions is D = 0.35 exactly, not float32's 0.3499999940."""
    freezer = Freezer({"s": nn.Parameter(torch.tensor(1.0))}, tau=0.35, window=21, warmup_windows=0)
    signs = [(-1.0) ** min(i, 7) for i in range(21)]  # alternates for 7 transitions, then holds
    for sign in signs:
        freezer.observe({"s": torch.tensor(sign)}, {"s": torch.tensor(0.0)})
    assert [(r["kind"], r["d_task"]) for r in freezer.pop_records()] == [("window", 0.35)]
    assert freezer.frozen == set()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 1.5}, "tau"),
        ({"mode": "some"}, "mode"),
        ({"warmup_windows": -1}, "warmup"),
        ({"metric": "kl"}, "metric"),
    ],
)
def test_bad_freezer_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scalar_freezer(**kwargs)


def gaqat_for(model, mode="task", lr=1e-3, window=2):
    """Adam and GAQAT(ρ = 0.5, α = 0.01) with a freezer that freezes at the first chance (τ = 1)."""
    base = torch.optim.Adam(model.parameters(), lr=lr)
    freezer = Freezer(model.step_sizes(), tau=1.0, window=window, mode=mode)
    return base, GAQAT(base, model, freezer, rho=0.5, alpha=0.01)


def test_frozen_step_sizes_get_half_g_smooth_and_the_rest_the_sagm_gradient():
    model, x, y = make(TinyMLP)
    base, opt = gaqat_for(model)
    seen = capture_grads(base)
    handed = record_components(opt.freezer)
    closure = closure_for(model, x, y)
    for _ in range(4):  # warm-up window, then a window whose end freezes (τ = 1)
        opt.step(closure)
    assert opt.freezer.frozen == {"w_scale", "a_scale"}
    g, g_p = reference_grads(model, x, y, rho=0.5, alpha=0.01)
    opt.step(closure)
    for name, p in model.step_sizes().items():
        assert torch.equal(seen[p], 0.5 * handed[-1][1][name])
        torch.testing.assert_close(seen[p], 0.5 * (g_p[p] - g[p]), rtol=0, atol=1e-10)
    for p in (model.fc1.weight, model.fc2.bias):
        torch.testing.assert_close(seen[p], 0.5 * (g[p] + g_p[p]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["all", "task"])
def test_frozen_step_size_keeps_its_value_bit_for_bit_only_in_mode_all(mode):
    """Under Adam, mode "task" still moves a frozen step size along ½·g_smooth."""
    model, x, y = make(TinyConvBN)
    _, opt = gaqat_for(model, mode=mode, lr=1e-2)
    closure = closure_for(model, x, y)
    for _ in range(4):
        opt.step(closure)
    assert opt.freezer.frozen == {"w_scale"}
    value, weight = model.w_scale.detach().clone(), model.conv.weight.detach().clone()
    for _ in range(3):
        opt.step(closure)
    assert torch.equal(model.w_scale, value) == (mode == "all")
    assert not torch.equal(model.conv.weight, weight)


def test_gaqat_records_are_json_ready_and_counted_in_steps():
    model, x, y = make(TinyMLP)
    _, opt = gaqat_for(model)
    for _ in range(4):
        opt.step(closure_for(model, x, y))
    records = opt.freezer.pop_records()
    assert {(r["kind"], r["step"], r["name"]) for r in records} == {
        ("window", 2, "w_scale"),
        ("window", 2, "a_scale"),
        ("window", 4, "w_scale"),
        ("window", 4, "a_scale"),
        ("freeze", 4, "w_scale"),
        ("freeze", 4, "a_scale"),
    }
    assert all(type(v) in (str, int, float, bool) for r in records for v in r.values())
    assert opt.freezer.pop_records() == []


def test_gaqat_state_dict_round_trip_resumes_mid_window_identically():
    model, x, y = make(TinyMLP)
    _, opt = gaqat_for(model, window=3)
    closure = closure_for(model, x, y)
    for _ in range(4):  # one warm-up window and one step of the next
        opt.step(closure)
    opt.freezer.pop_records()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = copy.deepcopy(model)
    twin.load_state_dict(saved["model"])
    _, twin_opt = gaqat_for(twin, window=3)
    twin_opt.load_state_dict(saved["optimizer"])
    for _ in range(5):
        opt.step(closure)
        twin_opt.step(closure_for(twin, x, y))
    records = opt.freezer.pop_records()
    assert any(r["kind"] == "freeze" for r in records)
    assert records == twin_opt.freezer.pop_records()
    assert opt.freezer.frozen == twin_opt.freezer.frozen
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_gaqat_makes_exactly_two_forward_and_two_backward_passes_per_step():
    model, x, y = make(TinyConvBN)
    counts = pass_counter(model)
    _, opt = gaqat_for(model)
    for _ in range(5):  # across a freeze decision
        opt.step(closure_for(model, x, y))
    assert opt.freezer.frozen and counts == {"forward": 10, "backward": 10}


def test_only_the_given_step_sizes_are_frozen():
    model, x, y = make(TinyMLP)
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = GAQAT(base, model, Freezer({"a_scale": model.a_scale}, tau=1.0, window=2))
    for _ in range(4):
        opt.step(closure_for(model, x, y))
    assert opt.freezer.frozen == {"a_scale"}


@pytest.mark.parametrize("per_channel", [False, True])
def test_gaqat_on_a_quantized_small_cnn_logs_and_freezes_every_step_size(per_channel):
    from gaqat.models import ModelConfig, build_model
    from gaqat.prepare import quantize_model
    from gaqat.quant import QuantConfig, step_sizes

    torch.manual_seed(0)
    model = quantize_model(
        build_model(ModelConfig(num_classes=3)),
        QuantConfig(weight_bits=4, act_bits=4, per_channel=per_channel),
    )
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    sizes = step_sizes(model)
    freezer = Freezer(sizes, tau=1.0, window=2, mode="all")
    handed = record_components(freezer)
    opt = GAQAT(torch.optim.Adam(model.parameters(), lr=1e-3), model, freezer)
    closure = closure_for(model, x, y)
    for _ in range(4):
        opt.step(closure)
    records = opt.freezer.pop_records()
    assert {r["name"] for r in records if r["kind"] == "window"} == set(sizes)
    assert all(0.0 <= r["d_task"] <= 1.0 for r in records if r["kind"] == "window")
    assert {name: g.shape for name, g in handed[-1][1].items()} == {
        n: p.shape for n, p in sizes.items()
    }
    frozen = {name: sizes[name].detach().clone() for name in opt.freezer.frozen}
    assert frozen
    opt.step(closure)
    assert all(torch.equal(sizes[name], value) for name, value in frozen.items())


@pytest.mark.parametrize("reset", [False, True])
def test_freezing_can_forget_the_step_sizes_adam_momentum(reset):
    """With ``reset_momentum`` a step size that freezes starts its first moment afresh at
    that step: Adam's exp_avg is then (1 − β1)·½·g_smooth, not β1·m + (1 − β1)·½·g_smooth.
    Its second moment, and every other parameter's state, are left alone."""
    model, x, y = make(TinyMLP)
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    freezer = Freezer(model.step_sizes(), tau=1.0, window=2)
    opt = GAQAT(base, model, freezer, rho=0.5, alpha=0.01, reset_momentum=reset)
    seen = capture_grads(base)
    closure = closure_for(model, x, y)
    for _ in range(3):  # the warm-up window, then the first step of the deciding one
        opt.step(closure)
    before = {name: base.state[p]["exp_avg"].clone() for name, p in freezer.step_sizes.items()}
    opt.step(closure)  # closes the window: every step size freezes at this step
    assert freezer.frozen == set(freezer.step_sizes)
    beta1 = base.param_groups[0]["betas"][0]
    for name, param in freezer.step_sizes.items():
        grad = seen[param]  # the frozen gradient, ½·g_smooth
        old = torch.zeros_like(before[name]) if reset else before[name] * beta1
        expected = old + (1 - beta1) * grad
        torch.testing.assert_close(base.state[param]["exp_avg"], expected, rtol=1e-6, atol=1e-12)
