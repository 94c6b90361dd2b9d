"""Quantizers on the residual stream (gaqat.residual): which blocks, signedness and
initialisation, the config field, checkpoints; ResNet's blocks by hand and as
onnxruntime runs them. The ONNX fusion they buy in MobileNetV2 is tested in
tests/export/test_export.py, the node counts of each network in tests/export/test_nodes.py."""

import copy
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from helpers import load_benchmark
from torch import nn
from torchvision.models import resnet

from gaqat import efficientnet_lite, export
from gaqat.bn_folding import QuantConvBn2d, deployable
from gaqat.checkpoint import build_network
from gaqat.models import ModelConfig, build_model
from gaqat.prepare import quantize_model
from gaqat.quant import LsqQuantizer, QuantConfig, quantizers, step_sizes
from gaqat.residual import ROLES, QuantResidual, StreamInput, quantize_residuals

pytestmark = pytest.mark.usefixtures("one_thread")


FOLD = {"fold_batch_norm": True}


def _folded(model):
    return [n for n, m in model.named_modules() if isinstance(m, QuantConvBn2d)]


def _residuals(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantResidual)}


@pytest.mark.parametrize(
    ("arch", "blocks", "skips"),
    [("mobilenet_v2_compact", 10, 5), ("mobilenet_v3_large", 10, 6)],
)
def test_every_residual_block_gets_signed_quantizers_that_train(arch, blocks, skips):
    """Each run of residual blocks quantizes its first skip; the blocks after take the
    previous block's output quantizer as theirs. The new step sizes are step sizes like
    the layers' (the optimizer's step-size group and GAQAT's freezer read step_sizes)."""
    torch.manual_seed(0)
    config = QuantConfig(4, 4, fold_batch_norm=True, residual_bits=8)
    model = quantize_model(build_model(ModelConfig(arch=arch)), config)
    residuals = _residuals(model)
    assert len(residuals) == blocks
    assert sum(m.skip_quantizer is not None for m in residuals.values()) == skips
    names = [n for n in step_sizes(model) if n.rpartition(".")[0] in residuals]
    assert len(names) == 2 * blocks + skips
    # Batch norm still folds into the same convs, the projections included.
    plain = quantize_model(build_model(ModelConfig(arch=arch)), QuantConfig(4, 4, **FOLD))
    assert len(_folded(model)) == len(_folded(plain)) > 40
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for name in names:
        q = quantizers(model)[name]
        assert q.signed and (q.q_min, q.q_max) == (-128, 127) and q.initialized
        assert step_sizes(model)[name].grad is not None


def test_the_block_computes_quantized_sum_of_quantized_branch_and_skip():
    torch.manual_seed(0)
    block = efficientnet_lite.MBConv(3, 1, 6, 8, 8)
    assert block.skip
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        branch = block.branch(x)
        assert torch.equal(block(x), x + branch)
    wrapped = QuantResidual(block, 8)
    out = wrapped(x)
    skip, projection, total = (
        wrapped.skip_quantizer,
        wrapped.projection_quantizer,
        wrapped.output_quantizer,
    )
    # LSQ's activation initialisation, 2·mean|v|/sqrt(q_max), on the first batch.
    assert torch.allclose(skip.scale, 2 * x.abs().mean() / math.sqrt(127))
    with torch.no_grad():
        s = skip(x)
        expected = total(s + projection(block.branch(s)))
        assert torch.equal(out, expected)
        assert torch.allclose(projection.scale, 2 * block.branch(s).abs().mean() / math.sqrt(127))
        codes = total.codes(out)
    assert codes.min() >= -128 and codes.max() <= 127 and bool((codes < 0).any())


@pytest.mark.parametrize(
    ("arch", "readers"),
    [("mobilenet_v2_compact", 15), ("resnet18", 11), ("efficientnet_lite0", 14)],
)
def test_the_layers_that_read_the_stream_read_its_codes(arch, readers):
    """Each quantized layer whose input is a skip or output quantizer's output (the expand
    convolutions, ResNet's conv1 and downsample) takes that quantizer as its input's
    (StreamInput): it reads the 8-bit codes unchanged, its int32 bias is on the stream's
    grid, it owns no tensor, and the stream's step size learns from it."""
    torch.manual_seed(0)
    config = QuantConfig(4, 4, fold_batch_norm=True, residual_bits=8)
    model = quantize_model(build_model(ModelConfig(arch=arch, weights=None)), config)
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "input_quantizer", None), StreamInput)
    }
    assert len(layers) == readers
    stream = {
        id(q)
        for n, q in quantizers(model).items()
        if n.endswith(("skip_quantizer", "output_quantizer"))
    }
    assert all(id(m.input_quantizer.source) in stream for m in layers.values())
    assert not [
        k for k in model.state_dict() if any(k.startswith(f"{n}.input_quantizer") for n in layers)
    ]
    seen = {}
    hooks = [  # on the StreamInput: a folded pair calls its conv's parts, not the conv
        m.input_quantizer.register_forward_hook(lambda m, a, out, n=n: seen.update({n: out}))
        for n, m in layers.items()
    ]
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        q = layer.input_quantizer
        codes = seen[name] / q.step_size()
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 128
        assert q.bits == 8 and q.initialized and q.source.scale.grad is not None
    model.eval()
    name = next(iter(layers))
    pair = model.get_submodule(name.rpartition(".")[0])  # the folded conv-BN pair
    assert isinstance(pair, QuantConvBn2d)
    with torch.no_grad():
        bias = pair.conv.quantized_bias(pair.folded_bias())
        grid = pair.conv.input_quantizer.step_size() * pair.conv.weight_quantizer.step_size()
        assert torch.allclose(bias / grid.flatten(), (bias / grid.flatten()).round(), atol=1e-3)


