"""Misuse, round two: hyperparameter values, outputs that are not run folders, sweep
relaunches with other settings, exit statuses and advice that works, repeated domains.

Each case fails before training where it can (``cli.main`` on arguments that are
refused), and runs a two-step DigitsDG run where the case needs one."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from helpers import TINY, save_failing_at_the_second_checkpoint, tiny_argv

from gaqat import cli, launchers, sweep
from gaqat.algorithms import Algorithm
from gaqat.hparams import default_hparams
from gaqat.runfolder import CHECKPOINT, DONE, LOCK, RESULTS
from gaqat.train import _nan_message, _stored_identity


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK}


def _train(output, digits_dir, *extra, freq: int = 2) -> list[str]:
    """``gaqat train`` of two steps, a checkpoint every ``freq``."""
    return [*tiny_argv(output, digits_dir), "--steps", "2", "--checkpoint-freq", str(freq), *extra]


def _with_hparams(argv: list[str], hparams: dict) -> list[str]:
    argv = list(argv)
    argv[argv.index("--hparams") + 1] = json.dumps({**TINY, **hparams})
    return argv


def _exit_status(argv: list[str]) -> int:
    """``cli.main``'s status, argparse's own usage errors included."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


# --- 1. hyperparameter values ----------------------------------------------------------


