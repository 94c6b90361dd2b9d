"""Misuse that loses nothing: every argument checked before the folder is touched, one
process per run folder, overwrite and resume that keep what the user has, clean stops."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from helpers import save_failing_at_the_second_checkpoint, tiny_argv, tiny_run

from gaqat import cli
from gaqat.algorithms import Algorithm
from gaqat.errors import UsageError
from gaqat.runfolder import CHECKPOINT, DONE, LOCK, PREVIOUS, RESULTS, FolderBusyError, locked
from gaqat.train import NonFiniteLossError, RunInterrupted, run


def _config(tmp_path, digits_dir, name="run", algorithm="erm", **kwargs):
    return tiny_run(tmp_path / name, digits_dir, algorithm, **kwargs)


def _snapshot(folder):
    """The run's files (the lock file says who held the folder last, not what it holds)."""
    return {
        p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits_dir):
    """A finished float run, copied afresh for each test that may damage it."""
    return run(_config(tmp_path_factory.mktemp("finished"), digits_dir))


@pytest.fixture
def finished_copy(tmp_path, finished):
    folder = tmp_path / "run"
    folder.mkdir()
    for name, data in _snapshot(finished).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 0}, "--steps: expected a positive integer, got 0"),
        ({"checkpoint_freq": 0}, "--checkpoint-freq: expected a positive integer"),
        ({"image_size": -32}, "--image-size: expected a positive integer"),
        ({"steps": None, "hparams": {"steps": 0}}, "steps must be an integer >= 1"),
        ({"hparams": {"lrr": 1e-3}}, "unknown key\\(s\\) lrr"),
        ({"bits": 4}, "--bits 4: erm trains a float model"),
        (
            {"algorithm": "lsq", "bits": 9, "from_scratch": True},
            "--bits: expected an integer from 2 to 8",
        ),
        ({"algorithm": "lsq", "bits": 4}, "no float starting point: give --init"),
        (
            {"algorithm": "lsq", "bits": 4, "init": "missing.pt"},
            "checkpoint missing.pt does not exist",
        ),
        ({"test_envs": (5,)}, "--test-envs: \\[5\\] not among DigitsDG's domains"),
        ({"test_envs": (0, 1, 2, 3)}, "leave no training domain"),
        ({"new_lr": 1e-4}, "--new-lr .* use it with --resume"),
        ({"resume": True}, "contradict each other"),
        ({"trial_seed": -1}, "--seed: expected an integer from 0"),
        ({"weights": "nowhere.pt"}, "--weights nowhere.pt: no such file"),
        ({"device": "gpu0"}, "--device: 'gpu0' is not a device"),
        ({"algorithm": "nope"}, "unknown algorithm 'nope'"),
    ],
)
def test_bad_arguments_with_overwrite_leave_the_finished_run_untouched(
    finished_copy, digits_dir, change, message
):
    before = _snapshot(finished_copy)
    config = _config(finished_copy.parent, digits_dir, overwrite=True, **change)
    with pytest.raises(UsageError, match=message):
        run(config)
    assert _snapshot(finished_copy) == before


def test_a_rejected_command_leaves_no_folder_behind(tmp_path, digits_dir):
    with pytest.raises(UsageError):
        run(_config(tmp_path, digits_dir, "new", algorithm="lsq", bits=4))
    with pytest.raises(UsageError):
        run(_config(tmp_path, digits_dir, "sub/new", steps=0))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file; expected a folder"):
        run(_config(tmp_path, digits_dir, "file"))


def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(
    finished_copy, digits_dir, monkeypatch
):
    before = _snapshot(finished_copy)

    def crash(self, minibatches):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Algorithm, "update", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(_config(finished_copy.parent, digits_dir, overwrite=True, trial_seed=1))
    assert _snapshot(finished_copy) == before and not (finished_copy / PREVIOUS).exists()
    monkeypatch.undo()

    run(_config(finished_copy.parent, digits_dir, overwrite=True, trial_seed=1))
    records = [json.loads(line) for line in (finished_copy / RESULTS).read_text().splitlines()]
    assert [r["args"]["trial_seed"] for r in records] == [1]
    assert not (finished_copy / PREVIOUS).exists()


