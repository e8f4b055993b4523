"""The metrics registry."""

from __future__ import annotations

import pytest

from sdns_monitor.stream.prometheus import Metrics


def test_images_per_second_is_measured_over_a_sliding_window() -> None:
    m = Metrics()
    m.scored(10, now=100.0)
    assert m.images_per_second._value.get() == 0.0  # one point is no rate yet
    m.scored(30, now=101.0)
    m.scored(30, now=102.0)
    assert m.images_per_second._value.get() == pytest.approx(30.0)
    m.scored(0, now=120.0)  # 18 s later the old points have left the 10 s window
    assert m.images_per_second._value.get() == pytest.approx(0.0)
