"""Run-folder files: states, torn-line tolerant reading, truncation for resume."""

import json

import pytest

from gaqat.runfolder import (CHECKPOINT, DONE, RESULTS, TornLineWarning, append_jsonl, read_jsonl,
                             run_state, truncate_jsonl)


def test_run_state_follows_the_files(tmp_path):
    assert run_state(tmp_path / "missing") == "new"
    (tmp_path / CHECKPOINT).write_bytes(b"")
    assert run_state(tmp_path) == "incomplete"
    (tmp_path / DONE).write_text("done\n")
    assert run_state(tmp_path) == "done"


def test_a_torn_last_line_is_skipped_and_any_other_bad_line_is_an_error(tmp_path):
    path = tmp_path / RESULTS
    append_jsonl(path, [{"step": 1}, {"step": 2}])
    with path.open("a") as f:
        f.write('{"step": 3, "lo')
    with pytest.warns(TornLineWarning, match="line 3: torn last line"):
        assert [r for _, r in read_jsonl(path)] == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="results.jsonl, line 2: not valid JSON"):
        read_jsonl(path)


def test_truncate_keeps_what_the_checkpoint_covers(tmp_path):
    path = tmp_path / RESULTS
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 6)) + '{"st')
    truncate_jsonl(path, 4)
    assert [r["step"] for _, r in read_jsonl(path)] == [2, 4]
    truncate_jsonl(tmp_path / "absent.jsonl", 4)  # nothing written yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
