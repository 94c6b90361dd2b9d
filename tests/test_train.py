"""End-to-end runs: every algorithm, the results schema, resume identity, refusals, NaN stop."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_argv, tiny_run

from gaqat import cli
from gaqat.algorithms import Algorithm
from gaqat.averaging import LossValley
from gaqat.checkpoint import load_model
from gaqat.names import ALGORITHMS, get_recipe
from gaqat.runfolder import CHECKPOINT, DONE, GRADIENTS, RESULTS
from gaqat.selection import OracleSelection, TrainingDomainValidation
from gaqat.train import run, run_summary


def _config(tmp_path, digits_dir, name, algorithm="erm", **kwargs):
    return tiny_run(tmp_path / name, digits_dir, algorithm, **kwargs)


def _records(folder, name=RESULTS):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def float_init(tmp_path_factory, digits_dir):
    out = run(_config(tmp_path_factory.mktemp("init"), digits_dir, "erm", steps=4))
    assert [r["step"] for r in _records(out)] == [2, 4]
    return out / CHECKPOINT


def _every_algorithm():
    """Every method; the averaging ones marked slow but swad and lsq_swad (each is its
    base's run plus the average and one more evaluation)."""
    return [
        pytest.param(name, marks=pytest.mark.slow)
        if get_recipe(name).averaging != "none" and name not in ("swad", "lsq_swad")
        else name
        for name in sorted(ALGORITHMS)
    ]


@pytest.mark.parametrize("algorithm", _every_algorithm())
def test_every_algorithm_runs_and_writes_domainbed_records(
    tmp_path, digits_dir, float_init, algorithm
):
    recipe = get_recipe(algorithm)
    quantized, averaging = recipe.quantized, recipe.averaging != "none"
    hparams = {"window": 2} if recipe.freezing else {}
    if averaging:
        hparams["bn_recompute_steps"] = 2
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
    assert [r["step"] for r in records] == ([2, 2] if averaging else [2])
    # An averaging run's last record is its averaged network's, its result.
    assert [r.get("averaged", False) for r in records] == [False, True][: len(records)]
    for record in records:
        for i in range(4):
            assert (
                0.0 <= record[f"env{i}_in_acc"] <= 1.0 and 0.0 <= record[f"env{i}_out_acc"] <= 1.0
            )
        timed = ("loss", "step_time", "mem_gb") if not record.get("averaged") else ()
        for key in ("epoch", *timed, *(("val_loss",) if averaging else ())):
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
    if recipe.freezing:
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


def _tensors(value, prefix=""):
    """Every tensor in a checkpoint's nested dicts and lists, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {}
    return {k: t for key, v in items for k, t in _tensors(v, f"{prefix}/{key}").items()}


def _swad_config(tmp_path, digits_dir, name, algorithm, float_init, **kwargs):
    """4 steps, checkpoints at 2 and 4; n_converge 1: the window opens at the first."""
    quantized = get_recipe(algorithm).quantized
    return _config(
        tmp_path,
        digits_dir,
        name,
        algorithm,
        steps=4,
        checkpoint_freq=2,
        hparams={"n_converge": 1, "bn_recompute_steps": 2},
        bits=4 if quantized else None,
        init=float_init if quantized else None,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["swad", "lsq_swad"])
def test_a_swad_run_reports_and_saves_the_average_of_its_window(
    tmp_path, digits_dir, float_init, monkeypatch, algorithm
):
    """The last record is the averaged network's, flagged, over the window that SWAD's
    rule takes from the recorded validation losses; the checkpoint holds that average
    (step sizes included) with batch norm recomputed, and selection reports it."""
    seen = []  # every step's parameters, float64
    update = Algorithm.update

    def record_weights(self, minibatches):
        stats = update(self, minibatches)
        seen.append({n: p.detach().double().clone() for n, p in self.network.named_parameters()})
        return stats

    monkeypatch.setattr(Algorithm, "update", record_weights)
    out = run(_swad_config(tmp_path, digits_dir, algorithm, algorithm, float_init))
    *steps, last = _records(out)
    assert [r["step"] for r in steps] == [2, 4] and not any("averaged" in r for r in steps)
    valley = LossValley(n_converge=1)
    for record in steps:
        valley.observe(record["step"], record["val_loss"])
    after, through = valley.window(final=True)
    assert last["averaged"] is True and (last["step"], last["averaging"]) == (4, "swad")
    window = (last["average_start_step"], last["average_end_step"], last["averaged_steps"])
    assert window == (after + 1, through, through - after)

    model = torch.load(out / CHECKPOINT, weights_only=True)["model"]
    assert any(name.endswith(".scale") for name in seen[0]) == (algorithm == "lsq_swad")
    for name in seen[0]:
        mean = sum(s[name] for s in seen[after:through]) / (through - after)
        torch.testing.assert_close(model[name].double(), mean, rtol=1.2e-7, atol=1e-12)
    tracked = [v for k, v in model.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(n) == 2 for n in tracked)  # recomputed on 2 batches

    records = _records(out)
    val = np.mean([last[f"env{i}_out_acc"] for i in (0, 2, 3)])
    assert TrainingDomainValidation().run_acc(records) == (pytest.approx(val), last["env1_in_acc"])
    assert OracleSelection().run_acc(records) == (last["env1_out_acc"], last["env1_in_acc"])
    assert "with the SWAD average of steps" in run_summary(out)


@pytest.mark.slow
def test_a_swad_run_stopped_after_its_first_checkpoint_resumes_bit_identical(
    tmp_path, digits_dir, float_init, monkeypatch
):
    """Killed after the checkpoint of step 2 (which holds the average so far and the window
    state), resumed: the same records and every checkpoint tensor bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = run(_swad_config(tmp_path, digits_dir, "straight", "lsq_swad", float_init))
        update, calls = Algorithm.update, {"n": 0}

        def crash_after_checkpoint(self, minibatches):
            calls["n"] += 1
            if calls["n"] == 4:  # the second step after the step-2 checkpoint
                raise KeyboardInterrupt
            return update(self, minibatches)

        monkeypatch.setattr(Algorithm, "update", crash_after_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            run(_swad_config(tmp_path, digits_dir, "killed", "lsq_swad", float_init))
        monkeypatch.setattr(Algorithm, "update", update)
        saved = torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=True)
        assert saved["step"] == 2 and saved["training"]["average"]["total"]["count"] == 2
        resumed = run(
            _swad_config(tmp_path, digits_dir, "killed", "lsq_swad", float_init, resume=True)
        )
    finally:
        torch.set_num_threads(threads)

    def strip(records):
        return [
            {k: v for k, v in r.items() if k not in ("step_time", "mem_gb", "args")}
            for r in records
        ]

    assert strip(_records(straight)) == strip(_records(resumed))
    assert _records(resumed)[-1]["averaged"] is True
    a = _tensors(torch.load(straight / CHECKPOINT, weights_only=True))
    b = _tensors(torch.load(resumed / CHECKPOINT, weights_only=True))
    assert a.keys() == b.keys() and any(k.startswith("/training/average") for k in a)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


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
