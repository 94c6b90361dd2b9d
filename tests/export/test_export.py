"""Deployment: a briefly trained DigitsDG model at 4 and 3 bits, exported with
``gaqat export`` and checked against the PyTorch fake-quantized model, ONNX through
ONNX Runtime on CPU, on every image of every domain (the held-out domain of DomainBed's
protocol is tested on all of its images; 99.9% of 2500 leaves room for two of the rare
.5-tie flips). The measured sizes and agreement are printed.

Each test asks only for the packages of the export extra it uses (safetensors for the
int file; onnx and onnxruntime for the ONNX one), first, so that it skips without them
before any training; the rest run without the extra."""

from __future__ import annotations

import json
import subprocess
import sys
from copy import deepcopy
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gaqat import cli, export
from gaqat.bn_folding import deployable, update_running_statistics
from gaqat.checkpoint import save_atomic
from gaqat.data import load_dataset
from gaqat.data.loaders import make_loaders
from gaqat.models import ModelConfig, build_model
from gaqat.names import ARCHITECTURES
from gaqat.prepare import quantize_model
from gaqat.quant import QuantConfig

BITS = (4, 3)
TRIAL_SEED, TEST_ENVS = 0, [1]  # the run's DomainBed arguments: its splits and its meta
STEPS, BATCH = 30, 8  # per domain: 32 images a step
CHUNK = 64  # images per forward pass, the same for every model compared bit for bit
# small_cnn at first_last="float": values in its three quantized convs, in the float
# rest (stem conv, four BNs with running stats, classifier), step sizes (two per layer).
QUANTIZED_WEIGHTS, FLOAT_VALUES, STEP_SIZES = 239_616, 3_562, 6
MIN_AGREEMENT = 0.999
MIN_FOLD_AGREEMENT = 0.99  # on 359-500 images: a flip is 0.2-0.3%
MIN_INTEGER_AGREEMENT = MIN_AGREEMENT  # PyTorch evaluates with the kernels' int32 biases


@pytest.fixture(scope="session")
def safetensors_torch():
    return pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="session")
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def onnxruntime():
    return pytest.importorskip("onnxruntime")


@pytest.fixture(scope="session")
def digits(full_digits_dir):
    """Per domain: all its images, and the indices of its 80% training split and 20%
    held-out split as ``gaqat train`` draws them (DomainBed's, seeded with
    ``seed_hash(trial_seed, domain index)``)."""
    ds = load_dataset("digits", full_digits_dir)
    out = {}
    for i, split in enumerate(make_loaders(ds, TEST_ENVS, BATCH, seed=TRIAL_SEED).splits):
        images = torch.stack([ds[i][j][0] for j in range(len(ds[i]))])
        out[split.domain] = (
            images,
            torch.as_tensor(ds[i].labels),
            split.in_indices,
            split.out_indices,
        )
    return ds, out


def _checkpoint(model, quant, ds, bits, path):
    save_atomic(
        {
            "model": model.state_dict(),
            "model_config": ModelConfig().to_dict(),
            "quant_config": quant and asdict(quant),
            "meta": {
                "dataset": ds.name,
                "classes": ds.classes,
                "domains": ds.domains,
                "algorithm": "lsq" if quant else "erm",
                "bits": bits,
                "test_envs": TEST_ENVS,
            },
        },
        path,
    )


@torch.no_grad()
def _logits(model, images):
    return torch.cat([model(batch) for batch in images.split(CHUNK)])


