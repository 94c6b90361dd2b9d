"""The one checker of records read back: JSON types, dotted fields, messages naming the place."""

import pytest

from gaqat.fields import check_fields, is_a


def test_json_types():
    assert is_a(3, float) and is_a(0.5, float) and not is_a(True, float)
    assert is_a(3, int) and not is_a(3.0, int) and not is_a(False, int)
    assert is_a(False, bool) and not is_a(0, bool)
    assert is_a("x", str) and is_a([1], list) and is_a({}, dict) and not is_a(None, dict)


def test_dotted_fields_in_order():
    record = {"step": 3, "args": {"trial_seed": 1}}
    assert (
        check_fields(record, {"step": int, "args": dict, "args.trial_seed": int}, "f, line 1")
        is record
    )
    with pytest.raises(ValueError, match=r"^f, line 2: missing field 'args.hparams_seed'$"):
        check_fields(record, {"args": dict, "args.hparams_seed": int}, "f, line 2")
    with pytest.raises(
        ValueError, match=r"^f, line 3: field 'args' is \[1\], expected a JSON object$"
    ):
        check_fields({"args": [1]}, {"args": dict, "args.trial_seed": int}, "f, line 3")
    with pytest.raises(ValueError, match=r"^f, line 4: field 'step' is '3', expected int$"):
        check_fields({"step": "3"}, {"step": int}, "f, line 4")
    with pytest.raises(ValueError, match=r"^f, line 5: expected a JSON object, got list$"):
        check_fields([], {}, "f, line 5")


def test_optional_fields_are_checked_when_present():
    assert check_fields({}, {"hparams": dict, "hparams.tau": float}, "f", required=False) == {}
    with pytest.raises(ValueError, match=r"field 'hparams.tau' is 'high', expected a number"):
        check_fields({"hparams": {"tau": "high"}}, {"hparams.tau": float}, "f", required=False)
