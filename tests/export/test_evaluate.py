"""``gaqat export --evaluate``: the ONNX file's accuracy on every split of its run, against
the run's own records (exact for the PyTorch column)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import tiny_run

from gaqat import cli
from gaqat.checkpoint import load_model
from gaqat.data import load_dataset
from gaqat.export import onnx_session
from gaqat.export.evaluate import evaluate_export, run_splits
from gaqat.runfolder import RESULTS, read_jsonl
from gaqat.train import run as train

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def lsq_run(digits_dir, tmp_path_factory):
    """A W4 lsq run of ten steps from scratch, holding out mnist_m, at a learning rate that
    moves it off its initial constant prediction (one evaluation, at the end)."""
    root = tmp_path_factory.mktemp("evaluate")
    options = {"steps": 10, "checkpoint_freq": 10, "hparams": {"lr": 1e-2}}
    return train(tiny_run(root / "lsq", digits_dir, "lsq", bits=4, from_scratch=True, **options))


@pytest.fixture(scope="module")
def one_region_run(digits_dir, tmp_path_factory):
    """``lsq_run`` with its first and last layers at 8 bits: one integer region, the whole
    network integer kernels. Its step sizes learn at a tenth of the rate: at 1e-2, Adam
    drove a weight step size of 0.016 to the 1e-8 floor within the ten steps."""
    root = tmp_path_factory.mktemp("evaluate_int8_ends")
    hparams = {"lr": 1e-2, "first_last": "int8", "step_size_lr_scale": 0.1}
    options = {"steps": 10, "checkpoint_freq": 10, "hparams": hparams}
    return train(tiny_run(root / "lsq", digits_dir, "lsq", bits=4, from_scratch=True, **options))


def _export(run, out, *options, fmt="onnx"):
    return cli.main(
        ["export", str(run / "checkpoint.pt"), "--format", fmt, "--out", str(out), *options]
    )


@pytest.mark.slow
def test_evaluation_covers_every_split_and_matches_the_runs_own_accuracy(
    lsq_run, digits_dir, tmp_path, capsys
):
    """With integer kernels, whose int32 biases the PyTorch model evaluates with: every
    image of every split gets the same top-1 class."""
    out = tmp_path / "model.onnx"
    args = ("--evaluate", "--data-dir", str(digits_dir), "--integer-kernels")
    assert _export(lsq_run, out, *args) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "model.eval.json").read_text())
    assert report["file"] == str(out) and report["test_envs"] == [1]
    assert report["integer_kernels"] is True

    rows = {row["split"]: row for row in report["splits"]}
    last = [record for _, record in read_jsonl(lsq_run / RESULTS)][-1]
    assert sorted(rows) == sorted(k.removesuffix("_acc") for k in last if k.endswith("_acc"))
    for name, row in rows.items():
        # The PyTorch column is the run's own evaluation of the same splits, to the image.
        assert row["pytorch_acc"] == pytest.approx(last[f"{name}_acc"], abs=1e-12)
        assert row["agreement"] == 1.0 and row["onnx_acc"] == row["pytorch_acc"]
        assert f"{name:<10} {row['domain']:<14} {row['role']:<10}" in printed
    assert {rows[f"env1_{p}"]["role"] for p in ("in", "out")} == {"held out"}
    assert (rows["env0_in"]["role"], rows["env0_out"]["role"]) == ("training", "validation")
    images = sum(len(domain) for domain in load_dataset("digits", digits_dir))
    assert sum(row["images"] for row in rows.values()) == images  # every image once


@pytest.mark.parametrize("trained", ["lsq_run", "one_region_run"])
def test_integer_kernel_file_agrees_with_pytorch_on_every_held_out_image(
    trained, digits_dir, tmp_path, request
):
    """PyTorch evaluates with the int32 biases onnxruntime's integer kernels add (99.0% and
    98.4% agreement on mnist_m's two splits when it added float ones), first and last
    layers float or at 8 bits."""
    run, out = request.getfixturevalue(trained), tmp_path / "model.onnx"
    assert _export(run, out, "--integer-kernels") == 0
    model, checkpoint = load_model(run / "checkpoint.pt")
    splits = run_splits(checkpoint, "the run", digits_dir)
    loaders = {k: v for k, v in splits.loaders.items() if splits.role(k) == "held out"}
    held_out = dataclasses.replace(splits, loaders=loaders)
    rows = evaluate_export(onnx_session(out), model.eval(), held_out)
    assert [(row.split, row.agreement) for row in rows] == [("env1_in", 1.0), ("env1_out", 1.0)]


def test_evaluation_needs_an_onnx_file_and_a_run_checkpoint(lsq_run, tmp_path, capsys):
    assert _export(lsq_run, tmp_path / "m.safetensors", "--evaluate", fmt="int") == 2
    assert "onnx format" in capsys.readouterr().err

    bare = torch.load(lsq_run / "checkpoint.pt", weights_only=False)
    del bare["args"]
    (tmp_path / "run").mkdir()
    torch.save(bare, tmp_path / "run" / "checkpoint.pt")
    assert _export(tmp_path / "run", tmp_path / "m.onnx", "--evaluate") == 2
    error = capsys.readouterr().err
    assert "has no 'args'" in error and "Traceback" not in error
    assert not (tmp_path / "m.onnx").exists()  # refused before anything is written


def test_evaluation_refuses_data_with_other_domains(lsq_run, tmp_path, make_tree, capsys):
    other = make_tree(tmp_path / "other", {"photo": ["0", "1"], "sketch": ["0", "1"]})
    bare = torch.load(lsq_run / "checkpoint.pt", weights_only=False)
    bare["args"]["dataset"] = str(other)
    (tmp_path / "run").mkdir()
    torch.save(bare, tmp_path / "run" / "checkpoint.pt")
    assert _export(tmp_path / "run", tmp_path / "m.onnx", "--evaluate") == 2
    error = capsys.readouterr().err
    assert "the data found has ['photo', 'sketch']" in error and "--data-dir" in error
    assert not (tmp_path / "m.onnx").exists()