@pytest.fixture(scope="session", params=BITS, ids=lambda b: f"{b}bit")
def run(request, digits, tmp_path_factory):
    """A few dozen QAT steps on every domain's training split, the checkpoint and the
    PyTorch logits on every image of every domain."""
    bits = request.param
    ds, data = digits
    torch.manual_seed(bits)
    quant = QuantConfig(weight_bits=bits, act_bits=bits)
    model = quantize_model(build_model(ModelConfig()), quant)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        picks = [
            (train[torch.randint(len(train), (BATCH,), generator=generator)], x, y)
            for x, y, train, _ in data.values()
        ]
        loss = F.cross_entropy(
            model(torch.cat([x[i] for i, x, _ in picks])), torch.cat([y[i] for i, _, y in picks])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    folder = tmp_path_factory.mktemp(f"export{bits}")
    _checkpoint(model, quant, ds, bits, folder / "checkpoint.pt")
    images = {d: x for d, (x, *_) in data.items()}
    return SimpleNamespace(
        bits=bits,
        model=model,
        folder=folder,
        images=images,
        held_out={d: test for d, (*_, test) in data.items()},
        logits={d: _logits(model, x) for d, x in images.items()},
    )


def _export(run, fmt, name, *options):
    """``gaqat export`` of the run's checkpoint into its folder."""
    path = run.folder / name
    assert (
        cli.main(
            [
                "export",
                str(run.folder / "checkpoint.pt"),
                "--format",
                fmt,
                "--out",
                str(path),
                *options,
            ]
        )
        == 0
    )
    return path


@pytest.fixture(scope="session")
def int_file(safetensors_torch, run):
    return _export(run, "int", "model.safetensors")


@pytest.fixture(scope="session")
def onnx_file(onnx, onnxruntime, run):
    return _export(run, "onnx", "model.onnx")


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def test_onnx_runtime_matches_pytorch_on_every_domain(onnxruntime, onnx_file, run, capsys):
    for domain, images in run.images.items():
        ort = export.onnx_logits(onnx_file, images, CHUNK)
        diff = float((ort - run.logits[domain]).abs().max())
        agree = _agreement(ort, run.logits[domain])
        with capsys.disabled():
            print(
                f"\n{run.bits}-bit {domain}: {len(images)} images, onnxruntime "
                f"{onnxruntime.__version__} vs PyTorch max |logit diff| {diff:.3g}, "
                f"top-1 agreement {agree:.4%}"
            )
        assert agree >= MIN_AGREEMENT
        assert diff < 0.05 * float(run.logits[domain].abs().max())


def test_onnx_graph_is_qdq_at_the_trained_bit_width(onnx, onnx_file, run):
    proto = onnx.load(onnx_file)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [12]
    nodes = proto.graph.node
    init = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    consts = {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in nodes
        if n.op_type == "Constant"
    }
    clips = [n for n in nodes if n.op_type == "Clip"]
    layers = export.quantized_layers(run.model)
    # Inputs: QuantizeLinear -> Clip to [0, 2^b - 1] (after ReLU) -> DequantizeLinear.
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) == len(clips) == len(layers)
    assert all(
        [int(consts[c.input[1]]), int(consts[c.input[2]])] == [0, 2**run.bits - 1] for c in clips
    )
    producers = {o: n for n in nodes for o in n.output}
    for clip in clips:
        assert producers[clip.input[0]].op_type == "QuantizeLinear"
        assert any(n.op_type == "DequantizeLinear" and n.input[0] == clip.output[0] for n in nodes)
    steps = sorted(float(init[producers[c.input[0]].input[1]]) for c in clips)
    assert steps == sorted(float(m.input_quantizer.scale.detach()) for m in layers.values())
    # Weights: int8 codes -> DequantizeLinear; the float stem conv and classifier stay float.
    codes = [
        init[n.input[0]] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in init
    ]
    assert len(codes) == len(layers) and all(c.dtype == np.int8 for c in codes)
    assert init["classifier.weight"].dtype == np.float32
    assert _json_prop(proto, "bits") == run.bits and _json_prop(proto, "classes")[0] == "0"


def _json_prop(proto, key):
    return json.loads({p.key: p.value for p in proto.metadata_props}[key])


def test_int_export_round_trips_with_identical_logits(int_file, run):
    model = export.load_int(int_file)
    for domain, images in run.images.items():
        n = 2 * CHUNK  # bit identity needs no more
        assert torch.equal(_logits(model, images[:n]), run.logits[domain][:n])
    header = export.int_metadata(int_file)
    assert header["bits"] == run.bits and header["domains"][1] == "mnist_m"
    assert header["layers"]["featurizer.3"] == {
        "kind": "QuantConv2d",
        "weight_bits": run.bits,
        "per_channel": False,
        "act_bits": run.bits,
        "input_signed": False,
    }


def test_weight_codes_use_at_most_2_to_the_b_values(
    safetensors_torch, onnx, int_file, onnx_file, run
):
    tensors = safetensors_torch.load_file(int_file)
    onnx_codes = [
        onnx.numpy_helper.to_array(i)
        for i in onnx.load(onnx_file).graph.initializer
        if i.data_type == onnx.TensorProto.INT8
    ]
    int_codes = [t for k, t in tensors.items() if k.endswith(".weight_codes")]
    assert len(int_codes) == len(onnx_codes) == 3
    for a, b in zip(int_codes, onnx_codes):
        assert a.dtype == torch.int8 and np.array_equal(a.numpy(), b)
        assert len(torch.unique(a)) <= 2**run.bits
        assert -(2 ** (run.bits - 1)) <= int(a.min()) and int(a.max()) < 2 ** (run.bits - 1)
    for name, layer in export.quantized_layers(run.model).items():
        step = tensors[f"{name}.weight_quantizer.scale"]
        assert torch.equal(
            tensors[name + ".weight_codes"] * step, layer.weight_quantizer(layer.weight).detach()
        )


