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

from gaqat.freezing import GAQAT, Freezer, layer_of


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
        ({"scope": "model"}, r"scope: 'model' is not one of \('step_size', 'layer'\)"),
    ],
)
def test_bad_freezer_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scalar_freezer(**kwargs)


# One layer, "f.3", whose weight step size is ordered (+0.1 throughout: D_task = 0) and whose
# input step size flips twice in three transitions (D_task = 2/3): the layer's mean is 1/3.
# (D of their summed gradient, 1.1, -0.9, 1.1, 1.1, would be 2/3.) A second layer, "f.6",
# alternates in both (D_task = 1) and never freezes.
LAYERED = {
    "f.3.weight_quantizer": [0.1, 0.1, 0.1, 0.1],
    "f.3.input_quantizer": [1.0, -1.0, 1.0, 1.0],
    "f.6.weight_quantizer": [1.0, -1.0, 1.0, -1.0],
    "f.6.input_quantizer": [-1.0, 1.0, -1.0, 1.0],
}
LAYER_D = {"f.3.weight_quantizer": 0.0, "f.3.input_quantizer": 2 / 3}  # their own D_task


def feed(freezer, series, smooth=0.0):
    """One step per position of the per-step-size task-gradient ``series``."""
    for values in zip(*series.values()):
        task = {name: torch.tensor(v) for name, v in zip(series, values)}
        freezer.observe(task, {name: torch.tensor(smooth) for name in series})


def layered_freezer(**kwargs):
    sizes = {name: nn.Parameter(torch.tensor(1.0)) for name in LAYERED}
    return Freezer(sizes, window=4, warmup_windows=0, **kwargs)


@pytest.mark.parametrize(
    "scope, tau, frozen",
    [
        ("step_size", 0.5, {"f.3.weight_quantizer"}),  # 0 < 0.5 <= 2/3
        ("layer", 0.5, {"f.3.weight_quantizer", "f.3.input_quantizer"}),  # 1/3 < 0.5
        ("step_size", 0.3, {"f.3.weight_quantizer"}),
        ("layer", 0.3, set()),  # 1/3 >= 0.3: the ordered step size waits for its layer
    ],
)
def test_layer_scope_decides_on_the_mean_of_the_layers_disorder(scope, tau, frozen):
    freezer = layered_freezer(tau=tau, scope=scope)
    feed(freezer, LAYERED)
    assert freezer.frozen == frozen
    decisions = [r for r in freezer.pop_records() if r["kind"] != "window"]
    assert {(r["kind"], r["step"], r["name"]) for r in decisions} == {
        ("freeze", 4, name) for name in frozen
    }
    if scope == "layer":
        assert {r["name"]: r["d_task"] for r in decisions} == pytest.approx(
            {name: LAYER_D[name] for name in frozen}
        )
        assert all(r["layer"] == "f.3" and r["layer_d_task"] == 1 / 3 for r in decisions)
        assert all(r["layer_d_smooth"] == 0.0 for r in decisions)


def test_layer_scope_unfreezes_the_layer_together():
    """Window 2: the input step size alternates (D = 1), the mean is 0.5 >= τ, and the
    weight step size, still ordered (D = 0), is released with it."""
    freezer = layered_freezer(tau=0.5, scope="layer", unfreeze=True)
    feed(freezer, LAYERED)
    feed(freezer, {**LAYERED, "f.3.input_quantizer": [1.0, -1.0, 1.0, -1.0]})
    decisions = [r for r in freezer.pop_records() if r["kind"] != "window"]
    assert [(r["kind"], r["step"], r["name"], r["layer_d_task"]) for r in decisions] == [
        ("freeze", 4, "f.3.weight_quantizer", 1 / 3),
        ("freeze", 4, "f.3.input_quantizer", 1 / 3),
        ("unfreeze", 8, "f.3.weight_quantizer", 0.5),
        ("unfreeze", 8, "f.3.input_quantizer", 0.5),
    ]
    assert freezer.frozen == set()


@pytest.mark.parametrize("mode", ["task", "all"])
def test_a_frozen_layer_gets_the_frozen_update_in_either_mode(mode):
    freezer = layered_freezer(tau=0.5, scope="layer", mode=mode)
    feed(freezer, LAYERED, smooth=2.0)
    for param in freezer.step_sizes.values():
        param.grad = torch.tensor(7.0)
    freezer.edit_grads({name: torch.tensor(2.0) for name in LAYERED})
    grads = {name: p.grad for name, p in freezer.step_sizes.items()}
    frozen = None if mode == "all" else torch.tensor(1.0)  # ½·g_smooth
    assert grads == {
        "f.3.weight_quantizer": frozen,
        "f.3.input_quantizer": frozen,
        "f.6.weight_quantizer": torch.tensor(7.0),
        "f.6.input_quantizer": torch.tensor(7.0),
    }


def test_step_size_scope_decides_each_step_size_on_its_own_disorder():
    """The default scope against the rule written out: a step size freezes when its own
    D_task < τ, is released (with ``unfreeze``) when it is >= τ again; records as before."""
    generator = torch.Generator().manual_seed(0)
    series = {name: torch.randn(30, generator=generator).tolist() for name in LAYERED}
    freezer = Freezer(
        {name: nn.Parameter(torch.tensor(1.0)) for name in LAYERED},
        tau=0.45,
        window=5,
        unfreeze=True,
    )
    feed(freezer, series)
    records = freezer.pop_records()
    expected, frozen = [], set()
    for r in records:
        if r["kind"] != "window" or r["window"] == 1:
            continue
        if r["name"] not in frozen and r["d_task"] < 0.45:
            frozen.add(r["name"])
            expected.append(("freeze", r["step"], r["name"]))
        elif r["name"] in frozen and r["d_task"] >= 0.45:
            frozen.discard(r["name"])
            expected.append(("unfreeze", r["step"], r["name"]))
    decisions = [r for r in records if r["kind"] != "window"]
    assert [(r["kind"], r["step"], r["name"]) for r in decisions] == expected
    assert {"freeze", "unfreeze"} <= {kind for kind, _, _ in expected}  # both rules exercised
    assert all(set(r) == {"kind", "step", "name", "d_task", "d_smooth"} for r in decisions)
    assert freezer.frozen == frozen


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


@pytest.mark.parametrize(
    "per_channel, scope", [(False, "step_size"), (True, "step_size"), (True, "layer")]
)
def test_gaqat_on_a_quantized_small_cnn_logs_and_freezes_every_step_size(per_channel, scope):
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
    freezer = Freezer(sizes, tau=1.0, window=2, mode="all", scope=scope)
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
    decisions = [r for r in records if r["kind"] == "freeze"]
    layers = {r["name"]: r.get("layer") for r in decisions}
    assert layers == {name: layer_of(name) if scope == "layer" else None for name in frozen}
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


@pytest.mark.parametrize("scope", ["step_size", "layer"])
def test_the_freeze_scope_hyperparameter_reaches_the_freezer(scope):
    from gaqat.algorithms import Algorithm
    from gaqat.hparams import default_hparams
    from gaqat.models import ModelConfig

    hparams = {**default_hparams("gaqat", "digits"), "freeze_scope": scope}
    freezer = Algorithm("gaqat", ModelConfig(), hparams, total_steps=10, bits=4).freezer
    names = list(freezer.step_sizes)
    units = [layer_of(name) for name in names] if scope == "layer" else names
    assert list(freezer.units) == list(dict.fromkeys(units)) and len(freezer.units) > 1
    assert default_hparams("gaqat", "digits")["freeze_scope"] == "step_size"
