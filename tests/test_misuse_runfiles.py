"""Misuse of export, report and plot: outputs that would destroy a user's files, hand-edited
or corrupted run files, and usage errors that must exit 2 with one plain line (issue #19).

The checkpoints here are untrained (a quantized small_cnn whose step sizes one forward pass
initialised): export reads them as it reads a trained one, in a second."""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import asdict

import pytest
import torch

from gaqat import cli
from gaqat.checkpoint import load_checkpoint, load_model
from gaqat.models import ModelConfig, build_model
from gaqat.prepare import QuantConfig, quantize_model
from gaqat.report import report
from gaqat.report.runs import SkippedRunWarning, load_runs

DOMAINS = ["mnist", "mnist_m", "syn"]


def _checkpoint() -> dict:
    """What ``gaqat train`` writes, less the training state export never reads."""
    torch.manual_seed(0)
    quant = QuantConfig(weight_bits=4, act_bits=4)
    model = quantize_model(build_model(ModelConfig()), quant)
    model(torch.randn(4, 3, 32, 32))  # initialises the step sizes
    return {
        "model": model.state_dict(),
        "model_config": ModelConfig().to_dict(),
        "quant_config": asdict(quant),
        "meta": {
            "dataset": "DigitsDG",
            "classes": [str(i) for i in range(10)],
            "domains": DOMAINS,
            "algorithm": "lsq",
            "bits": 4,
            "test_envs": [1],
        },
        "args": {"dataset": "digits", "trial_seed": 0, "algorithm": "lsq_w4", "bits": 4},
    }


@pytest.fixture(scope="module")
def checkpoint_dict():
    return _checkpoint()


@pytest.fixture
def run(tmp_path, checkpoint_dict):
    """A run folder as ``gaqat train`` leaves it."""
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save(checkpoint_dict, folder / "checkpoint.pt")
    for name in ("results.jsonl", "gradients.jsonl"):
        (folder / name).write_text('{"step": 2}\n')
    (folder / "done").write_text("")
    return folder


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _export(checkpoint, out, *options, fmt="int"):
    return cli.main(["export", str(checkpoint), "--format", fmt, "--out", str(out), *options])


# --- export: where it may write -------------------------------------------------------


@pytest.mark.parametrize("name", ["checkpoint.pt", "results.jsonl", "gradients.jsonl", "done"])
def test_export_never_writes_over_a_file_of_the_run(run, name, capsys):
    pytest.importorskip("safetensors")
    before = _contents(run)
    for extra in ((), ("--overwrite",)):
        assert _export(run / "checkpoint.pt", run / name, *extra) == 2
        err = capsys.readouterr().err
        assert str(run / name) in err and "--out" in err and "Traceback" not in err
        assert "even with --overwrite" in err
    assert _contents(run) == before


def test_export_never_writes_over_its_checkpoint_outside_a_run(run, tmp_path, capsys):
    pytest.importorskip("safetensors")
    loose = tmp_path / "model.pt"
    loose.write_bytes((run / "checkpoint.pt").read_bytes())
    assert _export(loose, loose, "--overwrite") == 2
    assert "the checkpoint exported" in capsys.readouterr().err
    assert loose.read_bytes() == (run / "checkpoint.pt").read_bytes()


def test_an_existing_output_needs_overwrite(run, tmp_path, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"mine")
    assert _export(run / "checkpoint.pt", out) == 2
    err = capsys.readouterr().err
    assert f"--out {out} exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"mine"
    assert _export(run / "checkpoint.pt", out, "--overwrite") == 0
    assert out.read_bytes() != b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "run"]


def test_evaluation_file_is_an_output_too(run, tmp_path, capsys):
    """Refused before the data is read or the ONNX file written."""
    out = tmp_path / "model.onnx"
    (tmp_path / "model.eval.json").write_text("{}")
    assert _export(run / "checkpoint.pt", out, "--evaluate", fmt="onnx") == 2
    assert f"{tmp_path / 'model.eval.json'} exists" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["int", "onnx"])
def test_export_to_a_folder_or_below_a_file_is_a_usage_error(run, tmp_path, fmt, capsys):
    assert _export(run / "checkpoint.pt", tmp_path, fmt=fmt) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} is a folder" in err and "Traceback" not in err
    assert _export(run / "checkpoint.pt", run / "done" / "model.x", fmt=fmt) == 2
    assert f"{run / 'done'} is a file, not a folder" in capsys.readouterr().err


