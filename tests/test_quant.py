"""LSQ quantizer: torch-exact forward, LSQ gradients, positivity, model preparation."""

import dataclasses
import io
import json
import math
import warnings

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gaqat.prepare import quantize_model
from gaqat.quant import (
    MIN_STEP,
    LsqQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    check_optimizer,
    check_step_sizes,
    lsq_quantize,
    quantizers,
    step_sizes,
)
from gaqat.quant import _lsq_traceable as lsq_traceable

FAST = settings(max_examples=40, deadline=None)
bits_st = st.integers(2, 8)
# The autograd Function eager mode runs, and the plain-ops form torch.compile traces.
implementations = pytest.mark.parametrize(
    "quantize", [lsq_quantize, lsq_traceable], ids=["function", "traceable"]
)


pytestmark = pytest.mark.usefixtures("one_thread")


def grid_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def sample(seed, shape, spread, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype) * spread


def closed_form(x, scale, q_min, q_max, grad, grad_scale):
    """docs/method.md §2 written out element by element (float64), reduced to scale's shape."""
    y = x / scale
    inside = (y > q_min) & (y < q_max)
    d_scale = torch.where(
        y <= q_min, float(q_min), torch.where(y >= q_max, float(q_max), torch.round(y) - y)
    )
    return grad * inside, (grad * d_scale).sum_to_size(scale.shape) * grad_scale


@implementations
@FAST
@given(
    seed=st.integers(0, 2**16),
    bits=bits_st,
    signed=st.booleans(),
    scale=st.floats(1e-3, 10.0),
    spread=st.floats(0.01, 50.0),
)
def test_forward_equals_torch_learnable_fake_quant(quantize, seed, bits, signed, scale, spread):
    q_min, q_max = grid_range(bits, signed)
    s = torch.tensor([scale])
    x = sample(seed, (257,), spread)
    ties = (torch.arange(q_min - 2, q_max + 3, dtype=torch.float32) + 0.5) * s  # midpoints
    x = torch.cat([x, ties, torch.arange(q_min - 1, q_max + 2) * s])
    ref = torch._fake_quantize_learnable_per_tensor_affine(x, s, torch.zeros(1), q_min, q_max, 1.0)
    assert torch.equal(quantize(x, s, q_min, q_max, 1.0), ref)


@implementations
@FAST
@given(
    seed=st.integers(0, 2**16),
    bits=bits_st,
    signed=st.booleans(),
    per_channel=st.booleans(),
    grad_scale=st.floats(1e-3, 1.0),
)
def test_gradients_follow_lsq_closed_form(quantize, seed, bits, signed, per_channel, grad_scale):
    q_min, q_max = grid_range(bits, signed)
    gen = torch.Generator().manual_seed(seed)
    scale_shape = (3, 1, 1, 1) if per_channel else (1,)
    scale = torch.rand(scale_shape, generator=gen, dtype=torch.float64) + 0.05
    x = sample(seed, (3, 2, 4, 4), 2.0**bits * 0.3, torch.float64) * scale
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x_leaf, s_leaf = x.clone().requires_grad_(), scale.clone().requires_grad_()
    quantize(x_leaf, s_leaf, q_min, q_max, grad_scale).backward(grad)
    want_x, want_s = closed_form(x, scale, q_min, q_max, grad, grad_scale)
    torch.testing.assert_close(x_leaf.grad, want_x)
    torch.testing.assert_close(s_leaf.grad, want_s, rtol=1e-9, atol=1e-9)


@implementations
def test_float32_step_size_gradient_is_accurate_on_a_large_tensor(quantize):
    """The dot-product form of dL/ds must not lose precision at activation sizes."""
    x = sample(0, (8, 16, 32, 32), 1.0).relu()
    grad = sample(1, x.shape, 1.0)
    s = torch.tensor([0.05], requires_grad=True)
    quantize(x, s, 0, 15, 1e-3).backward(grad)
    _, want = closed_form(x.double(), s.detach().double(), 0, 15, grad.double(), 1e-3)
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-4, atol=1e-6)


@implementations
def test_boundaries_use_lsq_convention_not_torchs(quantize):
    s = torch.tensor([0.25], requires_grad=True)
    x = torch.tensor([-2.0, 1.75, 1.8, -2.1, 0.6], requires_grad=True)  # y = -8, 7, 7.2, -8.4, 2.4
    quantize(x, s, -8, 7, 1.0).backward(torch.ones(5))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]  # torch's op passes 1 at y = -8 and 7
    torch.testing.assert_close(s.grad, torch.tensor([-8 + 7 + 7 - 8 + (2 - 2.4)]))


