"""QAT with batch norm folded into the quantized convolutions (gaqat.bn_folding)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaqat.algorithms import Algorithm, quant_config_for
from gaqat.bn_folding import (
    QuantConvBn2d,
    deployable,
    fold_into_quantized_convs,
    freeze_statistics,
    update_running_statistics,
)
from gaqat.checkpoint import build_network
from gaqat.hparams import default_hparams
from gaqat.models import ModelConfig, build_model
from gaqat.names import ARCHITECTURES, FOLDED_BY_DEFAULT
from gaqat.optim import SAGM, frozen_running_stats
from gaqat.prepare import quantize_model
from gaqat.quant import QuantConfig, QuantConv2d


def folded_small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = quantize_model(build_model(ModelConfig()), QuantConfig(4, 4, fold_batch_norm=True))
    with torch.no_grad():  # statistics and BN parameters away from their identity defaults
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    model.train()(torch.randn(8, 3, 16, 16))  # initialises the quantizers
    return model


def test_each_quantized_conv_takes_the_batch_norm_after_it():
    model = folded_small_cnn()
    folded = {n for n, m in model.named_modules() if isinstance(m, QuantConvBn2d)}
    assert folded == {"featurizer.3", "featurizer.6", "featurizer.9"}  # the first conv is float
    assert type(model.featurizer[1]) is nn.BatchNorm2d  # its BN stays
    assert all(type(model.featurizer[i]) is nn.Identity for i in (4, 7, 10))
    # A checkpoint's configs rebuild the same structure, so its state dict loads.
    configs = ModelConfig().to_dict(), {**QuantConfig(4, 4, fold_batch_norm=True).__dict__}
    build_network(*configs).load_state_dict(model.state_dict())


def test_live_statistics_normalise_like_the_unfolded_pair():
    """Training: BN with the batch's statistics after the conv with Q(W f) / f."""
    layer = folded_small_cnn().featurizer[3]
    reference_bn = copy.deepcopy(layer.bn)
    x = torch.randn(8, 32, 16, 16).relu()
    out = layer(x)
    conv, bn = layer.conv, reference_bn
    factor = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight_quantizer(conv.weight * factor.view(-1, 1, 1, 1))
    y = conv._conv_forward(conv.input_quantizer(x), weight / factor.view(-1, 1, 1, 1), None)
    torch.testing.assert_close(out, bn(y), rtol=1e-4, atol=1e-5)
    layer.update_running_statistics()  # after the step: the running statistics move
    torch.testing.assert_close(layer.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.bn.running_var, bn.running_var)


def test_eval_frozen_training_and_the_deployed_conv_agree_bit_for_bit():
    model = folded_small_cnn()
    x = torch.randn(4, 3, 16, 16)
    layer, h = model.featurizer[3], torch.randn(4, 32, 16, 16).relu()
    freeze_statistics(model)
    before = layer.bn.running_mean.clone()
    frozen = layer.train()(h)
    assert torch.equal(layer.bn.running_mean, before)  # frozen: nothing updated
    with torch.no_grad():
        layer.eval()
        rounded = layer(h)  # eval mode: the folded bias on its int32 grid s_x·s_w
        layer.conv.bias_quantizer.train()  # the float bias: frozen training's arithmetic
        assert torch.equal(frozen, layer(h))
        layer.conv.bias_quantizer.eval()
        grid = layer.conv.input_quantizer.step_size() * layer.conv.weight_quantizer.step_size()
        assert 0 < float((rounded - frozen).abs().max()) <= float(grid) / 2 + 1e-6
        deployed = deployable(copy.deepcopy(model)).eval()
        assert not any(isinstance(m, QuantConvBn2d) for m in deployed.modules())
        assert (
            type(deployed.featurizer[6]) is QuantConv2d and deployed.featurizer[6].bias is not None
        )
        assert torch.equal(model.eval()(x), deployed(x))


def test_every_parameter_trains_through_the_folded_pair():
    model = folded_small_cnn()
    F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.arange(4)).backward()
    layer = model.featurizer[3]
    for p in (layer.conv.weight, layer.bn.weight, layer.bn.bias, layer.conv.weight_quantizer.scale):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_fold_into_quantized_convs_skips_a_batch_norm_fed_by_two_paths_or_without_affine():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = QuantConv2d(3, 4, 1), QuantConv2d(3, 4, 1)
            self.bn_sum, self.bn_plain = nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)

        def forward(self, x):
            return self.bn_sum(self.a(x) + self.b(x)) + self.bn_plain(self.b(x))

    assert fold_into_quantized_convs(Branchy()) == {}


def test_auto_folds_the_mobile_backbones_only():
    hp = default_hparams("lsq", "digits")
    assert hp["fold_batch_norm"] == "auto"
    for arch in ARCHITECTURES:
        assert quant_config_for(hp, 4, arch).fold_batch_norm == (arch in FOLDED_BY_DEFAULT)
    assert not quant_config_for({**hp, "fold_batch_norm": "off"}, 4, "mobilenet_v2").fold_batch_norm


