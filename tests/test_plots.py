"""``gaqat plot``: the figures' data from synthetic gradients.jsonl records with known content."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from gaqat import cli
from gaqat.plots import (
    below_tau_fraction,
    freeze_steps,
    frozen_counts,
    load_gradients,
    opposite_signs,
    plot_disorder,
    run_tau,
    short_label,
    short_labels,
    smooth_factors,
    window_table,
)
from gaqat.runfolder import TornLineWarning

# Model order deliberately not alphabetical: the figures must keep it.
NAMES = [
    "featurizer.9.weight_quantizer",
    "featurizer.3.input_quantizer",
    "featurizer.3.weight_quantizer",
]
K = 10  # steps per window
# [layer][window] window sums; signs chosen so that opposite = [[T,F,F,T],[F,F,T,F],[F,F,F,F]]
G_TASK = [[1e-2, 2e-2, -1e-2, 3e-2], [-1.0, -2.0, 1.0, 0.5], [0.0, 1e-3, 2e-3, -1e-3]]
G_SMOOTH = [[-1e-3, 2e-3, -1e-3, -2e-3], [-1.0, -1.0, -3.0, 0.5], [5.0, 1e-3, 0.0, -1e-3]]
D_TASK = [[0.5, 0.2, 0.1, 0.1], [0.6, 0.5, 0.4, 0.25], [0.4, 0.45, 0.5, 0.5]]
D_SMOOTH = [[0.3, 0.3, 0.3, 0.3], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]]
# Decisions at window ends: 9.w frozen at step 20, 3.a at step 40 (end of the last window),
# 3.w frozen at 20 and unfrozen at 30.
DECISIONS = [("freeze", 20, 0), ("freeze", 20, 2), ("unfreeze", 30, 2), ("freeze", 40, 1)]
FROZEN = [[False, False, True, True], [False] * 4, [False, False, True, False]]


def synthetic_records():
    records = []
    for w in range(4):
        step = (w + 1) * K
        for i, name in enumerate(NAMES):
            records.append(
                {
                    "kind": "window",
                    "step": step,
                    "window": w + 1,
                    "name": name,
                    "g_task": G_TASK[i][w],
                    "g_smooth": G_SMOOTH[i][w],
                    "d_task": D_TASK[i][w],
                    "d_smooth": D_SMOOTH[i][w],
                    "frozen": FROZEN[i][w],
                }
            )
        records += [
            {
                "kind": kind,
                "step": s,
                "name": NAMES[i],
                "d_task": D_TASK[i][w],
                "d_smooth": D_SMOOTH[i][w],
            }
            for kind, s, i in DECISIONS
            if s == step
        ]
    return records


def write_run(folder, records, tail="", tau=0.3):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gradients.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if tau is not None:
        first = {"step": 40, "hparams": {"tau": tau}}
        (folder / "results.jsonl").write_text(json.dumps(first) + "\n")
    return folder


def test_short_labels():
    assert short_label("featurizer.3.weight_quantizer") == "3.w"
    assert short_label("featurizer.3.input_quantizer") == "3.a"
    assert short_label("featurizer.layer1.0.conv1.weight_quantizer") == "layer1.0.conv1.w"
    assert short_label("classifier.input_quantizer") == "classifier.a"
    assert short_label("weight_quantizer") == "weight_quantizer"
    # Two names that shorten alike keep their full names.
    clash = ["featurizer.3.weight_quantizer", "3.weight_quantizer"]
    assert short_labels(clash) == clash


def test_window_table_arrays():
    records = synthetic_records()
    table = window_table(records[::-1])  # file order reversed: windows still ascend
    assert table.names == tuple(reversed(NAMES))  # first appearance in the file
    table = window_table(records)
    assert table.names == tuple(NAMES)
    assert table.labels == ["9.w", "3.a", "3.w"]
    np.testing.assert_array_equal(table.windows, [1, 2, 3, 4])
    np.testing.assert_array_equal(table.steps, [10, 20, 30, 40])
    np.testing.assert_array_equal(table.edges, [0, 10, 20, 30, 40])
    np.testing.assert_array_equal(table.g_task, G_TASK)
    np.testing.assert_array_equal(table.d_smooth, D_SMOOTH)
    np.testing.assert_array_equal(table.frozen, FROZEN)
    assert [d["kind"] for d in table.decisions] == ["freeze", "freeze", "unfreeze", "freeze"]


def test_missing_record_is_nan():
    records = [
        r
        for r in synthetic_records()
        if not (r["kind"] == "window" and r["window"] == 4 and r["name"] == NAMES[2])
    ]
    table = window_table(records)
    assert math.isnan(table.g_task[2, 3]) and math.isnan(table.d_task[2, 3])
    assert not opposite_signs(table)[2, 3]


def test_opposite_signs_and_factors():
    table = window_table(synthetic_records())
    np.testing.assert_array_equal(
        opposite_signs(table),
        [[True, False, False, True], [False, False, True, False], [False, False, False, False]],
    )
    # max |g_task| / max |g_smooth|: 3e-2 / 2e-3 = 15 -> 10; 2 / 3 -> 1; 2e-3 / 5 -> 1e-3.
    np.testing.assert_allclose(smooth_factors(table), [10, 1, 1e-3])


def test_smooth_factor_of_zero_gradients_is_one():
    records = [dict(r, g_smooth=0.0) if r["kind"] == "window" else r for r in synthetic_records()]
    np.testing.assert_array_equal(smooth_factors(window_table(records)), [1, 1, 1])


def test_freeze_timeline():
    table = window_table(synthetic_records())
    assert freeze_steps(table) == {NAMES[0]: 20, NAMES[2]: 20, NAMES[1]: 40}
    # after edges 0, 10, 20, 30, 40: none; none; two frozen; one unfrozen; 3.a frozen last.
    np.testing.assert_array_equal(frozen_counts(table), [0, 0, 2, 1, 2])


def test_below_tau_fraction_skips_first_window():
    table = window_table(synthetic_records())
    # windows 2-4: 0.2, 0.1, 0.1 | 0.5, 0.4, 0.25 | 0.45, 0.5, 0.5 -> 4 of 9 below 0.3
    assert below_tau_fraction(table, 0.3) == pytest.approx(4 / 9)


def test_load_gradients_round_trip_and_torn_line(tmp_path):
    folder = write_run(tmp_path / "run", synthetic_records(), tail='{"kind": "wind')
    with pytest.warns(TornLineWarning, match=r"line 17: torn last line"):
        records = load_gradients(folder / "gradients.jsonl")
    assert records == synthetic_records()


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object"),
        ('{"kind": "thaw"}', r"line 2: field 'kind' is 'thaw'"),
        (
            '{"kind": "freeze", "step": 3, "name": "x", "d_task": 0.1}',
            r"line 2: missing field 'd_smooth'",
        ),
        (
            '{"kind": "freeze", "step": true, "name": "x", "d_task": 0.1, "d_smooth": 0}',
            r"field 'step' is True, expected int",
        ),
    ],
)
def test_load_gradients_rejects_bad_lines(tmp_path, line, message):
    records = synthetic_records()
    path = tmp_path / "gradients.jsonl"
    path.write_text(json.dumps(records[0]) + "\n" + line + "\n" + json.dumps(records[1]) + "\n")
    with pytest.raises(ValueError, match=message):
        load_gradients(path)


def test_window_table_rejects_appended_runs():
    records = synthetic_records()
    with pytest.raises(ValueError, match=r"two records for \S+9\.weight_quantizer in window 1"):
        window_table(records + records[:1])
    with pytest.raises(ValueError, match="window 1 ends at step 10 and at step 11"):
        window_table(records + [dict(records[0], step=11)])
    with pytest.raises(ValueError, match="no window records"):
        window_table([r for r in records if r["kind"] != "window"])


def test_run_tau(tmp_path):
    assert run_tau(write_run(tmp_path / "a", [], tau=0.25)) == 0.25
    assert run_tau(write_run(tmp_path / "b", [], tau=None)) is None
    with pytest.raises(
        ValueError, match=r"line 1: field 'hparams.tau' is 'high', expected a number"
    ):
        run_tau(write_run(tmp_path / "c", [], tau="high"))
    for i, bad in enumerate((float("nan"), 5.0, -0.1)):
        with pytest.raises(
            ValueError, match=r"field 'hparams.tau' is .*, expected a number from 0"
        ):
            run_tau(write_run(tmp_path / f"bad{i}", [], tau=bad))
    # Read as every JSON-lines file is: a torn last line is skipped with a warning.
    torn = write_run(tmp_path / "d", [], tau=0.25)
    with (torn / "results.jsonl").open("a") as f:
        f.write('{"step": 8')
    with pytest.warns(TornLineWarning, match="line 2: torn last line"):
        assert run_tau(torn) == 0.25
    (torn / "results.jsonl").write_text('{"step": 4')
    with pytest.warns(TornLineWarning, match="line 1: torn last line"):
        assert run_tau(torn) is None


def assert_png(path):
    assert path.stat().st_size > 10_000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 500


def test_plot_disorder_without_tau(tmp_path):
    assert_png(plot_disorder(synthetic_records(), tmp_path / "sub" / "d.png", tau=None))


def test_cli_end_to_end(tmp_path, capsys):
    folder = write_run(tmp_path / "run", synthetic_records(), tail="{")
    assert cli.main(["plot", str(folder)]) == 0
    captured = capsys.readouterr()
    names = ["cumulative.png", "disorder.png", "freezing.png"]
    assert captured.out.split() == [str(folder / n) for n in names]
    assert "gaqat plot: warning:" in captured.err and "torn last line" in captured.err
    for name in names:
        assert_png(folder / name)


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "erm").mkdir()
    assert cli.main(["plot", str(tmp_path / "erm")]) == 2
    assert (
        "is " + str(tmp_path / "erm") + " a gaqat run that has trained" in capsys.readouterr().err
    )
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "erm" / "results.jsonl").write_text("")
    assert cli.main(["plot", str(tmp_path / "erm" / "results.jsonl")]) == 2
    assert "is a file; give the run folder: " + str(tmp_path / "erm") in capsys.readouterr().err
    (tmp_path / "erm" / "gradients.jsonl").mkdir()
    assert cli.main(["plot", str(tmp_path / "erm")]) == 2
    assert (
        "gradients.jsonl is a folder; expected the gradients.jsonl file" in capsys.readouterr().err
    )