@implementations
@FAST
@given(seed=st.integers(0, 2**16), bits=bits_st, signed=st.booleans(), per_channel=st.booleans())
def test_outputs_lie_on_the_grid(quantize, seed, bits, signed, per_channel):
    q_min, q_max = grid_range(bits, signed)
    x = sample(seed, (4, 300), 3.0)
    scale = torch.tensor([[0.1], [0.3], [0.05], [1.0]]) if per_channel else torch.tensor([0.2])
    out = quantize(x, scale, q_min, q_max, 1.0)
    levels = out / scale
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.min() >= q_min - 1e-4 and levels.max() <= q_max + 1e-4
    for row in out.reshape(4 if per_channel else 1, -1):
        assert row.unique().numel() <= 2**bits


def test_weight_quantizer_initialises_from_weights_and_scales_gradient_per_channel():
    w = sample(0, (6, 3, 3, 3), 0.1)
    q = LsqQuantizer(4, signed=True, per_channel=True, weight_shape=w.shape)
    assert q.scale.shape == (6, 1, 1, 1) and not q.initialized
    q(w)
    want = 2 * w.abs().mean((1, 2, 3), keepdim=True) / math.sqrt(7)
    torch.testing.assert_close(q.scale.data, want)
    grad = sample(1, w.shape, 1.0)
    q(w).backward(grad)
    _, want = closed_form(
        w.double(), q.scale.detach().double(), -8, 7, grad.double(), 1 / math.sqrt(27 * 7)
    )
    torch.testing.assert_close(q.scale.grad.double(), want, rtol=1e-4, atol=1e-7)
    assert LsqQuantizer(4, True, per_channel=True, weight_shape=(5, 8)).scale.shape == (5, 1)


@pytest.mark.parametrize("shift, signed", [(0.0, False), (-0.01, True)])
def test_activation_quantizer_picks_signedness_on_first_batch(shift, signed):
    q = LsqQuantizer(4, signed=None)
    with pytest.raises(RuntimeError, match="first batch"):
        _ = q.q_max
    x = sample(0, (2, 5, 4), 1.0).abs()
    x[0, 0, 0] = shift
    q(x)
    assert q.signed is signed and q.initialized
    assert q.q_max == (7 if signed else 15)
    torch.testing.assert_close(q.scale.data, 2 * x.abs().mean().reshape(1) / math.sqrt(q.q_max))
    first = q.scale.detach().clone()
    q(x * 10 - 5)  # no re-initialisation, no change of sign
    assert torch.equal(q.scale.detach(), first) and q.signed is signed


def test_activation_gradient_scale_uses_one_sample_not_the_batch():
    x = sample(0, (4, 3, 5), 1.0).abs()
    grads = []
    for batch in (x, x.repeat(3, 1, 1)):
        q = LsqQuantizer(4, signed=None)
        q(batch).sum().backward()
        grads.append(q.scale.grad)
    # 3x the batch gives 3x the summed gradient: N (one sample's 15 features) is unchanged.
    torch.testing.assert_close(grads[1], 3 * grads[0])


@pytest.mark.parametrize("hostile", [0.0, -0.5])
def test_step_size_stays_positive_and_recovers_after_hostile_update(hostile):
    q = LsqQuantizer(4, signed=None)
    x = sample(0, (8, 20), 1.0).abs()
    q(x)
    optimizer = torch.optim.SGD(q.parameters(), lr=1e-2)
    with torch.no_grad():
        q.scale.fill_(hostile)
    model = nn.Sequential(q)
    with pytest.warns(RuntimeWarning, match="floored"):
        assert check_step_sizes(model) == ["0"]
    out = q(x)
    assert torch.isfinite(out).all() and (out >= 0).all()
    ((q(x) - x) ** 2).sum().backward()
    assert q.scale.grad.item() < 0  # the gradient still reaches the step size and pushes it up
    optimizer.step()
    assert q.scale.item() > MIN_STEP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_step_sizes(model) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("step", [-1e3, -0.75, -0.25, -1e-9, 0.0, 1e-9, 1e-8, 0.3])
