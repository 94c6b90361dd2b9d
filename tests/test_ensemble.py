"""Ensembles of quantized models (``gaqat ensemble``): the mean of the members' softmax by
hand, the record the report and selection read, refusals, the sweep mode and the ONNX
file against PyTorch.

The runs are tiny: 2 steps of a 4-bit small CNN on a folder of 3 domains × 3 classes ×
10 random 32×32 images (the class in a colour channel), so that evaluating every split
takes milliseconds where DigitsDG's 9,297 images take seconds per model."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gaqat import cli
from gaqat import ensemble as E
from gaqat.errors import UsageError
from gaqat.export.evaluate import run_splits
from gaqat.hparams import default_hparams
from gaqat.report import report
from gaqat.runfolder import DONE, RESULTS, read_jsonl
from gaqat.train import TrainConfig
from gaqat.train import run as train

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = (0, 1, 2)
HELD_OUT = [(1,), (0, 1), (1, 2)]  # domain 1 alone, and with each other: leave-one-out scores


def _tree(root):
    """3 domains × 3 classes × 10 images of 32×32 random pixels, the class's channel bright."""
    rng = np.random.default_rng(0)
    for d, domain in enumerate(["photo", "sketch", "art"]):
        for c, name in enumerate(["cat", "dog", "fox"]):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for k in range(10):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., c] = 255 - 20 * d
                Image.fromarray(pixels).save(folder / f"{k}.png")
    return root


