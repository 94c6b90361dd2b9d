"""Deployment: a quantized checkpoint as an integer file and as an ONNX QDQ model.

A fake-quantized checkpoint holds float weights that the forward pass rounds on the
fly; a deployed model holds the rounded integers. Two formats:

``int`` (safetensors): per quantized layer the weight codes ``round(clamp(w/s))`` as
int8 tensors (b-bit values), the weight step size(s) and the input step size as used in
the forward pass (floored at ``MIN_STEP``); every other tensor as stored (batch norm,
the float first/last layers, biases); in the JSON header the configs, the checkpoint's
meta (bits, classes, domains, ...), per-layer bit widths and signedness. ``load_int``
rebuilds the fake-quantized model from that file alone, with bit-identical logits:
``codes * s`` quantizes back to the same codes.

``onnx``: weights as int8 initializers of the codes followed by DequantizeLinear (the
form ONNX Runtime's own quantizer writes: the file stores integers and the codes are
those of the int file, bit for bit); input activations through QuantizeLinear -> Clip ->
DequantizeLinear ("QCDQ", as brevitas exports) with the learned step size and zero
point 0. QuantizeLinear only knows 8-bit (and, from opset 21, 4-bit) types, so a b-bit
range is the 8-bit type clipped in the integer domain to [q_min, q_max]: exact for any
b in 2..8. Clip takes integer tensors from opset 12 and QuantizeLinear takes a
per-channel ``axis`` from opset 13, so models are written at opset 12, or 13 with
per-channel weight scales: the lowest opsets that express them. Float layers stay float.

Rounding: the fake quantizer computes ``x * (1/s)``, QuantizeLinear ``x / s``, and
ONNX Runtime's convolutions (the stem fused with its BN) sum in another order; any of
these moves a value by an ulp, which changes an activation code only where the value
sits on a .5 tie. The tests measure the effect on the logits on DigitsDG: a few images
in a thousand differ at all, and none in top-1.

Batch-norm folding (``fold_bn``) only folds a BN that follows a *float* convolution.
Folding into a quantized convolution would rescale its weights per channel, which
changes their integer codes (and makes a per-tensor step size wrong for every channel):
that is a different model from the one trained, so those BNs stay as they are. In
ONNX graphs the exporter fuses such a float conv + BN pair anyway (ONNX Runtime would
at load time), so the option changes the int file. Folding moves the conv's outputs by
an ulp or so, which flips the rare activation code that sits on a rounding tie.

The torch.export-based ONNX exporter needs onnxscript, which gaqat does not depend on;
the TorchScript exporter (``dynamo=False``) writes these graphs through the
``symbolic`` methods below.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gaqat.checkpoint import load_model
from gaqat.models import ModelConfig, Network, build_model
from gaqat.quant import MIN_STEP, QuantConfig, QuantConv2d, QuantLinear, lsq_quantize, \
    quantize_model

FORMATS = ("int", "onnx")
INT_FORMAT = "gaqat-int"
INT_FORMAT_VERSION = 1
#: Input side used to trace the ONNX graph and to probe it, per architecture (the
#: small CNN is built for 32x32 DigitsDG, ResNets for 224x224 photos).
INPUT_SIZES = {"small_cnn": 32, "resnet18": 224, "resnet50": 224}
PROBE_BATCH = 8

_QUANTIZED_TYPES = (QuantConv2d, QuantLinear)
_CODES = ".weight_codes"  # replaces a quantized layer's ".weight" in the int file
_EXPORT_EXTRA = "install the export extra: pip install 'gaqat[export]'"


# --------------------------------------------------------------------------- layers


def quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The quantized layers by qualified name; ValueError for a float model or one whose
    quantizers never saw a batch (they have no step size or signedness yet)."""
    layers = _layers(model)
    if not layers:
        raise ValueError("the model has no quantized layer: export writes QAT models "
                         "(train with a quantized algorithm, e.g. --algorithm lsq --bits 4)")
    fresh = [name for name, m in layers.items()
             if not (m.weight_quantizer.initialized and m.input_quantizer.initialized)]
    if fresh:
        raise ValueError(f"quantizers of {fresh} were never initialised: run a forward pass "
                         f"(train) before exporting")
    return layers