def test_both_forms_floor_any_step_size_alike(step, dtype):
    """Negative and sub-floor step sizes, where ``s + (max(s, floor) - s)`` is not exact:
    the traceable form gives the Function's outputs and step-size gradients bit for bit."""
    x = sample(1, (64,), 1e-7, dtype)
    results = []
    for quantize in (lsq_quantize, lsq_traceable):
        s = torch.tensor([step], dtype=dtype, requires_grad=True)
        xi = x.clone().requires_grad_()
        out = quantize(xi, s, -8, 7, 0.5)
        out.backward(torch.linspace(-1, 1, 64, dtype=dtype))
        results.append((out.detach(), xi.grad, s.grad))
    for eager, traced in zip(*results):
        assert torch.isfinite(traced).all()
        torch.testing.assert_close(traced, eager, rtol=1e-6, atol=0)
    assert torch.equal(results[0][0], results[1][0])  # the forward, exactly


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5)


def layer_types(model):
    return {
        name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def test_quantize_resnet18_keeps_parameters_and_first_last_float():
    model = resnet18()
    before = layer_types(model)
    params = {name: p for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    quantize_model(model, QuantConfig())
    assert torch.equal(rng, torch.get_rng_state())  # no re-initialisation of anything
    after = layer_types(model)
    assert after.keys() == before.keys()
    assert after.pop("conv1") is nn.Conv2d and after.pop("fc") is nn.Linear
    assert set(after.values()) == {QuantConv2d}  # every other conv, downsample included
    for name, p in model.named_parameters():
        if not name.endswith(".scale"):
            assert p is params[name]
    assert len(quantizers(model)) == 2 * 19 and set(step_sizes(model)) == set(quantizers(model))
    assert (
        step_sizes(model)["layer1.0.conv1.weight_quantizer"]
        is model.layer1[0].conv1.weight_quantizer.scale
    )


@pytest.mark.parametrize("policy, bits", [("int8", 8), ("same", 3)])
def test_first_last_policy_and_skip(policy, bits):
    model = quantize_model(
        resnet18(),
        QuantConfig(3, 3, per_channel=True, first_last=policy, skip=("layer4", "layer1.0.conv2")),
    )
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    for layer in (model.conv1, model.fc):
        assert layer.weight_quantizer.bits == layer.input_quantizer.bits == bits
    assert model.layer1[0].conv1.weight_quantizer.bits == 3
    assert model.fc.weight_quantizer.scale.shape == (5, 1)
    assert type(model.layer1[0].conv2) is nn.Conv2d
    assert not any(isinstance(m, QuantConv2d) for m in model.layer4.modules())


def test_quantized_resnet18_trains():
    model = quantize_model(resnet18(), QuantConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    check_optimizer(optimizer, model)
    x, y = sample(0, (4, 3, 16, 16), 1.0), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(q.initialized for q in quantizers(model).values())
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in step_sizes(model).values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_step_sizes_take_the_dtype_of_their_layer(dtype):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)).to(dtype)
    quantize_model(model, QuantConfig(first_last="same"))
    assert {s.dtype for s in step_sizes(model).values()} == {dtype}


@pytest.mark.parametrize("per_channel", [False, True])
def test_float64_model_gets_float64_step_size_gradients(per_channel):
    """A float32 step size would round its gradient to float32 (relative error ~1e-8)."""
    torch.manual_seed(0)
    layer = quantize_model(
        nn.Sequential(nn.Linear(5, 4)).double(),
        QuantConfig(first_last="same", per_channel=per_channel),
    )[0]
    x, grad = sample(0, (6, 5), 1.0, torch.float64), sample(1, (6, 4), 1.0, torch.float64)
    layer(x).backward(grad)
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    w_hat = wq.codes(layer.weight) * wq.step_size()
    x_hat = aq.codes(x) * aq.step_size()
    # (quantizer, its input, dL/d(its output), N of its gradient scale)
    for q, v, upstream, n in (
        (wq, layer.weight, grad.T @ x_hat, 5 if per_channel else 20),
        (aq, x, grad @ w_hat, 5),
    ):
        _, want = closed_form(
            v.detach(), q.scale.detach(), q.q_min, q.q_max, upstream, 1 / math.sqrt(n * q.q_max)
        )
        torch.testing.assert_close(q.scale.grad, want, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_keeps_scales_and_flags():
    config = QuantConfig(per_channel=True)
    model = quantize_model(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)
        ),
        config,
    )
    model(sample(0, (2, 3, 5, 5), 1.0))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = quantize_model(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)
        ),
        config,
    )
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    original = quantizers(model)
    for name, q in quantizers(clone).items():
        assert q.initialized and q.signed == original[name].signed
        assert torch.equal(q.scale, original[name].scale)
    scales = {name: s.detach().clone() for name, s in step_sizes(clone).items()}
    clone(sample(1, (2, 3, 5, 5), 5.0) - 3)  # a different batch must not re-initialise
    assert all(torch.equal(s, scales[name]) for name, s in step_sizes(clone).items())