def test_packed_size_against_float(int_file, onnx_file, run, capsys):
    sizes = export.model_sizes(run.model)
    assert sizes == {
        "packed_bytes": QUANTIZED_WEIGHTS * run.bits // 8 + 4 * (FLOAT_VALUES + STEP_SIZES),
        "float_bytes": 4 * (QUANTIZED_WEIGHTS + FLOAT_VALUES),
    }
    assert export.int_metadata(int_file)["packed_bytes"] == sizes["packed_bytes"]
    with capsys.disabled():
        print(
            f"\n{run.bits}-bit sizes: {sizes}, {sizes['float_bytes'] / sizes['packed_bytes']:.2f}x "
            f"smaller; files: int {int_file.stat().st_size} B, onnx "
            f"{onnx_file.stat().st_size} B"
        )


def test_batchnorm_folds_only_into_a_float_conv():
    """Folding is plain PyTorch: it needs no export extra."""
    torch.manual_seed(0)
    model = quantize_model(build_model(ModelConfig()), QuantConfig(4, 4))
    images = torch.randn(16, 3, 32, 32)
    model(images)  # initialises the quantizers, moves BN's running statistics
    model.eval()
    with torch.no_grad():
        before = model(images)
        with pytest.raises(ValueError, match="cannot fold .*featurizer.4"):
            quantized_conv = {"featurizer.4": "featurizer.3"}
            export.fold_into_float_convs(model, quantized_conv)
        assert export.fold_into_float_convs(model) == {"featurizer.1": "featurizer.0"}
        change = float((model(images) - before).abs().max())
    assert change < 0.05 * float(before.abs().max())


def test_export_with_fold_bn_keeps_codes_and_predictions(safetensors_torch, int_file, run, capsys):
    path = _export(run, "int", "folded.safetensors", "--fold-bn")
    assert "folded batch norm ['featurizer.1']" in capsys.readouterr().out
    folded = export.load_int(path)
    assert isinstance(folded.featurizer[1], nn.Identity)
    assert isinstance(folded.featurizer[4], nn.BatchNorm2d)  # after a quantized conv: kept
    plain, codes = safetensors_torch.load_file(int_file), safetensors_torch.load_file(path)
    assert all(torch.equal(plain[k], codes[k]) for k in plain if k.endswith("_codes"))
    for domain, held_out in run.held_out.items():  # the 20% split: folding is a side check
        logits, reference = (
            _logits(folded, run.images[domain][held_out]),
            run.logits[domain][held_out],
        )
        change, agree = float((logits - reference).abs().max()), _agreement(logits, reference)
        with capsys.disabled():
            print(
                f"\n{run.bits}-bit {domain}: {len(held_out)} held-out images, BN folding "
                f"max |logit change| {change:.3g}, top-1 agreement {agree:.4%}"
            )
        assert agree >= MIN_FOLD_AGREEMENT and change < 0.05 * float(reference.abs().max())


def test_per_channel_model_exports_at_opset_13(tmp_path, onnx, onnxruntime):
    torch.manual_seed(0)
    model = quantize_model(build_model(ModelConfig()), QuantConfig(4, 4, per_channel=True))
    images = torch.randn(16, 3, 32, 32)
    model(images)  # initialises the quantizers
    model.eval()
    assert export.export_onnx(model, tmp_path / "m.onnx", 32) == 13
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(export.onnx_ready(model)(images), expected)
    assert float((export.onnx_logits(tmp_path / "m.onnx", images) - expected).abs().max()) < 1e-4