def _layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _QUANTIZED_TYPES)}


def weight_codes(layer: QuantConv2d | QuantLinear) -> torch.Tensor:
    """int8 codes of the layer's weight, with the fake quantizer's arithmetic, so that
    ``codes * step`` equals the fake-quantized weight bit for bit."""
    return layer.weight_quantizer.codes(layer.weight).to(torch.int8)


def _layer_info(layer: QuantConv2d | QuantLinear) -> dict:
    w, x = layer.weight_quantizer, layer.input_quantizer
    return {"kind": type(layer).__name__, "weight_bits": w.bits, "per_channel": w.per_channel,
            "act_bits": x.bits, "input_signed": x.signed}


# ------------------------------------------------------------------ batch-norm folding


class _Tracer(torch.fx.Tracer):
    """Treats quantized layers as opaque calls: only the data flow between modules matters."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _QUANTIZED_TYPES) or super().is_leaf_module(m, qualname)


def foldable_batchnorms(model: nn.Module) -> dict[str, str]:
    """{BN name: conv name} for each BatchNorm2d whose only input is a float nn.Conv2d
    used nowhere else (traced with torch.fx, so the pairing is the real data flow)."""
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.BatchNorm2d:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and type(modules[src.target]) is nn.Conv2d and len(src.users) == 1
                and calls[src.target] == calls[node.target] == 1
                and modules[node.target].track_running_stats):
            pairs[node.target] = src.target
    return pairs


def _make_folded(model: nn.Module, pairs: dict[str, str]) -> None:
    """The structure of a folded model: each BN replaced by Identity, its conv given a bias."""
    for bn_name, conv_name in pairs.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[str, str]:
    """Fold each BN that follows a float conv into it, in place (inference only: the
    running statistics are used); returns the folded {BN name: conv name}."""
    pairs = foldable_batchnorms(model)
    folded = {}
    for bn_name, conv_name in pairs.items():
        bn, conv = model.get_submodule(bn_name), model.get_submodule(conv_name)
        gain = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * gain
        if bn.affine:
            gain, shift = gain * bn.weight, shift * bn.weight + bn.bias
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        folded[conv_name] = (conv.weight * gain.view(-1, 1, 1, 1),
                             shift if bias is None else shift + bias * gain)
    _make_folded(model, pairs)
    for conv_name, (weight, bias) in folded.items():
        conv = model.get_submodule(conv_name)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return pairs


# ---------------------------------------------------------------------------- sizes


def model_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of the deployed model against the float one.

    ``packed_bytes``: each quantized weight as b-bit codes packed without gaps,
    ``ceil(numel * b / 8)``, plus every floating-point tensor (step sizes, biases,
    batch norm, float layers) at 32 bits. ``float_bytes``: the same network in float32
    (no step sizes). Integer bookkeeping (BN's ``num_batches_tracked``, the quantizers'
    flags) is in neither: it plays no part in inference.
    """
    layers = quantized_layers(model)
    weights = {f"{name}.weight": layer.weight_quantizer.bits for name, layer in layers.items()}
    packed = float_ = 0
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        n = tensor.numel()
        packed += math.ceil(n * weights[key] / 8) if key in weights else 4 * n
        float_ += 0 if key.endswith("_quantizer.scale") else 4 * n
    return {"packed_bytes": packed, "float_bytes": float_}


# ------------------------------------------------------------------------ int format


