"""The hyperparameter registry: published defaults, key sets, seeded draws, overrides."""

import json
import re

import numpy as np
import pytest

from gaqat import hparams
from gaqat.hparams import (
    Hparam,
    apply_overrides,
    default_hparams,
    random_hparams,
    seed_hash,
)
from gaqat.names import ALGORITHMS, DATASETS

IMAGE_DATASETS = [d for d in DATASETS if d != "digits"]


@pytest.mark.parametrize(
    "dataset, lr, weight_decay, alpha",
    [
        ("PACS", 3e-5, 1e-4, 1e-3),
        ("VLCS", 1e-5, 1e-4, 1e-3),
        ("OfficeHome", 1e-5, 1e-4, 5e-4),
        ("TerraIncognita", 1e-5, 1e-4, 1e-3),
        ("DomainNet", 3e-5, 1e-6, 5e-4),
    ],
)
def test_image_datasets_default_to_sagm_published_values(dataset, lr, weight_decay, alpha):
    for algorithm in ALGORITHMS:
        hp = default_hparams(algorithm, dataset)
        assert (hp["lr"], hp["weight_decay"]) == (lr, weight_decay)
        assert (hp["arch"], hp["freeze_bn"], hp["resnet_dropout"]) == ("resnet50", True, 0.5)
        assert (hp["batch_size"], hp["lr_schedule"]) == (32, "constant")
    assert default_hparams("gaqat", dataset)["alpha"] == alpha
    assert default_hparams("sagm", dataset)["rho"] == 0.05


def test_run_length_and_window_per_dataset():
    assert default_hparams("erm", "PACS")["steps"] == 5000
    assert default_hparams("erm", "DomainNet")["steps"] == 15000
    assert default_hparams("gaqat", "PACS")["window"] == 350
    assert default_hparams("gaqat", "DomainNet")["window"] == 2111
    assert default_hparams("gaqat", "digits")["window"] == 50


def test_digits_defaults():
    float_hp, qat_hp = default_hparams("erm", "digits"), default_hparams("lsq_sagm", "digits")
    assert (float_hp["lr"], qat_hp["lr"]) == (1e-3, 3e-4)
    assert float_hp["arch"] == "small_cnn" and not float_hp["freeze_bn"]
    assert float_hp["lr_schedule"] == "cosine" and float_hp["batch_size"] == 32


def test_algorithm_specific_keys_only_where_used():
    common = set(default_hparams("erm", "PACS"))
    extra = {a: set(default_hparams(a, "PACS")) - common for a in ALGORITHMS}
    quant = {
        "per_channel",
        "first_last",
        "step_size_lr_scale",
        "fold_batch_norm",
        "bn_freeze_at",
        "residual_bits",
    }
    freezing = {
        "tau",
        "window",
        "freeze_mode",
        "freeze_scope",
        "unfreeze",
        "disorder_metric",
        "freeze_resets_momentum",
    }
    sam = {"rho", "perturbed_pass_rng"}
    sagm = sam | {"alpha"}
    swa = {"swa_start", "bn_recompute_steps"}
    swad = {"n_converge", "n_tolerance", "tolerance_ratio", "bn_recompute_steps"}
    assert extra == {
        "erm": set(),
        "sagm": sagm,
        "lsq": quant,
        "lsq_sam": sam | quant,
        "lsq_sagm": sagm | quant,
        "gaqat": sagm | quant | freezing,
        "swa": swa,
        "swad": swad,
        "lsq_swa": quant | swa,
        "lsq_swad": quant | swad,
        "lsq_sam_swad": sam | quant | swad,
        "lsq_sagm_swad": sagm | quant | swad,
        "gaqat_swad": sagm | quant | freezing | swad,
        # QT-DoG: weights only (no folding, no residual quantizers), after a float warm-up
        "qtdog": {"per_channel", "first_last", "step_size_lr_scale", "quantize_at"},
    }
    gaqat = default_hparams("gaqat", "PACS")
    assert gaqat["perturbed_pass_rng"] == "replay"
    assert (gaqat["tau"], gaqat["freeze_mode"], gaqat["unfreeze"], gaqat["disorder_metric"]) == (
        0.3,
        "task",
        False,
        "sign_flip",
    )
    assert (gaqat["per_channel"], gaqat["first_last"]) == (False, "float")


