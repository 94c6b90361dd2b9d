"""SAM, SAGM and GAQAT's step against a hand-computed two-pass step, in float64 on tiny models.

The models (helpers.TinyMLP, TinyConvBN) carry extra scalar and per-channel parameters
that play the role of LSQ step sizes, so the optimizers are tested without gaqat.quant.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TinyConvBN,
    TinyDropout,
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
from gaqat.optim import SAGM, SAM

torch.set_num_threads(1)


@pytest.mark.parametrize("model_cls", [TinyMLP, TinyConvBN])
@pytest.mark.parametrize(
    "wrapper, kwargs, final",
    [
        (SAGM, {"rho": 0.5, "alpha": 0.01}, lambda g, g_p: 0.5 * (g + g_p)),
        (SAM, {"rho": 0.5}, lambda g, g_p: g_p),
    ],
)
def test_the_base_optimizer_gets_the_hand_computed_gradient(model_cls, wrapper, kwargs, final):
    model, x, y = make(model_cls)
    g, g_p = reference_grads(model, x, y, rho=0.5, alpha=kwargs.get("alpha", 0.0))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = capture_grads(base)
    wrapper(base, model, **kwargs).step(closure_for(model, x, y))
    assert set(seen) == set(model.parameters())
    for p in model.parameters():
        torch.testing.assert_close(seen[p], final(g[p], g_p[p]), rtol=0, atol=1e-10)


def test_components_split_the_two_passes_of_the_named_parameters():
    model, x, y = make(TinyMLP)
    g, g_p = reference_grads(model, x, y, rho=0.5, alpha=0.01)
    opt = SAGM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5, alpha=0.01)
    g_task, g_smooth = opt.two_passes(closure_for(model, x, y)).components(model.step_sizes())
    for name, p in model.step_sizes().items():
        torch.testing.assert_close(g_task[name], g[p], rtol=0, atol=1e-10)
        torch.testing.assert_close(g_smooth[name], g_p[p] - g[p], rtol=0, atol=1e-10)


def test_gaqat_hands_the_freezer_the_components_of_the_sagm_gradient():
    model, x, y = make(TinyMLP)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = capture_grads(base)
    freezer = Freezer(model.step_sizes(), tau=0.0, window=2)
    handed = record_components(freezer)
    GAQAT(base, model, freezer, rho=0.5, alpha=0.01).step(closure_for(model, x, y))
    ((g_task, g_smooth),) = handed
    for name, p in model.step_sizes().items():
        torch.testing.assert_close(g_task[name] + 0.5 * g_smooth[name], seen[p], rtol=0, atol=1e-12)


def test_parameters_are_restored_bit_for_bit():
    model, x, y = make(TinyConvBN)
    before = [p.detach().clone() for p in model.parameters()]
    SAGM(torch.optim.SGD(model.parameters(), lr=0.0), model, rho=3.0).step(closure_for(model, x, y))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_parameters_are_restored_when_the_perturbed_pass_raises():
    model, x, y = make(TinyConvBN)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(len(calls))
        loss = F.cross_entropy(model(x), y)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the perturbed pass")
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="perturbed pass"):
        SAGM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=3.0).step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert model.bn.track_running_stats


# Each two-pass optimizer at ρ = α = 0, where the perturbed pass runs at θ itself.
AT_ZERO_RADIUS = {
    "SAM": lambda base, model, **kw: SAM(base, model, rho=0.0, **kw),
    "SAGM": lambda base, model, **kw: SAGM(base, model, rho=0.0, alpha=0.0, **kw),
    "GAQAT": lambda base, model, **kw: GAQAT(
        base, model, Freezer(model.step_sizes(), tau=0.0, window=2), rho=0.0, alpha=0.0, **kw
    ),
}


@pytest.mark.parametrize("rng", ["replay", "fresh"])
@pytest.mark.parametrize("wrapper", AT_ZERO_RADIUS)
def test_replayed_dropout_masks_make_a_zero_radius_step_a_plain_gradient_step(wrapper, rng):
    model, x, y = make(TinyDropout)
    closure = closure_for(model, x, y)
    torch.manual_seed(1)
    closure()
    plain = {p: p.grad.clone() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = capture_grads(base)
    opt = AT_ZERO_RADIUS[wrapper](base, model, perturbed_pass_rng=rng)
    torch.manual_seed(1)
    opt.step(closure)
    assert all(torch.equal(seen[p], plain[p]) for p in model.parameters()) == (rng == "replay")


@pytest.mark.parametrize("rng", ["replay", "fresh"])
def test_replayed_dropout_masks_make_g_smooth_exactly_zero_at_zero_radius(rng):
    """With fresh masks g_smooth = g_p − g would be dropout noise, not curvature."""
    model, x, y = make(TinyDropout)
    opt = SAGM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        rho=0.0,
        alpha=0.0,
        perturbed_pass_rng=rng,
    )
    _, g_smooth = opt.two_passes(closure_for(model, x, y)).components(model.step_sizes())
    assert (not any(g.any() for g in g_smooth.values())) == (rng == "replay")


def test_bn_running_stats_move_as_after_one_plain_forward():
    model, x, y = make(TinyConvBN)
    plain = copy.deepcopy(model)
    plain(x)
    SAGM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5).step(closure_for(model, x, y))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.bn, name), getattr(plain.bn, name)), name
    assert model.bn.track_running_stats


def test_only_the_given_models_batch_norm_is_left_alone():
    """The context is scoped to the optimizer's model: other modules' statistics move as usual."""
    model, x, y = make(TinyConvBN)
    other = nn.BatchNorm1d(3).double()

    def closure():
        loss = F.cross_entropy(model(x), y) + other(model(x)).sum() * 0
        loss.backward()
        return loss

    SAGM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5).step(closure)
    assert model.bn.num_batches_tracked == 2  # two forwards in the first pass, none in the second
    assert other.num_batches_tracked == 2  # one forward in each pass


def test_the_model_must_be_given():
    model, _, _ = make(TinyMLP)
    with pytest.raises(ValueError, match="model must be the nn.Module"):
        SAGM(torch.optim.SGD(model.parameters(), lr=0.1), 0.05)


def test_instance_norm_with_running_stats_is_refused():
    model = nn.Sequential(
        nn.Conv2d(2, 2, 1),
        nn.InstanceNorm2d(2, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    x, y = torch.randn(3, 2, 2, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="InstanceNorm2d"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), model).step(closure_for(model, x, y))


@pytest.mark.parametrize("wrapper", [SAM, SAGM])
def test_exactly_two_forward_and_two_backward_passes_per_step(wrapper):
    model, x, y = make(TinyConvBN)
    counts = pass_counter(model)
    opt = wrapper(torch.optim.Adam(model.parameters(), lr=1e-3), model)
    for _ in range(3):
        opt.step(closure_for(model, x, y))
    assert counts == {"forward": 6, "backward": 6}


def test_state_dict_round_trip_continues_identically():
    model, x, y = make(TinyMLP)
    opt = SAGM(torch.optim.Adam(model.parameters(), lr=1e-2), model, rho=0.1)
    for _ in range(3):
        opt.step(closure_for(model, x, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = TinyMLP().double()
    twin.load_state_dict(saved["model"])
    twin_opt = SAGM(torch.optim.Adam(twin.parameters(), lr=1e-2), twin, rho=0.1)
    twin_opt.load_state_dict(saved["optimizer"])
    assert twin_opt.param_groups is twin_opt.base_optimizer.param_groups
    assert twin_opt.state is twin_opt.base_optimizer.state
    for _ in range(2):
        opt.step(closure_for(model, x, y))
        twin_opt.step(closure_for(twin, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_scheduler_on_the_wrapper_drives_the_base_learning_rate():
    model, x, y = make(TinyMLP)
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = SAGM(base, model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(closure_for(model, x, y))
    scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_parameter_without_gradient_at_theta_is_not_stepped():
    model, x, y = make(TinyMLP)
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    base = torch.optim.Adam([*model.parameters(), unused], lr=1e-2)
    SAGM(base, model).step(closure_for(model, x, y))
    assert unused.grad is None and torch.equal(unused, torch.ones(2, dtype=torch.float64))


def test_bfloat16_autocast_inside_the_closure_trains():
    model, x, y = make(TinyConvBN)
    model.float()
    x = x.float()
    freezer = Freezer(model.step_sizes(), tau=0.0, window=2)
    handed = record_components(freezer)
    opt = GAQAT(torch.optim.SGD(model.parameters(), lr=0.1), model, freezer)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = model.w_scale.detach().clone()
    opt.step(closure)
    assert model.w_scale.dtype == torch.float32 and not torch.equal(model.w_scale, before)
    assert handed[0][1]["w_scale"].dtype == torch.float32


def test_fp16_grad_scaler_is_refused_with_a_clear_error():
    model, x, y = make(TinyMLP)
    opt = SAGM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    closure = closure_for(model, x, y)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="GradScaler.*bfloat16"):
        scaler.step(opt, closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    torch.amp.GradScaler("cpu", enabled=False).step(opt, closure)  # a disabled scaler just steps
    opt.step(closure)  # and the optimizer is still usable without one


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1}, "rho"),
        ({"alpha": float("nan")}, "alpha"),
        ({"perturbed_pass_rng": "same"}, "perturbed_pass_rng.*replay"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    model, _, _ = make(TinyMLP)
    with pytest.raises(ValueError, match=match):
        SAGM(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


def test_step_size_outside_the_optimizer_is_refused():
    model, _, _ = make(TinyMLP)
    base = torch.optim.SGD(model.fc1.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'w_scale'.*after quantize_model"):
        GAQAT(base, model, Freezer(model.step_sizes()))


def test_step_without_closure_or_without_backward_is_refused():
    model, x, y = make(TinyMLP)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: F.cross_entropy(model(x), y))
