"""``gaqat report`` on fixture runs with hand-computed means and standard errors."""

import csv
import io
import json
import subprocess
import sys

import pytest

from gaqat import cli
from gaqat.report import report
from gaqat.report.aggregate import pair_runs, paired_tables
from gaqat.report.render import MARKDOWN, latex_escape
from gaqat.report.runs import SkippedRunWarning, load_runs
from gaqat.runfolder import TornLineWarning

DOMAINS = ["mnist", "mnist_m", "syn"]

# Test accuracy chosen by training-domain validation, per (algorithm, test env): one
# value per trial seed 0, 1, 2. By hand (SE = population std / sqrt(3), in %):
#   erm env0 [50, 60, 70]: mean 60.0, std sqrt(200/3) = 8.165, SE 4.714 -> 4.7
#   erm env1 [40, 40, 70]: mean 50.0, std sqrt(600/3) = 14.142, SE 8.165 -> 8.2
#   erm Avg per trial [45, 50, 70]: mean 55.0, std sqrt(350/3) = 10.801, SE 6.236 -> 6.2
CHOSEN = {
    ("erm", 0): [0.5, 0.6, 0.7],
    ("erm", 1): [0.4, 0.4, 0.7],
    ("lsq", 0): [0.3, 0.5, 0.4],
    ("lsq", 1): [0.2, 0.2, 0.2],
}


def records(algorithm, bits, test_env, trial, chosen, hparams_seed=0, train_out=0.9):
    """Two checkpoints as gaqat writes them: the first is best on the training domains' out
    splits (its test-in accuracy is ``chosen``); the last has test-in ``chosen`` + 0.1 (what
    the oracle takes). A QAT run's name carries its bit width, as DomainBed's tools need."""
    out = []
    for step, train_acc, test_in, test_out in (
        (100, train_out, chosen, 0.3),
        (200, train_out - 0.1, chosen + 0.1, 0.6),
    ):
        r = {
            "step": step,
            "epoch": step / 10,
            "loss": 0.5,
            "step_time": 0.1,
            "mem_gb": 0.0,
            "hparams": {"lr": 1e-3},
            "args": {
                "dataset": "digits",
                "test_envs": [test_env],
                "algorithm": algorithm if bits is None else f"{algorithm}_w{bits}",
                "trial_seed": trial,
                "hparams_seed": hparams_seed,
                "bits": bits,
                "domains": DOMAINS,
            },
        }
        for i in range(len(DOMAINS)):
            r[f"env{i}_in_acc"] = test_in if i == test_env else 0.95
            r[f"env{i}_out_acc"] = test_out if i == test_env else train_acc
        out.append(r)
    return out


def write_run(folder, recs, done=True, tail=""):
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    if done:
        (folder / "done").write_text("")


def write_runs(folder, chosen, done):
    """One run per (algorithm, test env) and trial seed of ``chosen``; erm float, others
    4-bit; ``done(algorithm, env, trial)`` says which runs finished."""
    for (algorithm, env), accs in chosen.items():
        bits = None if algorithm == "erm" else 4
        for trial, acc in enumerate(accs):
            write_run(
                folder / f"{algorithm}_{env}_{trial}",
                records(algorithm, bits, env, trial, acc),
                done=done(algorithm, env, trial),
            )


@pytest.fixture
def sweep(tmp_path):
    write_runs(tmp_path, CHOSEN, done=lambda algorithm, env, trial: algorithm == "erm")
    # A second hyperparameter draw, worse on the training domains and on the test domain's
    # out split: neither method may pick it, though its test accuracy is high.
    worse = records("erm", None, 0, 0, 0.89, hparams_seed=1, train_out=0.5)
    for r in worse:
        r["env0_out_acc"] = 0.1
    write_run(tmp_path / "nested" / "erm_0_0_h1", worse)
    return tmp_path


