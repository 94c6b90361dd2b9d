"""Disorder metrics on known sequences, and the per-window tracker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaqat.disorder import DisorderTracker, cancellation_disorder, sign_flip_disorder

METRICS = [sign_flip_disorder, cancellation_disorder]


@pytest.mark.parametrize("metric", METRICS)
def test_constant_direction_has_no_disorder(metric):
    assert metric([0.3, 0.1, 2.0, 0.5]) == 0.0
    assert metric(torch.full((10,), -1.0)) == 0.0


@pytest.mark.parametrize("metric", METRICS)
def test_strict_alternation_has_full_disorder(metric):
    assert metric(np.array([1.0, -1.0] * 8)) == 1.0


def test_random_signs_flip_about_half_the_time():
    signs = torch.randint(0, 2, (20000,), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    assert sign_flip_disorder(signs) == pytest.approx(0.5, abs=0.02)
    # Random signs cancel almost completely: |Σ g| grows like √n.
    assert cancellation_disorder(signs) > 0.97


def test_sign_flip_counts_consecutive_pairs_with_sign_zero():
    assert sign_flip_disorder([1.0, 0.0, 1.0]) == 1.0
    assert sign_flip_disorder([0.0, 0.0, 0.0]) == 0.0
    assert sign_flip_disorder([1.0, 2.0, -1.0, -3.0, 4.0]) == pytest.approx(2 / 4)


def test_cancellation_is_the_share_of_mass_that_cancels():
    assert cancellation_disorder([3.0, -1.0]) == pytest.approx(0.5)
    assert cancellation_disorder([0.0, 0.0]) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=40))
def test_both_metrics_stay_in_the_unit_interval(values):
    for metric in METRICS:
        assert 0.0 <= metric(values) <= 1.0


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    "bad, match",
    [
        ([1.0], "at least 2"),
        ([[1.0, 2.0]], "1-D"),
        ([1.0, float("nan")], "NaN"),
        (["a", "b"], "numbers"),
    ],
)
def test_bad_sequences_are_refused(metric, bad, match):
    with pytest.raises(ValueError, match=match):
        metric(bad)


def feed(tracker, task_rows, smooth_rows):
    """Record per-step dicts; return the summaries of the last closed window."""
    out = None
    for task, smooth in zip(task_rows, smooth_rows):
        out = tracker.record(task, smooth) or out
    return out


def test_tracker_summarises_each_window_and_averages_channels():
    shapes = {"a": torch.zeros(()), "b": torch.zeros(2, 1)}
    tracker = DisorderTracker(shapes, window=4)
    task = [
        {"a": torch.tensor(1.0), "b": torch.tensor([[0.5], [s]])} for s in (1.0, -1.0, 1.0, -1.0)
    ]
    smooth = [{"a": torch.tensor(-s), "b": torch.zeros(2, 1)} for s in (1.0, -1.0, 1.0, 1.0)]
    assert feed(tracker, task[:3], smooth[:3]) is None
    summaries = {s.name: s for s in tracker.record(task[3], smooth[3])}
    a, b = summaries["a"], summaries["b"]
    assert (a.g_task, a.d_task, a.g_smooth, a.d_smooth) == (4.0, 0.0, -2.0, pytest.approx(2 / 3))
    # b: channel 0 constant (D 0, sum 2), channel 1 alternating (D 1, sum 0) -> means.
    assert (b.g_task, b.d_task, b.g_smooth, b.d_smooth) == (1.0, 0.5, 0.0, 0.0)
    assert tracker.record(task[0], smooth[0]) is None  # a new window starts


def test_tracker_cancellation_metric():
    tracker = DisorderTracker({"a": torch.zeros(())}, window=2, metric="cancellation")
    (summary,) = feed(
        tracker,
        [{"a": torch.tensor(3.0)}, {"a": torch.tensor(-1.0)}],
        [{"a": torch.tensor(1.0)}] * 2,
    )
    assert summary.d_task == pytest.approx(0.5) and summary.d_smooth == 0.0


def test_tracker_resumes_a_partial_window():
    shapes = {"a": torch.zeros(()), "b": torch.zeros(3)}
    gen = torch.Generator().manual_seed(1)
    steps = [
        (
            {"a": torch.randn((), generator=gen), "b": torch.randn(3, generator=gen)},
            {"a": torch.randn((), generator=gen), "b": torch.randn(3, generator=gen)},
        )
        for _ in range(5)
    ]
    whole = DisorderTracker(shapes, window=5)
    expected = feed(whole, *zip(*steps))
    first = DisorderTracker(shapes, window=5)
    feed(first, *zip(*steps[:2]))
    resumed = DisorderTracker(shapes, window=5)
    resumed.load_state_dict(first.state_dict())
    assert feed(resumed, *zip(*steps[2:])) == expected


def test_tracker_refuses_a_checkpoint_of_other_step_sizes():
    tracker = DisorderTracker({"a": torch.zeros(())}, window=3)
    tracker.record({"a": torch.tensor(1.0)}, {"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="names"):
        DisorderTracker({"b": torch.zeros(())}, window=3).load_state_dict(tracker.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"window": 1}, "window"), ({"metric": "kl"}, "metric"), ({"step_sizes": {}}, "empty")],
)
def test_tracker_bad_arguments_are_named(kwargs, match):
    args = {"step_sizes": {"a": torch.zeros(())}, "window": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        DisorderTracker(**args)
