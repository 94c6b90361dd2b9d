"""Command-line conventions: version, help on every option, exit codes, --quiet, and the
bad inputs that used to pass silently or end in a traceback."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_argv
from PIL import Image

import gaqat
from gaqat import cli, launchers, sweep
from gaqat.runfolder import locked

SOURCES = Path(gaqat.__file__).parent


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"gaqat {gaqat.__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "gaqat", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"gaqat {gaqat.__version__}"


def test_every_option_of_every_command_has_help_and_shows_its_default():
    for name, parser in _subparsers(cli.build_parser()):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"gaqat {name} {action.option_strings[0]} has no help text"
        text = " ".join(parser.format_help().split())
        if name == "train":
            assert "(default: erm)" in text and "(default: 0)" in text


def test_usage_errors_exit_2(tmp_path, capsys):
    for argv in (["train"], ["nope"], ["report"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2
    assert cli.main(["demo", "--bits", "9", "--output", str(tmp_path / "demo")]) == 2
    assert "--bits: expected an integer from 2 to 8, got 9" in capsys.readouterr().err


def test_plot_refuses_a_threshold_outside_0_1(tmp_path, capsys):
    for tau in ("nan", "-0.1", "2"):
        assert cli.main(["plot", str(tmp_path), "--tau", tau]) == 2
        assert "--tau: expected a freezing threshold in [0, 1]" in capsys.readouterr().err


def test_demo_checks_every_run_before_training_anything(tmp_path):
    from gaqat.demo import demo
    from gaqat.errors import UsageError

    with pytest.raises(UsageError, match="--bits: .* from 2 to 8, got 9"):
        demo(tmp_path / "demo", bits=9)
    assert not (tmp_path / "demo").exists()


def test_data_info_counts_only_images_that_decode(tmp_path, capsys):
    for domain in ("a", "b"):
        for cls in ("x", "y"):
            folder = tmp_path / "data" / domain / cls
            folder.mkdir(parents=True)
            for k in range(2):
                noise = np.random.default_rng(k).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(noise).save(folder / f"{k}.jpg")
    broken = tmp_path / "data" / "b" / "y" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:2000])  # truncated: the header still reads
    assert cli.main(["data", "info", str(tmp_path / "data")]) == 1
    captured = capsys.readouterr()
    assert "7 images" in captured.out and str(broken) in captured.err
    assert "1 image(s) fail to decode" in captured.err
    assert cli.main(["data", "info", str(tmp_path / "data"), "--quick"]) == 0
    assert "8 images" in capsys.readouterr().out


def test_quiet_runs_print_no_progress(tmp_path, digits_dir, capsys):
    argv = tiny_argv(tmp_path / "run", digits_dir, "--steps", "1", "--quiet")
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("finished ")


def test_no_unix_only_module_is_imported_at_module_level():
    unix_only = {"fcntl", "resource", "termios", "pwd", "grp", "posix"}
    for path in SOURCES.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: functions may import them where they exist
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else []
            )
            assert not unix_only & {n.split(".")[0] for n in names}, f"{path}: imports {names}"


def test_sweep_takes_every_shared_train_option(tmp_path, monkeypatch, capsys):
    runs = []
    monkeypatch.setattr(launchers, "run", lambda config: runs.append(config))
    argv = [
        "sweep",
        "--dataset",
        "digits",
        "--algorithms",
        "lsq",
        "--test-envs",
        "1",
        "--output",
        str(tmp_path),
        "--image-size",
        "48",
        "--weights",
        "none",
        "--deterministic",
        "--num-workers",
        "2",
        "--device",
        "cpu",
        "--quiet",
    ]
    cli.main(argv)
    assert {
        (c.image_size, c.weights, c.deterministic, c.num_workers, c.device, c.progress)
        for c in runs
    } == {(48, None, True, 2, "cpu", False)}
    capsys.readouterr()
    assert cli.main(argv[:9] + ["--image-size", "0"]) == 2
    assert "--image-size: expected a positive integer" in capsys.readouterr().err


def test_a_second_sweep_skips_the_runs_another_process_holds(tmp_path, capsys):
    jobs = sweep.plan(sweep.SweepConfig("digits", tmp_path, ["lsq"], [1]))
    with locked(jobs[0].folder):  # another process is training the float init
        outcomes = sweep.launch(jobs)
    assert [o.status for o in outcomes] == ["busy", "skipped"]
    assert "in use by another process" in outcomes[0].detail
    assert outcomes[1].detail.endswith("which another process is running")


def test_a_missing_extra_names_the_pip_command(tmp_path, monkeypatch, capsys):
    for module in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "gaqat.plots", raising=False)
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert 'pip install "gaqat[plot]"' in capsys.readouterr().err


def test_sweep_launch_options_are_checked_before_anything_runs(tmp_path, capsys):
    base = ["sweep", "--dataset", "digits", "--algorithms", "erm", "--output", str(tmp_path)]
    for extra, message in (
        (["--jobs", "0"], "--jobs: expected an integer >= 1, got '0'"),
        (["--threads", "0"], "--threads: expected an integer >= 1"),
        (["--mem-gb", "-1"], "--mem-gb: expected a finite number > 0, got '-1'"),
        (["--mem-gb", "nan"], "--mem-gb: expected a finite number > 0"),
        (["--time-min", "0"], "--time-min: expected an integer >= 1"),
        (["--cpus-per-run", "0"], "--cpus-per-run: expected an integer >= 1"),
        (["--gpus-per-run", "-1"], "--gpus-per-run: expected an integer >= 0"),
        (["--float-steps", "0"], "--float-steps: expected an integer >= 1"),
        (["--float-checkpoint-freq", "-2"], "--float-checkpoint-freq: expected an integer >= 1"),
        (["--seeds", "0", "--seeds", "1"], "--seeds given more than once"),
    ):
        with pytest.raises(SystemExit) as stop:
            cli.main(base + ["--dry-run"] + extra)
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_warnings_are_one_plain_line_each_even_when_the_command_then_fails(
    tmp_path, monkeypatch, capsys
):
    from gaqat import report

    def warn_then_fail(*args, **kwargs):
        warnings.warn("a torn last line, skipped", stacklevel=2)
        warnings.warn("step sizes floored", RuntimeWarning, stacklevel=2)
        raise ValueError("no readable run")

    monkeypatch.setattr(report, "report", warn_then_fail)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "gaqat report: warning: a torn last line, skipped",
        "gaqat report: warning: step sizes floored",
        "gaqat report: error: no readable run",
    ]
    assert cli.main(["report", str(tmp_path), "--quiet"]) == 2  # notes left out, not alarms
    assert capsys.readouterr().err.splitlines()[0] == "gaqat report: warning: step sizes floored"
