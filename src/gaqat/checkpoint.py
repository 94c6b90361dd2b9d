"""Checkpoint files: written atomically, read back with errors that say what is wrong.

A checkpoint is one ``torch.save`` dict. Its keys:

- ``model``: the network's state_dict (quantizer step sizes and flags included);
- ``model_config``: :class:`gaqat.models.ModelConfig` as a dict;
- ``quant_config``: :class:`gaqat.quant.QuantConfig` as a dict, or None for float models;
- ``meta``: dataset, classes, domains, algorithm, bits, test_envs;
- training state (``step``, ``optimizer``, ``rng``, ...) when written by ``gaqat train``.

``load_model`` is all that ``export`` and evaluation need: it rebuilds the architecture
from the stored configs, so a checkpoint is usable without the command that made it.
Checkpoints hold tensors and plain Python values only and are read with
``weights_only=True``: opening someone else's checkpoint never runs pickled code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch

from gaqat.fields import check_fields
from gaqat.models import ModelConfig, Network, build_model
from gaqat.prepare import quantize_model
from gaqat.quant import QuantConfig
from gaqat.runfolder import CHECKPOINT, replace_atomic

REQUIRED_KEYS = ("model", "model_config", "quant_config", "meta")
# The types of the fields gaqat reads (``gaqat.fields``), so that a hand-edited checkpoint
# is refused by name when it is read rather than failing somewhere later.
_REQUIRED = {"model": dict, "model_config": dict, "model_config.arch": str, "meta": dict}
_OPTIONAL = {
    "model_config.num_classes": int,
    "model_config.freeze_bn": bool,
    "model_config.dropout": float,
    "meta.dataset": str,
    "meta.algorithm": str,
    "meta.classes": list,
    "meta.domains": list,
    "meta.test_envs": list,
    "args": dict,
}
# Fields that a float model's checkpoint holds as None.
_NULLABLE = {"quant_config": dict, "meta.bits": int}


def save_atomic(obj: dict, path: str | Path) -> None:
    """A crash never leaves a half-written checkpoint where a good one was."""
    replace_atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    require: Mapping[str, type] | None = None,
) -> dict:
    """The checkpoint at ``path``, its fields checked (``gaqat.fields``), ValueError naming
    the file and the field otherwise. ``require``: more fields (dotted path -> type) that
    the caller reads, e.g. the training state a resumed run needs."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} is a folder; give the checkpoint file, e.g. {path / CHECKPOINT}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        refused = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), None)
        if refused:
            raise ValueError(
                f"checkpoint {path} holds Python objects, not only tensors and plain "
                f"values ({refused}); gaqat reads checkpoints with weights_only=True "
                f"and never runs code from a file"
            ) from None
        raise ValueError(f"checkpoint {path} is not a readable torch file") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, found {type(checkpoint).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(
            f"checkpoint {path}: missing keys {missing}; expected a file written "
            f"by `gaqat train` (keys {list(REQUIRED_KEYS)})"
        )
    _check_types(checkpoint, f"checkpoint {path}")
    return check_fields(checkpoint, require or {}, f"checkpoint {path}")


def _check_types(checkpoint: dict, where: str) -> None:
    check_fields(checkpoint, _REQUIRED, where)
    check_fields(checkpoint, _OPTIONAL, where, required=False)
    given = {key: kind for key, kind in _NULLABLE.items() if _value(checkpoint, key) is not None}
    check_fields(checkpoint, given, where)


def _value(checkpoint: dict, key: str) -> object:
    """The value at ``key``, one dot deep at most, whose parent is a dict (checked)."""
    parent, _, leaf = key.rpartition(".")
    return (checkpoint[parent] if parent else checkpoint).get(leaf)


def _config(cls, data: dict, key: str):
    """``cls(**data)``; errors name the stored field (``model_config.arch``), not the class."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"field {key} has unknown entries {unknown}")
    try:
        return cls(**data)
    except ValueError as error:
        raise ValueError(str(error).replace(f"{cls.__name__}.", f"{key}.")) from None


def build_network(model_config: dict, quant_config: dict | None) -> Network:
    """The untrained (possibly quantized) network that stored configs describe: a
    checkpoint's, or the header of an integer export (``gaqat.export.load_int``)."""
    model = build_model(_config(ModelConfig, {**model_config, "weights": None}, "model_config"))
    if quant_config is not None:
        quantize_model(model, _config(QuantConfig, dict(quant_config), "quant_config"))
    return model


def model_from_checkpoint(checkpoint: dict, path: str | Path = "<checkpoint>") -> Network:
    """Rebuild the (possibly quantized) network described by a checkpoint dict."""
    path = Path(path)
    try:
        model = build_network(checkpoint["model_config"], checkpoint["quant_config"])
    except ValueError as error:  # a field this gaqat does not know, or a value out of range
        raise ValueError(f"checkpoint {path}: {error}") from error
    _check_tensor_names(checkpoint["model"], model, path)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(
            f"checkpoint {path}: weights do not fit the stored configs "
            f"({' '.join(str(error).split())})"
        ) from error
    return model


def _check_tensor_names(state: dict, model: Network, path: Path) -> None:
    """The stored weights' names against the network's, in one line however many differ."""
    wanted, stored = set(model.state_dict()), set(state)
    problems = [
        f"{verb} {len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        for verb, what, names in (
            ("lacks", "tensors", sorted(wanted - stored)),
            ("has", "unknown tensors", sorted(stored - wanted)),
        )
        if names
    ]
    if problems:
        raise ValueError(
            f"checkpoint {path}: field 'model' {' and '.join(problems)}; expected the "
            f"weights of the network that model_config and quant_config describe"
        )


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Network, dict]:
    checkpoint = load_checkpoint(path, map_location)
    return model_from_checkpoint(checkpoint, path), checkpoint