def export_int(model: nn.Module, path: str | Path, checkpoint: dict,
               folded: dict[str, str] | None = None) -> None:
    """Write ``model`` (built from ``checkpoint``'s configs, BN-folded as ``folded`` says)
    to a safetensors file; see the module docstring for what it holds."""
    safetensors_torch = _require("safetensors.torch")
    layers = quantized_layers(model)
    tensors = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf == "weight":
            tensors[owner + _CODES] = weight_codes(layers[owner])
        elif leaf == "scale" and owner.rpartition(".")[0] in layers:
            tensors[key] = tensor.clamp_min(MIN_STEP)
        elif leaf not in ("is_initialized", "signedness"):  # in the header's "layers"
            tensors[key] = tensor
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {
        "format": INT_FORMAT, "format_version": INT_FORMAT_VERSION,
        "model_config": checkpoint["model_config"], "quant_config": checkpoint["quant_config"],
        **checkpoint["meta"],
        "layers": {name: _layer_info(layer) for name, layer in layers.items()},
        "folded_bn": folded or {}, **model_sizes(model),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, str(path), {k: json.dumps(v) for k, v in header.items()})


def int_metadata(path: str | Path) -> dict:
    """The decoded JSON header of an int export; ValueError if the file is not one."""
    safetensors = _require("safetensors")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"integer export {path} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        header = {k: json.loads(v) for k, v in raw.items()}
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    if header.get("format") != INT_FORMAT:
        raise ValueError(f"{path}: header field format is {header.get('format')!r}, expected "
                         f"{INT_FORMAT!r} (a file written by `gaqat export --format int`)")
    if header.get("format_version") != INT_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {header.get('format_version')!r}, this "
                         f"gaqat reads version {INT_FORMAT_VERSION}")
    missing = [k for k in ("model_config", "quant_config", "layers", "folded_bn") if k not in header]
    if missing:
        raise ValueError(f"{path}: header lacks {missing}")
    return header


def load_int(path: str | Path) -> Network:
    """Rebuild the fake-quantized model (eval mode) from an int export alone."""
    safetensors_torch = _require("safetensors.torch")
    header = int_metadata(path)
    try:
        model = build_model(ModelConfig(**{**header["model_config"], "weights": None}))
        quantize_model(model, QuantConfig(**header["quant_config"]))
        _make_folded(model, header["folded_bn"])
    except (TypeError, AttributeError) as error:  # unknown fields or module names
        raise ValueError(f"{path}: header model_config/quant_config/folded_bn do not "
                         f"describe a gaqat model ({error})") from error
    try:
        tensors = safetensors_torch.load_file(str(path))
    except Exception as error:
        raise ValueError(f"{path}: tensors are not readable ({error})") from error
    layers = _layers(model)
    if set(layers) != set(header["layers"]):
        raise ValueError(f"{path}: quantized layers {sorted(header['layers'])} do not match "
                         f"the model its configs build ({sorted(layers)})")
    state = {}
    for name, layer in layers.items():
        info = header["layers"][name]
        if info != {**_layer_info(layer), "input_signed": info.get("input_signed")} or \
                not isinstance(info["input_signed"], bool):
            raise ValueError(f"{path}: layer {name} is {info}, its configs build "
                             f"{_layer_info(layer)}")
        codes = _pop(tensors, name + _CODES, path)
        q = layer.weight_quantizer
        if codes.dtype != torch.int8 or codes.shape != layer.weight.shape or \
                int(codes.min()) < q.q_min or int(codes.max()) > q.q_max:
            raise ValueError(f"{path}: {name}{_CODES} must be int8 codes of shape "
                             f"{tuple(layer.weight.shape)} in [{q.q_min}, {q.q_max}]")
        step = _pop(tensors, f"{name}.weight_quantizer.scale", path)
        state[f"{name}.weight"] = codes.to(step.dtype) * step
        state[f"{name}.weight_quantizer.scale"] = step
        for role, signed in (("weight", True), ("input", info["input_signed"])):
            state[f"{name}.{role}_quantizer.is_initialized"] = torch.tensor(True)
            state[f"{name}.{role}_quantizer.signedness"] = torch.tensor(int(signed),
                                                                        dtype=torch.int8)
    state.update(tensors)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path}: tensors do not fit the model its header describes "
                         f"({error})") from error
    return model.eval()