def test_an_overwrite_killed_before_its_first_checkpoint_gives_the_old_run_back(
    finished_copy, digits_dir, monkeypatch
):
    before = _snapshot(finished_copy)
    monkeypatch.setattr("gaqat.train.settle", lambda folder, keep_new: None)  # as if kill -9

    def die(self, minibatches):
        raise SystemExit("killed")

    monkeypatch.setattr(Algorithm, "update", die)
    with pytest.raises(SystemExit):
        run(_config(finished_copy.parent, digits_dir, overwrite=True))
    assert (finished_copy / PREVIOUS).is_dir() and not (finished_copy / DONE).exists()
    monkeypatch.undo()
    with pytest.raises(UsageError, match="finished run"):  # the next command sees the old run
        run(_config(finished_copy.parent, digits_dir))
    assert _snapshot(finished_copy) == before and not (finished_copy / PREVIOUS).exists()


def test_a_second_process_on_the_same_folder_is_refused(tmp_path, digits_dir):
    folder = tmp_path / "run"
    with locked(folder):
        with pytest.raises(
            FolderBusyError, match=f"in use by another process \\(pid {os.getpid()}"
        ):
            run(_config(tmp_path, digits_dir))
    assert not folder.exists()  # nothing was written, so the folder went with the lock


@pytest.mark.slow
def test_resume_with_other_arguments_is_refused_listing_the_differences(
    tmp_path, digits_dir, monkeypatch
):
    config = _config(tmp_path, digits_dir, steps=4)
    update = Algorithm.update

    def stop_at_step_3(self, minibatches):
        if self.scheduler.last_epoch == 2:
            raise KeyboardInterrupt
        return update(self, minibatches)

    monkeypatch.setattr(Algorithm, "update", stop_at_step_3)
    with pytest.raises(RunInterrupted, match="interrupted at step 3 of 4: .* keeps step 2"):
        run(config)
    monkeypatch.undo()
    before = _snapshot(config.output)
    other = _config(
        tmp_path,
        digits_dir,
        steps=4,
        algorithm="sagm",
        resume=True,
        hparams={"lr": 1e-2},
        precision="bf16",
    )
    with pytest.raises(UsageError) as refused:
        run(other)
    text = str(refused.value)
    assert "algorithm: 'erm' in the run, 'sagm' in this command" in text
    assert "hparams.lr: 0.001 in the run, 0.01 in this command" in text
    assert "hparams.rho: (absent) in the run, 0.05 in this command" in text
    assert "precision: 'fp32' in the run, 'bf16' in this command" in text
    assert _snapshot(config.output) == before
    run(_config(tmp_path, digits_dir, steps=4, resume=True))
    assert (config.output / DONE).exists()


