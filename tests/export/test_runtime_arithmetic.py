"""The runtime's arithmetic in PyTorch: a quantized layer evaluates with the int32 bias that
the ONNX file stores and onnxruntime's integer kernels add (gaqat.quant.bias_codes), so
that an --integer-kernels file computes what the model computes; biases that an int32
cannot hold are refused; an --int4-weights file runs integer kernels once widened at
load. Untrained models on seeded random images: seconds, no training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gaqat import export
from gaqat.bn_folding import update_running_statistics
from gaqat.export.rewrite import int4_to_int8
from gaqat.models import ModelConfig, Network, build_model
from gaqat.prepare import QuantConfig, quantize_model
from gaqat.quant import BiasQuantizer, QuantConv2d, bias_codes

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def test_bias_codes_round_half_to_even_per_channel_as_onnxruntime_does():
    """round(b / (s_x·s_w)) in float32, ties to even (ONNX's Round, numpy's round), one
    step per output channel when the weight's step size is per channel."""
    bias = torch.tensor([0.25, 0.75, -0.25, 1.0, -0.3, 1e-3])
    input_step = torch.tensor([0.5])
    weight_step = torch.tensor([1.0, 1.0, 1.0, 0.2, 0.2, 1e-4]).view(-1, 1, 1, 1)
    codes, step = bias_codes(bias, input_step, weight_step)
    assert codes.tolist() == [0.0, 2.0, -0.0, 10.0, -3.0, 20.0]  # 0.5, 1.5 and -0.5: to even
    scale = np.float32(0.5) * weight_step.flatten().numpy()  # what onnxruntime computes
    assert np.array_equal(step.numpy(), scale)
    assert np.array_equal(codes.numpy(), np.round(bias.numpy() / scale))
    per_tensor, one = bias_codes(bias, input_step, torch.tensor([0.1]))
    assert one.shape == (1,) and torch.equal(per_tensor, torch.round(bias / (0.5 * 0.1)))


