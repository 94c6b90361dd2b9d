"""The main job: a small sweep (float run, QAT runs from it, report); reruns keep finished runs."""

import json

import pytest

from gaqat.demo import QAT_ALGORITHMS, demo
from gaqat.runfolder import CHECKPOINT, DONE, RESULTS


@pytest.mark.slow
def test_demo_trains_float_then_qat_from_it_and_reports(tmp_path, digits_dir, capsys):
    text = demo(tmp_path, data_dir=digits_dir, bits=3, float_steps=4, qat_steps=2, progress=False)
    (erm,) = tmp_path.glob("erm_env1_seed0_*")
    qat = {name: next(tmp_path.glob(f"{name}_w3_env1_seed0_*")) for name in QAT_ALGORITHMS}
    assert all((folder / DONE).exists() for folder in [erm, *qat.values()])
    assert [json.loads(line)["step"] for line in (erm / RESULTS).read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]  # the float run trains longer than the QAT runs
    for folder in qat.values():
        records = [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        assert records[0]["args"]["init"] == str(erm / CHECKPOINT) and records[0]["bits"] == 3
    assert "mnist_m" in text and "oracle" in text
    for row in ("| erm | 32 |", "| lsq_sagm | 3 |", "| gaqat | 3 |"):
        assert row in text

    before = {f: (f / CHECKPOINT).stat().st_mtime_ns for f in [erm, *qat.values()]}
    demo(tmp_path, data_dir=digits_dir, bits=3, float_steps=4, qat_steps=2, progress=False)
    assert {f: (f / CHECKPOINT).stat().st_mtime_ns for f in [erm, *qat.values()]} == before
    assert capsys.readouterr().out.count("kept    ") == 3