@pytest.mark.slow
def test_a_nan_stop_keeps_the_last_checkpoint_and_resumes_at_a_new_learning_rate(
    tmp_path, digits_dir, monkeypatch
):
    update = Algorithm.update

    def explode_at_step_3(self, minibatches):
        stats = update(self, minibatches)
        if self.scheduler.last_epoch == 3:
            stats["loss"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(Algorithm, "update", explode_at_step_3)
    with pytest.raises(
        NonFiniteLossError, match="step 3.*checkpoint \\(step 2\\).*--resume --new-lr 0.000333"
    ):
        run(_config(tmp_path, digits_dir, steps=4))
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["step"] == 2
    assert not (tmp_path / "run" / DONE).exists()
    run(_config(tmp_path, digits_dir, steps=4, resume=True, new_lr=1e-4))
    records = [json.loads(line) for line in (tmp_path / "run" / RESULTS).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert "lr_changes" not in records[0] and records[1]["lr_changes"] == [[2, 1e-4]]
    scheduler = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["training"][
        "scheduler"
    ]
    assert scheduler["base_lrs"] == [pytest.approx(1e-4)]


def test_checkpoints_load_without_unpickling_code(tmp_path, finished):
    checkpoint = torch.load(finished / CHECKPOINT, weights_only=True)  # raises on any object
    assert checkpoint["step"] == 2

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save(
        {"model": {}, "model_config": {}, "quant_config": None, "meta": Payload()},
        tmp_path / "evil.pt",
    )
    from gaqat.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match="holds Python objects.*GLOBAL posix.system"):
        load_checkpoint(tmp_path / "evil.pt")


def test_qat_from_scratch_is_allowed_when_asked_for(tmp_path, digits_dir):
    out = run(
        _config(
            tmp_path,
            digits_dir,
            algorithm="lsq",
            bits=4,
            from_scratch=True,
            steps=1,
            checkpoint_freq=1,
        )
    )
    assert (out / DONE).exists()


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def test_deterministic_sets_pytorchs_flags(tmp_path, digits_dir, restore_determinism):
    run(_config(tmp_path, digits_dir, deterministic=True, steps=1, checkpoint_freq=1))
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark


def _argv(tmp_path, digits_dir, *extra):
    return tiny_argv(tmp_path / "run", digits_dir, "--quiet", *extra)


@pytest.mark.slow
def test_ctrl_c_and_sigterm_print_how_to_resume(tmp_path, digits_dir, monkeypatch, capsys):
    update = Algorithm.update

    def terminated_at_step_2(self, minibatches):
        if self.scheduler.last_epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return update(self, minibatches)

    monkeypatch.setattr(Algorithm, "update", terminated_at_step_2)
    assert cli.main(_argv(tmp_path, digits_dir, "--steps", "3", "--checkpoint-freq", "1")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2 of 3" in err and "keeps step 1" in err
    assert "continue with: gaqat train --dataset digits" in err and err.rstrip().endswith(
        "--resume"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command
    monkeypatch.undo()
    assert (
        cli.main(_argv(tmp_path, digits_dir, "--steps", "3", "--checkpoint-freq", "1", "--resume"))
        == 0
    )
    out = capsys.readouterr().out
    assert f"finished {tmp_path / 'run'}" in out and "held-out mnist_m: " in out


@pytest.mark.slow
def test_failures_at_run_time_exit_1_in_one_line_and_keep_the_checkpoint(
    tmp_path, digits_dir, monkeypatch, capsys
):
    def disk_full(path):
        return OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", save_failing_at_the_second_checkpoint(disk_full))
    assert cli.main(_argv(tmp_path, digits_dir, "--steps", "2", "--checkpoint-freq", "1")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["step"] == 1
    monkeypatch.setattr(torch, "save", save_failing_at_the_second_checkpoint(disk_full))
    with pytest.raises(OSError):  # --debug: the traceback instead of one line
        cli.main(
            _argv(
                tmp_path,
                digits_dir,
                "--steps",
                "3",
                "--checkpoint-freq",
                "1",
                "--overwrite",
                "--debug",
            )
        )


def test_usage_errors_exit_2_and_leave_nothing(tmp_path, digits_dir, capsys):
    assert cli.main(_argv(tmp_path, digits_dir, "--steps", "0")) == 2
    assert "--steps: expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["args", "meta", "hparams", "step"])
def test_resume_names_a_field_a_hand_edited_checkpoint_lacks(
    tmp_path, digits_dir, finished_copy, field
):
    (finished_copy / DONE).unlink()  # an unfinished run, as a kill would leave it
    checkpoint = torch.load(finished_copy / CHECKPOINT, weights_only=True)
    if field == "args":
        del checkpoint["args"]["trial_seed"]
    elif field == "meta":
        checkpoint["meta"]["algorithm"] = 5
    else:
        del checkpoint[field]
    torch.save(checkpoint, finished_copy / CHECKPOINT)
    before = _snapshot(finished_copy)
    with pytest.raises(ValueError, match=rf"checkpoint .*{CHECKPOINT}.*'{field}"):
        run(_config(tmp_path, digits_dir, resume=True))
    assert _snapshot(finished_copy) == before
