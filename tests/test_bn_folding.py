"""QAT with batch norm folded into the quantized convolutions (gaqat.bn_folding)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaqat.algorithms import Algorithm, quant_config_for
from gaqat.bn_folding import QuantConvBn2d, deployable, fold_batch_norm, freeze_statistics
from gaqat.checkpoint import build_network
from gaqat.hparams import default_hparams
from gaqat.models import ModelConfig, build_model
from gaqat.names import ARCHITECTURES, FOLDED_BY_DEFAULT
from gaqat.quant import QuantConfig, QuantConv2d, quantize_model


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
        assert torch.equal(frozen, layer.eval()(h))
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


def test_fold_batch_norm_skips_a_batch_norm_fed_by_two_paths_or_without_affine():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = QuantConv2d(3, 4, 1), QuantConv2d(3, 4, 1)
            self.bn_sum, self.bn_plain = nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)

        def forward(self, x):
            return self.bn_sum(self.a(x) + self.b(x)) + self.bn_plain(self.b(x))

    assert fold_batch_norm(Branchy()) == {}


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
