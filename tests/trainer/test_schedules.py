"""Per-step schedules: cosine with linear warm-up, and linear."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.schedules import cosine, linear


def test_cosine_warmup_is_linear_from_warmup_from_to_start() -> None:
    s = cosine(1.0, 0.1, total_steps=100, warmup_steps=10, warmup_from=0.2)
    assert len(s) == 100
    np.testing.assert_allclose(s[:10], 0.2 + 0.08 * np.arange(10))
    assert s[10] == pytest.approx(1.0)  # the first step after warm-up is at `start`
    assert s[-1] == pytest.approx(0.1)


def test_cosine_without_warmup_hits_both_endpoints_and_decreases() -> None:
    s = cosine(0.04, 0.4, total_steps=50)
    assert len(s) == 50
    assert s[0] == pytest.approx(0.04)
    assert s[-1] == pytest.approx(0.4)
    assert np.all(np.diff(s) >= 0)  # increasing when end > start (teacher momentum, wd)


def test_cosine_is_monotone_after_warmup_and_half_way_at_the_midpoint() -> None:
    s = cosine(2.0, 0.0, total_steps=1001, warmup_steps=0)
    assert np.all(np.diff(s) <= 0)
    assert s[500] == pytest.approx(1.0)


def test_cosine_warmup_longer_than_run_is_capped() -> None:
    assert len(cosine(1.0, 0.0, total_steps=5, warmup_steps=50)) == 5


def test_cosine_single_step_is_start() -> None:
    np.testing.assert_allclose(cosine(0.996, 1.0, total_steps=1), [0.996])


def test_schedules_scale_with_run_length() -> None:
    short = cosine(1.0, 0.0, total_steps=20, warmup_steps=4)
    long = cosine(1.0, 0.0, total_steps=200, warmup_steps=40)
    # Same shape on a 10x longer run: every 10th value of the long one is close to the short
    # (up to the discretisation of the 16-step cosine).
    np.testing.assert_allclose(long[:40:10], short[:4])  # warm-up: exactly proportional
    np.testing.assert_allclose(long[::10], short, atol=0.06)


def test_linear_endpoints_length_and_constant_step() -> None:
    s = linear(0.04, 0.01, total_steps=31)
    assert len(s) == 31
    assert s[0] == pytest.approx(0.04)
    assert s[-1] == pytest.approx(0.01)
    np.testing.assert_allclose(np.diff(s), -0.001, rtol=1e-9)


@pytest.mark.parametrize("fn", [cosine, linear])
def test_non_positive_length_is_refused(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        fn(1.0, 0.0, 0)
