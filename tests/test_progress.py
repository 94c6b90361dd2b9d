"""Progress on a terminal is a live bar; in a log (SLURM, CI, nohup, a pipe) it is one
plain line per checkpoint, never a carriage-return redraw."""

from __future__ import annotations

import io
import json

import pytest
from helpers import tiny_argv
from tqdm import tqdm

from gaqat import cli
from gaqat.progress import PlainProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_a_log_gets_lines_and_quiet_gets_nothing():
    assert isinstance(progress(10, "erm", True, stream=Terminal()), tqdm)
    log = io.StringIO()
    bar = progress(10, "erm", True, initial=4, stream=log)
    assert type(bar) is PlainProgress
    for _ in range(6):
        bar.update(1)
    bar.set_postfix(loss="0.125")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1  # steps: a line per checkpoint (set_postfix), none in between
    assert lines[0].startswith("erm: 10 steps of 10 (100%), ") and lines[0].endswith("loss=0.125")
    assert "\r" not in log.getvalue()
    silent = io.StringIO()
    bar = progress(10, "erm", False, stream=silent)
    bar.update(10)
    bar.set_postfix(loss=1)
    bar.close()
    assert silent.getvalue() == ""


def test_work_without_checkpoints_prints_a_line_per_tenth():
    log = io.StringIO()
    with progress(1000, "PACS.zip", True, unit="B", stream=log) as bar:
        for _ in range(100):
            bar.update(10)
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("PACS.zip: 0.0 MB of 0.0 MB (100%)")


@pytest.mark.slow
def test_a_run_logged_to_a_file_prints_one_line_per_checkpoint(tmp_path, digits_dir, capsys):
    argv = tiny_argv(tmp_path / "run", digits_dir, "--steps", "4", "--checkpoint-freq", "2")
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("erm: ")]
    assert [line.split(",")[0] for line in lines] == [
        "erm: 2 steps of 4 (50%)",
        "erm: 4 steps of 4 (100%)",
    ]
    assert (
        json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])["step"] == 4
    )