def _train(data, out, seed, test_envs=(1,), algorithm="lsq", **hparams):
    bits = 4 if algorithm != "erm" else None
    config = TrainConfig(
        dataset=str(data),
        output=out,
        test_envs=test_envs,
        algorithm=algorithm,
        bits=bits,
        from_scratch=bits is not None,
        steps=2,
        checkpoint_freq=2,
        trial_seed=seed,
        hparams={"batch_size": 4, "arch": "small_cnn", **hparams},
        image_size=32,
        progress=False,
    )
    return train(config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sweep of 4-bit lsq runs (3 trial seeds × 3 holdouts) and, apart, runs that must
    not join them: another learning rate, an unfinished copy, two float runs."""
    root = tmp_path_factory.mktemp("ensemble")
    data = _tree(root / "data")
    sweep = root / "sweep"
    for envs in HELD_OUT:
        for seed in SEEDS:
            name = "+".join(map(str, envs))
            _train(data, sweep / f"lsq_w4_env{name}_seed{seed}", seed, envs)
    other = root / "other"
    runs = {
        "members": [sweep / f"lsq_w4_env1_seed{seed}" for seed in SEEDS],
        "sweep": sweep,
        "data": data,
        "lr": _train(data, other / "lsq_lr", 3, lr=1e-4),
        "erm": [_train(data, other / f"erm{seed}", seed, algorithm="erm") for seed in (0, 1)],
        "unfinished": other / "unfinished",
    }
    shutil.copytree(sweep / "lsq_w4_env1_seed2", runs["unfinished"])
    (runs["unfinished"] / DONE).unlink()
    return runs


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
    """The ensemble of the 3 members holding out domain 1 alone, with its ONNX file."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("built") / "ens"
    return E.build_ensemble(runs["members"], out, device="cpu", onnx=True)


def _last(folder):
    return read_jsonl(folder / RESULTS)[-1][1]


def _accuracy_keys(record):
    return sorted(key for key in record if key.endswith("_acc"))


# --- the ensemble -------------------------------------------------------------------------


def test_the_ensemble_is_the_mean_of_its_members_softmax_computed_by_hand(runs):
    members = [E.open_member(folder) for folder in runs["members"]]
    models = [member.model for member in members]
    splits = run_splits(members[0].checkpoint, "the anchor", None)
    accs, member_accs = E.evaluate_ensemble(models, splits, torch.device("cpu"), "fp32", False)
    with torch.no_grad():
        for name, loader in splits.loaders.items():
            x, y = map(torch.cat, zip(*loader))
            logits = [model(x) for model in models]
            by_hand = sum(torch.softmax(out, dim=1) for out in logits) / len(logits)
            torch.testing.assert_close(E.Ensemble(models)(x), by_hand, rtol=0, atol=1e-6)
            assert accs[f"{name}_acc"] == (by_hand.argmax(1) == y).double().mean().item()
            each = [(out.argmax(1) == y).double().mean().item() for out in logits]
            assert member_accs[f"{name}_acc"] == each
    # The splits are the first member's, evaluated as its training evaluated them: its
    # own accuracies are its final record's, to the image.
    own = _last(runs["members"][0])
    assert {key: values[0] for key, values in member_accs.items()} == {
        key: own[key] for key in _accuracy_keys(own)
    }


def test_the_record_is_a_results_record_flagged_as_the_runs_result(runs, built):
    record = _last(built.folder)
    member = _last(runs["members"][0])
    assert _accuracy_keys(record) == _accuracy_keys(member)
    assert all(0 <= record[key] <= 1 for key in _accuracy_keys(record))
    assert record["averaged"] is True and record["averaging"] == "ensemble"
    args = record["args"]
    assert args["algorithm"] == "ens3_lsq_w4" and args["bits"] == record["bits"] == 4
    assert args["trial_seed"] == 0 and args["test_envs"] == [1] and "init" not in args
    assert record["step"] == member["step"] and record["hparams"] == member["hparams"]
    info = record["ensemble"]
    assert info["trial_seeds"] == [0, 1, 2] and info["members"] == 3
    assert info["runs"] == [str(folder) for folder in runs["members"]]
    assert info["ensemble_bytes"] == 3 * info["member_bytes"] < 3 * info["float_bytes"]
    assert (built.folder / DONE).is_file()
    printed = str(built)
    held_out = args["domains"][1]
    assert printed.startswith(f"ens3_lsq_w4: 3 members (trial seeds 0, 1, 2), held out {held_out}")
    assert f"size: 3 x {info['member_bytes']:,} = {info['ensemble_bytes']:,} bytes" in printed


def test_the_onnx_file_agrees_with_pytorch_under_onnxruntime(built):
    from gaqat.export import onnx_session

    record = _last(built.folder)
    assert built.onnx.max_abs_diff < 1e-5
    rows = built.onnx.evaluation
    assert [row.split for row in rows] == [k.removesuffix("_acc") for k in _accuracy_keys(record)]
    for row in rows:
        assert row.agreement == 1.0 and row.onnx_acc == row.pytorch_acc
        assert row.pytorch_acc == record[f"{row.split}_acc"]
    session = onnx_session(built.folder / E.ONNX_FILE)
    assert [output.name for output in session.get_outputs()] == ["probabilities"]
    x = torch.randn(5, 3, 32, 32).numpy()
    probabilities = session.run(None, {"images": x})[0]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    written = json.loads((built.folder / E.EVAL_FILE).read_text())
    assert written["trial_seeds"] == [0, 1, 2] and len(written["splits"]) == len(rows)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["algorithm"]) == "ens3_lsq_w4"