def _qlinear_add_session(onnx, onnxruntime, steps, zeros):
    """A DequantizeLinear x2 -> Add -> QuantizeLinear graph over 256x256 uint8 pairs, which
    onnxruntime fuses into one QLinearAdd."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    names = ("sa", "sb", "sc")
    inits = [numpy_helper.from_array(np.float32(s), n) for n, s in zip(names, steps)]
    inits += [numpy_helper.from_array(np.uint8(z), f"z{n[1]}") for n, z in zip(names, zeros)]
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
        helper.make_node("Add", ["fa", "fb"], ["sum"]),
        helper.make_node("QuantizeLinear", ["sum", "sc", "zc"], ["c"]),
    ]
    uint8 = onnx.TensorProto.UINT8
    io = [helper.make_tensor_value_info(n, uint8, [256, 256]) for n in ("a", "b", "c")]
    graph = helper.make_graph(nodes, "add", io[:2], io[2:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("signs", [(True, True, True), (False, True, False)])
def test_the_evaluated_add_is_onnxruntimes_qlinear_add_to_the_bit(signs):
    """runtime_add against onnxruntime's QLinearAdd on every pair of 8-bit codes, for
    drawn step sizes: the mobile nets' signed stream (uint8 around 128) and ResNet's
    unsigned skip and output (zero point 0, the ReLU as the clip at code 0) with a signed
    projection. A float sum of the values takes the other code near .5 ties."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from gaqat.residual import runtime_add

    rng = np.random.default_rng(0)
    codes = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for _ in range(10):
        steps = rng.uniform(0.02, 0.5, 3).astype(np.float32)
        quantizers = []
        for signed, step in zip(signs, steps):
            q = LsqQuantizer(8, signed=signed)
            q(torch.ones(4))  # initialised, then given the drawn step size
            q.scale.data.fill_(float(step))
            quantizers.append(q)
        zeros = [128 if q.signed else 0 for q in quantizers]
        session = _qlinear_add_session(onnx, onnxruntime, steps, zeros)
        a, b = (c.astype(np.uint8) for c in codes)
        expected = session.run(None, {"a": a, "b": b})[0].astype(np.int64) - zeros[2]
        values = [
            torch.from_numpy((c.astype(np.float32) - z) * np.float32(s))
            for c, z, s in zip(codes, zeros, steps)
        ]
        with torch.no_grad():
            out = runtime_add((values[0], quantizers[0]), (values[1], quantizers[1]), quantizers[2])
        assert np.array_equal(quantizers[2].codes(out).numpy().astype(np.int64), expected)


def _resnet_block(kind: str) -> nn.Module:
    """A torchvision ResNet block with random batch-norm affines (not a fresh one's 1 and
    0): ``basic`` 16 -> 16 channels (identity skip), ``basic_down`` and ``bottleneck``
    8 -> 16 (x4) at stride 2 (a downsampling conv on the skip)."""
    if kind == "basic":
        block = resnet.BasicBlock(16, 16)
    else:
        kind_type, out = (
            (resnet.BasicBlock, 16) if kind == "basic_down" else (resnet.Bottleneck, 64)
        )
        down = nn.Sequential(nn.Conv2d(8, out, 1, 2, bias=False), nn.BatchNorm2d(out))
        block = kind_type(8, 16, 2, down)
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1, 0.3)
            nn.init.normal_(module.bias, 0, 0.3)
    return block


@pytest.mark.parametrize("kind", ["basic", "basic_down", "bottleneck"])
def test_a_resnet_block_computes_the_quantized_block_written_by_hand(kind):
    """BasicBlock (identity skip, or a downsampling conv on it) and Bottleneck: the branch
    and the skip's convolution quantized signed, their sum through the block's ReLU then
    quantized unsigned (the form onnxruntime fuses into QLinearAdd), the input too (it
    follows a ReLU). Without quantizers the wrapper is torchvision's block."""
    torch.manual_seed(0)
    block = _resnet_block(kind)
    x = torch.relu(torch.randn(4, 16 if kind == "basic" else 8, 8, 8))
    wrapped = QuantResidual(block, 8)
    out = wrapped(x)
    q = {role: getattr(wrapped, role) for role in ROLES}
    assert (q["shortcut_quantizer"] is None) == (kind == "basic")
    for role in ("skip_quantizer", "output_quantizer"):
        assert (q[role].q_min, q[role].q_max) == (0, 255)
    assert (q["projection_quantizer"].q_min, q["projection_quantizer"].q_max) == (-128, 127)
    convs = 3 if kind == "bottleneck" else 2
    with torch.no_grad():
        s = q["skip_quantizer"](x)
        h = s
        for i in range(1, convs + 1):
            h = getattr(block, f"bn{i}")(getattr(block, f"conv{i}")(h))
            h = torch.relu(h) if i < convs else h
        skip = s if kind == "basic" else q["shortcut_quantizer"](block.downsample(s))
        expected = q["output_quantizer"](torch.relu(skip + q["projection_quantizer"](h)))
        assert torch.equal(out, expected)
        for role in ROLES:
            if q[role] is not None:
                setattr(wrapped, role, nn.Identity())
        assert torch.equal(wrapped(x), block(x.clone()))