def test_data_dir_without_evaluate_is_a_usage_error(run, tmp_path, capsys):
    assert _export(run / "checkpoint.pt", tmp_path / "m", "--data-dir", str(tmp_path)) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_a_failing_write_leaves_no_partial_file_and_the_old_one_intact(
    run, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("safetensors")
    from gaqat.export import output

    def full_disk(path, data):
        path.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output, "_write", full_disk)
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the old export")
    assert _export(run / "checkpoint.pt", out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}: No space left on device" in err and "Traceback" not in err
    assert out.read_bytes() == b"the old export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "run"]


def test_outputs_are_written_all_or_none(tmp_path, monkeypatch):
    from gaqat.export import output

    first, second = tmp_path / "a.onnx", tmp_path / "a.eval.json"
    first.write_text("old a")
    written = []

    def fail_second(path, data):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(path)
        path.write_bytes(data)

    monkeypatch.setattr(output, "_write", fail_second)
    with pytest.raises(OSError, match="cannot write .*a.eval.json"):
        output.write_outputs({first: b"new a", second: b"new b"})
    assert first.read_text() == "old a" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]


# --- checkpoints edited by hand -------------------------------------------------------


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda c: c.pop("model_config"), "missing keys ['model_config']"),
        (lambda c: c.update(model_config=5), "field 'model_config' is 5, expected a JSON object"),
        (lambda c: c["model_config"].pop("arch"), "missing field 'model_config.arch'"),
        (
            lambda c: c["model_config"].update(num_classes="10"),
            "field 'model_config.num_classes' is '10', expected int",
        ),
        (lambda c: c["model_config"].update(arch="resnet9"), "model_config.arch: 'resnet9'"),
        (lambda c: c.update(meta="lsq"), "field 'meta' is 'lsq', expected a JSON object"),
        (lambda c: c["meta"].update(algorithm=5), "field 'meta.algorithm' is 5, expected str"),
        (lambda c: c["meta"].update(dataset=3), "field 'meta.dataset' is 3, expected str"),
        (lambda c: c["meta"].update(bits="4"), "field 'meta.bits' is '4', expected int"),
        (lambda c: c.update(quant_config="lsq"), "field 'quant_config' is 'lsq'"),
        (
            lambda c: c["quant_config"].update(weight_bits="4"),
            "quant_config.weight_bits: expected an integer",
        ),
        (lambda c: c.update(model=[1, 2]), "field 'model' is [1, 2], expected a JSON object"),
        (lambda c: c.update(args=[]), "field 'args' is [], expected a JSON object"),
        (lambda c: c.update(model={}), "field 'model' lacks 44 tensors (classifier.bias, "),
        (
            lambda c: c["model"].update(extra=torch.zeros(1)),
            "field 'model' has 1 unknown tensors (extra)",
        ),
        (lambda c: c["quant_config"].update(skip=5), "quant_config.skip: expected a list"),
    ],
)
def test_hand_edited_checkpoints_name_the_file_and_field(
    checkpoint_dict, tmp_path, spoil, message, capsys
):
    bad = {k: dict(v) for k, v in checkpoint_dict.items()}  # every value is a dict
    spoil(bad)
    path = tmp_path / "checkpoint.pt"
    torch.save(bad, path)
    assert _export(path, tmp_path / "m.safetensors") == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path}" in err and message in err, err
    assert "Traceback" not in err and "ModelConfig" not in err and "QuantConfig" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_a_float_checkpoint_may_have_no_quant_config_and_no_bits(checkpoint_dict, tmp_path):
    float_one = {**checkpoint_dict, "quant_config": None, "meta": {"bits": None}}
    float_one["model"] = build_model(ModelConfig()).state_dict()
    torch.save(float_one, tmp_path / "float.pt")
    model, checkpoint = load_model(tmp_path / "float.pt")
    assert checkpoint["quant_config"] is None


