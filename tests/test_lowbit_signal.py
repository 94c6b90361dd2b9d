"""benchmarks/lowbit_signal.py: what a quantized copy of a float run keeps before QAT."""

from __future__ import annotations

import pytest
from helpers import load_benchmark, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_signal_falls_with_the_bit_width_and_8_bits_keep_the_float_network(
    tmp_path, digits_dir
):
    from gaqat.train import run

    folder = tmp_path / "erm"
    run(tiny_run(folder, digits_dir, steps=20, checkpoint_freq=20))
    bench = load_benchmark("lowbit_signal")
    rows, shown = bench.measure(
        folder / "checkpoint.pt", bench.widths((8, 2), True), 96, digits_dir
    )
    assert [row["bits"] for row in rows] == ["float", "W8A8", "W2A2", "W2A8", "W8A2"]
    assert (
        shown and shown[-1] == len(bench.blocks(bench.load_model(folder / "checkpoint.pt")[0])) - 1
    )
    eight, two = rows[1], rows[2]
    last = f"cos@{shown[-1]}"  # each half alone loses less than both together
    assert rows[2][last] < min(rows[3][last], rows[4][last]) <= rows[1][last]
    for k in shown:
        assert 0.97 < eight[f"cos@{k}"] <= 1.0 + 1e-6
        assert two[f"cos@{k}"] < eight[f"cos@{k}"]
    assert abs(eight["acc"] - rows[0]["acc"]) <= 0.05
    assert 0.8 < eight["grad (running stats)"] < 1.25  # 8 bits: the float gradient
    assert all(row[f"grad ({s} stats)"] > 0 for row in rows[1:] for s in ("batch", "running"))