def test_markdown_means_and_standard_errors(sweep):
    text = report([sweep])
    assert "### digits: training-domain validation set" in text
    assert "| Algorithm | Bits | mnist | mnist_m | Avg | Trials |" in text
    assert "| erm | 32 | 60.0 ± 4.7 | 50.0 ± 8.2 | 55.0 ± 6.2 | 3 |" in text
    # lsq env0 [30, 50, 40]: SE sqrt(200/3)/sqrt(3) = 4.7; env1 constant; avg [25, 35, 30].
    assert "| lsq | 4 | 40.0 ± 4.7* | 20.0 ± 0.0* | 30.0 ± 2.4* | 3 |" in text
    assert text.index("| erm |") < text.index("| lsq |")  # float rows first
    assert "13 runs (6 without a `done` file, marked *)" in text
    assert "oracle" not in text and "leave-one-domain-out" not in text


def test_oracle_takes_last_checkpoint_and_is_labelled(sweep):
    text = report([sweep], selection="oracle")
    assert "### digits: test-domain validation set (oracle)" in text
    assert "| erm | 32 | 70.0 ± 4.7 | 60.0 ± 8.2 | 65.0 ± 6.2 | 3 |" in text
    every = report([sweep], selection="all")
    assert (
        every.index("training-domain validation set")
        < every.index("### digits: leave-one-domain-out cross-validation")
        < every.index("(oracle)")
    )
    # No run holds out two domains: leave-one-domain-out scores nothing, and says why.
    assert "| erm | 32 | – | – | – | 3 |" in every and "there are none here" in every


def test_csv_parses_with_unrounded_numbers(sweep):
    rows = list(csv.DictReader(io.StringIO(report([sweep], fmt="csv", selection="all"))))
    assert len(rows) == 3 * 2 * 3  # selections x rows x (2 domains + Avg)
    cell = {(r["selection"], r["algorithm"], r["domain"]): r for r in rows}
    erm = cell[("training", "erm", "mnist_m")]
    assert (erm["bits"], erm["n"], erm["incomplete"]) == ("32", "3", "0")
    assert float(erm["mean"]) == pytest.approx(50.0)
    assert float(erm["stderr"]) == pytest.approx(8.1650, abs=1e-4)
    assert float(cell[("training", "erm", "Avg")]["stderr"]) == pytest.approx(6.2361, abs=1e-4)
    assert float(cell[("oracle", "lsq", "mnist")]["mean"]) == pytest.approx(50.0)
    assert cell[("oracle", "lsq", "mnist")]["incomplete"] == "1"
    assert (
        cell[("leave-one-out", "erm", "mnist")]["mean"],
        cell[("leave-one-out", "erm", "mnist")]["n"],
    ) == ("", "0")


def test_latex_table_parses(sweep):
    text = report([sweep], fmt="latex")
    body = text[text.index(r"\midrule") + len(r"\midrule") : text.index(r"\bottomrule")]
    rows = [
        [c.strip() for c in line.removesuffix(r"\\").split("&")]
        for line in body.strip().splitlines()
    ]
    assert rows[0] == ["erm", "32", r"60.0 $\pm$ 4.7", r"50.0 $\pm$ 8.2", r"55.0 $\pm$ 6.2", "3"]
    assert rows[1][0] == r"lsq" and rows[1][2].endswith("*")
    assert r"Algorithm & Bits & mnist & mnist\_m & Avg & Trials \\" in text
    assert r"\begin{tabular}{llcccc}" in text


def test_latex_escapes_every_special_character():
    assert latex_escape(r"a\b&c%d$e#f_g{h}i~j^k") == (
        r"a\textbackslash{}b\&c\%d\$e\#f\_g\{h\}i\textasciitilde{}j\textasciicircum{}k"
    )


def test_latex_table_escapes_names_not_numbers(tmp_path):
    recs = records("lsq_{x}", 4, 0, 0, 0.5)
    for r in recs:
        r["args"]["domains"] = ["a&b", "50%", "c$"]
    write_run(tmp_path / "run", recs)
    text = report([tmp_path], fmt="latex")
    assert r"Algorithm & Bits & a\&b & Avg & Trials \\" in text
    assert r"lsq\_\{x\} & 4 & 50.0 & 50.0 & 1 \\" in text