def test_averaging_defaults_are_swads_release_and_swas_last_quarter():
    swad = default_hparams("lsq_swad", "PACS")
    assert (swad["n_converge"], swad["n_tolerance"], swad["tolerance_ratio"]) == (3, 6, 0.3)
    assert swad["bn_recompute_steps"] == 500
    assert default_hparams("swa", "digits")["swa_start"] == 0.75
    draws = [random_hparams("swad", "PACS", seed) for seed in range(5)]
    assert all(d["n_tolerance"] == 6 for d in draws)  # SWAD's rule is fixed, not searched
    assert all(0.5 <= random_hparams("swa", "PACS", s)["swa_start"] <= 0.9 for s in range(20))
    with pytest.raises(ValueError, match=r"swa_start must be a number in \[0, 1\]"):
        apply_overrides(default_hparams("swa", "PACS"), {"swa_start": 1.5}, "swa", "PACS")
    with pytest.raises(ValueError, match="n_converge must be an integer >= 1"):
        apply_overrides(swad, {"n_converge": 0}, "lsq_swad", "PACS")


def test_unknown_algorithm_lists_choices():
    with pytest.raises(ValueError, match="choices: erm, sagm, lsq, lsq_sam, lsq_sagm, gaqat"):
        default_hparams("sgd", "PACS")


def test_unlisted_dataset_gets_generic_image_defaults():
    hp = default_hparams("sagm", "my_folder")
    assert (hp["lr"], hp["weight_decay"], hp["alpha"], hp["arch"]) == (5e-5, 0.0, 1e-3, "resnet50")


def test_seed_hash_is_stable_across_processes():
    # md5-based: a fixed value, so draws never change between runs or machines.
    assert seed_hash(1, 0, "lr") == seed_hash(1, 0, "lr") == 1661246503
    assert seed_hash(1, 0, "lr") != seed_hash(1, 0, "rho")


def test_random_draws_are_deterministic_and_json_ready():
    a = random_hparams("gaqat", "PACS", seed=7, trial_seed=1)
    assert a == random_hparams("gaqat", "PACS", seed=7, trial_seed=1)
    assert a != random_hparams("gaqat", "PACS", seed=8, trial_seed=1)
    assert a != random_hparams("gaqat", "PACS", seed=7, trial_seed=2)
    assert json.loads(json.dumps(a)) == a
    defaults = default_hparams("gaqat", "PACS")
    assert {k: type(v) for k, v in a.items()} == {k: type(v) for k, v in defaults.items()}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_draws_stay_in_their_ranges(dataset):
    for seed in range(1, 40):
        hp = random_hparams("gaqat", dataset, seed)
        low_lr = 10**-5 if dataset != "digits" else 10**-4.5
        assert low_lr <= hp["lr"] <= 10**-2.5
        assert 8 <= hp["batch_size"] < 64
        assert 0.1 <= hp["tau"] <= 0.5 and 0.01 <= hp["rho"] <= 0.1
        window = default_hparams("gaqat", dataset)["window"]
        assert window // 2 <= hp["window"] <= 2 * window
        assert hp["resnet_dropout"] in (0.0, 0.1, 0.5)
        assert apply_overrides(hp, hp, "gaqat", dataset) == hp  # every draw is valid
        # Not-searched values are their defaults in every draw.
        assert hp["steps"] == default_hparams("gaqat", dataset)["steps"]


def test_adding_a_hyperparameter_changes_no_other_draw(monkeypatch):
    before = random_hparams("gaqat", "PACS", seed=3)
    declare = hparams._declare

    def with_new_one(algorithm, dataset):
        return {"new_one": Hparam(1.0, lambda r: r.uniform()), **declare(algorithm, dataset)}

    monkeypatch.setattr(hparams, "_declare", with_new_one)
    after = random_hparams("gaqat", "PACS", seed=3)
    assert after.pop("new_one") != 1.0
    assert after == before