def test_a_folder_given_as_checkpoint_is_named_as_a_folder(run, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_checkpoint(run)
    assert _export(run, tmp_path / "m") == 2
    assert str(run / "checkpoint.pt") in capsys.readouterr().err


# --- report: corrupted results.jsonl --------------------------------------------------


def _records(algorithm="lsq_w4", bits=4, trial=0):
    out = []
    for step in (100, 200):
        r = {
            "step": step,
            "args": {
                "dataset": "digits",
                "test_envs": [1],
                "algorithm": algorithm,
                "trial_seed": trial,
                "hparams_seed": 0,
                "bits": bits,
                "domains": DOMAINS,
            },
        }
        for i in range(len(DOMAINS)):
            r[f"env{i}_in_acc"] = r[f"env{i}_out_acc"] = 0.5
        out.append(r)
    return out


def _write(folder, records=None, raw=None):
    folder.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records or [])
    (folder / "results.jsonl").write_bytes(text.encode() if raw is None else raw)
    (folder / "done").write_text("")


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda rs: rs[1].pop("step"), "line 2: missing field 'step'"),
        (lambda rs: rs[0]["args"].update(algorithm=5), "line 1: field 'args.algorithm' is 5"),
        (lambda rs: rs[0]["args"].update(dataset=3), "line 1: field 'args.dataset' is 3"),
        (lambda rs: rs[0]["args"].update(bits="4"), "line 1: field 'args.bits' is '4'"),
        (lambda rs: rs[0]["args"].update(bits=4.0), "line 1: field 'args.bits' is 4.0"),
        (
            lambda rs: rs[0]["args"].update(domains=[1, 2, 3]),
            "line 1: field 'args.domains' is [1, 2, 3], expected a list of domain names",
        ),
        (
            lambda rs: rs[1]["args"].update(domains=[]),
            "line 2: field 'args.domains' is [], expected a list of domain names",
        ),
        (
            lambda rs: rs[0].update(env1_in_acc=math.nan),
            "line 1: field 'env1_in_acc' is nan, expected an accuracy from 0 to 1",
        ),
        (lambda rs: rs[1].update(env0_out_acc=-0.5), "line 2: field 'env0_out_acc' is -0.5"),
        (lambda rs: rs[1].update(env2_in_acc=42), "line 2: field 'env2_in_acc' is 42"),
        (lambda rs: rs[0].update(env2_in_acc=math.inf), "line 1: field 'env2_in_acc' is inf"),
    ],
)
def test_report_skips_a_corrupt_run_with_a_warning_naming_file_line_and_field(
    tmp_path, spoil, message
):
    _write(tmp_path / "good", _records("erm", None))
    bad = _records()
    spoil(bad)
    _write(tmp_path / "bad", bad)
    with pytest.warns(SkippedRunWarning) as caught:
        runs = load_runs([tmp_path])
    assert [run.algorithm for run in runs] == ["erm"]
    (warning,) = caught
    assert f"{tmp_path / 'bad' / 'results.jsonl'}, {message}" in str(warning.message)
    assert "run skipped" in str(warning.message)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"[1, 2]\n[3]\n", "line 1: expected a JSON object, got list"),
        (bytes(range(256)) * 4, "not a text file"),
        (b"\xff\xfe\x00abc\n\x80\x81\n{}\n", "not a text file"),
    ],
)
def test_report_skips_results_that_are_not_json_records(tmp_path, raw, message, capsys):
    _write(tmp_path / "good", _records("erm", None))
    _write(tmp_path / "bad", raw=raw)
    assert cli.main(["report", str(tmp_path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "| erm | 32 |" in captured.out and "lsq" not in captured.out
    (line,) = captured.err.strip().splitlines()  # shown under --quiet: a run is missing
    assert line.startswith("gaqat report: warning: ")
    assert str(tmp_path / "bad" / "results.jsonl") in line and message in line


def test_report_with_every_run_skipped_is_an_error_that_says_why(tmp_path, capsys):
    _write(tmp_path / "bad", raw=b"[1]\n[2]\n")
    _write(tmp_path / "new", raw=b"")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gaqat report: error: no readable run with records below {tmp_path}: "
        f"{tmp_path / 'bad' / 'results.jsonl'}, line 1: expected a JSON object, got list "
        f"(and 1 more skipped)"
    )


def test_report_of_a_file_says_to_give_its_folder(tmp_path, capsys):
    _write(tmp_path / "run", _records())
    assert cli.main(["report", str(tmp_path / "run" / "results.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "folder" in err


def test_report_reads_good_runs_as_before(tmp_path):
    _write(tmp_path / "a", _records())
    assert "| lsq | 4 | 50.0 |" in report([tmp_path])


# --- plot -----------------------------------------------------------------------------


def test_plot_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "run").mkdir()
    (tmp_path / "f").write_text("mine")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        assert cli.main(["plot", str(tmp_path / "run"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and "is a file" in err
    assert (tmp_path / "f").read_text() == "mine"


def test_a_checkpoint_with_a_non_finite_step_size_is_not_exported(
    checkpoint_dict, tmp_path, capsys
):
    bad = {k: dict(v) for k, v in checkpoint_dict.items()}
    name = next(k for k in bad["model"] if k.endswith("weight_quantizer.scale"))
    bad["model"][name] = torch.full_like(bad["model"][name], float("nan"))
    torch.save(bad, tmp_path / "checkpoint.pt")
    assert _export(tmp_path / "checkpoint.pt", tmp_path / "m.safetensors") == 2
    assert "are not finite numbers: nothing to export" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
