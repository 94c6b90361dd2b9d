"""Run-folder files: states, torn-line tolerant reading, truncation for resume."""

import json
import subprocess
import sys

import pytest

from gaqat.runfolder import (
    CHECKPOINT,
    DONE,
    LOCK,
    PREVIOUS,
    RESULTS,
    FolderBusyError,
    TornLineWarning,
    append_jsonl,
    locked,
    read_jsonl,
    replace_atomic,
    run_state,
    set_aside,
    settle,
    truncate_jsonl,
)


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
    with pytest.warns(TornLineWarning, match="torn last line"):
        truncate_jsonl(path, 4)
    assert [r["step"] for _, r in read_jsonl(path)] == [2, 4]
    truncate_jsonl(tmp_path / "absent.jsonl", 4)  # nothing written yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_rewriting_is_atomic_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / RESULTS
    path.write_text('{"step": 2}\n{"step": 4}\n')

    def crash(tmp):
        tmp.write_text('{"step": 2}\n')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_atomic(path, crash)
    assert path.read_text() == '{"step": 2}\n{"step": 4}\n'
    assert [p.name for p in tmp_path.iterdir()] == [RESULTS]  # no temporary file left


def test_a_torn_or_missing_record_of_the_checkpoint_step_is_reported(tmp_path):
    path = tmp_path / RESULTS
    path.write_text(json.dumps({"step": 2}) + "\n" + '{"step": 4, "env0_in')
    with pytest.warns(TornLineWarning) as caught:
        truncate_jsonl(path, 4)
    messages = [str(w.message) for w in caught]
    assert any("torn last line" in m for m in messages)
    assert any("no complete record of step 4" in m for m in messages)
    assert path.read_text() == json.dumps({"step": 2}) + "\n"


def test_a_second_holder_of_the_lock_is_refused_with_the_holders_name(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from gaqat.runfolder import locked\n"
            f"with locked({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            FolderBusyError, match=f"in use by another process \\(pid {holder.pid} "
        ):
            with locked(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked(folder):  # the OS released the dead holder's lock
        assert (folder / LOCK).exists()


def test_the_lock_removes_a_folder_it_created_when_nothing_was_written(tmp_path):
    with locked(tmp_path / "a" / "new"):
        pass
    assert not (tmp_path / "a" / "new").exists()
    with locked(tmp_path / "kept"):
        (tmp_path / "kept" / RESULTS).write_text("")
    assert (tmp_path / "kept" / RESULTS).exists()


def test_an_overwritten_run_is_set_aside_and_comes_back_unless_the_new_one_checkpoints(tmp_path):
    for name, text in ((RESULTS, "old\n"), (CHECKPOINT, "old"), (DONE, "done\n")):
        (tmp_path / name).write_text(text)
    set_aside(tmp_path)
    assert run_state(tmp_path) == "done"  # what the folder holds until the new run checkpoints
    (tmp_path / RESULTS).write_text("new\n")  # the new run died before its first checkpoint
    settle(tmp_path, keep_new=False)
    assert (tmp_path / RESULTS).read_text() == "old\n" and (tmp_path / DONE).exists()
    assert not (tmp_path / PREVIOUS).exists()

    set_aside(tmp_path)
    (tmp_path / CHECKPOINT).write_text("new")
    assert run_state(tmp_path) == "incomplete"
    settle(tmp_path, keep_new=True)
    assert (tmp_path / CHECKPOINT).read_text() == "new" and not (tmp_path / PREVIOUS).exists()
