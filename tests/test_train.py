"""End-to-end runs: every algorithm, the results schema, resume identity, refusals, NaN stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_argv, tiny_run

from gaqat import cli
from gaqat.algorithms import Algorithm
from gaqat.checkpoint import load_model
from gaqat.names import ALGORITHMS, get_recipe
from gaqat.runfolder import CHECKPOINT, DONE, GRADIENTS, RESULTS
from gaqat.train import run


def _config(tmp_path, digits_dir, name, algorithm="erm", **kwargs):
    return tiny_run(tmp_path / name, digits_dir, algorithm, **kwargs)


def _records(folder, name=RESULTS):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def float_init(tmp_path_factory, digits_dir):
    out = run(_config(tmp_path_factory.mktemp("init"), digits_dir, "erm", steps=4))
    assert [r["step"] for r in _records(out)] == [2, 4]
    return out / CHECKPOINT


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_runs_and_writes_domainbed_records(
    tmp_path, digits_dir, float_init, algorithm
):
    quantized = get_recipe(algorithm).quantized
    hparams = {"window": 2} if algorithm == "gaqat" else {}
    out = run(
        _config(
            tmp_path,
            digits_dir,
            algorithm,
            algorithm,
            hparams=hparams,
            bits=4 if quantized else None,
            init=float_init if quantized else None,
        )
    )
    records = _records(out)
    assert [r["step"] for r in records] == [2]
    for record in records:
        for i in range(4):
            assert (
                0.0 <= record[f"env{i}_in_acc"] <= 1.0 and 0.0 <= record[f"env{i}_out_acc"] <= 1.0
            )
        for key in ("epoch", "loss", "step_time", "mem_gb"):
            assert isinstance(record[key], float) and record[key] >= 0
        args = record["args"]
        # DomainBed's tools group by args.algorithm alone: a QAT name carries its bit width.
        assert args["dataset"] == "DigitsDG"
        assert (args["algorithm"], args["bits"]) == (
            (f"{algorithm}_w4", 4) if quantized else (algorithm, None)
        )
        assert args["output_dir"] == str(out) and args["holdout_fraction"] == 0.2
        assert args["test_envs"] == [1] and args["trial_seed"] == 0 and args["hparams_seed"] == 0
        assert record["hparams"]["batch_size"] == 8
        assert (
            (record["bits"] == 4 and record["n_frozen"] >= 0) if quantized else "bits" not in record
        )
    assert (out / DONE).exists()
    model, checkpoint = load_model(out / CHECKPOINT)
    assert (checkpoint["quant_config"] is not None) == quantized
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    if algorithm == "gaqat":
        kinds = {r["kind"] for r in _records(out, GRADIENTS)}
        assert "window" in kinds


@pytest.mark.slow
def test_resume_after_a_crash_gives_identical_weights(
    tmp_path, digits_dir, float_init, monkeypatch
):
    def config(name, **kw):
        return _config(
            tmp_path,
            digits_dir,
            name,
            "gaqat",
            bits=4,
            init=float_init,
            steps=6,
            checkpoint_freq=3,
            hparams={"window": 2},
            **kw,
        )

    straight = run(config("straight"))

    update = Algorithm.update
    calls = {"n": 0}

    def crash_after_checkpoint(self, minibatches):
        calls["n"] += 1
        if calls["n"] == 5:  # a step after the step-3 checkpoint
            raise KeyboardInterrupt
        return update(self, minibatches)

    monkeypatch.setattr(Algorithm, "update", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(config("killed"))
    monkeypatch.setattr(Algorithm, "update", update)
    assert not (tmp_path / "killed" / DONE).exists()
    resumed = run(config("killed", resume=True))

    a = torch.load(straight / CHECKPOINT, weights_only=False)
    b = torch.load(resumed / CHECKPOINT, weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key

    def strip(records):
        return [
            {k: v for k, v in r.items() if k not in ("step_time", "mem_gb", "args")}
            for r in records
        ]

    assert strip(_records(straight)) == strip(_records(resumed))
    assert _records(straight, GRADIENTS) == _records(resumed, GRADIENTS)


@pytest.mark.slow
def test_a_finished_folder_is_refused_unless_overwrite(tmp_path, digits_dir, capsys):
    run(_config(tmp_path, digits_dir, "run"))
    with pytest.raises(ValueError, match="finished run.*--overwrite"):
        run(_config(tmp_path, digits_dir, "run"))
    argv = tiny_argv(tmp_path / "run", digits_dir, "--steps", "2", "--no-progress")
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0
    assert len(_records(tmp_path / "run")) == 1


def test_an_unfinished_folder_needs_resume_or_overwrite(tmp_path, digits_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RESULTS).write_text("")
    with pytest.raises(ValueError, match="--resume"):
        run(_config(tmp_path, digits_dir, "run"))
    # --resume with nothing to resume from starts afresh (what `gaqat demo` relies on)
    out = run(_config(tmp_path, digits_dir, "fresh", resume=True, steps=1, checkpoint_freq=1))
    assert [r["step"] for r in _records(out)] == [1]


def test_bad_arguments_get_clear_errors(tmp_path, digits_dir, float_init):
    with pytest.raises(ValueError, match="choices: erm"):
        run(_config(tmp_path, digits_dir, "a", "nope"))
    with pytest.raises(ValueError, match="--bits"):
        run(_config(tmp_path, digits_dir, "b", "lsq"))
    with pytest.raises(ValueError, match="--test-envs .* leave no training domain"):
        run(_config(tmp_path, digits_dir, "c", test_envs=(0, 1, 2, 3)))
    quantized = run(_config(tmp_path, digits_dir, "q", "lsq", bits=4, init=float_init))
    with pytest.raises(ValueError, match="float checkpoint"):
        run(_config(tmp_path, digits_dir, "d", "lsq", bits=4, init=quantized / CHECKPOINT))


def test_hparams_on_the_command_line_must_be_a_json_object(capsys):
    for text in ("{bad", "[1]"):
        with pytest.raises(SystemExit) as stop:
            cli.main(
                [
                    "train",
                    "--dataset",
                    "digits",
                    "--test-envs",
                    "1",
                    "--output",
                    "x",
                    "--hparams",
                    text,
                ]
            )
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "expected a JSON object" in err


def test_a_bf16_channels_last_run_trains_and_says_so(tmp_path, digits_dir):
    out = run(
        tiny_run(
            tmp_path / "bf16",
            digits_dir,
            "lsq",
            bits=4,
            from_scratch=True,
            precision="bf16",
            channels_last=True,
        )
    )
    (record,) = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert record["args"]["precision"] == "bf16" and record["args"]["channels_last"]
    assert math.isfinite(record["loss"])
