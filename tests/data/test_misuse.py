"""Misuse of image folders (issue #19, round two): data that cannot train is refused up
front with a message naming the folder, and a run's dataset can be found and checked
again by resume and export."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image

from gaqat import cli
from gaqat.data import load_dataset, load_recorded
from gaqat.data.folders import load_image_folder

TINY = {"arch": "small_cnn", "batch_size": 2}


def train_argv(root: Path, output: Path, *extra: str, steps: int = 1) -> list[str]:
    """``gaqat train`` of a step or two of a small CNN at 32 pixels on a folder dataset."""
    options = ["--steps", str(steps), "--checkpoint-freq", "1", "--image-size", "32"]
    return helpers.train_argv(root, output, TINY, *options, "--device", "cpu", "--quiet", *extra)


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytes(data[12:16]) + struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(bytes(data))
    return path


# --- 1. image folders -----------------------------------------------------------------


def test_a_domain_too_small_for_a_validation_split_is_refused_before_the_run(
    tmp_path, make_tree, capsys
):
    root = make_tree(tmp_path / "toy", {"d0": ["cat", "dog"], "d1": ["cat", "dog"]}, per_class=3)
    for image in (root / "d0" / "dog").iterdir():
        image.unlink()
    (root / "d0" / "dog" / "x.png").write_bytes((root / "d0" / "cat" / "0.png").read_bytes())
    out = tmp_path / "run"
    assert cli.main(train_argv(root, out)) == 2
    error = capsys.readouterr().err
    assert f"{root / 'd0'} (4 images)" in error and "at least 5 images" in error
    assert "Traceback" not in error and not out.exists()


def test_an_image_claiming_a_huge_size_is_skipped_by_name(tmp_path, make_tree, capsys):
    root = make_tree(tmp_path / "toy", {"d0": ["cat"], "d1": ["cat"]}, per_class=5)
    bomb = bomb_png(root / "d0" / "cat" / "bomb.png")
    for quick in (["--quick"], []):
        assert cli.main(["data", "info", str(root), *quick]) == 0
        captured = capsys.readouterr()
        assert "10 images" in captured.out
        assert str(bomb) in captured.err and "400000000 pixels" in captured.err
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = load_image_folder(root)
    assert str(bomb) not in ds[0].paths


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path, make_tree):
    root = make_tree(tmp_path / "toy", {"d0": ["cat"]}, per_class=1)
    ramp = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    path = root / "d0" / "cat" / "wide.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")
    ds = load_image_folder(root)
    raw = ds[0].raw(ds[0].paths.index(str(path)))
    assert raw.mode == "RGB"
    assert np.asarray(raw)[0, :, 0].tolist() == [0, 64, 128, 255]


def test_a_symlink_loop_in_a_class_folder_is_not_followed(tmp_path, make_tree):
    root = make_tree(tmp_path / "toy", {"d0": ["cat"], "d1": ["cat"]}, per_class=2)
    (root / "d0" / "cat" / "loop").symlink_to(".", target_is_directory=True)
    elsewhere = make_tree(tmp_path / "more", {"d": ["c"]}, per_class=3)
    (root / "d1" / "cat" / "linked").symlink_to(elsewhere / "d" / "c", target_is_directory=True)
    ds = load_image_folder(root)
    assert [len(d) for d in ds.datasets] == [2, 5]  # a loop adds nothing, a real link does


def test_a_folder_of_datasets_is_named_as_such(tmp_path, make_tree, capsys):
    make_tree(tmp_path / "PACS", {"art_painting": ["dog"], "photo": ["dog"]})
    assert cli.main(["data", "info", str(tmp_path), "--quick"]) == 2
    error = capsys.readouterr().err
    assert "folder of datasets" in error and f"did you mean {tmp_path / 'PACS'}?" in error


# --- 2. domains whose class folders are named differently --------------------------------


@pytest.fixture
def bilingual(tmp_path, make_tree):
    """Two domains naming the same two classes in English and in French."""
    root = make_tree(tmp_path / "pets", {"en": ["cat", "dog"]}, per_class=3)
    return make_tree(root, {"en": [], "fr": ["chat", "chien"]}, per_class=3)


def test_held_out_classes_no_training_domain_has_are_refused(bilingual, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_argv(bilingual, out)) == 2
    error = capsys.readouterr().err
    assert "chat, chien" in error and "'fr'" in error and "'en'" in error
    assert "--class-map" in error and not out.exists()


def test_a_class_map_joins_differently_named_folders(bilingual, tmp_path, capsys):
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"fr": {"chat": "cat", "chien": "dog"}}))
    ds = load_dataset(str(bilingual), class_map=class_map)
    assert ds.classes == ["cat", "dog"] and ds.class_counts().tolist() == [[3, 3], [3, 3]]
    assert cli.main(["data", "info", str(bilingual), "--class-map", str(class_map)]) == 0
    assert "pets: 2 domains, 2 classes, 12 images" in capsys.readouterr().out
    out = tmp_path / "run"
    assert cli.main(train_argv(bilingual, out, "--class-map", str(class_map))) == 0
    args = torch.load(out / "checkpoint.pt", weights_only=False)["args"]
    assert load_recorded(args).classes == ["cat", "dog"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ('["fr"]', "expected a JSON object"),
        ('{"de": {"katze": "cat"}}', "unknown domain 'de' (domains: en, fr)"),
        ('{"fr": {"chats": "cat"}}', "'fr' has no class folder 'chats' (found: chat, chien)"),
        ('{"fr": ["cat"]}', "'fr': expected a JSON object"),
        ('{"fr": {"chat": 3}}', "'fr' / 'chat': expected a class name"),
    ],
)
def test_a_bad_class_map_is_a_usage_error_naming_file_and_key(
    bilingual, tmp_path, capsys, content, expected
):
    class_map = tmp_path / "map.json"
    class_map.write_text(content)
    assert cli.main(["data", "info", str(bilingual), "--class-map", str(class_map)]) == 2
    error = capsys.readouterr().err
    assert str(class_map) in error and expected in error and "Traceback" not in error


def test_a_missing_class_map_file_is_a_usage_error(bilingual, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(bilingual, out, "--class-map", str(tmp_path / "nowhere.json"))
    assert cli.main(argv) == 2
    assert "nowhere.json" in capsys.readouterr().err and not out.exists()


# --- 3. a run records where its folder dataset is, and what it held ------------------------


def two_domain_toy(make_tree, root: Path, per_class: int = 3) -> Path:
    return make_tree(root, {"d0": ["cat", "dog"], "d1": ["cat", "dog"]}, per_class=per_class)


def test_a_run_records_its_folder_and_export_can_load_it_again(tmp_path, make_tree):
    root = two_domain_toy(make_tree, tmp_path / "a" / "toy")
    out = tmp_path / "run"
    assert cli.main(train_argv(root, out)) == 0
    args = torch.load(out / "checkpoint.pt", weights_only=False)["args"]
    assert args["dataset"] == "toy" and args["dataset_path"] == str(root.resolve())
    assert load_recorded(args).domains == ["d0", "d1"]
    moved = tmp_path / "b"
    root.rename(tmp_path / "toy_moved")
    two_domain_toy(make_tree, moved / "toy", per_class=4)  # same basename, other images
    with pytest.raises(ValueError, match="other files"):
        load_recorded(args, moved)
    (tmp_path / "toy_moved").rename(tmp_path / "c_toy")
    assert load_recorded(args, tmp_path / "c_toy").domains == ["d0", "d1"]  # moved, same files


def test_resume_refuses_another_folder_with_the_same_basename(tmp_path, make_tree, capsys):
    first = two_domain_toy(make_tree, tmp_path / "a" / "toy")
    other = two_domain_toy(make_tree, tmp_path / "b" / "toy", per_class=4)
    out = tmp_path / "run"
    assert cli.main(train_argv(first, out, steps=2)) == 0
    (out / "done").unlink()  # as if killed after its last checkpoint
    before = (out / "results.jsonl").read_bytes()
    assert cli.main(train_argv(other, out, "--resume", steps=2)) == 2
    error = capsys.readouterr().err
    assert str(first.resolve()) in error and str(other.resolve()) in error
    assert (out / "results.jsonl").read_bytes() == before and not (out / "done").exists()
    assert cli.main(train_argv(first, out, "--resume", steps=2)) == 0