def test_a_resnet18_with_residual_quantizers_runs_as_integer_kernels(tmp_path):
    """A prepared ResNet-18: its 8 basic blocks wrapped, only the first quantizing its
    skip (the others' input is the previous block's output, across the stages'
    Sequentials too), the three downsampling skips quantized. Its integer-kernel file
    runs every quantized convolution as QLinearConv and every residual add as
    QLinearAdd (the float stem alone stays a float convolution), with PyTorch's top-1;
    the int file rebuilds it bit for bit."""
    for module in ("onnx", "onnxruntime", "safetensors"):
        pytest.importorskip(module)
    from gaqat.export.nodes import optimized_node_counts

    torch.manual_seed(0)
    quant = QuantConfig(4, 4, fold_batch_norm=True, residual_bits=8)
    model = quantize_model(build_model(ModelConfig(arch="resnet18")), quant)
    residuals = _residuals(model)
    assert len(residuals) == 8
    assert [n for n, m in residuals.items() if m.skip_quantizer is not None] == [
        "featurizer.layer1.0"
    ]
    assert sum(m.shortcut_quantizer is not None for m in residuals.values()) == 3
    images = torch.randn(8, 3, 32, 32)  # step sizes and batch-norm statistics from these
    load_benchmark("deploy_latency").calibrate(model, images, own_statistics=True)
    with torch.no_grad():
        expected = model(images)
    path = tmp_path / "integer.onnx"
    export.export_onnx(model, path, 32, integer_kernels=True)
    counts = optimized_node_counts(path)
    assert counts["QLinearConv"] == len(export.quantized_layers(model)) == 19
    assert counts["QLinearAdd"] == 8 and counts["Add"] == 0
    assert counts["Conv"] + counts["FusedConv"] == 1  # the float stem
    assert torch.equal(export.onnx_logits(path, images).argmax(1), expected.argmax(1))
    header = {"model_config": ModelConfig(arch="resnet18").to_dict()}
    header |= {"quant_config": asdict(quant), "meta": {"bits": 4}}
    export.export_int(deployable(copy.deepcopy(model)), tmp_path / "model.safetensors", header)
    with torch.no_grad():
        assert torch.equal(export.load_int(tmp_path / "model.safetensors")(images), expected)


def test_blocks_without_an_identity_skip_stay_as_they_are():
    model = nn.Sequential(efficientnet_lite.MBConv(3, 2, 6, 8, 8), nn.ReLU())
    assert quantize_residuals(model, 8) == []
    with pytest.raises(ValueError, match="not a residual block"):
        QuantResidual(model[0], 8)


def test_residual_bits_is_off_by_default_and_checked():
    assert QuantConfig().residual_bits is None
    assert QuantConfig(residual_bits=0).residual_bits is None  # 0: off
    for bad in (1, 9, True, 8.0):
        with pytest.raises(ValueError, match="QuantConfig.residual_bits"):
            QuantConfig(residual_bits=bad)
    # An old checkpoint's quant_config, written before the field: today's network.
    old = {k: v for k, v in asdict(QuantConfig(4, 4, fold_batch_norm=True)).items()}
    del old["residual_bits"]
    model = build_network({"arch": "mobilenet_v2_compact"}, old)
    assert not _residuals(model)


def test_a_network_with_residual_quantizers_rebuilds_from_its_configs():
    torch.manual_seed(0)
    quant = asdict(QuantConfig(4, 4, fold_batch_norm=True, residual_bits=8))
    model = build_network({"arch": "mobilenet_v2_compact"}, quant)
    x = torch.randn(4, 3, 32, 32)
    model(x)
    model.eval()
    rebuilt = build_network({"arch": "mobilenet_v2_compact"}, quant)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert all(q.initialized for q in quantizers(rebuilt).values())


def test_the_residual_bits_hyperparameter_reaches_the_quant_config():
    from gaqat.algorithms import quant_config_for
    from gaqat.hparams import default_hparams

    hp = default_hparams("lsq", "digits")
    assert hp["residual_bits"] == 0 and quant_config_for(hp, 4, "small_cnn").residual_bits is None
    config = quant_config_for({**hp, "residual_bits": 8}, 4, "mobilenet_v2_compact")
    assert config.residual_bits == 8
