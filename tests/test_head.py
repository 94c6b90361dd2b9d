"""The head quantizer (gaqat.head): where it goes, that it trains, that only first_last
"int8" adds it (today's configs keep their state-dict keys), checkpoints and the int file;
and what the export writes for a layer that stays float. The node counts of each
network's one-integer-region file are in tests/export/test_nodes.py."""

import copy
from dataclasses import asdict

import pytest
import torch
from torch import nn

from gaqat import export
from gaqat.bn_folding import deployable, fold_into_quantized_convs, round_folded_shifts
from gaqat.checkpoint import build_network, model_from_checkpoint
from gaqat.head import QuantHead, head_activation
from gaqat.models import ModelConfig, build_model
from gaqat.prepare import quantize_model
from gaqat.quant import QuantConfig, quantize_layers, quantizers, step_sizes
from gaqat.residual import quantize_residuals

pytestmark = pytest.mark.usefixtures("one_thread")

INT8 = QuantConfig(4, 4, first_last="int8", fold_batch_norm=True, residual_bits=8)
COMPACT = {"arch": "mobilenet_v2_compact"}


def _heads(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QuantHead)]


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("small_cnn", "featurizer.11"),  # conv, batch norm, ReLU, pooling
        ("mobilenet_v2_compact", "featurizer.features.18.2"),  # the 1x1 head's ReLU6
        ("efficientnet_lite0", "featurizer._act_head"),
        ("resnet18", None),  # the last convolution meets the residual add
        ("mobilenet_v3_large", None),  # a Hardswish follows: no unsigned range
    ],
)
def test_the_head_quantizer_follows_the_last_convolutions_relu(arch, head):
    model = quantize_model(build_model(ModelConfig(arch=arch)), INT8)
    assert _heads(model) == ([head] if head else [])


def test_the_head_quantizer_is_an_unsigned_8_bit_step_size_that_trains():
    """An LsqQuantizer like the others: listed by step_sizes (so the optimizer and
    GAQAT's freezer take it), initialised on the first batch, with a gradient; the block
    computes it on the ReLU6's output, after the folded convolution."""
    torch.manual_seed(0)
    model = build_network(COMPACT, asdict(INT8))
    name = "featurizer.features.18.2.output_quantizer"
    assert name in step_sizes(model)
    q = quantizers(model)[name]
    assert (q.bits, q.signed, q.q_min, q.q_max) == (8, False, 0, 255)
    features = {}
    model.featurizer.features[18][2].register_forward_hook(
        lambda module, args, out: features.update(x=args[0], out=out)
    )
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert q.initialized and step_sizes(model)[name].grad is not None
    assert float(step_sizes(model)[name].grad.abs()) > 0
    with torch.no_grad():
        assert torch.equal(features["out"], q(features["x"].clamp(0, 6)))
        codes = q.codes(features["out"])
    assert codes.min() == 0 and 0 < codes.max() <= 255


def _without_head(config: QuantConfig) -> nn.Module:
    """The compact MobileNetV2 as quantize_model built it before gaqat.head: the layers,
    the residual quantizers, batch norm folded."""
    model = quantize_layers(build_model(ModelConfig(**COMPACT)), config)
    quantize_residuals(model, config.residual_bits)
    fold_into_quantized_convs(model)
    round_folded_shifts(model)
    return model


@pytest.mark.parametrize("first_last", ["float", "same", "int8"])
def test_only_int8_first_and_last_layers_add_the_head_quantizer(first_last):
    """Off unless first_last is "int8" (and activations are quantized): "float" and
    "same" build the network of before, key for key, so their checkpoints load as they
    did; "int8" adds the head quantizer's three entries."""
    config = QuantConfig(4, 4, first_last=first_last, fold_batch_norm=True, residual_bits=8)
    model = quantize_model(build_model(ModelConfig(**COMPACT)), config)
    added = model.state_dict().keys() - _without_head(config).state_dict().keys()
    assert not _without_head(config).state_dict().keys() - model.state_dict().keys()
    if first_last != "int8":
        assert not added and not _heads(model)
    else:
        prefix = "featurizer.features.18.2.output_quantizer."
        assert added == {prefix + leaf for leaf in ("scale", "is_initialized", "signedness")}
        weights_only = QuantConfig(4, None, first_last="int8")
        assert not _heads(quantize_model(build_model(ModelConfig(**COMPACT)), weights_only))


def test_a_network_with_a_head_quantizer_rebuilds_from_a_checkpoint_and_its_int_file(
    tmp_path,
):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = build_network(COMPACT, asdict(INT8))
    x = torch.randn(4, 3, 32, 32)
    model(x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    checkpoint = {"model": model.state_dict(), "model_config": ModelConfig(**COMPACT).to_dict()}
    checkpoint |= {"quant_config": asdict(INT8), "meta": {"bits": 4}}
    rebuilt = model_from_checkpoint(checkpoint).eval()
    assert _heads(rebuilt) == _heads(model) and all(
        q.initialized for q in quantizers(rebuilt).values()
    )
    path = tmp_path / "model.safetensors"
    export.export_int(deployable(copy.deepcopy(model)), path, checkpoint)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
        assert torch.equal(export.load_int(path)(x), expected)


def test_the_head_wraps_only_a_relu_after_a_quantized_convolution():
    with pytest.raises(ValueError, match="ReLU or ReLU6"):
        QuantHead(nn.Hardswish(), 8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Flatten())
    assert head_activation(net) is None  # a float convolution: no integer kernel to end
    config = QuantConfig(4, 4, first_last="same")
    assert head_activation(quantize_layers(net, config)) == "2"
    shared = nn.ReLU()  # called twice: no quantizer for one of its calls alone
    twice = quantize_layers(nn.Sequential(nn.Conv2d(3, 4, 3), shared, shared), config)
    assert head_activation(twice) is None


def test_a_float_first_or_last_layer_is_a_float_initializer():
    """Issue #23's "any weight that does stay float is stored as a float initializer, not
    as codes dequantized on every run": with first_last "float" the stem Conv (its batch
    norm folded by the exporter) and the classifier's Gemm read float32 initializers
    directly, in the plain and the integer-kernel file; the quantized layers' weights are
    int8 codes behind a DequantizeLinear."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    config = QuantConfig(4, 4, fold_batch_norm=True, residual_bits=8)
    model = build_network(COMPACT, asdict(config))
    model(torch.randn(4, 3, 32, 32))
    for integer_kernels in (False, True):
        data, _ = export.onnx_bytes(model.eval(), 32, integer_kernels=integer_kernels)
        graph = onnx.load_from_string(data).graph
        initializers = {t.name: t.data_type for t in graph.initializer}
        layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
        float_layers = [n for n in layers if n.input[1] in initializers]
        assert [n.op_type for n in float_layers] == ["Conv", "Gemm"]  # stem, classifier
        assert all(initializers[n.input[1]] == onnx.TensorProto.FLOAT for n in float_layers)
        dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
        codes = [initializers.get(n.input[0]) for n in dequantized]
        assert len(layers) - 2 == codes.count(onnx.TensorProto.INT8) == 51
