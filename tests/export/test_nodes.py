"""The graph onnxruntime runs (``gaqat.export.nodes``) for each network as
``benchmarks/deploy_latency.py`` quantizes it (W4, batch norm folded, 8-bit residual
quantizers), here at 32x32 with random weights: what its ``--integer-kernels`` file runs
as integer kernels and what stays float, and with its first and last layers at 8 bits
(first_last "int8": one integer region, ``gaqat.head``); and the benchmark's baseline,
onnxruntime's own post-training quantization of the float network, as a file onnxruntime
runs.

Counts are onnxruntime 1.32's on x86. Transposes and NCHWc reorders are left out (they
depend on the CPU); a float convolution counts as Conv or FusedConv, whichever the
optimiser made of it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import load_benchmark
from torch import nn

from gaqat import export
from gaqat.export.nodes import node_counts, optimized_node_counts
from gaqat.models import ModelConfig, build_model
from gaqat.prepare import QuantConfig, quantize_model
from gaqat.quant import LsqQuantizer

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

# After optimisation: every quantized convolution whose output feeds a quantizer is a
# QLinearConv and, with the residual quantizers, every residual add a QLinearAdd. Float
# convolutions left: the float stem, and the last quantized one (it feeds the float
# pooling; its weight, input and int32 bias are dequantized: the small CNN's 3
# DequantizeLinear). Each quantized layer with a 4-bit input quantizer of its own keeps
# the Clip of its input to the 4-bit range in the integer domain; the layers that read
# the 8-bit residual stream read its codes (``gaqat.residual.StreamInput``), so no
# DequantizeLinear -> QuantizeLinear requantization is left between blocks: the one
# QuantizeLinear is the float stem's output's. ResNet-18's basic blocks take residual quantizers
# too (``gaqat.residual``; the unsigned one after each add's ReLU lets onnxruntime drop
# the ReLU into the QLinearAdd): all 19 quantized convolutions run as QLinearConv, the 3
# downsampling the skips and the last one (its output meets an add before the pooling)
# included, and the 8 adds as QLinearAdd; the float stem is the one float Conv. Without
# them: 8 QLinearConv, 12 float Conv, 8 float Add, 33 DequantizeLinear.
INTEGER_FILES = {
    "small_cnn": {"QLinearConv": 2, "QLinearAdd": 0, "float Conv": 2, "Add": 0},
    "mobilenet_v2": {"QLinearConv": 50, "QLinearAdd": 10, "float Conv": 2, "Add": 0},
    "efficientnet_lite0": {"QLinearConv": 47, "QLinearAdd": 9, "float Conv": 2, "Add": 0},
    "resnet18": {"QLinearConv": 19, "QLinearAdd": 8, "float Conv": 1, "Add": 0},
}
QUANTIZE_OPS = {  # QuantizeLinear, DequantizeLinear, Clip
    "small_cnn": (1, 3, 3),
    "mobilenet_v2": (1, 3, 36),
    "efficientnet_lite0": (1, 3, 34),
    "resnet18": (1, 1, 8),
}

# With the first and last layers at 8 bits (first_last "int8") the network is one integer
# region: the stem is a QLinearConv (8-bit weights, the image quantized to uint8 around
# 128), the last convolution's ReLU6 (ReLU) output takes the 8-bit head quantizer
# (``gaqat.head``; ResNet-18's last block's unsigned output quantizer is one already), so
# that convolution is a QLinearConv too, the global average pooling between it and the
# classifier's 8-bit input quantizer a QLinearGlobalAveragePool, and the classifier a QGemm
# (float logits). No float Conv, FusedConv, GlobalAveragePool or Gemm is left. Clip: the
# 4-bit inputs' and the head quantizer's upper clip at 6 (the ReLU6's, in the integer
# range), none for the 8-bit stem and classifier or the layers that read the 8-bit stream.
# QuantizeLinear: the image's alone; no DequantizeLinear: the form of onnxruntime's own
# post-training quantization of the float network, plus the 4-bit Clips.
INT8_FILES = {  # QLinearConv, QLinearAdd, QLinearGlobalAveragePool, QGemm
    "small_cnn": (4, 0, 1, 1),
    "mobilenet_v2": (52, 10, 1, 1),
    "efficientnet_lite0": (49, 9, 1, 1),
    "resnet18": (20, 8, 1, 1),
}
INT8_QUANTIZE_OPS = {  # QuantizeLinear, DequantizeLinear, Clip
    "small_cnn": (1, 0, 3),
    "mobilenet_v2": (1, 0, 37),
    "efficientnet_lite0": (1, 0, 35),
    "resnet18": (1, 0, 8),
}
FLOAT_OPS = ("Conv", "FusedConv", "Add", "Gemm", "GlobalAveragePool", "BatchNormalization")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("deploy_latency")


def _network(bench, arch: str, residual_bits: int = 8, first_last: str = "float"):
    """``arch`` as the benchmark quantizes it, its step sizes and batch-norm statistics
    from 8 seeded images (the spread of a trained network's activations); and those."""
    torch.manual_seed(0)
    model, pretrained = bench.quantized(arch, residual_bits, first_last=first_last)
    assert not pretrained  # weights=None: nothing is downloaded
    images = torch.randn(8, 3, 32, 32)
    return bench.calibrate(model, images, own_statistics=True), images


def _profile(counts) -> dict:
    """The integer and float compute ops of an optimised graph, as INTEGER_FILES lists them."""
    ops = {op: counts[op] for op in ("QLinearConv", "QLinearAdd", "Add")}
    return ops | {"float Conv": counts["Conv"] + counts["FusedConv"]}


@pytest.mark.parametrize("arch", list(INTEGER_FILES))
def test_integer_kernel_files_run_these_nodes(bench, arch, tmp_path):
    model, images = _network(bench, arch)
    path = tmp_path / "integer.onnx"
    export.export_onnx(model, path, 32, integer_kernels=True)
    assert node_counts(path)["QLinearConv"] == 0  # the file is QDQ: onnxruntime fuses
    counts = optimized_node_counts(path)
    assert _profile(counts) == INTEGER_FILES[arch]
    ops = ("QuantizeLinear", "DequantizeLinear", "Clip")
    assert tuple(counts[op] for op in ops) == QUANTIZE_OPS[arch]
    layers = export.quantized_layers(model).values()
    assert counts["Clip"] == sum(isinstance(m.input_quantizer, LsqQuantizer) for m in layers)
    assert counts["Gemm"] == 1 and "BatchNormalization" not in counts  # the float head
    assert torch.equal(export.onnx_logits(path, images).argmax(1), model(images).argmax(1))


@pytest.mark.parametrize("arch", list(INT8_FILES))
def test_int8_first_and_last_layers_make_one_integer_region(bench, arch, tmp_path):
    """first_last "int8" (with the head quantizer): every convolution a QLinearConv, the
    pooling a QLinearGlobalAveragePool, the classifier a QGemm, nothing float; the logits
    PyTorch's (top-1 equal; the integer pooling rounds its mean once, as the classifier's
    input quantizer does)."""
    model, images = _network(bench, arch, first_last="int8")
    path = tmp_path / "integer.onnx"
    export.export_onnx(model, path, 32, integer_kernels=True)
    counts = optimized_node_counts(path)
    ops = ("QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm")
    assert tuple(counts[op] for op in ops) == INT8_FILES[arch]
    convs = [m for m in export.quantized_layers(model).values() if isinstance(m, nn.Conv2d)]
    assert (
        counts["QLinearConv"]
        == len(convs)
        == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    )
    assert not [op for op in FLOAT_OPS if counts[op]]
    ops = ("QuantizeLinear", "DequantizeLinear", "Clip")
    assert tuple(counts[op] for op in ops) == INT8_QUANTIZE_OPS[arch]
    with torch.no_grad():
        expected = model(images)
    logits = export.onnx_logits(path, images)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert float((logits - expected).abs().max()) < 1e-3


def test_the_float_twin_is_the_network_without_its_quantizers(bench):
    """The benchmark's float file: every quantizer gone, residual ones included, and the
    float network's logits."""
    torch.manual_seed(0)
    network = build_model(ModelConfig(arch="mobilenet_v2_compact"))
    reference = copy.deepcopy(network).eval()
    model = quantize_model(network, QuantConfig(4, 4, residual_bits=8))
    images = torch.randn(4, 3, 32, 32)
    bench.calibrate(model, images, own_statistics=False)
    twin = bench.float_twin(model)
    assert not [m for m in twin.modules() if isinstance(m, LsqQuantizer)]
    with torch.no_grad():
        assert torch.allclose(twin(images), reference(images), atol=1e-5)


def test_ptq_baseline_is_a_file_onnxruntime_runs_with_integer_kernels(bench, tmp_path):
    """onnxruntime's quant_pre_process and quantize_static of the small CNN's float file
    (4 calibration images): every convolution a QLinearConv, the head a QGemm."""
    model, images = _network(bench, "small_cnn")
    twin = bench.float_twin(model)
    float_path = bench.float_file(twin, 32, tmp_path / "float.onnx")
    path = bench.ptq_file(float_path, images[:4], tmp_path / "ptq.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "ptq.onnx"]
    logits = export.onnx_logits(path, images)
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    counts = optimized_node_counts(path)
    assert counts["QLinearConv"] == 4 and counts["QGemm"] == 1
    assert counts["Conv"] + counts["FusedConv"] + counts["Gemm"] == 0


def test_the_profile_shares_cover_the_integer_files_kernels(bench, tmp_path):
    """deploy_latency --profile: each op type's share of the kernel time, summing to 1,
    the integer convolutions and the 4-bit inputs' Clips among them."""
    model, images = _network(bench, "small_cnn", first_last="int8")
    path = tmp_path / "integer.onnx"
    export.export_onnx(model, path, 32, integer_kernels=True)
    shares = bench.op_shares(path, images.numpy(), 1, tmp_path, runs=2)
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert {"QLinearConv", "Clip"} <= set(shares) and list(shares.values()) == sorted(
        shares.values(), reverse=True
    )
