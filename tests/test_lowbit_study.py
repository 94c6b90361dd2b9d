"""The low-bit study script (benchmarks/lowbit_study.py) end to end on tiny runs."""

import json

import pytest
from helpers import TINY, load_benchmark

pytest.importorskip("matplotlib")


def load_study():
    return load_benchmark("lowbit_study")


def test_a_regime_qualifies_on_two_points_lost_beyond_two_standard_errors():
    study = load_study()
    assert study.qualifies(2.5, 0.5) and study.qualifies(2.0, 0.9)
    assert not study.qualifies(2.5, 1.3)  # within two standard errors
    assert not study.qualifies(1.9, 0.1)  # too small to matter
    assert not study.qualifies(-3.0, 0.1)  # quantization helps
    assert not study.qualifies(5.0, None)  # one pair: no standard error


@pytest.mark.slow
def test_study_trains_the_cost_map_the_comparison_and_writes_its_page(
    tmp_path, digits_dir, monkeypatch
):
    pytest.importorskip("imagecorruptions")
    study = load_study()
    monkeypatch.setattr(study, "BEST_CHECKPOINT_FREQ", 1)  # not the other runs' 2
    grid = study.Grid("small_cnn", seeds=(0,), bits=(2,), test_envs=(1,))
    scale = study.Scale(
        steps=2,
        checkpoint_freq=2,
        float_steps=2,
        float_checkpoint_freq=2,
        grids=(grid,),
        compare=(study.Regime("small_cnn", (2,), (0, 1), test_envs=(1,), ablation_envs=(1,)),),
        corruptions=("gaussian_noise",),
        severities=(1,),
        per_domain=8,
        hparams={**TINY, "bn_recompute_steps": 2},  # SWAD's batch-norm pass: 500 by default
        variants=("reset_momentum",),
        # at the comparison's width, so that plain lsq is the comparison's own run
        integer=(study.IntegerCheck("small_cnn", (0,), ("int8_ends",), (2,), test_envs=(1,)),),
    )
    out = tmp_path / "study"
    study.run_study(out, scale, 1, 1, digits_dir)

    lsq = study.runs_of(out / "small_cnn", "lsq", 2)
    fair = study.runs_of(out / "small_cnn_fair", "erm")
    assert len(lsq) == 2 and len(fair) == 1  # the comparison adds seed 1's lsq
    for folder in fair:  # erm continued from the float init, at the QAT learning rate
        args = json.loads((folder / "results.jsonl").read_text().splitlines()[0])["args"]
        assert args["init"].startswith(str(out / "small_cnn" / "erm_env1_"))
        assert args["hparams"]["lr"] == 3e-4 and args["steps"] == 2
    assert sorted(study.cost_pairs_folders(out, grid)) == sorted([lsq[0], *fair])  # seed 0
    for folder in study.cost_pairs_folders(out, grid):
        assert (folder / "corruptions.jsonl").is_file()
    for algorithm in ("lsq_sam", "lsq_sagm", "gaqat"):
        assert len(study.runs_of(out / "small_cnn", algorithm, 2)) == 2  # trial seeds 0, 1
    for algorithm in study.BEST_METHODS:  # a sweep of their own: evaluated more often
        assert len(study.runs_of(out / "small_cnn_best", algorithm, 2)) == 2
    ablation = out / "small_cnn_ablations" / "reset_momentum"
    assert [p.name.split("_env")[0] for p in ablation.iterdir() if p.is_symlink()] == ["erm"] * 2

    (plain,), (int8_ends,) = (  # the integer region's variant: its own lsq, the init linked
        [f for f in study.runs_of(folder, "lsq", 2) if "seed0" in f.name]
        for folder in (out / "small_cnn", out / "small_cnn_integer" / "int8_ends")
    )
    hparams = [
        json.loads(f.joinpath("results.jsonl").read_text().splitlines()[0])["hparams"]
        for f in (plain, int8_ends)
    ]
    assert (hparams[0]["first_last"], hparams[1]["first_last"]) == ("float", "int8")
    assert [p.is_symlink() for p in int8_ends.parent.glob("erm_*")] == [True]

    doc, json_path = tmp_path / "page" / "lowbit.md", tmp_path / "page" / "summary.json"
    study.write_page(out, scale, True, doc, json_path)
    text = doc.read_text()
    for heading in ("## What quantization costs", "## Where the methods are compared"):
        assert heading in text
    assert "| small_cnn | 2 | held-out domain | 1 |" in text
    assert "| small_cnn | 2 | training domains, corrupted | 1 |" in text
    assert "| gaqat − lsq_sagm |" in text and "| reset_momentum |" in text
    assert "| lsq_sam_swad − lsq_sam |" in text and "| qtdog − lsq_sam |" in text
    assert "| lsq_sam_swad − lsq_sagm |" in text and "| qtdog − lsq_sagm |" in text
    ensembles = sorted(p.name for p in (out / "small_cnn_ensembles").iterdir())
    assert ensembles == ["ens2_lsq_sam_w2_env1", "ens2_lsq_w2_env1"]
    assert "| ens2_lsq − lsq |" in text and "Ensemble size against one float model" in text
    for figure in ("cost", "severity_small_cnn"):
        assert (doc.parent / "lowbit" / f"{figure}.png").stat().st_size > 0
    summary = json.loads(json_path.read_text())
    assert {r["shift"] for r in summary["cost"]} == set(study.SHIFTS)
    assert summary["comparisons"]["small_cnn"]["gaqat − lsq_sagm"]["n"] == 2
    assert "| `small_cnn` | 2 | int8_ends | `first_last=int8` |" in text
    assert summary["integer"]["small_cnn"]["int8_ends"]["n"] == 1