def test_overrides_from_json_and_dict():
    hp = default_hparams("gaqat", "PACS")
    out = apply_overrides(
        hp,
        '{"lr": 1, "tau": 0.2, "unfreeze": true, "window": 100, "freeze_mode": "all"}',
        "gaqat",
        "PACS",
    )
    assert (out["lr"], out["tau"], out["unfreeze"], out["window"], out["freeze_mode"]) == (
        1.0,
        0.2,
        True,
        100,
        "all",
    )
    assert isinstance(out["lr"], float)
    assert hp == default_hparams("gaqat", "PACS")  # the input is not modified
    assert apply_overrides(hp, {"rho": 0.1}, "gaqat", "PACS")["rho"] == 0.1
    assert apply_overrides(hp, None, "gaqat", "PACS") == hp
    assert apply_overrides(hp, "", "gaqat", "PACS") == hp


def test_unknown_override_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) tau.*valid keys.*alpha, arch"):
        apply_overrides(default_hparams("sagm", "PACS"), '{"tau": 0.1}', "sagm", "PACS")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ('{"lr": "fast"}', "lr must be a finite number > 0"),
        ('{"lr": true}', "lr must be a finite number > 0"),
        ('{"window": 2.5}', "window must be an integer >= 2"),
        ('{"window": true}', "window must be an integer >= 2"),
        ('{"unfreeze": 1}', "unfreeze must be true or false"),
        ('{"freeze_mode": "some"}', "freeze_mode must be one of 'task', 'all'"),
        ('{"freeze_scope": "model"}', "freeze_scope must be one of 'step_size', 'layer'"),
        ('{"residual_bits": 1}', "residual_bits must be one of 0, 2, 3, 4, 5, 6, 7, 8"),
        ('{"disorder_metric": 3}', "disorder_metric must be one of 'sign_flip', "),
        ('{"perturbed_pass_rng": "same"}', "perturbed_pass_rng must be one of 'replay', "),
        ('{"lr": 1e-3', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_override_values_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(default_hparams("gaqat", "digits"), overrides, "gaqat", "digits")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"lr": -1e-3}, "lr must be a finite number > 0"),
        ({"lr": 0}, "lr must be a finite number > 0"),
        ({"batch_size": 0}, "batch_size must be an integer from 1 to 65536"),
        ({"batch_size": 10**12}, "batch_size must be an integer from 1 to 65536"),
        ({"tau": 2}, r"tau must be a number in \[0, 1\]"),
        ({"window": 1}, "window must be an integer >= 2"),
        ({"rho": -1}, "rho must be a finite number >= 0"),
        ({"alpha": -1e-3}, "alpha must be a finite number >= 0"),
        ({"step_size_lr_scale": -1}, "step_size_lr_scale must be a finite number > 0"),
        ({"step_size_lr_scale": 0}, "step_size_lr_scale must be a finite number > 0"),
        ({"bn_freeze_at": -3}, r"bn_freeze_at must be a number in \[0, 1\]"),
        ({"weight_decay": -1e-4}, "weight_decay must be a finite number >= 0"),
        ({"resnet_dropout": 1.0}, r"resnet_dropout must be a number in \[0, 1\)"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"checkpoint_freq": -5}, "checkpoint_freq must be an integer >= 1"),
    ],
)
def test_override_values_outside_their_declared_range_are_refused(override, message):
    """The message quotes the user's --hparams and says what the key takes."""
    quoted = "--hparams '" + json.dumps(override) + "': "
    with pytest.raises(ValueError, match=re.escape(quoted) + message):
        apply_overrides(default_hparams("gaqat", "PACS"), override, "gaqat", "PACS")


def test_every_hyperparameter_declares_its_valid_values():
    for algorithm in ALGORITHMS:
        for dataset in DATASETS:
            for name, declared in hparams._declare(algorithm, dataset).items():
                assert isinstance(declared.default, bool) or declared.valid is not None, name
                assert declared.accepts(declared.default), name


def test_draw_values_follow_numpy_random_state():
    # The draw of one name is its own RandomState's first numbers, whatever the others.
    r = np.random.RandomState(seed_hash(5, 0, "tau"))
    assert random_hparams("gaqat", "VLCS", 5)["tau"] == r.uniform(0.1, 0.5)


@pytest.mark.parametrize("spelling", ["pacs", "Pacs", "PACS"])
def test_dataset_names_are_case_insensitive_like_load_dataset(spelling):
    assert default_hparams("gaqat", spelling) == default_hparams("gaqat", "PACS")
    assert default_hparams("erm", "DigitsDG") == default_hparams("erm", "digits")