@pytest.mark.parametrize("fold", ["auto", "on"])
def test_algorithm_folds_as_the_hparam_says_and_freezes_statistics_on_time(fold):
    hp = {**default_hparams("lsq", "digits"), "fold_batch_norm": fold, "bn_freeze_at": 0.5}
    algorithm = Algorithm("lsq", ModelConfig(), hp, total_steps=4, bits=4)
    folded = [m for m in algorithm.network.modules() if isinstance(m, QuantConvBn2d)]
    assert algorithm.quant_config.fold_batch_norm == (fold == "on") == bool(folded)
    if not folded:
        return
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
    means = []
    for _ in range(4):
        algorithm.update(batches)
        means.append(folded[0].bn.running_mean.clone())
    assert not torch.equal(means[0], means[1])  # steps 1-2: live statistics
    assert torch.equal(means[1], means[2]) and torch.equal(means[2], means[3])  # frozen at 2
    assert folded[0].statistics_frozen


def three_convs(dtype=torch.float64, seed: int = 0) -> nn.Module:
    """Three folded conv + BN pairs (first_last "same": every conv quantized), float64,
    quantizers initialised, statistics away from their defaults."""
    torch.manual_seed(seed)
    layers = []
    for c_in, c_out in ((3, 8), (8, 8), (8, 8)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        layers.append(nn.ReLU())
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = model.to(dtype)
    quantize_model(model, QuantConfig(4, 4, first_last="same", fold_batch_norm=True))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    with frozen_running_stats(model):
        model.train()(torch.randn(6, 3, 8, 8, dtype=dtype))  # initialises the quantizers
    return model


def batch(dtype=torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=gen, dtype=dtype), torch.arange(6) % 4


def test_live_statistics_hold_still_through_both_passes_of_a_step():
    """At ρ = α = 0 the perturbed pass is the first pass again: bit-identical gradients,
    codes and all, although the first pass saw a batch whose statistics differ from the
    running ones (which move only after the step)."""
    model = three_convs()
    x, y = batch()
    optimizer = SAGM(torch.optim.SGD(model.parameters(), lr=0.0), model, rho=0.0, alpha=0.0)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = [m.bn.running_var.clone() for m in model.modules() if isinstance(m, QuantConvBn2d)]
    passes = optimizer.two_passes(closure)
    for g, g_p in zip(passes.g, passes.g_p):
        assert torch.equal(g, g_p)
    after = [m.bn.running_var for m in model.modules() if isinstance(m, QuantConvBn2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # not yet: after the step
    update_running_statistics(model)
    assert not any(torch.equal(a, b) for a, b in zip(before, after))


def test_running_statistics_follow_batch_norms_update_rule():
    """After N steps of staging and applying, the running statistics equal those of an
    nn.BatchNorm2d fed the same pre-normalisation activations, in train mode."""
    layer = three_convs().train()[0]
    reference = copy.deepcopy(layer.bn)
    for step in range(5):
        x = batch(seed=step)[0]
        with torch.no_grad():
            factor = layer._factor()
            weight = layer.conv.weight_quantizer(layer.conv.weight * factor.view(-1, 1, 1, 1))
            pre = layer.conv._conv_forward(layer.conv.input_quantizer(x), weight, None)
            pre = pre / factor.view(1, -1, 1, 1)
        out = layer(x)
        torch.testing.assert_close(out, reference(pre), rtol=1e-12, atol=1e-12)
        layer.update_running_statistics()
        layer.update_running_statistics()  # nothing staged: no second update
    torch.testing.assert_close(layer.bn.running_mean, reference.running_mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(layer.bn.running_var, reference.running_var, rtol=1e-13, atol=0)
    assert layer.bn.num_batches_tracked == reference.num_batches_tracked == 5


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_compiled_step_on_live_statistics_gives_the_eager_gradients(backend):
    """torch's compiler read running statistics in the backward after the forward had
    overwritten them; staged statistics leave it nothing to reread."""
    results = []
    for compiled in (False, True):
        model = three_convs()
        forward = torch.compile(model, backend=backend) if compiled else model
        x, y = batch()
        F.cross_entropy(forward(x), y).backward()
        update_running_statistics(model)
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((grads, [b.clone() for b in model.buffers()]))
    (eager_grads, eager_buffers), (grads, buffers) = results
    for eager, compiled in zip(eager_grads + eager_buffers, grads + buffers):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_channel_with_zero_gamma_outputs_beta(frozen):
    model = three_convs()
    layer = model[0]
    with torch.no_grad():
        layer.bn.weight[2] = 0.0
    freeze_statistics(model, frozen)
    x, y = batch()
    out = layer.train()(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2], torch.full_like(out[:, 2], layer.bn.bias[2].item()))
    F.cross_entropy(model(x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    update_running_statistics(model)
    assert torch.isfinite(layer.bn.running_var).all() and torch.isfinite(model.eval()(x)).all()
