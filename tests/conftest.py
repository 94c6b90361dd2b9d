"""Fixtures shared by several test files."""

import pytest

from gaqat.data import build_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A DigitsDG cache built once per test session (the build takes seconds)."""
    data_dir = tmp_path_factory.mktemp("digits_data")
    build_digits(data_dir)
    return data_dir