def _calibrated(config: QuantConfig, images: torch.Tensor, arch: str = "small_cnn"):
    """A random-weight model whose batch norms hold the statistics of ``images`` (so its
    activations spread over the quantizers' ranges, as a trained network's do), in eval."""
    torch.manual_seed(0)
    model = quantize_model(build_model(ModelConfig(arch=arch)), config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # one batch: its own statistics
    model.train()(images)  # also initialises the quantizers
    update_running_statistics(model)  # the folded pairs' staged statistics
    return model.eval()


def _float_biases(model: nn.Module, on: bool) -> None:
    """Evaluate with the float biases (``on``), as gaqat did before it rounded them."""
    for module in model.modules():
        if isinstance(module, BiasQuantizer):
            module.train(on)


@pytest.mark.parametrize("fold", [False, True], ids=["bn_after", "bn_folded"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_integer_kernel_file_computes_what_pytorch_evaluates(fold, per_channel):
    """Batch norm after the quantized convs (folded by the export into their int32 biases)
    or trained folded: onnxruntime's QLinearConv and the PyTorch model agree to float
    rounding. Rounding moves an activation code only on a .5 tie: one image of 64 here,
    through the float stem (its conv and batch norm, fused by onnxruntime), at 1e-3."""
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _calibrated(QuantConfig(4, 4, per_channel=per_channel, fold_batch_norm=fold), images)
    data, _ = export.onnx_bytes(model, 32, integer_kernels=True)
    runtime = export.onnx_logits(export.onnx_session(data), images)
    with torch.no_grad():
        ours = model(images)
        _float_biases(model, True)
        before = model(images)
        _float_biases(model, False)
    diff = (ours - runtime).abs().amax(1)
    assert torch.equal(ours.argmax(1), runtime.argmax(1))
    assert float(diff.median()) < 1e-5 and int((diff > 1e-4).sum()) <= 2
    # The float biases are off by up to half an int32 step everywhere.
    assert float((before - runtime).abs().amax(1).median()) > 100 * float(diff.median())


def test_written_int32_biases_are_the_codes_pytorch_adds(tmp_path):
    """A quantized conv with its own bias and no batch norm: the file's int32 initializer
    is bias_codes of the layer, and its DequantizeLinear has the step s_x·s_w."""
    images = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    featurizer = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten()
    )
    torch.manual_seed(0)
    model = quantize_model(Network(featurizer, 8 * 10 * 10, 10), QuantConfig(4, 4))
    model.train()(images)
    model.eval()
    layer = model.featurizer[2]
    input_step, weight_step = layer.input_quantizer.step_size(), layer.weight_quantizer.step_size()
    codes, step = bias_codes(layer.bias, input_step, weight_step)
    export.export_onnx(model, tmp_path / "m.onnx", 12, integer_kernels=True)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    int32 = [
        onnx.numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.INT32
    ]
    assert len(int32) == 1 and np.array_equal(int32[0], codes.numpy().astype(np.int32))
    with torch.no_grad():
        assert torch.equal(export.onnx_ready(model, True)(images), model(images))
    assert float(step) == float(input_step * weight_step)


def test_a_bias_beyond_the_int32_range_is_refused(tmp_path):
    """Step sizes at their 1e-8 floor make b / (s_x·s_w) ~ 1e15: no file, and the error
    names the layer, the code, both step sizes and what to do."""
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    model = quantize_model(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten()),
        QuantConfig(4, 4, first_last="same"),
    )
    model.train()(images)
    model.eval()
    with torch.no_grad():
        model[2].weight_quantizer.scale.fill_(1e-8)
        model[2].input_quantizer.scale.fill_(1e-8)
        model[2].bias.fill_(0.1)
    with pytest.raises(ValueError) as refused:
        export.export_onnx(model, tmp_path / "m.onnx", 8, integer_kernels=True)
    message = str(refused.value)
    for part in ("layer 2:", "1e+15", "s_x = 1e-08", "s_w = 1e-08", "without --integer-kernels"):
        assert part in message
    assert not (tmp_path / "m.onnx").exists()
    export.export_onnx(model, tmp_path / "m.onnx", 8)  # float biases: written


def _optimised_ops(path, tmp_path) -> list[str]:
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]


def test_int4_file_widened_at_load_runs_integer_kernels_with_the_same_logits(tmp_path):
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model = _calibrated(QuantConfig(4, 4), images)
    int4 = tmp_path / "int4.onnx"
    assert export.export_onnx(model, int4, 32, int4_weights=True, integer_kernels=True) == 21
    widened = onnx.load(str(int4))
    assert int4_to_int8(widened) == 3
    onnx.save(widened, str(tmp_path / "int8.onnx"))
    assert "QLinearConv" not in _optimised_ops(int4, tmp_path)  # 4-bit: dequantized to float
    assert _optimised_ops(tmp_path / "int8.onnx", tmp_path).count("QLinearConv") == 2
    stored = export.onnx_logits(int4, images)
    loaded = export.onnx_logits(export.onnx_session(int4, int8_weights=True), images)
    assert torch.equal(loaded.argmax(1), stored.argmax(1))
    assert float((loaded - stored).abs().amax(1).median()) < 1e-5
    export.export_onnx(model, int4, 32, int4_weights=True)  # plain QDQ: float convs either way
    plain = export.onnx_session(int4, int8_weights=True)
    assert torch.equal(export.onnx_logits(plain, images), export.onnx_logits(int4, images))


def test_quantized_conv_keeps_float_bias_in_training():
    """Training adds the float bias (gradients as before); eval mode the int32 one."""
    torch.manual_seed(0)
    layer = QuantConv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    layer(x)
    step = layer.input_quantizer.step_size() * layer.weight_quantizer.step_size()
    assert torch.equal(layer.quantized_bias(layer.bias), layer.bias)
    layer.eval()
    rounded = layer.quantized_bias(layer.bias)
    assert torch.equal(rounded, torch.round(layer.bias / step) * step)
    rounded.sum().backward()  # straight through: the bias still gets its gradient
    assert torch.equal(layer.bias.grad, torch.ones(4))
