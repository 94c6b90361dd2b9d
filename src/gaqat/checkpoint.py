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

from dataclasses import fields
from pathlib import Path

import torch

from gaqat.models import ModelConfig, Network, build_model
from gaqat.quant import QuantConfig, quantize_model
from gaqat.runfolder import replace_atomic

REQUIRED_KEYS = ("model", "model_config", "quant_config", "meta")


def save_atomic(obj: dict, path: str | Path) -> None:
    """A crash never leaves a half-written checkpoint where a good one was."""
    replace_atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
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
    return checkpoint


def _config(cls, data: dict, key: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"field {key} has unknown entries {unknown}")
    return cls(**data)


def build_network(model_config: dict, quant_config: dict | None) -> Network:
    """The untrained (possibly quantized) network that stored configs describe: a
    checkpoint's, or the header of an integer export (``gaqat.export.load_int``)."""
    model = build_model(_config(ModelConfig, {**model_config, "weights": None}, "model_config"))
    if quant_config is not None:
        quant = dict(quant_config)
        quant["skip"] = tuple(quant.get("skip", ()))
        quantize_model(model, _config(QuantConfig, quant, "quant_config"))
    return model


def model_from_checkpoint(checkpoint: dict, path: str | Path = "<checkpoint>") -> Network:
    """Rebuild the (possibly quantized) network described by a checkpoint dict."""
    path = Path(path)
    try:
        model = build_network(checkpoint["model_config"], checkpoint["quant_config"])
    except ValueError as error:  # a field this gaqat does not know, or a value out of range
        raise ValueError(f"checkpoint {path}: {error}") from error
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(
            f"checkpoint {path}: weights do not fit the stored configs ({error})"
        ) from error
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Network, dict]:
    checkpoint = load_checkpoint(path, map_location)
    return model_from_checkpoint(checkpoint, path), checkpoint
