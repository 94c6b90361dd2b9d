"""`gaqat corrupt`: deterministic corruption of stored images, mCE by hand, and the
evaluation of tiny runs end to end (file, re-use, settings, sharing, CLI, figure, report)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import save_failing_at_the_second_checkpoint, tiny_run
from PIL import Image

from gaqat import cli
from gaqat import corruptions as C
from gaqat.errors import UsageError
from gaqat.report import report
from gaqat.runfolder import (
    CHECKPOINT,
    CORRUPTIONS,
    DONE,
    OWN_FILES,
    PREVIOUS,
    RUN_FILES,
    set_aside,
)

NAMES = ["gaussian_noise", "fog"]
SEVERITIES = (1, 5)
PER_DOMAIN = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(shape=(32, 32, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _state_equal(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


# --- one image ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "glass_blur", "frost"])
def test_the_same_image_gets_the_same_pixels_and_the_global_generator_is_untouched(name):
    image = Image.fromarray(_image())
    np.random.seed(123)
    before = np.random.get_state()
    seed = C.image_seed(name, 3, 0, 5)
    first = np.asarray(C.corrupt_image(image, name, 3, seed))
    again = np.asarray(C.corrupt_image(image, name, 3, C.image_seed(name, 3, 0, 5)))
    assert np.array_equal(first, again)
    assert _state_equal(np.random.get_state(), before)
    other = np.asarray(C.corrupt_image(image, name, 3, C.image_seed(name, 3, 0, 6)))
    assert not np.array_equal(first, other)  # another image index, other noise


def test_seeds_depend_on_every_part_of_the_key_and_not_on_the_process():
    key = ("fog", 2, 1, 17)
    seeds = {C.image_seed(*key), C.image_seed("snow", 2, 1, 17), C.image_seed("fog", 3, 1, 17)}
    seeds |= {C.image_seed("fog", 2, 0, 17), C.image_seed("fog", 2, 1, 18)}
    assert len(seeds) == 5
    assert C.image_seed(*key) == 3519126748  # SHA-256 and SeedSequence: no salted hash()


def test_raw_types_come_back_as_they_went():
    pil = C.corrupt_image(Image.fromarray(_image((33, 47, 3))), "fog", 2, seed=1)
    assert isinstance(pil, Image.Image) and pil.size == (47, 33) and pil.mode == "RGB"
    gray = C.corrupt_image(Image.fromarray(_image((32, 32))), "contrast", 2, seed=1)
    assert gray.size == (32, 32) and gray.mode == "RGB"  # grayscale repeated to 3 channels
    chw = torch.from_numpy(_image((32, 32, 3)).transpose(2, 0, 1).copy())
    out = C.corrupt_image(chw, "pixelate", 4, seed=1)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    one = C.corrupt_image(chw[:1], "pixelate", 4, seed=1)
    assert one.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="at least 32 pixels"):
        C.corrupt_image(Image.fromarray(_image((16, 16, 3))), "fog", 1, seed=1)
    with pytest.raises(TypeError, match="PIL image or a uint8 CHW tensor"):
        C.corrupt_image(chw.float(), "fog", 1, seed=1)


def test_corruption_sets_groups_and_names():
    assert C.corruption_names("benchmark") == C.BENCHMARK and len(C.BENCHMARK) == 15
    assert len(C.corruption_names(["all"])) == 19
    assert C.corruption_names(["weather", "contrast"]) == (
        "snow",
        "frost",
        "fog",
        "brightness",
        "contrast",
    )
    with pytest.raises(UsageError, match="'gaussian'.*speckle_noise"):
        C.corruption_names(["gaussian"])
    with pytest.raises(UsageError, match="severities"):
        C.check_severities([0, 3])


def test_spread_takes_images_across_a_class_sorted_split():
    assert C.spread(2500, 1000)[[0, 1, -1]].tolist() == [0, 2, 2497]
    assert C.spread(5, 10).tolist() == [0, 1, 2, 3, 4]


# --- the numbers ----------------------------------------------------------------------------


def test_mce_and_relative_mce_against_numbers_by_hand():
    run = C.CorruptionResult.from_accuracies(0.9, {"fog": [0.8, 0.7, 0.5], "snow": [0.9, 0.8, 0.6]})
    base = C.CorruptionResult.from_accuracies(
        0.8, {"fog": [0.6, 0.5, 0.3], "snow": [0.7, 0.4, 0.3]}
    )
    # CE: fog (0.2 + 0.3 + 0.5) / (0.4 + 0.5 + 0.7) = 1.0 / 1.6; snow 0.7 / 1.6
    assert C.mce(run, base) == pytest.approx((1.0 / 1.6 + 0.7 / 1.6) / 2)
    # relative: fog (1.0 - 3 * 0.1) / (1.6 - 3 * 0.2); snow (0.7 - 0.3) / (1.6 - 0.6)
    assert C.relative_mce(run, base) == pytest.approx((0.7 / 1.0 + 0.4 / 1.0) / 2)
    assert C.mce(run, run) == 1.0 and C.relative_mce(run, run) == 1.0
    assert run.mean_accuracy() == pytest.approx(np.mean([0.8, 0.7, 0.5, 0.9, 0.8, 0.6]))
    assert run.accuracies()["snow", 2] == 0.8
    with pytest.raises(ValueError, match="snow"):
        C.mce(run, C.CorruptionResult.from_accuracies(0.8, {"fog": [0.6, 0.5, 0.3]}))


def test_accuracy_pools_the_images_of_a_role():
    rows = (
        C.Row(0, "a", "validation", C.CLEAN, 0, 10, 10),
        C.Row(2, "b", "validation", C.CLEAN, 0, 30, 15),
        C.Row(1, "c", "held out", C.CLEAN, 0, 5, 1),
    )
    result = C.CorruptionResult({}, rows)
    assert result.clean_accuracy("validation") == 25 / 40
    assert result.roles == ("held out", "validation")


# --- tiny runs end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir):
    """Two tiny float runs sharing their images (same held-out domain and trial seed),
    trained once; each test evaluates copies of them."""
    from gaqat.train import run

    root = tmp_path_factory.mktemp("corrupt")
    folders = [root / "erm_a", root / "erm_b"]
    run(tiny_run(folders[0], digits_dir))
    run(tiny_run(folders[1], digits_dir, hparams={"lr": 1e-3}))
    return folders


@pytest.fixture
def copies(runs, tmp_path):
    out = []
    for folder in runs:
        shutil.copytree(folder, tmp_path / folder.name)
        out.append(tmp_path / folder.name)
    return out


def _evaluate(folders, digits_dir, **kwargs):
    options = {"corruptions": NAMES, "severities": SEVERITIES, "per_domain": PER_DOMAIN}
    return C.evaluate_corruptions(folders, data_dir=digits_dir, **{**options, **kwargs})


def _count_corruptions(monkeypatch) -> list:
    calls = []
    corrupt = C.corrupt_image

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return corrupt(*args, **kwargs)

    monkeypatch.setattr(C, "corrupt_image", counting)
    return calls


def test_runs_sharing_images_share_the_work_and_write_their_rows(copies, digits_dir, monkeypatch):
    calls = _count_corruptions(monkeypatch)
    results = _evaluate(copies, digits_dir)
    assert len(calls) == 4 * PER_DOMAIN * len(NAMES) * len(SEVERITIES)  # once, not per run
    lines = [json.loads(line) for line in (copies[0] / CORRUPTIONS).read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["kind"] == "settings" and header["per_domain"] == PER_DOMAIN
    assert header["library"] == "imagecorruptions-imaug" and header["library_version"]
    assert header["algorithm"] == "erm" and header["step"] == 2
    assert len(rows) == 4 * (1 + len(NAMES) * len(SEVERITIES))  # 4 domains, clean + 4
    assert {(r["env"], r["role"]) for r in rows} == {
        (0, "validation"),
        (1, "held out"),
        (2, "validation"),
        (3, "validation"),
    }
    assert {r["images"] for r in rows} == {PER_DOMAIN}
    assert {(r["corruption"], r["group"], r["severity"]) for r in rows if r["env"] == 1} == {
        ("clean", "clean", 0),
        ("gaussian_noise", "noise", 1),
        ("gaussian_noise", "noise", 5),
        ("fog", "weather", 1),
        ("fog", "weather", 5),
    }
    assert all(r["acc"] == r["correct"] / r["images"] for r in rows)
    result = results[copies[0]]
    assert result.corruptions == tuple(NAMES)
    assert result.severities == SEVERITIES
    assert C.load_corruptions(copies[0]).rows == result.rows


def test_a_second_call_re_uses_the_file_and_evaluates_only_what_is_missing(
    copies, digits_dir, monkeypatch
):
    first = _evaluate(copies, digits_dir)
    text = (copies[0] / CORRUPTIONS).read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("evaluated again")

    with monkeypatch.context() as m:
        m.setattr("gaqat.checkpoint.load_model", no_model)
        again = _evaluate(copies, digits_dir)
        fog = _evaluate(copies, digits_dir, corruptions=["fog"], severities=[5])
    assert again == first and (copies[0] / CORRUPTIONS).read_text() == text
    assert fog[copies[0]].corruptions == ("fog",) and fog[copies[0]].severities == (5,)
    calls = _count_corruptions(monkeypatch)
    more = _evaluate(copies, digits_dir, corruptions=["pixelate"], severities=[2])
    assert set(calls) == {("pixelate", 2)} and len(calls) == 4 * PER_DOMAIN
    assert more[copies[1]].corruptions == ("pixelate",)
    assert len(C.load_corruptions(copies[1]).rows) == 4 * 6  # the earlier rows kept


def test_the_same_run_evaluated_twice_gives_the_same_numbers(copies, digits_dir):
    first = _evaluate(copies[:1], digits_dir)[copies[0]]
    again = _evaluate(copies[:1], digits_dir, overwrite=True)[copies[0]]
    assert first.rows == again.rows


def test_other_settings_need_overwrite(copies, digits_dir):
    _evaluate(copies[:1], digits_dir)
    with pytest.raises(UsageError, match=f"{CORRUPTIONS} was evaluated with per_domain 6.*--overw"):
        _evaluate(copies[:1], digits_dir, per_domain=3)
    result = _evaluate(copies[:1], digits_dir, per_domain=3, overwrite=True)[copies[0]]
    assert {row.images for row in result.rows} == {3}


def test_an_interrupted_evaluation_leaves_the_old_file_or_none(copies, digits_dir, monkeypatch):
    _evaluate(copies[:1], digits_dir)
    text = (copies[0] / CORRUPTIONS).read_text()
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return args[0]

    monkeypatch.setattr(C, "corrupt_image", interrupted)
    for folder in copies:
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            _evaluate([folder], digits_dir, per_domain=3, overwrite=True)
    assert (copies[0] / CORRUPTIONS).read_text() == text
    assert not (copies[1] / CORRUPTIONS).exists()
    assert sorted(p.name for p in copies[1].iterdir()) == sorted(
        p.name for p in copies[0].iterdir() if p.name != CORRUPTIONS
    )


def test_an_overwrite_of_the_run_sets_the_file_aside_with_the_old_run(copies):
    assert CORRUPTIONS in RUN_FILES and CORRUPTIONS in OWN_FILES
    (copies[0] / CORRUPTIONS).write_text("{}\n")
    set_aside(copies[0])  # what `gaqat train --overwrite` does first
    assert (copies[0] / PREVIOUS / CORRUPTIONS).exists()
    assert not (copies[0] / CORRUPTIONS).exists()


@pytest.mark.slow
def test_a_run_resumed_or_overwritten_after_its_evaluation(tmp_path, digits_dir, monkeypatch):
    from gaqat.train import run

    folder = tmp_path / "stopped"
    with monkeypatch.context() as m:  # stopped by a full disk at its second checkpoint
        m.setattr(torch, "save", save_failing_at_the_second_checkpoint(OSError))
        with pytest.raises(OSError):
            run(tiny_run(folder, digits_dir, steps=2, checkpoint_freq=1))
    _evaluate([folder], digits_dir, corruptions=["contrast"], severities=[1])
    run(tiny_run(folder, digits_dir, steps=2, checkpoint_freq=1, resume=True))
    assert (folder / DONE).exists() and (folder / CORRUPTIONS).exists()
    with pytest.raises(UsageError, match="evaluated with step 1, this evaluation's is 2"):
        _evaluate([folder], digits_dir, corruptions=["contrast"], severities=[1])
    run(tiny_run(folder, digits_dir, steps=1, checkpoint_freq=1, overwrite=True))
    assert not (folder / CORRUPTIONS).exists()  # the old run's numbers went with it


# --- the command ----------------------------------------------------------------------------


def test_the_command_prints_the_table_with_mce_and_writes_the_figure(
    copies, digits_dir, tmp_path, capsys
):
    figure = tmp_path / "plots" / "robustness.png"
    argv = ["corrupt", str(copies[1]), "--baseline", str(copies[0]), "--per-corruption"]
    argv += ["--corruptions", *NAMES, "--severities", "1", "5", "--per-domain", str(PER_DOMAIN)]
    argv += ["--data-dir", str(digits_dir), "--figure", str(figure), "--quiet"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    lines = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    header, rows = lines[0], {cells[0]: cells for cells in lines[2:4]}
    for role in ("held out", "validation"):  # the baseline against itself
        assert rows["erm_a"][header.index(f"{role} mCE")] == "100.0"
        assert rows["erm_a"][header.index(f"{role} rel. mCE")] in ("100.0", "–")  # – : 0 / 0
    assert "held out mCE" in out and "#### erm_b: held out" in out and "| fog | weather |" in out
    assert figure.stat().st_size > 0


def test_the_command_refuses_bad_runs_and_names_with_exit_2(copies, tmp_path, capsys):
    assert cli.main(["corrupt", str(tmp_path)]) == 2
    assert "not a run folder (no checkpoint.pt)" in capsys.readouterr().err
    assert cli.main(["corrupt", str(copies[0]), "--corruptions", "rain"]) == 2
    err = capsys.readouterr().err
    assert "'rain'" in err and "jpeg_compression" in err and "Traceback" not in err
    other = tmp_path / "pacs_run"
    other.mkdir()
    checkpoint = torch.load(copies[1] / CHECKPOINT, weights_only=True)
    checkpoint["args"]["dataset"] = checkpoint["meta"]["dataset"] = "PACS"
    checkpoint["meta"]["domains"] = ["art_painting", "cartoon", "photo", "sketch"]
    torch.save(checkpoint, other / CHECKPOINT)
    assert cli.main(["corrupt", str(copies[0]), "--baseline", str(other)]) == 2
    assert "choose a baseline trained on the same dataset" in capsys.readouterr().err
    assert not (copies[0] / CORRUPTIONS).exists()


def test_a_missing_library_is_a_usage_error_naming_the_extra(copies, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "imagecorruptions", None)
    assert cli.main(["corrupt", str(copies[0])]) == 2
    assert 'pip install "gaqat[corruptions]"' in capsys.readouterr().err


# --- the report -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*pooled as one draw")  # two draws of one seed: averaged
def test_the_report_adds_the_corrupted_held_out_accuracy(copies, digits_dir):
    results = _evaluate(copies, digits_dir)
    text = report([copies[0].parent])
    table = text.split("### DigitsDG: corrupted held-out accuracy\n\n", 1)[1].split("\n\n")[0]
    mean = np.mean([results[f].domain_mean_accuracy(1) for f in copies])  # one seed, two draws
    assert table.splitlines()[2] == f"| erm | 32 | {100 * mean:.1f} | {100 * mean:.1f} | 1 |"
    assert "Corrupted held-out accuracy (%)" in text
    assert "corrupted,DigitsDG,erm,32,mnist_m" in report([copies[0].parent], fmt="csv")
