"""Checkpoint files: atomic writes, clear errors, a model rebuilt from the file alone."""

from dataclasses import asdict

import pytest
import torch

from gaqat.checkpoint import load_checkpoint, load_model, save_atomic
from gaqat.models import ModelConfig, build_model
from gaqat.prepare import QuantConfig, quantize_model


def _checkpoint(model, quant):
    return {
        "model": model.state_dict(),
        "model_config": ModelConfig().to_dict(),
        "quant_config": asdict(quant) if quant else None,
        "meta": {"algorithm": "lsq"},
    }


def test_a_quantized_model_round_trips_with_identical_logits(tmp_path):
    quant = QuantConfig(weight_bits=3, act_bits=3, per_channel=True)
    model = quantize_model(build_model(ModelConfig()), quant)
    x = torch.randn(4, 3, 32, 32)
    model.train()(x)  # initialises the step sizes and activation signedness
    save_atomic(_checkpoint(model, quant), tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    loaded, checkpoint = load_model(tmp_path / "c.pt")
    assert checkpoint["meta"] == {"algorithm": "lsq"}
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_bad_files_get_errors_that_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(ValueError, match="junk.pt is not a readable torch file"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(
        ValueError, match="missing keys \\['model_config', 'quant_config', 'meta'\\]"
    ):
        load_checkpoint(tmp_path / "partial.pt")
    bad = _checkpoint(build_model(ModelConfig()), None)
    bad["model_config"]["width"] = 3
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="model_config has unknown entries \\['width'\\]"):
        load_model(tmp_path / "bad.pt")


def test_callers_name_the_fields_they_read(tmp_path):
    """``train --resume`` reads the training state; a hand edit that lost it is named."""
    torch.save(_checkpoint(build_model(ModelConfig()), None), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"checkpoint .*c.pt: missing field 'args'"):
        load_checkpoint(tmp_path / "c.pt", require={"args": dict, "args.trial_seed": int})
    assert load_checkpoint(tmp_path / "c.pt", require={"meta.algorithm": str})
