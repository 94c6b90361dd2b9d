"""Sweeps: the job grid and its order, stable folder hashes, relaunch, resume, failures."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from gaqat import cli, launchers, sweep
from gaqat.data.digits import DOMAINS as DIGITS_DOMAINS
from gaqat.runfolder import CHECKPOINT, DONE, RESULTS

TINY = {"batch_size": 8}


@pytest.fixture
def fake_run(monkeypatch):
    """Replaces training by writing a finished folder; records every config it was given."""
    calls = []

    def run(config):
        calls.append(config)
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        accuracies = {f"env{i}_{split}_acc": 0.5 for i in range(4) for split in ("in", "out")}
        args = {**config.to_args(), "dataset": "DigitsDG", "domains": list(DIGITS_DOMAINS)}
        (out / RESULTS).write_text(json.dumps({"step": 1, "args": args, **accuracies}) + "\n")
        (out / DONE).write_text("done\n")
        return out

    monkeypatch.setattr(launchers, "run", run)
    return calls


def _config(output, algorithms, test_envs, *, bits=(4,), seeds=(0,), hparams_seeds=(0,), **options):
    return sweep.SweepConfig(
        "digits",
        output,
        algorithms,
        test_envs,
        bits=bits,
        seeds=seeds,
        hparams_seeds=hparams_seeds,
        options=options,
    )


def _names(jobs):
    return [job.folder.name for job in jobs]


def test_qat_jobs_start_from_an_added_erm_run_of_their_domain_and_seed(tmp_path):
    jobs = sweep.plan(
        _config(
            tmp_path,
            ["gaqat", "lsq_sagm"],
            [0, 2],
            bits=[4, 3],
            seeds=[0, 1],
            hparams={**TINY, "window": 2},
        )
    )
    assert len(jobs) == 2 * 2 * (1 + 2 * 2)  # (seed, env) groups x (erm + 2 methods x 2 widths)
    position = {job.folder: i for i, job in enumerate(jobs)}
    floats = [job for job in jobs if job.needs is None]
    assert {job.key["algorithm"] for job in floats} == {"erm"} and len(floats) == 4
    for job in jobs:
        config = job.config
        assert config.test_envs == tuple(job.key["test_envs"]) and config.resume
        if job.needs is None:
            assert config.init is None and config.bits is None and "_w" not in job.folder.name
            assert config.hparams == TINY  # erm has no window: that key is not passed to it
            continue
        init = jobs[position[job.needs]]
        assert position[job.needs] < position[job.folder]
        assert config.init == init.folder / CHECKPOINT
        assert (init.config.test_envs, init.config.trial_seed, init.config.hparams_seed) == (
            config.test_envs,
            config.trial_seed,
            0,
        )
        window = {"window": 2} if config.algorithm == "gaqat" else {}  # lsq_sagm does not freeze
        assert config.hparams == {**TINY, **window}
    # grouped by (seed, held-out domain): a sweep stopped halfway leaves whole pairs
    groups = [(job.key["trial_seed"], job.key["test_envs"][0]) for job in jobs]
    assert groups == sorted(groups, key=[(0, 0), (0, 2), (1, 0), (1, 2)].index)
    first_group = [
        "erm_env0_seed0",
        "gaqat_w4_env0_seed0",
        "gaqat_w3_env0_seed0",
        "lsq_sagm_w4_env0_seed0",
        "lsq_sagm_w3_env0_seed0",
    ]
    assert [job.folder for job in jobs[:5]] == [
        tmp_path / f"{prefix}_{sweep.job_hash(job.key)}" for prefix, job in zip(first_group, jobs)
    ]


def test_float_methods_ignore_bits_and_a_requested_erm_is_not_doubled(tmp_path):
    jobs = sweep.plan(
        _config(tmp_path, ["lsq", "erm", "sagm"], [1], bits=[4, 3], hparams_seeds=[0, 1])
    )
    algorithms = [(job.key["algorithm"], job.key["bits"], job.key["hparams_seed"]) for job in jobs]
    assert algorithms == [
        ("erm", None, 0),
        ("erm", None, 1),
        ("sagm", None, 0),
        ("sagm", None, 1),
        ("lsq", 4, 0),
        ("lsq", 3, 0),
        ("lsq", 4, 1),
        ("lsq", 3, 1),
    ]
    assert jobs[1].folder.name.startswith("erm_env1_seed0_hp1_")
    assert {job.needs for job in jobs[4:]} == {jobs[0].folder}  # every draw: the same init


def test_folder_names_are_stable_and_distinct(tmp_path):
    # Fixed values: a change here renames every folder, and relaunching old sweeps reruns them.
    assert sweep.job_hash({"b": [1, 2], "a": None}) == "ee743f2f"
    assert sweep.job_hash({"a": None, "b": [1, 2]}) == "ee743f2f"
    assert _names(sweep.plan(_config(tmp_path, ["gaqat"], [1]))) == [
        "erm_env1_seed0_61e9c916",
        "gaqat_w4_env1_seed0_68a5df4c",
    ]
    # where the data lives and where the sweep is are not part of a run's identity
    moved = sweep.plan(_config(tmp_path / "elsewhere", ["gaqat"], [1], data_dir=tmp_path))
    assert _names(moved) == ["erm_env1_seed0_61e9c916", "gaqat_w4_env1_seed0_68a5df4c"]

    grid = sweep.plan(
        _config(
            tmp_path,
            ["erm", "sagm", "lsq", "gaqat"],
            [0, 1, 2, 3],
            bits=[2, 3, 4, 8],
            seeds=[0, 1, 2],
            hparams_seeds=[0, 1, 2],
        )
    )
    assert len(grid) == 4 * 3 * (2 * 3 + 2 * 4 * 3) == len(set(_names(grid)))
    variants = [
        sweep.plan(_config(tmp_path, ["gaqat"], [1], **kw))[1].folder.name
        for kw in (
            {},
            {"steps": 10},
            {"checkpoint_freq": 5},
            {"hparams": {"tau": 0.2}},
            {"image_size": 64},
            {"weights": None},
        )
    ]
    assert len(set(variants)) == len(variants)
    erm, gaqat = sweep.plan(_config(tmp_path, ["gaqat"], [1]))
    assert gaqat.key["init"] == erm.folder.name  # a QAT run's identity includes its init


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"algorithms": ["nope"]}, "unknown algorithm 'nope'"),
        ({"algorithms": []}, "--algorithms"),
        ({"bits": [1]}, "--bits"),
        ({"bits": []}, "--bits"),
        ({"hparams": {"windw": 2}}, "unknown key(s) windw"),
        ({"hparams": {"window": "2"}}, "window must be an integer >= 2"),
        ({"hparams": {"window": 1}}, "--hparams '{\"window\": 1}': window must be an integer >= 2"),
    ],
)
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, kwargs, message):
    arguments = {"algorithms": ["gaqat"], **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.plan(_config(tmp_path, arguments.pop("algorithms"), [1], **arguments))
    assert not any(tmp_path.iterdir())


def test_test_envs_all_and_indices_are_checked_against_the_domains():
    assert sweep.test_env_indices("digits", None, ["all"]) == [0, 1, 2, 3]
    assert sweep.test_env_indices("PACS", None, ["3", "1"]) == [3, 1]
    with pytest.raises(ValueError, match=r"\[4\] not among digits's domains \(0=mnist, 1=mnist_m"):
        sweep.test_env_indices("digits", None, ["1", "4"])
    with pytest.raises(ValueError, match="expected 'all' or domain indices"):
        sweep.test_env_indices("digits", None, ["mnist"])


def test_relaunching_runs_nothing_finished_and_resumes_the_unfinished(tmp_path, fake_run):
    jobs = sweep.plan(_config(tmp_path, ["erm", "gaqat"], [0, 1]))
    incomplete = jobs[3].folder  # gaqat on env 1: a killed run left a results file only
    incomplete.mkdir()
    (incomplete / RESULTS).write_text("{}\n")
    jobs = sweep.plan(_config(tmp_path, ["erm", "gaqat"], [0, 1]))
    assert [job.state for job in jobs] == ["new", "new", "new", "incomplete"]

    outcomes = sweep.launch(jobs)
    assert [o.status for o in outcomes] == ["ran"] * 4
    assert [Path(c.output) for c in fake_run] == [job.folder for job in jobs]
    assert all(c.resume for c in fake_run)

    again = sweep.plan(_config(tmp_path, ["erm", "gaqat"], [0, 1]))
    assert [job.state for job in again] == ["done"] * 4
    assert [o.status for o in sweep.launch(again)] == ["kept"] * 4
    assert len(fake_run) == 4  # the second launch trained nothing


def test_dry_run_lists_the_jobs_and_their_state_and_runs_nothing(tmp_path, fake_run, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--dataset",
        "digits",
        "--algorithms",
        "erm",
        "lsq_sagm",
        "--bits",
        "4",
        "3",
        "--test-envs",
        "1",
        "--output",
        str(out),
        "--dry-run",
    ]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "state",
        "folder",
        "algorithm",
        "bits",
        "test",
        "env",
        "seed",
        "hparams",
        "seed",
    ]
    assert [line.split()[0::2][:3] for line in lines[1:4]] == [
        ["new", "erm", "1"],
        ["new", "lsq_sagm", "1"],
        ["new", "lsq_sagm", "1"],
    ]
    assert lines[1].split()[3] == "-" and [line.split()[3] for line in lines[2:4]] == ["4", "3"]
    assert lines[-1] == "3 jobs: 0 done, 0 incomplete, 3 new"
    assert not out.exists() and not fake_run

    finished = out / lines[1].split()[1]
    finished.mkdir(parents=True)
    (finished / DONE).write_text("done\n")
    (out / lines[2].split()[1]).mkdir()
    (out / lines[2].split()[1] / CHECKPOINT).write_bytes(b"")
    assert cli.main(argv) == 0
    states = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:4]]
    assert states == ["done", "incomplete", "new"] and not fake_run


def test_a_failure_stops_the_sweep_or_with_skip_failed_skips_its_dependants(
    tmp_path, fake_run, monkeypatch, capsys
):
    ran = launchers.run

    def fail_on_env0_erm(config):
        if config.algorithm == "erm" and config.test_envs == (0,):
            raise RuntimeError("disk full")
        return ran(config)

    monkeypatch.setattr(launchers, "run", fail_on_env0_erm)
    jobs = sweep.plan(_config(tmp_path, ["lsq"], [0, 1]))
    stopped = sweep.launch(jobs)
    assert [o.status for o in stopped] == ["failed"] and not fake_run
    assert f"[1/4] failed  {jobs[0].folder}: RuntimeError: disk full" in capsys.readouterr().out

    outcomes = sweep.launch(jobs, skip_failed=True)
    assert [o.status for o in outcomes] == ["failed", "skipped", "ran", "ran"]
    assert outcomes[1].detail == f"needs {jobs[0].folder.name}, which failed"
    assert [Path(c.output) for c in fake_run] == [job.folder for job in jobs[2:]]

    argv = [
        "sweep",
        "--dataset",
        "digits",
        "--algorithms",
        "lsq",
        "--test-envs",
        "0",
        "1",
        "--output",
        str(tmp_path),
        "--skip-failed",
    ]
    assert cli.main(argv) == 1  # the report of what finished, then the failures
    captured = capsys.readouterr()
    assert "[3/4] kept" in captured.out and "| lsq | 4 | 50.0 |" in captured.out
    assert (
        "2 job(s) failed, busy or skipped; launching the same sweep again retries them"
        in captured.err
    )


def test_ctrl_c_stops_the_sweep_and_leaves_the_run_resumable(tmp_path, monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(launchers, "run", interrupted)
    argv = [
        "sweep",
        "--dataset",
        "digits",
        "--algorithms",
        "erm",
        "--test-envs",
        "1",
        "--output",
        str(tmp_path),
    ]
    assert cli.main(argv) == 130
    assert "resume from their last checkpoints" in capsys.readouterr().out


@pytest.mark.slow
def test_a_tiny_sweep_end_to_end_reports_both_methods_and_resumes(tmp_path, digits_dir, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--dataset",
        "digits",
        "--data-dir",
        str(digits_dir),
        "--algorithms",
        "erm",
        "lsq_sagm",
        "--bits",
        "4",
        "--test-envs",
        "1",
        "--steps",
        "2",
        "--checkpoint-freq",
        "2",
        "--hparams",
        json.dumps(TINY),
        "--output",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| erm | 32 | " in printed and "| lsq_sagm | 4 | " in printed
    erm, qat = sorted(out.glob("*_env1_seed0_*"))
    records = [json.loads(line) for line in (qat / RESULTS).read_text().splitlines()]
    assert [r["step"] for r in records] == [2]
    assert records[0]["args"]["init"] == str(erm / CHECKPOINT)
    record = json.loads((out / sweep.SWEEP_RECORD).read_text())
    assert record["config"]["test_envs"] == ["1"] and record["config"]["options"]["steps"] == 2
    assert [j["folder"] for j in record["jobs"]] == [erm.name, qat.name]

    (qat / DONE).unlink()  # as if killed after its last checkpoint
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("done ") and lines[2].startswith("incomplete ")
    assert lines[4].startswith(f"[1/2] kept    {erm}") and lines[5].startswith(
        f"[2/2] ran     {qat}"
    )
    assert (qat / DONE).exists()
    assert [json.loads(line)["step"] for line in (qat / RESULTS).read_text().splitlines()] == [2]


def _records_without_timing(folder):
    """What must not depend on how runs were launched: everything but time, memory and
    where the run folder is."""
    skip = ("step_time", "mem_gb")
    records = [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]
    for record in records:
        record["args"] = {
            k: v for k, v in record["args"].items() if k not in ("output", "output_dir", "init")
        }
    return [{k: v for k, v in r.items() if k not in skip} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["processes", "submitit"])
def test_parallel_launchers_give_the_records_of_a_sequential_sweep(tmp_path, digits_dir, launcher):
    """Runs get one thread each in both sweeps: float sums, and so quantization, round alike."""
    import torch

    def config(out):
        return _config(
            out, ["lsq_sagm"], [1], data_dir=digits_dir, steps=2, hparams=TINY, progress=False
        )

    threads = torch.get_num_threads()
    try:
        sequential = sweep.launch(
            sweep.plan(config(tmp_path / "one")), launcher=launchers.InlineLauncher(threads=1)
        )
    finally:
        torch.set_num_threads(threads)
    if launcher == "processes":
        chosen = launchers.ProcessLauncher(2, threads=1)
    else:
        chosen = launchers.SubmititLauncher(
            tmp_path / "submitit", 2, launchers.SlurmOptions(cluster="local", gpus=0, cpus=1)
        )
    lines = []
    parallel = sweep.launch(
        sweep.plan(config(tmp_path / "two")), launcher=chosen, note=lines.append
    )
    assert [o.status for o in sequential] == [o.status for o in parallel] == ["ran"] * 2
    for a, b in zip(sequential, parallel):
        assert a.job.folder.name == b.job.folder.name
        assert _records_without_timing(a.job.folder) == _records_without_timing(b.job.folder)
    assert "running" in lines[-1] and lines[-1].startswith("[2/2] ran")


class _Recording:
    """A launcher whose runs end at once (as finished futures), recording what started."""

    slots = 3

    def __init__(self):
        self.started = []

    def start(self, config):
        from concurrent.futures import Future

        self.started.append(Path(config.output).name)
        handle = Future()
        handle.set_result(config.output)
        return handle

    def stop(self, interrupt=False):
        pass


def test_a_qat_run_starts_only_after_its_float_init_is_done(tmp_path):
    jobs = sweep.plan(_config(tmp_path, ["lsq", "gaqat"], [0, 1]))
    recording = _Recording()
    outcomes = sweep.launch(jobs, launcher=recording, note=lambda line: None)
    assert [o.status for o in outcomes] == ["ran"] * 6
    erm0, erm1 = (j.folder.name for j in jobs if j.needs is None)
    # the two float runs take two of the three slots; QAT runs wait for them to end
    assert recording.started[:2] == [erm0, erm1]
    assert set(recording.started[2:]) == {j.folder.name for j in jobs if j.needs is not None}


def test_workers_share_the_cpu_threads_and_take_one_gpu_each(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launcher = launchers.ProcessLauncher(2)
    submitted = []
    monkeypatch.setattr(
        launcher._pool,
        "submit",
        lambda fn, config, threads: submitted.append((config.device, threads, config.progress)),
    )
    for name in "abc":
        launcher.start(sweep.TrainConfig(dataset="digits", output=Path(name), test_envs=(1,)))
    launcher.start(
        sweep.TrainConfig(dataset="digits", output=Path("d"), test_envs=(1,), device="cpu")
    )
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert submitted == [
        ("cuda:0", threads, False),
        ("cuda:1", threads, False),
        ("cuda:0", threads, False),
        ("cpu", threads, False),
    ]
    launcher.stop()


def test_the_fair_float_baseline_continues_each_init_for_the_qat_steps_and_lr(tmp_path, fake_run):
    config = _config(
        tmp_path / "sweep", ["lsq"], [0, 1], bits=[4, 2], seeds=[0, 1], steps=3, hparams=TINY
    )
    config = replace(config, float_options={"steps": 7})
    jobs = sweep.fair_float_baseline(config, tmp_path / "fair")
    inits, runs = jobs[:4], jobs[4:]
    assert [job.folder for job in inits] == [
        j.folder for j in sweep.plan(config) if j.needs is None
    ]
    assert len(runs) == 4 and all(job.folder.parent == tmp_path / "fair" for job in runs)
    for init, job in zip(inits, runs):
        assert job.key["algorithm"] == "erm" and job.needs == init.folder
        assert job.config.init == init.folder / CHECKPOINT and job.config.steps == 3
        assert job.config.hparams == {"lr": 3e-4, **TINY}  # lsq's learning rate, not erm's 1e-3
        assert (job.config.test_envs, job.config.trial_seed) == (
            init.config.test_envs,
            init.config.trial_seed,
        )
    assert len({job.folder.name for job in runs}) == 4  # named by their init
    outcomes = sweep.launch(jobs, note=lambda line: None)
    assert [o.status for o in outcomes] == ["ran"] * 8
    with pytest.raises(ValueError, match="no QAT method"):
        sweep.fair_float_baseline(replace(config, algorithms=["erm"]), tmp_path / "x")