def test_integer_kernels_and_int4_weights_export_the_ensemble_too(runs, tmp_path, capsys):
    """The options of ``gaqat export`` (int4 raises the opset to 21 after tracing)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "ens"
    options = ("--onnx", "--integer-kernels", "--int4-weights", "--quiet")
    members = [str(folder) for folder in runs["members"][:2]]
    assert cli.main(["ensemble", *members, "--output", str(out), *options]) == 0
    printed = capsys.readouterr().out
    assert "ONNX opset 21" in printed
    diff = float(printed.split("max abs probability difference ")[1].split()[0])
    assert diff < 1e-4
    rows = json.loads((out / E.EVAL_FILE).read_text())["splits"]
    assert all(row["agreement"] >= 0.95 for row in rows)  # a .5 tie may flip one image


# --- refusals -----------------------------------------------------------------------------


def test_members_that_differ_in_more_than_the_trial_seed_are_refused(runs, tmp_path):
    first, second, _ = runs["members"]
    out = tmp_path / "ens"
    with pytest.raises(UsageError) as error:
        E.build_ensemble([first, second, runs["lr"]], out, device="cpu")
    message = str(error.value)
    joining = f"{runs['lr']} cannot join an ensemble with {first}"
    assert f"{joining}: field hparams.lr is 0.0001 there" in message
    assert "differ only by trial seed" in message and "\n" not in message
    erm = runs["erm"][1]  # trial seed 1
    with pytest.raises(UsageError, match=f"{erm} cannot join an ensemble with .*: field algorithm"):
        E.build_ensemble([first, erm], out, device="cpu")
    held_out_twice = runs["sweep"] / "lsq_w4_env0+1_seed1"
    with pytest.raises(UsageError, match="field test_envs is \\[0, 1\\] there and \\[1\\]"):
        E.build_ensemble([first, held_out_twice], out, device="cpu")
    assert not out.exists()


def test_unfinished_runs_repeated_seeds_and_single_runs_are_refused(runs, tmp_path):
    first, second, third = runs["members"]
    out = tmp_path / "ens"
    unfinished = runs["unfinished"]
    with pytest.raises(UsageError, match=f"{unfinished}: the run has not finished"):
        E.build_ensemble([first, second, unfinished], out)
    copy = shutil.copytree(third, tmp_path / "copy")
    same = runs["sweep"] / ".." / "sweep" / third.name  # the same folder: counted once
    with pytest.raises(UsageError, match=f"{third} and {copy} are both trial seed 2"):
        E.build_ensemble([first, third, same, copy], out)
    with pytest.raises(UsageError, match="at least 2 trial seeds, got 1"):
        E.build_ensemble([first, first], out)
    with pytest.raises(UsageError, match="not a run folder"):
        E.build_ensemble([first, tmp_path], out)
    with pytest.raises(UsageError, match="--onnx: .* is a float run"):
        E.build_ensemble(runs["erm"], out, onnx=True)
    assert not out.exists()


def test_an_ensemble_is_replaced_only_with_overwrite_and_never_over_a_run(
    runs, built, tmp_path, capsys
):
    folder = shutil.copytree(built.folder, tmp_path / "ens")
    before = (folder / RESULTS).read_bytes()
    argv = ["ensemble", *map(str, runs["members"]), "--output", str(folder), "--quiet"]
    assert cli.main(argv) == 2
    assert "holds an ensemble already; add --overwrite" in capsys.readouterr().err
    assert (folder / RESULTS).read_bytes() == before
    assert cli.main([*argv[:-3], "--output", str(runs["members"][0])]) == 2
    assert "not an ensemble's folder" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0
    assert "ens3_lsq_w4: 3 members" in capsys.readouterr().out
    again = _last(folder)
    old = json.loads(before)
    assert {k: again[k] for k in _accuracy_keys(old)} == {k: old[k] for k in _accuracy_keys(old)}
    assert not (folder / E.ONNX_FILE).exists()  # this one wrote no ONNX file
    assert (folder / DONE).is_file()


def test_the_command_checks_its_options_and_names_the_bad_member(runs, tmp_path, capsys):
    members = list(map(str, runs["members"]))
    out = ["--output", str(tmp_path / "ens")]
    assert cli.main(["ensemble", *members, *out, "--algorithms", "lsq"]) == 2
    assert "--algorithms goes with --sweep" in capsys.readouterr().err
    assert cli.main(["ensemble", *members, *out, "--int4-weights"]) == 2
    assert "--int4-weights goes with --onnx" in capsys.readouterr().err
    assert cli.main(["ensemble", *members[:2], str(runs["lr"]), *out]) == 2
    assert f"{runs['lr']} cannot join an ensemble" in capsys.readouterr().err


# --- a sweep and its report ---------------------------------------------------------------


def test_a_sweep_gets_an_ensemble_per_group_which_the_report_shows_under_every_method(
    runs, tmp_path, capsys
):
    sweep = tmp_path / "sweep"
    shutil.copytree(runs["sweep"], sweep)
    argv = ["ensemble", str(sweep), "--sweep", "--output", str(sweep), "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("ens3_lsq_w4: 3 members (trial seeds 0, 1, 2)") == 3
    folders = {p.parent.name.rsplit("_", 1)[0]: p.parent for p in sweep.glob("ens3*/" + RESULTS)}
    assert sorted(folders) == ["ens3_lsq_w4_env0+1", "ens3_lsq_w4_env1", "ens3_lsq_w4_env1+2"]
    alone = _last(folders["ens3_lsq_w4_env1"])
    held_out = alone["args"]["domains"][1]
    lines = csv.DictReader(io.StringIO(report([sweep], fmt="csv", selection="all")))
    rows = {
        (line["selection"], line["algorithm"]): line for line in lines if line["domain"] == held_out
    }
    for selection in ("training", "leave-one-out", "oracle"):
        row = rows[selection, "ens3_lsq"]
        assert (row["bits"], row["n"], row["incomplete"]) == ("4", "1", "0")
        if selection != "leave-one-out":  # the record's own held-out accuracy
            assert float(row["mean"]) == pytest.approx(100 * alone["env1_in_acc"], abs=1e-4)
        assert rows[selection, "lsq"]["n"] == "3"
    sizes = alone["ensemble"]
    assert (
        f"ens3_lsq at 4 bits: 3 members, {sizes['ensemble_bytes']:,} bytes, "
        f"{sizes['ensemble_bytes'] / sizes['float_bytes']:.2f}× one float model"
    ) in report([sweep])
    assert cli.main(argv) == 0  # again: the same members, kept
    assert capsys.readouterr().out.count("kept") == 3


def test_find_groups_leaves_out_other_methods_and_notes_runs_alone(runs, tmp_path):
    other = runs["lr"].parent
    groups, notes = E.find_groups([runs["sweep"], other], ["lsq"])
    assert sorted(len(g) for g in groups) == [3, 3, 4]  # the unfinished copy joins seed 2's
    alone = runs["lr"].resolve()
    assert notes == [f"{alone}: no run of another trial seed with its settings, so no ensemble"]
    groups, _ = E.find_groups([other], ["erm"])
    assert groups == [[folder.resolve() for folder in runs["erm"]]]
    with pytest.raises(UsageError, match="the run has not finished"):
        E.build_sweep_ensembles([runs["sweep"], other], tmp_path / "ens", ["lsq"])
    with pytest.raises(UsageError, match="--onnx: .* are float runs"):
        E.build_sweep_ensembles([other], tmp_path / "ens", ["erm"], onnx=True)
    with pytest.raises(UsageError, match="no runs below .* that differ only by trial seed"):
        E.build_sweep_ensembles([other], tmp_path / "ens", ["lsq_sam"])
    assert not (tmp_path / "ens").exists()


def test_a_hyperparameter_newer_than_a_run_counts_at_its_default():
    """A run written before ``residual_bits`` existed had its default behaviour (none), so
    it joins an ensemble with a newer run that records the default."""
    args = {"dataset": "digits", "algorithm": "lsq_sam_w2", "bits": 2, "test_envs": [1]}
    args |= {"hparams_seed": 0, "trial_seed": 0}
    newer = default_hparams("lsq_sam", "digits")
    older = {k: v for k, v in newer.items() if k != "residual_bits"}
    assert E.identity(args, older) == E.identity(args, newer)
    assert E.identity(args, older) != E.identity(args, {**newer, "residual_bits": 8})