def _pop(tensors: dict, key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path}: tensor {key} is missing")
    return tensors.pop(key)


# ----------------------------------------------------------------------------- ONNX


def onnx_opset(model: nn.Module) -> int:
    """The lowest opset expressing the model's QDQ graph: 12 (Clip on integer tensors),
    13 when some weight has per-channel step sizes (QuantizeLinear's ``axis``)."""
    layers = quantized_layers(model)
    return 13 if any(m.weight_quantizer.per_channel for m in layers.values()) else 12


class _Dequantize(torch.autograd.Function):
    """codes * step in PyTorch; DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, codes, step, per_channel):
        shape = (-1,) + (1,) * (codes.dim() - 1) if per_channel else ()
        return codes.to(step.dtype) * step.view(shape)

    @staticmethod
    def symbolic(g, codes, step, per_channel):
        zero = g.op("Constant", value_t=torch.zeros(step.type().sizes(), dtype=torch.int8))
        if per_channel:
            return g.op("DequantizeLinear", codes, step, zero, axis_i=0)
        return g.op("DequantizeLinear", codes, step, zero)


class _FakeQuantize(torch.autograd.Function):
    """LSQ's fake quantization in PyTorch; QuantizeLinear -> Clip -> DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, x, step, q_min, q_max):
        return lsq_quantize(x, step, q_min, q_max, 1.0)

    @staticmethod
    def symbolic(g, x, step, q_min, q_max):
        dtype = torch.int8 if q_min < 0 else torch.uint8
        info = torch.iinfo(dtype)
        zero = g.op("Constant", value_t=torch.zeros((), dtype=dtype))
        q = g.op("QuantizeLinear", x, step, zero)
        if (q_min, q_max) != (info.min, info.max):
            bounds = [g.op("Constant", value_t=torch.tensor(v, dtype=dtype)) for v in (q_min, q_max)]
            q = g.op("Clip", q, *bounds)
        return g.op("DequantizeLinear", q, step, zero)