def test_single_trial_shows_no_error_and_missing_average(tmp_path):
    write_run(tmp_path / "a", records("gaqat", 3, 1, 0, 0.42))
    write_run(tmp_path / "b", records("gaqat", 4, 0, 0, 0.5))
    text = report([tmp_path])
    # 3 bits has only mnist_m: no Avg over both columns; rows by falling bit width.
    assert "| gaqat | 4 | 50.0 | – | – | 1 |" in text
    assert "| gaqat | 3 | – | 42.0 | – | 1 |" in text
    assert text.index("| gaqat | 4 |") < text.index("| gaqat | 3 |")


def test_truncated_last_line_warns_and_keeps_the_rest(tmp_path):
    write_run(tmp_path / "run", records("erm", None, 1, 0, 0.4), done=False, tail='{"step": 3')
    with pytest.warns(TornLineWarning, match=r"run/results.jsonl, line 3: torn last line"):
        text = report([tmp_path])
    assert "| erm | 32 | 40.0* | 40.0* | 1 |" in text


def skipped(message, dirs):
    """``message`` in the warning that skips the one run below ``dirs``, which leaves none."""
    with (
        pytest.warns(SkippedRunWarning, match=rf"{message}.*; run skipped"),
        pytest.raises(ValueError, match=f"no readable run with records below .*{message}"),
    ):
        load_runs(dirs)


def test_bad_line_inside_the_file_skips_the_run(tmp_path):
    recs = records("erm", None, 1, 0, 0.4)
    write_run(tmp_path / "run", [])
    (tmp_path / "run" / "results.jsonl").write_text(
        json.dumps(recs[0]) + "\n{broken\n" + json.dumps(recs[1]) + "\n"
    )
    skipped(r"results.jsonl, line 2: not valid JSON", [tmp_path])


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda r: r.pop("env1_out_acc"), "missing field 'env1_out_acc'"),
        (lambda r: r["args"].pop("trial_seed"), "missing field 'args.trial_seed'"),
        (lambda r: r.pop("step"), "missing field 'step'"),
        (
            lambda r: r.update(env0_in_acc="high"),
            "field 'env0_in_acc' is 'high', expected a number",
        ),
        (
            lambda r: r["args"].update(test_envs=1),
            "field 'args.test_envs' is 1, expected a JSON array",
        ),
    ],
)
def test_bad_field_skips_the_run_naming_file_line_and_field(tmp_path, spoil, message):
    recs = records("erm", None, 1, 0, 0.4)
    spoil(recs[1])
    write_run(tmp_path / "run", recs)
    skipped(rf"results.jsonl, line 2: {message}", [tmp_path])


def test_inconsistent_records_skip_the_run(tmp_path):
    recs = records("erm", None, 1, 0, 0.4)
    recs[1]["args"]["trial_seed"] = 5
    write_run(tmp_path / "mixed", recs)
    skipped("line 2: args .* differ from line 1's", [tmp_path / "mixed"])
    bad_env = records("erm", None, 3, 0, 0.4)[:1]
    bad_env[0]["env3_in_acc"] = bad_env[0]["env3_out_acc"] = 0.5
    write_run(tmp_path / "env", bad_env)
    skipped(r"test_envs \[3\] are not domain indices 0..2", [tmp_path / "env"])
    other = records("erm", None, 0, 0, 0.4)
    for r in other:
        r["args"]["domains"] = ["a", "b", "c"]
    write_run(tmp_path / "other", other)
    write_run(tmp_path / "one", records("erm", None, 0, 1, 0.4))
    with pytest.raises(ValueError, match="dataset digits: .* has domains"):
        load_runs([tmp_path / "other", tmp_path / "one"])


def test_missing_folders_and_bad_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        report([tmp_path / "nope"])
    with pytest.raises(FileNotFoundError, match="no results.jsonl below"):
        report([tmp_path])
    with pytest.raises(ValueError, match="format 'html' is not one of markdown, csv, latex"):
        report([tmp_path], fmt="html")
    with pytest.raises(
        ValueError, match="selection 'best' is not one of training, leave-one-out, oracle, all"
    ):
        report([tmp_path], selection="best")