@pytest.mark.parametrize(
    "algorithm, hparams, message",
    [
        ("gaqat", {"window": 1}, """--hparams '{"window": 1}': window must be an integer >= 2"""),
        (
            "erm",
            {"lr": float("nan")},
            """--hparams '{"lr": NaN}': lr must be a finite number > 0""",
        ),
        ("erm", {"lr": -1}, "lr must be a finite number > 0"),
        ("erm", {"batch_size": 0}, "batch_size must be an integer from 1 to 65536"),
        ("erm", {"batch_size": 10**12}, "batch_size must be an integer from 1 to 65536"),
        ("gaqat", {"tau": 2}, "tau must be a number in [0, 1]"),
        ("lsq_sagm", {"rho": -1}, "rho must be a finite number >= 0"),
        ("lsq", {"step_size_lr_scale": -1}, "step_size_lr_scale must be a finite number > 0"),
        ("lsq", {"bn_freeze_at": -3}, "bn_freeze_at must be a number in [0, 1]"),
    ],
)
def test_bad_hyperparameter_values_are_usage_errors_before_the_folder_is_touched(
    tmp_path, digits_dir, capsys, algorithm, hparams, message
):
    qat = ["--bits", "4", "--from-scratch"] if algorithm != "erm" else []
    argv = _with_hparams(
        _train(tmp_path / "run", digits_dir, "--algorithm", algorithm, *qat), hparams
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Tracker" not in err and "Freezer" not in err
    assert not (tmp_path / "run").exists()


def test_a_sweep_checks_its_hparams_values_before_anything_runs(tmp_path, capsys):
    argv = ["sweep", "--dataset", "digits", "--algorithms", "gaqat", "--output", str(tmp_path)]
    assert cli.main([*argv, "--dry-run", "--hparams", '{"window": 1}']) == 2
    assert (
        """--hparams '{"window": 1}': window must be an integer >= 2""" in capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []


def test_the_nan_advice_is_a_usable_learning_rate():
    advice = _nan_message(float("nan"), 3, None, Path("run"), 1e-3)
    assert """--overwrite --hparams '{"lr": 0.000333}'""" in advice
    assert "--resume --new-lr 0.000333" in _nan_message(float("nan"), 3, 2, Path("run"), 1e-3)
    for unusable in (float("inf"), float("nan"), 5e-324):
        for saved_step in (None, 2):
            advice = _nan_message(float("nan"), 3, saved_step, Path("run"), unusable)
            assert "unusable" in advice and "finite, positive" in advice
            assert '"lr": inf' not in advice and "--new-lr inf" not in advice


# --- 2. outputs that are not run folders -----------------------------------------------


def test_outputs_that_are_no_run_folders_are_usage_errors(tmp_path, digits_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for output, message in (
        (mine, "a folder of other files (thesis.tex), not a gaqat run"),
        (a_file, "is a file; expected a folder"),
        (a_file / "run", f"is below the file {a_file}"),
        (link, "a broken symbolic link"),
    ):
        assert cli.main(_train(output, digits_dir)) == 2
        assert message in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert a_file.read_text() == "mine" and link.is_symlink() and not link.exists()


def test_an_empty_output_is_refused_by_every_command(tmp_path, digits_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (
        _train("", digits_dir),
        ["sweep", "--dataset", "digits", "--algorithms", "erm", "--output", ""],
        ["demo", "--output", ""],
    ):
        assert _exit_status(argv) == 2
        assert "--output: expected a folder, got an empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sweep_and_demo_refuse_a_folder_of_other_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for argv in (
        ["sweep", "--dataset", "digits", "--algorithms", "erm", "--output", str(mine), "--dry-run"],
        ["demo", "--output", str(mine)],
    ):
        assert cli.main(argv) == 2
        assert "a folder of other files (notes.txt), not a gaqat sweep" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    dry = ["sweep", "--dataset", "digits", "--algorithms", "erm", "--dry-run"]
    assert cli.main([*dry, "--output", str(a_file)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# --- 3. sweeps -------------------------------------------------------------------------


def test_a_relaunch_with_other_settings_is_refused_and_sweep_json_kept(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(launchers, "run", lambda config: None)
    argv = ["sweep", "--dataset", "digits", "--algorithms", "erm", "--test-envs", "1"]
    argv += ["--output", str(tmp_path), "--quiet", "--steps", "4"]
    cli.main(argv)
    record = (tmp_path / sweep.SWEEP_RECORD).read_bytes()
    capsys.readouterr()
    assert cli.main([*argv[:-1], "6"]) == 2
    err = capsys.readouterr().err
    assert "--steps 4 recorded, 6 given" in err and "--float-steps 4 recorded, 6 given" in err
    assert (tmp_path / sweep.SWEEP_RECORD).read_bytes() == record
    assert cli.main([*argv, "--seeds", "0", "1", "--dry-run"]) == 0  # more seeds: welcome


def test_repeated_options_are_usage_errors(tmp_path, digits_dir, capsys):
    argv = _train(tmp_path / "run", digits_dir, "--steps", "3")
    assert _exit_status(argv) == 2
    assert "--steps given more than once" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- 4. exit statuses and advice that works --------------------------------------------


def test_careless_train_options_exit_2_naming_the_option(tmp_path, digits_dir, capsys):
    run = tmp_path / "run"
    qat = ["--algorithm", "lsq", "--bits", "4"]
    for extra, message in (
        (["--init", str(tmp_path / "nothing.pt"), *qat], "--init: checkpoint"),
        (["--init", __file__, *qat], "--init: checkpoint"),
        (["--resume"], "--resume: " + str(run) + " holds no run to continue"),
        (["--new-lr", "0.1"], "--new-lr changes the learning rate of a run being resumed"),
        (["--algorithm", "lsq", "--bits", "9", "--from-scratch"], "--bits: expected an integer"),
    ):
        assert cli.main(_train(run, digits_dir, *extra)) == 2, extra
        assert message in capsys.readouterr().err
    for envs in (["5"], ["-1"], ["1", "1"]):
        argv = _train(run, digits_dir)
        argv[argv.index("--test-envs") + 1 : argv.index("--test-envs") + 2] = envs
        assert cli.main(argv) == 2
        assert "--test-envs" in capsys.readouterr().err
    assert not run.exists()


def test_a_repeated_test_domain_says_which(tmp_path, digits_dir, capsys):
    argv = _train(tmp_path / "run", digits_dir)
    argv[argv.index("--test-envs") + 1 : argv.index("--test-envs") + 2] = ["1", "2", "1"]
    assert cli.main(argv) == 2
    assert "--test-envs 1 2 1: 1 given more than once" in capsys.readouterr().err


def _float_checkpoint(path: Path, test_envs: list[int]) -> Path:
    """An untrained small CNN saved as a float run holding ``test_envs`` out would save it."""
    from gaqat.checkpoint import save_atomic
    from gaqat.models import ModelConfig, build_model

    meta = {"dataset": "digits", "algorithm": "erm", "bits": None, "test_envs": test_envs}
    state = {"model": build_model(ModelConfig()).state_dict(), "meta": meta}
    save_atomic({**state, "model_config": ModelConfig().to_dict(), "quant_config": None}, path)
    return path


def test_careless_arguments_round_three_exit_2_naming_what_was_typed(tmp_path, digits_dir, capsys):
    """A third probe: inputs that trained, or failed late, without a word."""
    run, a_file = tmp_path / "run", tmp_path / "notes.txt"
    a_file.write_text("mine")
    leaky = _float_checkpoint(tmp_path / "init.pt", [2])  # it saw domain 1, the held-out one
    qat = ["--algorithm", "lsq", "--bits", "4"]
    cases = [
        (["--init", str(leaky), *qat], "--init " + str(leaky) + ": trained on other data"),
        (["--weights", "imagenet"], "--weights imagenet: small_cnn has no pretrained weights"),
        (["--data-dir", str(a_file)], "is a file; expected a folder"),
        (["--class-map", str(tmp_path)], "is a folder; expected a file"),
    ]
    for extra, message in cases:
        assert _exit_status(_train(run, digits_dir, *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
    steps = _with_hparams([*tiny_argv(run, digits_dir), "--steps", "3"], {"steps": 5})
    assert _exit_status(steps) == 2
    assert "--steps 3 and --hparams steps 5 disagree" in capsys.readouterr().err
    doubled = [*tiny_argv(run, digits_dir), "--hparams", '{"lr": 1e-3, "lr": 1e-2}']
    assert _exit_status(doubled) == 2 and "lr given twice" in capsys.readouterr().err
    empty = (["data", "build", "digits", "--root", ""], ["report", ""], ["plot", "x", "--out", ""])
    for argv in empty:
        assert _exit_status(argv) == 2, argv
        assert "expected a folder, got an empty path" in capsys.readouterr().err
    assert not run.exists()


@pytest.fixture
def finished(tmp_path, digits_dir):
    folder = tmp_path / "run"
    assert cli.main(_train(folder, digits_dir, "--quiet")) == 0
    return folder


def test_ctrl_c_while_overwriting_keeps_the_old_run_and_advises_overwrite(
    finished, digits_dir, monkeypatch, capsys
):
    before = _files(finished)
    capsys.readouterr()

    def interrupted(self, minibatches):
        raise KeyboardInterrupt

    monkeypatch.setattr(Algorithm, "update", interrupted)
    assert cli.main(_train(finished, digits_dir, "--overwrite")) == 130
    err = capsys.readouterr().err
    assert ": interrupted at step 1 of 2: no checkpoint had been written yet." in err
    assert "the run it was overwriting is back in" in err
    assert err.rstrip().endswith("--overwrite") and "--resume" not in err
    assert _files(finished) == before
    monkeypatch.undo()
    command = shlex.split(err.split("start again with: gaqat ")[1])
    assert cli.main([*command, "--quiet"]) == 0  # the advised command works


def test_ctrl_c_before_the_first_checkpoint_of_a_new_run_advises_no_resume(
    tmp_path, digits_dir, monkeypatch, capsys
):
    def interrupted(self, minibatches):
        raise KeyboardInterrupt

    monkeypatch.setattr(Algorithm, "update", interrupted)
    assert cli.main(_train(tmp_path / "run", digits_dir)) == 130
    err = capsys.readouterr().err
    assert "start again with: gaqat train" in err and "--resume" not in err


@pytest.mark.slow
def test_a_full_disk_names_the_folder_and_the_resume_command(
    tmp_path, digits_dir, monkeypatch, capsys
):
    torch_full_disk = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"
    failing = save_failing_at_the_second_checkpoint(lambda path: RuntimeError(torch_full_disk))
    monkeypatch.setattr(torch, "save", failing)
    run = tmp_path / "run"
    assert cli.main(_train(run, digits_dir, "--quiet", freq=1)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "enforce fail" in err
    assert f"could not write the checkpoint of step 2 into {run}" in err
    assert "the disk may be full" in err and "keeps step 1" in err and "--resume" in err
    monkeypatch.undo()
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 1
    assert not (run / DONE).exists()
    assert cli.main(_train(run, digits_dir, "--quiet", "--resume", freq=1)) == 0
    assert [json.loads(line)["step"] for line in (run / RESULTS).read_text().splitlines()] == [1, 2]


def test_a_run_written_before_a_hyperparameter_existed_resumes_at_its_default():
    hparams = default_hparams("gaqat", "digits")
    del hparams["freeze_scope"]  # as gaqat wrote it before the option
    checkpoint = {
        "meta": {"dataset": "digits", "algorithm": "gaqat", "bits": 4, "test_envs": [1]},
        "args": {"trial_seed": 0, "hparams_seed": 0},
        "hparams": hparams,
    }
    identity = _stored_identity(checkpoint)
    assert identity["hparams.freeze_scope"] == "step_size"  # what the run did
    assert identity["hparams.tau"] == hparams["tau"]  # stored keys are kept as stored
