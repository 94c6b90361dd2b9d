"""The DigitsDG study script (benchmarks/digits_study.py) end to end on tiny runs."""

import json
import tarfile
import time
from types import SimpleNamespace

import pytest
from helpers import TINY, load_benchmark

pytest.importorskip("matplotlib")


def load_study():
    return load_benchmark("digits_study")


def tiny_scale(study, **overrides):
    """Two seeds, one held-out domain, 3 bits: runs of a few seconds."""
    fields = {
        "steps": 2,
        "checkpoint_freq": 2,
        "float_steps": 2,
        "float_checkpoint_freq": 2,
        "seeds": (0, 1),
        "test_envs": (1,),
        "bits": (3,),
        "ablation_envs": (1,),
        "hparams": {**TINY, "window": 2, "bn_recompute_steps": 2},
    }
    return study.Scale(**{**fields, **overrides})


@pytest.mark.slow
def test_study_runs_resumes_and_writes_its_page(tmp_path, digits_dir):
    study = load_study()
    scale = tiny_scale(study, steps=4, checkpoint_freq=4, variants=("tau0.1",))
    out = tmp_path / "study"
    study.run_study(out, scale, jobs=1, threads=1, data_dir=digits_dir)

    main = out / "main"
    assert len(study.runs_of(main, "erm")) == 2
    for algorithm in ("lsq", "lsq_sagm", "gaqat"):
        assert len(study.runs_of(main, algorithm, 3)) == 2
    # The ablation trains gaqat with tau 0.1 only; its float inits and lsq_sagm are links.
    ablation = out / "ablations" / "tau0.1"
    links = sorted(p.name.split("_env")[0] for p in ablation.iterdir() if p.is_symlink())
    assert links == ["erm", "erm", "lsq_sagm_w3", "lsq_sagm_w3"]
    assert len(study.runs_of(out / "extra", "sagm")) == 1  # the first seed only
    assert len(study.runs_of(out / "extra", "lsq_sam", 3)) == 2

    # Launched again, every run is kept and nothing trains.
    before = {p: p.stat().st_mtime for p in main.rglob("results.jsonl")}
    study.run_study(out, scale, jobs=1, threads=1, data_dir=digits_dir)
    assert {p: p.stat().st_mtime for p in main.rglob("results.jsonl")} == before

    doc, json_path = tmp_path / "page" / "digits.md", tmp_path / "page" / "summary.json"
    study.write_page(out, scale, True, doc, json_path)
    text = doc.read_text()
    for heading in ("## Held-out accuracy", "## Paired differences", "## What freezing did"):
        assert heading in text
    assert "| tau0.1 |" in text and "| sagm | 32 |" in text
    assert "gaqat − lsq_sagm at 3 bits:" in text and "over 2 pairs" in text
    for figure in ("erm_curve", "paired", "d_task", "freeze_timeline", "ablations"):
        assert (doc.parent / "digits" / f"{figure}.png").stat().st_size > 0
        assert f"(digits/{figure}.png)" in text
    summary = json.loads(json_path.read_text())
    assert summary["paired_gaqat_vs_lsq_sagm"]["3"]["n"] == "2"
    assert summary["freezing"]["3"]["runs"] == 2
    assert set(summary["step_times_s"]) == {"erm", "lsq_w3", "lsq_sagm_w3", "gaqat_w3"}
    # The extras pair with the main grid's runs of their seeds.
    assert {name: row["n"] for name, row in summary["extras"].items()} == {
        "sagm − erm": "1",
        "lsq_sam − lsq": "2",
        "lsq_sam − lsq_sagm": "2",
    }
    assert "| lsq_sam − lsq_sagm |" in text and "`sagm − erm` (the extras)" in text
    # The best part: float swad against erm, lsq_sam_swad and qtdog against lsq_sam and
    # lsq_sagm.
    assert {name: row["n"] for name, row in summary["best"].items()} == {
        "swad − erm": "2",
        "lsq_sam_swad − lsq_sam": "2",
        "lsq_sam_swad − lsq_sagm": "2",
        "qtdog − lsq_sam": "2",
        "qtdog − lsq_sagm": "2",
    }
    assert "| qtdog − lsq_sagm |" in text and "| swad | 32 |" in text
    # One checkpoint in 4 steps: SWAD's window never opens, each run averages its last 4.
    assert "- `lsq_sam_swad` (2 runs of 4 steps): the average starts between steps 1 and 1" in text
    assert "in 2 of them the validation loss never stopped falling and only the last 4" in text
    # EoQ's ensembles of the two seeds, one per method at 3 bits on the held-out domain.
    assert {name: row["n"] for name, row in summary["ensembles"].items()} == {
        "ens2_lsq − lsq": 1,
        "ens2_lsq_sam − lsq_sam": 1,
        "ens2_lsq_sagm − lsq_sagm": 1,
        "ens2_gaqat − gaqat": 1,
    }
    assert "| ens2_gaqat − gaqat |" in text and "Ensemble size against one float model" in text

    # `pairs` makes the page's comparisons over the finished runs only: a qtdog run still
    # training (no done marker) pairs with nothing.
    unfinished = study.runs_of(out / "best", "qtdog", 3)[0]
    (unfinished / study.DONE).unlink()
    study.write_pairs(out, scale, tmp_path / "pairs.json")
    pairs = json.loads((tmp_path / "pairs.json").read_text())["pairs"]
    assert pairs["gaqat − lsq_sagm"]["n"] == "2" and pairs["sagm − erm"]["n"] == "1"
    assert pairs["qtdog − lsq_sam"]["n"] == "1" and pairs["swad − erm"]["n"] == "2"
    assert pairs["ens2_lsq_sam − lsq_sam"]["n"] == 1

    # The records continue the study elsewhere: `run` trains the float inits again (their
    # records equal the archived reference) and the unfinished qtdog run, nothing else.
    archive, copy = tmp_path / "records.tar.xz", tmp_path / "copy"
    held = study.archive_records(out, archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(copy, filter="data")
    assert held == len([n for n in names if n.endswith("/done")])
    assert not [n for n in names if n.endswith("checkpoint.pt")]
    assert sorted(n for n in names if "/erm_" in n and n.endswith("/done")) == sorted(
        f"reference/main/{p.name}/done" for p in study.runs_of(main, "erm")
    )
    started = time.time()
    study.run_study(copy, scale, jobs=1, threads=1, data_dir=digits_dir)
    trained = {p.parent for p in copy.rglob(study.RESULTS) if p.stat().st_mtime >= started}
    assert {p.relative_to(copy) for p in trained if not p.is_symlink()} == {
        *(p.relative_to(out) for p in study.runs_of(main, "erm")),
        unfinished.relative_to(out),
    }
    for erm in study.runs_of(copy / "main", "erm"):
        again = copy / "reference" / "main" / erm.name / study.RESULTS
        assert _accuracies(erm / study.RESULTS) == _accuracies(again)


def _accuracies(path):
    """A results.jsonl's steps, losses and accuracies (not its timings and arguments)."""
    kept = lambda key: key in ("step", "loss") or key.endswith("_acc")  # noqa: E731
    return [{k: v for k, v in r.items() if kept(k)} for r in map(json.loads, open(path))]


def _record_launches(study, launched: list, monkeypatch) -> None:
    """The study's runs are planned but not trained: ``launched`` collects their jobs."""

    def launch(jobs, launcher, note):
        launched.extend(jobs)
        return [SimpleNamespace(status="ran") for _ in jobs]

    monkeypatch.setattr(study, "launch", launch)


def test_study_trains_only_the_parts_asked_for(tmp_path, digits_dir, monkeypatch):
    study, launched = load_study(), []
    _record_launches(study, launched, monkeypatch)
    out = tmp_path / "study"
    study.run_study(out, tiny_scale(study), 1, 1, digits_dir, parts=("extra",))
    folders = {job.folder.parent for job in launched}
    assert folders == {out / "extra"}
    trained = sorted(job.folder.name.split("_env")[0] for job in launched)
    # sagm on the first seed, lsq_sam on both and their float inits (once each)
    assert trained == ["erm", "erm", "lsq_sam_w3", "lsq_sam_w3", "sagm"]


def test_the_best_part_trains_its_candidates_evaluated_every_25_steps(
    tmp_path, digits_dir, monkeypatch
):
    study, launched = load_study(), []
    _record_launches(study, launched, monkeypatch)
    out = tmp_path / "study"
    scale = tiny_scale(study, steps=100, checkpoint_freq=50)
    study.run_study(out, scale, 1, 1, digits_dir, parts=("best",))
    assert {job.folder.parent for job in launched} == {out / "best"}
    trained = sorted(job.folder.name.split("_env")[0] for job in launched)
    assert trained == [*["erm"] * 2, *["lsq_sam_swad_w3"] * 2, *["qtdog_w3"] * 2, *["swad"] * 2]
    # The candidates, float swad too (SWAD's window rule needs a loss curve), are evaluated
    # every 25 steps; their float inits as in the main grid, whose runs they link.
    candidates = [job for job in launched if not job.folder.name.startswith("erm")]
    assert {job.config.checkpoint_freq for job in candidates} == {25}
    assert {job.config.checkpoint_freq for job in launched if job not in candidates} == {2}
