"""The main job's orchestration: float run, QAT runs from it, report; reruns keep finished runs."""

import json

from gaqat.demo import QAT_ALGORITHMS, demo
from gaqat.runfolder import DONE


def test_demo_trains_float_then_qat_from_it_and_reports(tmp_path, digits_dir, capsys):
    text = demo(tmp_path, data_dir=digits_dir, bits=3, float_steps=2, qat_steps=2, progress=False)
    folders = ["erm", *(f"{name}_w3" for name in QAT_ALGORITHMS)]
    assert all((tmp_path / f / DONE).exists() for f in folders)
    for name in QAT_ALGORITHMS:
        args = json.loads((tmp_path / f"{name}_w3" / "results.jsonl").read_text().splitlines()[0])["args"]
        assert args["init"] == str(tmp_path / "erm" / "checkpoint.pt") and args["bits"] == 3
    assert "mnist_m" in text and "oracle" in text
    for row in ("| erm | 32 |", "| lsq_sagm | 3 |", "| gaqat | 3 |"):
        assert row in text

    before = {f: (tmp_path / f / "checkpoint.pt").stat().st_mtime_ns for f in folders}
    demo(tmp_path, data_dir=digits_dir, bits=3, float_steps=2, qat_steps=2, progress=False)
    assert {f: (tmp_path / f / "checkpoint.pt").stat().st_mtime_ns for f in folders} == before
    assert capsys.readouterr().out.count("finished earlier, kept") == 3