def test_check_optimizer_catches_an_optimizer_built_too_early():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    early = torch.optim.Adam(model.parameters())
    quantize_model(model, QuantConfig())
    with pytest.raises(ValueError, match="build the optimizer after quantize_model"):
        check_optimizer(early, model)
    check_optimizer(torch.optim.Adam(model.parameters()), model)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"act_bits": "4"}, "act_bits"),
        ({"act_bits": True}, "act_bits"),
        ({"per_channel": "yes"}, "per_channel"),
        ({"first_last": "fp16"}, "first_last"),
        ({"skip": "fc"}, "skip"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"QuantConfig.{field}"):
        QuantConfig(**kwargs)


def test_config_round_trips_through_asdict_and_json():
    config = QuantConfig(3, 5, True, "int8", ("fc",))
    assert QuantConfig(**dataclasses.asdict(config)) == config
    assert QuantConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_quantize_model_rejects_unknown_skip_and_double_quantization():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="QuantConfig.skip.*nope"):
        quantize_model(model, QuantConfig(skip=("nope",)))
    quantize_model(model, QuantConfig(first_last="same"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, QuantConfig())
    with pytest.raises(ValueError, match="LsqQuantizer.bits"):
        LsqQuantizer(12, signed=True)
    with pytest.raises(ValueError, match="weight_shape"):
        LsqQuantizer(4, signed=None, per_channel=True)


@pytest.mark.parametrize("per_channel", [False, True])
def test_evaluation_path_without_autograd_gives_the_same_values(per_channel):
    torch.manual_seed(3)
    quantizer = LsqQuantizer(3, signed=True, per_channel=per_channel, weight_shape=(4, 5))
    x = torch.randn(4, 5)
    with_grad = quantizer(x)
    with torch.no_grad():
        assert torch.equal(quantizer(x), with_grad)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_quantized_linear_evaluates_with_the_integer_kernels_arithmetic(per_channel):
    """Eval without autograd: (sum of code products, exact, + int32 bias codes) · s_x·s_w,
    as onnxruntime's QGemm computes it, so equal integer scores give equal outputs (a
    float sum of scaled values rounds them apart); training keeps the fake-quant form."""
    torch.manual_seed(0)
    layer = QuantLinear(64, 6, weight_bits=8, act_bits=8, per_channel=per_channel)
    with torch.no_grad():
        layer.weight[3] = layer.weight[1]  # rows 1 and 3: the same codes, the same bias
        layer.bias[3] = layer.bias[1]
    x = torch.rand(16, 64) * 3
    trained = layer(x)  # initialises the step sizes; the fake-quant form
    assert torch.equal(
        trained,
        F.linear(layer.input_quantizer(x), layer.weight_quantizer(layer.weight), layer.bias),
    )
    layer.eval()
    with torch.no_grad():
        out = layer(x)
        sx, sw = layer.input_quantizer.step_size(), layer.weight_quantizer.step_size()
        codes = (
            layer.input_quantizer.codes(x).double()
            @ layer.weight_quantizer.codes(layer.weight).double().T
        )
        step = sx.reshape(()) * sw.flatten()
        bias = torch.round(layer.bias / step).double()  # the int32 codes, as exported
        assert torch.equal(out, (codes + bias).float() * step)
        assert torch.equal(out[:, 1], out[:, 3])
        fake = F.linear(
            layer.input_quantizer(x),
            layer.weight_quantizer(layer.weight),
            layer.quantized_bias(layer.bias),
        )
        assert torch.allclose(out, fake, rtol=0, atol=1e-5)
    with torch.enable_grad():  # eval mode with autograd (a sharpness probe): fake-quant
        assert torch.equal(layer(x), fake)