def test_float_checkpoint_is_refused(digits, tmp_path, capsys):
    _checkpoint(build_model(ModelConfig()), None, digits[0], None, tmp_path / "float.pt")
    assert (
        cli.main(
            [
                "export",
                str(tmp_path / "float.pt"),
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 2
    )
    assert "is a float model" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_corrupt_files_get_clear_errors(safetensors_torch, int_file, run, tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["export", str(bad), "--format", "int", "--out", str(tmp_path / "x")]) == 2
    assert "not a readable torch file" in capsys.readouterr().err

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(int_file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        export.load_int(truncated)

    foreign = tmp_path / "foreign.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="format is None, expected 'gaqat-int'"):
        export.load_int(foreign)

    tampered = tmp_path / "tampered.safetensors"
    header = {k: json.dumps(v) for k, v in export.int_metadata(int_file).items()}
    for key, value, error in (
        (
            "model_config",
            {**ModelConfig().to_dict(), "width": 3},
            r"model_config has unknown entries \['width'\]",
        ),
        ("folded_bn", {"featurizer.4": "featurizer.3"}, "cannot fold"),
    ):  # a quantized conv
        safetensors_torch.save_file(
            safetensors_torch.load_file(int_file), tampered, {**header, key: json.dumps(value)}
        )
        with pytest.raises(ValueError, match=error):
            export.load_int(tampered)

    tensors = safetensors_torch.load_file(int_file)
    tensors["featurizer.3.weight_codes"][0, 0, 0, 0] = 2 ** (run.bits - 1)  # one past q_max
    safetensors_torch.save_file(tensors, tampered, header)
    with pytest.raises(ValueError, match=r"featurizer.3.weight_codes must be int8 codes"):
        export.load_int(tampered)


def test_export_imports_without_the_extra():
    """gaqat.export imports without safetensors, onnx and onnxruntime; what needs one of
    them names the extra to install."""
    code = (
        "import sys\n"
        "sys.modules.update(dict.fromkeys(['safetensors', 'onnx', 'onnxruntime']))\n"
        "from gaqat import export\n"
        "export.load_int('model.safetensors')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "RuntimeError: export needs safetensors" in done.stderr
    assert 'pip install "gaqat[export]"' in done.stderr


# Quantized convs, and those onnxruntime runs as QLinearConv in an --integer-kernels file:
# all but the projections whose output meets a residual add (16 in MobileNetV2, 14 in
# EfficientNet-Lite0) and the last 1x1 conv (it feeds the float pooling); EfficientNet's
# stride-2 "same" padding is merged into its convolutions' pads.
FUSED_CONVS = {"mobilenet_v2": (51, 35), "efficientnet_lite0": (48, 33)}


def _calibrated(arch: str, config: QuantConfig):
    """A quantized network in eval mode whose batch norms hold one batch's statistics, so
    that the activations spread over the quantizers' ranges as a trained network's do;
    and that batch."""
    torch.manual_seed(0)
    model = quantize_model(build_model(ModelConfig(arch=arch)), config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # one batch: its own statistics
    images = torch.randn(8, 3, 32, 32)
    model(images)  # initialises the quantizers
    update_running_statistics(model)
    return model.eval(), images


@pytest.mark.parametrize(("arch", "fold"), [("mobilenet_v2", True), ("efficientnet_lite0", False)])
def test_mobile_nets_export_to_onnx_that_onnxruntime_agrees_with(
    arch, fold, tmp_path, onnx, onnxruntime
):
    """Depthwise convs with per-channel step sizes, ReLU6, residual adds, a float stem
    (and EfficientNet's TensorFlow "same" padding); batch norm trained folded, or folded
    by the export into the step sizes. The batch norms hold one batch's statistics, so
    that the activations spread over the quantizers' ranges as a trained network's do."""
    model, images = _calibrated(arch, QuantConfig(4, 4, fold_batch_norm=fold))
    export.export_onnx(model, tmp_path / "m.onnx", 32)
    with torch.no_grad():
        expected = model(images)
    assert float((export.onnx_logits(tmp_path / "m.onnx", images) - expected).abs().max()) < 1e-3
    # Every batch norm after a quantized conv folds into its step sizes, every ReLU6 before
    # a quantizer into its integer range, every zero padding into a convolution's pads.
    export.export_onnx(model, tmp_path / "integer.onnx", 32, integer_kernels=True)
    proto = onnx.load(str(tmp_path / "integer.onnx"))
    assert not {"BatchNormalization", "Pad"} & {n.op_type for n in proto.graph.node}
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(
        str(tmp_path / "integer.onnx"), options, providers=["CPUExecutionProvider"]
    )
    optimised = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    convs, fused = FUSED_CONVS[arch]
    assert len(export.quantized_layers(model)) == convs
    assert optimised.count("QLinearConv") == fused and "Pad" not in optimised
    # The integer kernels add the int32 biases the model evaluates with: float rounding.
    integer = export.onnx_logits(tmp_path / "integer.onnx", images)
    assert torch.equal(integer.argmax(1), expected.argmax(1))
    assert float((integer - expected).abs().max()) < 1e-4
    side = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[2:]]
    assert side == ([32, 32] if arch == "efficientnet_lite0" else [0, 0])  # 0: dynamic


@pytest.mark.parametrize("bits", [4, 3])
def test_int4_weights_hold_the_same_codes_in_half_the_bytes(bits, tmp_path, onnx, onnxruntime):
    torch.manual_seed(0)
    model = quantize_model(build_model(ModelConfig()), QuantConfig(bits, bits))
    images = torch.randn(16, 3, 32, 32)
    model(images)  # initialises the quantizers
    model.eval()
    int8, int4 = tmp_path / "int8.onnx", tmp_path / "int4.onnx"
    export.export_onnx(model, int8, 32)
    assert export.export_onnx(model, int4, 32, int4_weights=True) == 21
    initializers = onnx.load(str(int4)).graph.initializer
    packed = [t for t in initializers if t.data_type == onnx.TensorProto.INT4]
    assert len(packed) == 3  # the three quantized convs; stem and classifier stay float
    codes = sum(m.weight.numel() for m in export.quantized_layers(model).values())
    assert int8.stat().st_size - int4.stat().st_size >= codes // 2 - 64
    assert torch.equal(export.onnx_logits(int4, images), export.onnx_logits(int8, images))


def test_every_backbone_has_a_default_export_size():
    assert set(export.INPUT_SIZES) == set(ARCHITECTURES)


@pytest.mark.slow
def test_integer_kernels_onnx_runs_qlinearconv_and_agrees_on_every_domain(
    onnx, onnxruntime, run, tmp_path, capsys
):
    """Batch norm folded into the quantized convs' per-channel scales: onnxruntime's
    optimised graph has a QLinearConv for every quantized conv that feeds another
    quantizer (2 of the small CNN's 3; the last one feeds the float pooling and head).
    Evaluated in float (no graph optimisation) the folded graph is the model up to
    rounding; the integer kernels add the int32 biases the model evaluates with, and
    their requantisation moves an activation code only where it sits on a .5 tie."""
    path = _export(run, "onnx", "integer.onnx", "--integer-kernels")
    levels = onnxruntime.GraphOptimizationLevel
    sessions = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = getattr(levels, level)
        if level == "ORT_ENABLE_ALL":
            options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
        sessions[level] = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "BatchNormalization" not in ops
    for domain, images in run.images.items():
        expected = run.logits[domain]
        logits = {
            level: torch.cat(
                [
                    torch.from_numpy(session.run(None, {"images": chunk.numpy()})[0])
                    for chunk in images.split(CHUNK)
                ]
            )
            for level, session in sessions.items()
        }
        agree = _agreement(logits["ORT_ENABLE_ALL"], expected)
        with capsys.disabled():
            print(
                f"\n{run.bits}-bit {domain}: integer kernels, top-1 agreement with PyTorch "
                f"{agree:.4%}; folded graph in float: max |logit diff| "
                f"{float((logits['ORT_DISABLE_ALL'] - expected).abs().max()):.3g}"
            )
        assert _agreement(logits["ORT_DISABLE_ALL"], expected) >= MIN_FOLD_AGREEMENT
        assert agree >= MIN_INTEGER_AGREEMENT


def test_a_network_trained_with_batch_norm_folded_exports_as_trained(
    digits, tmp_path, onnx, onnxruntime, safetensors_torch
):
    """QuantConfig.fold_batch_norm: the int file gives the trained network's logits bit for
    bit, and even without --integer-kernels no batch norm stands between a quantized conv
    and the next quantizer, so onnxruntime fuses QLinearConv."""
    ds, data = digits
    torch.manual_seed(0)
    quant = QuantConfig(4, 4, fold_batch_norm=True)
    model = quantize_model(build_model(ModelConfig()), quant)
    images = torch.cat([x[:16] for x, *_ in data.values()])
    model.train()(images)  # initialises the quantizers, moves the running statistics
    model.eval()
    _checkpoint(model, quant, ds, 4, tmp_path / "checkpoint.pt")
    folder = SimpleNamespace(folder=tmp_path)
    with torch.no_grad():
        expected = model(images)
        loaded = export.load_int(_export(folder, "int", "model.safetensors"))
        assert torch.equal(loaded(images), expected)
    path = _export(folder, "onnx", "model.onnx")
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "BatchNormalization" not in ops
    assert float((export.onnx_logits(path, images) - expected).abs().max()) < 1e-2


def test_relu6_and_signed_inputs_become_integer_ranges_with_the_same_logits(
    onnx, onnxruntime, tmp_path
):
    """--integer-kernels: a ReLU6 that feeds only quantized layers becomes ReLU with its clip
    in their integer ranges, and signed activations are stored as uint8 around zero point
    128; in PyTorch the model computes the same features bit for bit (its logits up to
    the float rounding of the quantized classifier, which the model evaluates with the
    integer kernel's arithmetic), and onnxruntime fuses both quantized convs that feed a
    quantizer."""
    from gaqat.export.qdq import onnx_ready
    from gaqat.models import Network

    torch.manual_seed(0)
    featurizer = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1),  # its input is signed: the image
        nn.ReLU6(),
        nn.Conv2d(8, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model = quantize_model(Network(featurizer, 8, 10), QuantConfig(4, 4, first_last="same"))
    x = torch.randn(16, 3, 12, 12) * 3  # wide enough that the ReLU6 clips
    model.train()(x)
    model.eval()
    ready = onnx_ready(model, integer_kernels=True)
    assert not any(isinstance(m, nn.ReLU6) for m in ready.featurizer.modules())
    with torch.no_grad():
        assert torch.equal(ready.featurizer(x), model.featurizer(x))
        assert torch.allclose(ready(x), model(x), rtol=0, atol=1e-5)
    path = tmp_path / "m.onnx"
    export.export_onnx(model, path, 12, integer_kernels=True)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2


def _optimised_ops(onnx, onnxruntime, path, tmp_path) -> list[str]:
    """The node types of ``path``'s graph after onnxruntime's CPU optimisations."""
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]


def test_residual_quantizers_make_mobilenet_v2_one_integer_region(
    tmp_path, onnx, onnxruntime, safetensors_torch
):
    """QuantConfig.residual_bits: 8-bit quantizers on the residual stream (the projections'
    outputs, the first skip of each run of residual blocks, the adds' outputs). With
    --integer-kernels onnxruntime then runs 50 of the 51 quantized convs as QLinearConv
    (35 without; the last 1x1 conv feeds the float pooling) and all 10 residual adds as
    QLinearAdd (float Add without), and agrees with PyTorch, whose evaluation computes the
    adds as onnxruntime's QLinearAdd does (``gaqat.residual.runtime_add``: with a float
    sum, 27 of block 8's 4,096 outputs, at 3.49999 steps, took the other code and moved
    the logits by 0.1); the QDQ file and the int file carry the new quantizers too."""
    quant = QuantConfig(4, 4, fold_batch_norm=True, residual_bits=8)
    model, images = _calibrated("mobilenet_v2_compact", quant)
    with torch.no_grad():
        expected = model(images)
    path = tmp_path / "integer.onnx"
    export.export_onnx(model, path, 32, integer_kernels=True)
    ops = _optimised_ops(onnx, onnxruntime, path, tmp_path)
    assert len(export.quantized_layers(model)) == 51
    assert ops.count("QLinearConv") == 50 and ops.count("QLinearAdd") == 10
    assert ops.count("Conv") == 1 and "Add" not in ops  # the last 1x1 conv; the stem: FusedConv
    integer = export.onnx_logits(path, images)
    assert torch.equal(integer.argmax(1), expected.argmax(1))
    assert float((integer - expected).abs().max()) < 1e-5
    # The plain QDQ file: one QuantizeLinear more per residual quantizer (25), signed: int8,
    # and one less per layer that reads the stream's codes (15).
    plain = tmp_path / "plain.onnx"
    export.export_onnx(model, plain, 32)
    nodes = onnx.load(str(plain)).graph.node
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) == 51 + 25 - 15
    # Its adds are float Add -> QuantizeLinear: that near-tie takes the float sum's code.
    assert torch.equal(export.onnx_logits(plain, images).argmax(1), expected.argmax(1))
    header = {"model_config": ModelConfig(arch="mobilenet_v2_compact").to_dict()}
    header |= {"quant_config": asdict(quant), "meta": {"bits": 4}}
    export.export_int(deployable(deepcopy(model)), tmp_path / "model.safetensors", header)
    with torch.no_grad():
        assert torch.equal(export.load_int(tmp_path / "model.safetensors")(images), expected)
