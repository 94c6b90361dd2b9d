"""Image folders in DomainBed's layout: named specs, custom datasets, labels, bad input."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gaqat import cli
from gaqat.data import SPECS, load_dataset
from gaqat.data.folders import load_image_folder


def spec_layout(spec, classes: int = 3) -> dict[str, list[str]]:
    return {domain: list(spec.classes[:classes]) for domain in spec.domains}


@pytest.mark.parametrize("key", sorted(SPECS))
def test_named_spec_loads_with_the_spec_domains_and_classes(tmp_path, key, make_tree):
    spec = SPECS[key]
    make_tree(tmp_path / spec.folder, spec_layout(spec))
    with pytest.warns(UserWarning, match="has no images of class"):
        ds = load_dataset(spec.name.upper(), tmp_path)  # names are case-insensitive
    assert ds.domains == list(spec.domains)
    assert ds.classes == sorted(spec.classes) and ds.num_classes == len(spec.classes)
    assert len(ds) == len(spec.domains)
    assert all(len(ds[i]) == 3 * 2 for i in range(len(ds)))
    assert ds.class_counts()[:, :3].tolist() == [[2, 2, 2]] * len(ds)
    x, y = ds[0][0]
    assert x.shape == (3, 224, 224) == ds.input_shape and x.dtype == torch.float32
    assert y == ds.classes.index(spec.classes[0])


def test_root_may_be_the_dataset_folder_itself(tmp_path, make_tree):
    spec = SPECS["pacs"]
    make_tree(tmp_path / "PACS", spec_layout(spec, classes=7))
    a = load_dataset("pacs", tmp_path)
    b = load_dataset("pacs", tmp_path / "PACS")
    assert [d.paths for d in a.datasets] == [d.paths for d in b.datasets]


def test_custom_dataset_by_folder_prefix_or_path(tmp_path, make_tree):
    root = make_tree(tmp_path / "mine", {"b": ["x", "y"], "a": ["x", "y"]})
    for ds in (
        load_dataset(f"folder:{root}"),
        load_dataset("folder:", root),
        load_dataset(str(root)),
    ):
        assert ds.name == "mine" and ds.domains == ["a", "b"] and ds.classes == ["x", "y"]
        assert [len(d) for d in ds.datasets] == [4, 4]


def test_labels_follow_the_union_of_classes_when_a_domain_lacks_one(tmp_path, make_tree):
    root = make_tree(tmp_path, {"A": ["cat", "dog", "zebra"], "B": ["dog", "zebra"]}, per_class=1)
    with pytest.warns(UserWarning) as caught:
        ds = load_image_folder(root)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'B'" in messages[0] and "cat" in messages[0]
    assert ds.classes == ["cat", "dog", "zebra"]
    by_class = {
        domain: {Path(p).parent.name: int(y) for p, y in zip(d.paths, d.labels)}
        for domain, d in zip(ds.domains, ds.datasets)
    }
    assert by_class["A"] == {"cat": 0, "dog": 1, "zebra": 2}
    assert by_class["B"] == {"dog": 1, "zebra": 2}  # DomainBed's ImageFolder would say 0, 1
    # The pixels confirm it: colour channel 0 encodes the class position in its domain.
    assert ds[1][0][1] == 1


def test_missing_root_lists_expected_domains_found_and_path(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("VLCS", tmp_path / "nowhere")
    message = str(error.value)
    assert "Caltech101, LabelMe, SUN09, VOC2007" in message
    assert str(tmp_path / "nowhere") in message and "none" in message


def test_custom_dataset_without_domains_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no domains in .*gone \(which does not exist\)"):
        load_dataset(f"folder:{tmp_path / 'gone'}")
    (tmp_path / "flat.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="one subfolder per domain; found: none"):
        load_dataset(f"folder:{tmp_path}")


def test_missing_domain_folder_lists_expected_and_found(tmp_path, make_tree):
    spec = SPECS["pacs"]
    layout = spec_layout(spec, classes=7)
    del layout["sketch"]
    make_tree(tmp_path / "PACS", layout)
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("PACS", tmp_path)
    message = str(error.value)
    assert "missing domain folder(s) sketch" in message
    assert "found: art_painting, cartoon, photo" in message
    assert str(tmp_path / "PACS") in message


def test_stray_class_folder_of_a_named_dataset_is_an_error(tmp_path, make_tree):
    spec = SPECS["pacs"]
    layout = spec_layout(spec, classes=7)
    layout["photo"].append("unicorn")
    make_tree(tmp_path / "PACS", layout)
    with pytest.raises(ValueError, match="unicorn.*not a class of PACS"):
        load_dataset("PACS", tmp_path)


def test_corrupt_images_are_skipped_with_one_counting_warning(tmp_path, make_tree):
    root = make_tree(tmp_path, {"a": ["x", "y"], "b": ["x", "y"]})
    (root / "a" / "x" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "b" / "y" / "empty.png").write_bytes(b"")
    (root / "b" / "y" / "notes.txt").write_text("not an image: ignored silently")
    with pytest.warns(UserWarning) as caught:
        ds = load_image_folder(root)
    assert len(caught) == 1 and "skipped 2 unreadable" in str(caught[0].message)
    assert [len(d) for d in ds.datasets] == [4, 4]


def test_non_image_files_are_ignored_without_warning(tmp_path, make_tree):
    root = make_tree(tmp_path, {"a": ["x"], "b": ["x"]})
    (root / "a" / "x" / "labels.csv").write_text("1,2,3")
    (root / "b" / "readme.md").write_text("domain-level file")
    (root / "index.txt").write_text("root-level file")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_image_folder(root)
    assert ds.domains == ["a", "b"] and [len(d) for d in ds.datasets] == [2, 2]


def test_domain_without_images_is_an_error(tmp_path, make_tree):
    root = make_tree(tmp_path, {"a": ["x"]})
    (root / "b" / "x").mkdir(parents=True)
    (root / "b" / "x" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"domain folder .*b has no readable images"):
        load_image_folder(root)


def test_truncated_image_fails_at_decode_naming_the_file(tmp_path, make_tree):
    root = make_tree(tmp_path, {"a": ["x"]}, per_class=1, size=64)
    path = root / "a" / "x" / "0.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path, quality=95)
    path.write_bytes(path.read_bytes()[: -path.stat().st_size // 2])
    ds = load_image_folder(root)
    position = ds[0].paths.index(str(path))
    with pytest.raises(RuntimeError, match="0.jpg"):
        ds[0][position]


def test_named_datasets_and_downloads_cost_no_torch_import():
    """gaqat.data imports its torch-free modules only (every name it exports); the names
    that need torch are imported from their modules (gaqat.data.loaders, ...)."""
    code = (
        "import sys; from gaqat.data import *; "
        "assert dataset_domains('pacs') == SPECS['pacs'].domains; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_costs_no_torch_import():
    code = (
        "import sys; from gaqat import cli\n"
        "for argv in (['--help'], ['data', '--help'], ['data', 'info', '--help']):\n"
        "    try: cli.main(argv)\n"
        "    except SystemExit: pass\n"
        "assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # its stdout is the help text


def test_unknown_name_lists_the_choices():
    with pytest.raises(
        ValueError, match="digits, PACS, VLCS, OfficeHome, TerraIncognita, DomainNet"
    ):
        load_dataset("imagenet")


def test_cli_info_and_preview(tmp_path, capsys, make_tree):
    root = make_tree(tmp_path / "toy", {"d0": ["cat", "dog"], "d1": ["cat", "dog"]}, per_class=3)
    assert cli.main(["data", "info", f"folder:{root}"]) == 0
    table = capsys.readouterr().out
    assert "toy: 2 domains, 2 classes, 12 images" in table
    assert [line.split() for line in table.splitlines()[1:]] == [
        ["class", "d0", "d1"],
        ["cat", "3", "3"],
        ["dog", "3", "3"],
        ["total", "6", "6"],
    ]
    out = tmp_path / "grid.png"
    assert cli.main(["data", "preview", str(root), "--out", str(out), "--per-domain", "4"]) == 0
    with Image.open(out) as grid:
        pixels = np.asarray(grid.convert("RGB"))
    assert grid.size[1] == 2 * (96 + 14) and grid.size[0] > 4 * 96
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 4  # tiles were pasted
    assert cli.main(["data", "info", "PACS", "--root", str(tmp_path)]) == 2
    assert "art_painting, cartoon, photo, sketch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--seed", "-1", "expected an integer >= 0"),
        ("--per-domain", "0", "expected an integer >= 1"),
        ("--out", "grid.txt", "expected a file name ending in .png"),
        ("--out", "", "expected a file, got an empty path"),
    ],
)
def test_preview_options_are_usage_errors(tmp_path, capsys, make_tree, option, value, message):
    root = make_tree(tmp_path / "toy", {"d0": ["cat", "dog"], "d1": ["cat", "dog"]}, per_class=3)
    argv = ["data", "preview", str(root), "--out", str(tmp_path / "grid.png"), option, value]
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()