class _ExportedWeight(nn.Module):
    """Stands in for a weight quantizer: holds the codes, ignores the float weight."""

    def __init__(self, layer: QuantConv2d | QuantLinear):
        super().__init__()
        q = layer.weight_quantizer
        self.per_channel = q.per_channel
        self.register_buffer("codes", weight_codes(layer))
        self.register_buffer("step", q.step_size().flatten() if q.per_channel else q.step_size().view(()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _Dequantize.apply(self.codes, self.step, self.per_channel)


class _ExportedInput(nn.Module):
    """Stands in for an input quantizer, with a fixed step size and signedness."""

    def __init__(self, layer: QuantConv2d | QuantLinear):
        super().__init__()
        q = layer.input_quantizer
        self.q_min, self.q_max = q.q_min, q.q_max
        self.register_buffer("step", q.step_size().view(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FakeQuantize.apply(x, self.step, self.q_min, self.q_max)


def onnx_ready(model: nn.Module) -> nn.Module:
    """A CPU eval copy whose quantizers export as QDQ nodes; in PyTorch it computes the
    same logits as ``model`` bit for bit."""
    layers = quantized_layers(model)
    ready = deepcopy(model).cpu().eval()
    for name in layers:
        layer = ready.get_submodule(name)
        layer.weight_quantizer = _ExportedWeight(layer)
        layer.input_quantizer = _ExportedInput(layer)
    return ready


def export_onnx(model: nn.Module, path: str | Path, input_size: int,
                properties: dict | None = None) -> int:
    """Write the QDQ ONNX model (input "images" N x 3 x H x W, output "logits", batch and
    image side dynamic) with ``properties`` as JSON metadata; returns the opset used."""
    onnx = _require("onnx")
    opset = onnx_opset(model)
    ready = onnx_ready(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        # The torch.export-based exporter needs onnxscript; the TorchScript one does not,
        # and says (twice) that it is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(ready, (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in (properties or {}).items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return opset


def onnx_logits(path: str | Path, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits of an exported model under ONNX Runtime (CPU), ``batch_size`` images a run."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    # Idle threads spinning for work cost more than they save on a shared CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(session.run(None, {"images": batch.cpu().numpy()})[0])
                      for batch in images.split(batch_size)])


# ----------------------------------------------------------------------- entry point


@dataclass
class ExportSummary:
    """What ``export_checkpoint`` did, for the command line and for callers."""

    path: Path
    format: str
    file_bytes: int
    packed_bytes: int
    float_bytes: int
    opset: int | None = None
    folded_bn: dict[str, str] = field(default_factory=dict)
    fold_max_abs_change: float | None = None
    onnx_max_abs_diff: float | None = None

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, {self.file_bytes} bytes on disk)",
                 f"deployed size: {self.packed_bytes} bytes with bit-packed codes vs "
                 f"{self.float_bytes} bytes in float32 ({self.float_bytes / self.packed_bytes:.2f}x "
                 f"smaller)"]
        if self.opset is not None:
            lines.append(f"ONNX opset {self.opset}; ONNX Runtime vs PyTorch on {PROBE_BATCH} "
                         f"seeded N(0,1) inputs: max abs logit difference "
                         f"{self.onnx_max_abs_diff:.3g}")
        if self.fold_max_abs_change is not None:
            lines.append(f"folded batch norm {sorted(self.folded_bn)} into float convs; max abs "
                         f"logit change on the probe inputs {self.fold_max_abs_change:.3g}")
        return "\n".join(lines)


def probe_inputs(input_size: int, n: int = PROBE_BATCH) -> torch.Tensor:
    """A seeded N(0,1) batch: the scale of normalised images, the same on every machine."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, input_size, input_size, generator=generator)


@torch.no_grad()
def export_checkpoint(checkpoint_path: str | Path, fmt: str, out: str | Path,
                      fold_bn: bool = False, input_size: int | None = None) -> ExportSummary:
    """``gaqat export``: load a QAT checkpoint, optionally fold BN into float convs,
    write the ``int`` or ``onnx`` file, and say what was written and how it checks."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {FORMATS}")
    if input_size is not None and input_size < 1:
        raise ValueError(f"input size: expected a positive image side, got {input_size}")
    model, checkpoint = load_model(checkpoint_path)
    if checkpoint["quant_config"] is None:
        raise ValueError(f"checkpoint {checkpoint_path} is a float model (quant_config is "
                         f"None, algorithm {checkpoint['meta'].get('algorithm')!r}): export "
                         f"writes QAT checkpoints (e.g. gaqat train --algorithm gaqat --bits 4)")
    model.eval()
    quantized_layers(model)
    input_size = input_size or INPUT_SIZES[checkpoint["model_config"]["arch"]]
    probe = probe_inputs(input_size)
    summary = {}
    if fold_bn:
        before = model(probe)
        summary["folded_bn"] = fold_batchnorm(model)
        summary["fold_max_abs_change"] = float((model(probe) - before).abs().max())
    out = Path(out)
    if fmt == "int":
        export_int(model, out, checkpoint, summary.get("folded_bn"))
    else:
        summary["opset"] = export_onnx(model, out, input_size, {
            **checkpoint["meta"], "model_config": checkpoint["model_config"],
            "quant_config": checkpoint["quant_config"]})
        diff = onnx_logits(out, probe) - model(probe)
        summary["onnx_max_abs_diff"] = float(diff.abs().max())
    return ExportSummary(out, fmt, out.stat().st_size, **model_sizes(model), **summary)


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(f"export needs {module.split('.')[0]} ({error}); "
                           f"{_EXPORT_EXTRA}") from error
