"""The ``int`` format: one safetensors file holding the integers a deployment runs on.

Per quantized layer the weight codes ``round(clamp(w/s))`` as int8 tensors (b-bit
values), the weight step size(s) and the input step size as used in the forward pass
(floored at ``MIN_STEP``), and so the step sizes of the residual stream's quantizers
(``gaqat.residual``, whose signedness the block's type fixes) and of the head's
(``gaqat.head``, unsigned); every other tensor as stored (batch norm, the float
first/last layers, biases); in the JSON header the configs, the checkpoint's meta (bits,
classes, domains, ...), per-layer bit widths and signedness, the folded batch norms and
the sizes. ``load_int`` rebuilds the
fake-quantized model from that file alone, with bit-identical logits: ``codes * s``
quantizes back to the same codes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gaqat.bn_folding import deployable, fold_into_float_convs
from gaqat.checkpoint import build_network
from gaqat.export.extra import require
from gaqat.export.layers import (
    layer_info,
    model_sizes,
    quantized_layers,
    quantized_modules,
    weight_codes,
)
from gaqat.export.output import write_outputs
from gaqat.models import Network
from gaqat.quant import MIN_STEP, LsqQuantizer, quantizers

INT_FORMAT = "gaqat-int"
INT_FORMAT_VERSION = 1
_CODES = ".weight_codes"  # replaces a quantized layer's ".weight" in the int file


def export_int(
    model: nn.Module, path: str | Path, checkpoint: dict, folded: dict[str, str] | None = None
) -> None:
    """Write ``int_bytes`` to a file, atomically."""
    write_outputs({Path(path): int_bytes(model, checkpoint, folded)})


def int_bytes(model: nn.Module, checkpoint: dict, folded: dict[str, str] | None = None) -> bytes:
    """``model`` (built from ``checkpoint``'s configs, BN-folded as ``folded`` says) as a
    safetensors file; see the module docstring for what it holds."""
    safetensors_torch = require("safetensors.torch")
    layers = quantized_layers(model)
    tensors = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf == "weight":
            tensors[owner + _CODES] = weight_codes(layers[owner])
        elif leaf == "scale" and owner.endswith("_quantizer"):  # layers', residual stream's, head's
            tensors[key] = tensor.clamp_min(MIN_STEP)
        elif leaf not in ("is_initialized", "signedness"):  # in the header's "layers"
            tensors[key] = tensor
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {
        "format": INT_FORMAT,
        "format_version": INT_FORMAT_VERSION,
        "model_config": checkpoint["model_config"],
        "quant_config": checkpoint["quant_config"],
        **checkpoint["meta"],
        "layers": {name: layer_info(layer) for name, layer in layers.items()},
        "folded_bn": folded or {},
        **model_sizes(model),
    }
    return safetensors_torch.save(tensors, {k: json.dumps(v) for k, v in header.items()})


def int_metadata(path: str | Path) -> dict:
    """The decoded JSON header of an int export; ValueError if the file is not one."""
    safetensors = require("safetensors")
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
        raise ValueError(
            f"{path}: header field format is {header.get('format')!r}, expected "
            f"{INT_FORMAT!r} (a file written by `gaqat export --format int`)"
        )
    if header.get("format_version") != INT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {header.get('format_version')!r}, this "
            f"gaqat reads version {INT_FORMAT_VERSION}"
        )
    missing = [
        k for k in ("model_config", "quant_config", "layers", "folded_bn") if k not in header
    ]
    if missing:
        raise ValueError(f"{path}: header lacks {missing}")
    return header


def load_int(path: str | Path) -> Network:
    """Rebuild the fake-quantized model (eval mode) from an int export alone: the network
    its header's configs describe, built as a checkpoint's is, folded as the header says,
    with weights ``codes * step``."""
    safetensors_torch = require("safetensors.torch")
    header = int_metadata(path)
    try:
        model = deployable(build_network(header["model_config"], header["quant_config"]))
        fold_into_float_convs(model, header["folded_bn"])
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path}: header model_config/quant_config/folded_bn do not "
            f"describe a gaqat model ({error})"
        ) from error
    try:
        tensors = safetensors_torch.load_file(str(path))
    except Exception as error:
        raise ValueError(f"{path}: tensors are not readable ({error})") from error
    layers = quantized_modules(model)
    if set(layers) != set(header["layers"]):
        raise ValueError(
            f"{path}: quantized layers {sorted(header['layers'])} do not match "
            f"the model its configs build ({sorted(layers)})"
        )
    state = {}
    for name, layer in layers.items():
        info = header["layers"][name]
        if info != {
            **layer_info(layer),
            "input_signed": info.get("input_signed"),
        } or not isinstance(info["input_signed"], bool):
            raise ValueError(
                f"{path}: layer {name} is {info}, its configs build {layer_info(layer)}"
            )
        codes = _pop(tensors, name + _CODES, path)
        q = layer.weight_quantizer
        if (
            codes.dtype != torch.int8
            or codes.shape != layer.weight.shape
            or int(codes.min()) < q.q_min
            or int(codes.max()) > q.q_max
        ):
            raise ValueError(
                f"{path}: {name}{_CODES} must be int8 codes of shape "
                f"{tuple(layer.weight.shape)} in [{q.q_min}, {q.q_max}]"
            )
        step = _pop(tensors, f"{name}.weight_quantizer.scale", path)
        state[f"{name}.weight"] = codes.to(step.dtype) * step
        state[f"{name}.weight_quantizer.scale"] = step
        for role, signed in (("weight", True), ("input", info["input_signed"])):
            if not isinstance(getattr(layer, f"{role}_quantizer"), LsqQuantizer):
                continue  # a StreamInput: the residual stream's quantizer holds the state
            state[f"{name}.{role}_quantizer.is_initialized"] = torch.tensor(True)
            state[f"{name}.{role}_quantizer.signedness"] = torch.tensor(
                int(signed), dtype=torch.int8
            )
    for name, q in quantizers(model).items():
        if name.rpartition(".")[0] not in layers:  # residual stream's, head's: fixed when built
            state[f"{name}.is_initialized"] = torch.tensor(True)
            state[f"{name}.signedness"] = torch.tensor(int(q.signed), dtype=torch.int8)
    state.update(tensors)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{path}: tensors do not fit the model its header describes ({error})"
        ) from error
    return model.eval()


def _pop(tensors: dict, key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path}: tensor {key} is missing")
    return tensors.pop(key)