def test_same_file_reached_twice_counts_once(sweep):
    assert len(load_runs([sweep, sweep / "nested", sweep])) == 13


def test_cli_report(sweep, tmp_path, capsys):
    write_run(tmp_path / "torn", records("erm", None, 2, 0, 0.4), tail="{")
    assert cli.main(["report", str(sweep), str(tmp_path / "torn"), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    header = "selection,dataset,algorithm,bits,domain,mean,stderr,n,incomplete\n"
    assert captured.out.startswith(header)
    assert "gaqat report: warning: " in captured.err and "line 3: torn last line" in captured.err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


# Paired comparisons. Chosen test accuracy per (algorithm, test env), trial seeds 0, 1, 2.
PAIRED = {
    ("lsq_sagm", 0): [0.50, 0.60, 0.70],
    ("gaqat", 0): [0.52, 0.61, 0.70],
    ("lsq_sagm", 1): [0.43, 0.44, 0.50],
    ("gaqat", 1): [0.40, 0.45],
    ("erm", 0): [0.55, 0.58, 0.60],
}


@pytest.fixture
def pairs(tmp_path):
    write_runs(tmp_path, PAIRED, done=lambda *run: run != ("gaqat", 1, 1))
    # A hyperparameter draw no baseline run shares: unpaired, listed, never used.
    write_run(tmp_path / "gaqat_0_0_h1", records("gaqat", 4, 0, 0, 0.89, hparams_seed=1))
    return tmp_path


def test_paired_differences_by_hand(pairs):
    text = report([pairs], paired="lsq_sagm")
    assert "### digits: paired difference to lsq_sagm, training-domain validation set" in text
    assert "| Algorithm | Bits | lsq_sagm bits | mnist | mnist_m | All |" in text
    # gaqat − lsq_sagm in points. mnist [+2, +1, 0]: mean 1, sample std 1, SE 1/sqrt(3).
    # mnist_m [-3, +1] (trial 2 unpaired): mean -1, std sqrt(8), SE sqrt(8)/sqrt(2) = 2.
    # All [2, 1, 0, -3, 1]: mean 0.2, std sqrt(14.8/4) = 1.924, SE 0.860; 3 wins, 1 tie.
    assert (
        "| gaqat | 4 | 4 | +1.0 ± 0.6 (3: 2/1/0) | -1.0 ± 2.0* (2: 1/0/1) "
        "| +0.2 ± 0.9* (5: 3/1/1) |"
    ) in text
    assert "| erm |" not in text and "| lsq_sagm |" not in text
    assert "digits: erm 32-bit not compared: lsq_sagm has no 32-bit and no float runs" in text
    assert "digits: gaqat 4-bit vs lsq_sagm 4-bit: 2 unpaired runs: " in text
    assert "gaqat 4-bit, test mnist, trial 0, hparams 1 (" in text
    assert "lsq_sagm 4-bit, test mnist_m, trial 2, hparams 0 (" in text
    assert "ddof=1" in text
    # The oracle takes the last checkpoints, both 10 points higher: the same differences.
    oracle = report([pairs], selection="oracle", paired="lsq_sagm")
    assert "(oracle)" in oracle and "| +1.0 ± 0.6 (3: 2/1/0) | -1.0 ± 2.0* (2: 1/0/1) |" in oracle


def test_float_baseline_pairs_across_bit_widths(pairs):
    comparisons = pair_runs(load_runs([pairs]), "erm")
    assert [
        (c.algorithm, c.bits, c.baseline_bits, len(c.pairs), len(c.unpaired)) for c in comparisons
    ] == [("lsq_sagm", 4, 32, 3, 3), ("gaqat", 4, 32, 3, 3)]
    (table,) = paired_tables(comparisons, "training")
    assert table.header == ["Algorithm", "Bits", "erm bits", "mnist", "All"]  # erm: mnist only
    # lsq_sagm − erm [-5, +2, +10]: mean 2.33, SE sqrt(56.33)/sqrt(3) = 4.33.
    # gaqat − erm [-3, +3, +10]: mean 3.33, SE sqrt(42.33)/sqrt(3) = 3.76.
    rows = {row[0].value: row for row in table.rows}
    assert [cell.text(MARKDOWN) for cell in rows["lsq_sagm"]] == [
        "lsq_sagm",
        "4",
        "32",
        "+2.3 ± 4.3 (3: 2/0/1)",
        "+2.3 ± 4.3 (3: 2/0/1)",
    ]
    mnist = rows["gaqat"][3]
    assert mnist.stderr == pytest.approx((127 / 9) ** 0.5, abs=1e-9)
    assert mnist.counts == (2, 0, 1)


def test_paired_csv_and_unpaired_warnings(pairs):
    with pytest.warns(UserWarning) as caught:
        text = report([pairs], fmt="csv", selection="all", paired="lsq_sagm")
    messages = [str(w.message) for w in caught]
    assert messages[0].startswith("digits: erm 32-bit not compared")
    assert messages[1].startswith("digits: gaqat 4-bit vs lsq_sagm 4-bit: 2 unpaired runs")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3 * 3  # selections x (2 domains + All), one compared row
    cell = {(r["selection"], r["domain"]): r for r in rows}
    all_ = cell[("training", "All")]
    assert (all_["algorithm"], all_["bits"], all_["baseline"], all_["baseline_bits"]) == (
        "gaqat",
        "4",
        "lsq_sagm",
        "4",
    )
    assert float(all_["mean_diff"]) == pytest.approx(0.2, abs=1e-4)
    assert float(all_["stderr"]) == pytest.approx((14.8 / 4 / 5) ** 0.5, abs=1e-4)
    assert (all_["n"], all_["wins"], all_["ties"], all_["losses"], all_["incomplete"]) == (
        "5",
        "3",
        "1",
        "1",
        "1",
    )
    assert float(cell[("oracle", "mnist_m")]["stderr"]) == pytest.approx(2.0, abs=1e-4)


def test_paired_latex_table_parses(pairs):
    text = report([pairs], fmt="latex", paired="lsq_sagm")
    assert r"Algorithm & Bits & lsq\_sagm bits & mnist & mnist\_m & All \\" in text
    assert r"\begin{tabular}{llcccc}" in text
    body = text[text.index(r"\midrule") + len(r"\midrule") : text.index(r"\bottomrule")]
    (row,) = [
        [c.strip() for c in line.removesuffix(r"\\").split("&")]
        for line in body.strip().splitlines()
    ]
    assert row == [
        "gaqat",
        "4",
        "4",
        r"+1.0 $\pm$ 0.6 (3: 2/1/0)",
        r"-1.0 $\pm$ 2.0* (2: 1/0/1)",
        r"+0.2 $\pm$ 0.9* (5: 3/1/1)",
    ]
    assert "% - digits: erm 32-bit not compared" in text


def test_single_pair_has_no_error(tmp_path):
    write_run(tmp_path / "a", records("lsq", 3, 1, 0, 0.40))
    write_run(tmp_path / "b", records("gaqat", 3, 1, 0, 0.45))
    text = report([tmp_path], paired="lsq")
    assert "| gaqat | 3 | 3 | +5.0 (1: 1/0/0) | +5.0 (1: 1/0/0) |" in text
    assert "unpaired" not in text and "not compared" not in text


def test_paired_errors(pairs, tmp_path):
    with pytest.raises(
        ValueError, match="baseline 'sgd' is not among the algorithms found: erm, gaqat, lsq_sagm"
    ):
        report([pairs], paired="sgd")
    write_run(tmp_path / "copy" / "again", records("lsq_sagm", 4, 0, 1, 0.6))
    with (
        pytest.raises(
            ValueError,
            match="two lsq_sagm 4-bit runs with the same test domains, "
            "trial seed and hparams seed; a paired comparison",
        ),
        pytest.warns(UserWarning, match="pooled as one draw"),
    ):
        report([pairs], paired="lsq_sagm")


def test_cli_report_paired(pairs, capsys):
    assert cli.main(["report", str(pairs), "--paired", "lsq_sagm"]) == 0
    out = capsys.readouterr().out
    assert "| gaqat | 4 | 4 | +1.0 ± 0.6 (3: 2/1/0) |" in out
    assert cli.main(["report", str(pairs), "--paired", "erm", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("selection,dataset,algorithm,bits,baseline,baseline_bits,")
    assert "gaqat report: warning: digits: gaqat 4-bit vs erm 32-bit: 3 unpaired runs" in (
        captured.err
    )
    assert cli.main(["report", str(pairs), "--paired", "sgd"]) == 2
    assert "not among the algorithms found: erm, gaqat, lsq_sagm" in capsys.readouterr().err


# DomainBed's grouping: a run holding out two domains lands in the group of each.
def checkpoint(test_envs, ins, algorithm="erm", trial=0, hparams_seed=0, step=100):
    """One gaqat record over DOMAINS with the given ``in`` accuracies (``out`` all 0.9)."""
    r = {
        "step": step,
        "hparams": {},
        "args": {
            "dataset": "digits",
            "algorithm": algorithm,
            "test_envs": list(test_envs),
            "bits": None,
            "trial_seed": trial,
            "hparams_seed": hparams_seed,
            "domains": DOMAINS,
        },
    }
    for i, acc in enumerate(ins):
        r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = acc, 0.9
    return r


def test_runs_with_two_test_domains_serve_leave_one_domain_out_only(tmp_path):
    for envs, ins in {
        (0,): (0.5, 0, 0),
        (1,): (0, 0.6, 0),
        (2,): (0, 0, 0.7),
        (0, 1): (0.25, 0.75, 0),
        (0, 2): (0.5, 0, 0.5),
    }.items():
        write_run(tmp_path / "sweep" / "_".join(map(str, envs)), [checkpoint(envs, ins)])
    text = report([tmp_path / "sweep"], selection="all")
    assert "| Algorithm | Bits | mnist | mnist_m | syn | Avg | Trials |" in text  # no "a+b"
    # Training-domain validation and the oracle score the three runs with one test domain.
    assert text.count("| erm | 32 | 50.0 | 60.0 | 70.0 | 60.0 | 1 |") == 2
    # Leave-one-domain-out for mnist: validation (0.75 on mnist_m + 0.5 on syn) / 2 from the
    # runs holding out (mnist, mnist_m) and (mnist, syn); mnist_m and syn lack a run
    # holding out (mnist_m, syn).
    assert "| erm | 32 | 50.0 | – | – | – | 1 |" in text
    assert "there are none here" not in text
    # A domain no run holds out alone is no column: no method can score it.
    write_run(tmp_path / "pairs_only" / "0_1", [checkpoint((0, 1), (0.5, 0.5, 0))])
    assert "| Algorithm | Bits | Avg | Trials |" in report([tmp_path / "pairs_only"])


def domainbed_run(folder, test_env, trial, test_acc, algorithm="ERM", dataset="PACS", n_envs=4):
    """A run as DomainBed's train.py writes it: no bits, no domain names, steps from 0."""
    recs = []
    for step, acc in ((0, 0.1), (4999, test_acc)):
        r = {
            "step": step,
            "epoch": step / 50,
            "loss": 0.3,
            "mem_gb": 1.0,
            "step_time": 0.2,
            "hparams": {"lr": 5e-5, "batch_size": 32},
            "args": {
                "dataset": dataset,
                "algorithm": algorithm,
                "test_envs": [test_env],
                "trial_seed": trial,
                "hparams_seed": 0,
                "seed": 0,
                "holdout_fraction": 0.2,
                "output_dir": str(folder),
                "data_dir": "/data",
                "hparams": None,
            },
        }
        for i in range(n_envs):
            r[f"env{i}_in_acc"] = acc if i == test_env else 0.9
            r[f"env{i}_out_acc"] = 0.5 if i == test_env else 0.8 if step == 0 else 0.9
        recs.append(r)
    write_run(folder, recs)


def gaqat_pacs_run(folder, algorithm, bits, trial, test_acc, legacy=False):
    """A gaqat PACS run; ``legacy``: as gaqat wrote it before names carried the bit width."""
    recs = records(algorithm, bits, 0, trial, test_acc)
    for r in recs:
        r["args"].update(dataset="PACS", domains=["art_painting", "cartoon", "photo", "sketch"])
        r["env3_in_acc"], r["env3_out_acc"] = 0.95, r["env1_out_acc"]
        if legacy:
            r["args"]["algorithm"] = algorithm
    write_run(folder, recs)


def test_domainbed_and_gaqat_records_share_one_table(tmp_path):
    domainbed_run(tmp_path / "domainbed" / "a", 0, 0, 0.80)
    domainbed_run(tmp_path / "domainbed" / "b", 0, 1, 0.86)
    gaqat_pacs_run(tmp_path / "gaqat" / "a", "lsq_sagm", 4, 0, 0.70)
    gaqat_pacs_run(tmp_path / "gaqat" / "b", "lsq_sagm", 4, 1, 0.74)
    gaqat_pacs_run(tmp_path / "old" / "a", "lsq_sagm", 3, 0, 0.60, legacy=True)
    text = report([tmp_path / "domainbed", tmp_path / "gaqat", tmp_path / "old"])
    assert "| Algorithm | Bits | art_painting | Avg | Trials |" in text  # the registry's names
    # ERM [80, 86]: SE 3 / sqrt(2) = 2.1; lsq_sagm 4-bit [70, 74]: SE 2 / sqrt(2) = 1.4.
    assert "| ERM | 32 | 83.0 ± 2.1 | 83.0 ± 2.1 | 2 |" in text
    assert "| lsq_sagm | 4 | 72.0 ± 1.4 | 72.0 ± 1.4 | 2 |" in text
    assert "| lsq_sagm | 3 | 60.0 | 60.0 | 1 |" in text
    paired = report([tmp_path], paired="ERM")
    # lsq_sagm 4-bit − ERM: [-10, -12]: mean -11, sample std sqrt(2), SE 1.
    assert "| lsq_sagm | 4 | 32 | -11.0 ± 1.0 (2: 0/0/2) | -11.0 ± 1.0 (2: 0/0/2) |" in paired
    assert "| lsq_sagm | 3 | 32 | -20.0 (1: 0/0/1) |" in paired
    assert "ERM 32-bit not compared" in report([tmp_path], paired="lsq_sagm")


def test_domainbed_records_of_datasets_gaqat_does_not_know(tmp_path):
    domainbed_run(tmp_path / "cmnist" / "a", 2, 0, 0.3, dataset="ColoredMNIST", n_envs=3)
    text = report([tmp_path / "cmnist"])
    assert "| Algorithm | Bits | env2 | Avg | Trials |" in text
    domainbed_run(tmp_path / "vlcs" / "a", 0, 0, 0.3, dataset="VLCS", n_envs=3)
    skipped(
        "vlcs/a/results.jsonl: VLCS: records have 3 domains, gaqat's VLCS has 4",
        [tmp_path / "vlcs"],
    )


def test_two_runs_of_one_draw_are_pooled_with_a_warning(tmp_path):
    write_run(tmp_path / "a", records("erm", None, 0, 0, 0.4))
    write_run(tmp_path / "b", records("erm", None, 0, 0, 0.6, train_out=0.95))
    with pytest.warns(UserWarning, match="two erm 32-bit runs .* pooled as one draw"):
        text = report([tmp_path])
    assert "| erm | 32 | 60.0 | 60.0 | 1 |" in text  # the best checkpoint of both runs


def test_report_on_gaqat_records_does_not_import_torch(sweep):
    code = (
        f"import sys; from gaqat.report import report; report([{str(sweep)!r}], "
        f"selection='all'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runs_linked_from_another_sweep_are_read_once(tmp_path):
    write_run(tmp_path / "main" / "erm", records("erm", None, 1, 0, 0.4))
    write_run(tmp_path / "ablation" / "gaqat", records("gaqat", 3, 1, 0, 0.5))
    (tmp_path / "ablation" / "erm").symlink_to(tmp_path / "main" / "erm")
    text = report([tmp_path / "ablation"])
    assert "| erm | 32 |" in text and "| gaqat | 3 |" in text
    assert report([tmp_path]).count("| erm | 32 |") == 1  # the link and its target: one run
