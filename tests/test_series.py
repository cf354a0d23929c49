"""The shared read-outs: gradflow._series.first_crossing and the validators of gradflow._checks."""

import numpy as np
import pytest

from gradflow import _checks
from gradflow._series import first_crossing, first_crossings


def test_first_crossing_interpolates_linearly_between_samples():
    ts = [0.0, 1.0, 2.0, 4.0]
    values = [0.0, 0.2, 0.6, 1.0]
    assert first_crossing(ts, values, 0.5) == pytest.approx(1.75)  # 0.2 -> 0.6 over [1, 2]
    assert first_crossing(ts, values, 0.8) == pytest.approx(3.0)
    assert first_crossing(ts, values, 0.6) == pytest.approx(2.0)  # reached exactly at a sample
    assert first_crossing(ts, values, 0.0) == 0.0  # the first sample already reaches it
    assert first_crossing(ts, values, 1.5) is None


def test_first_crossing_log_time_below_and_nan():
    # linear in log t: halfway between 1 and 100 in log t is 10
    assert first_crossing([1.0, 100.0], [0.0, 1.0], 0.5, log_time=True) == pytest.approx(10.0)
    # a falling series (loss below a level)
    assert first_crossing([0.0, 1.0, 2.0], [1.0, 0.5, 0.1], 0.3, below=True) == pytest.approx(1.5)
    assert first_crossing([0.0, 1.0], [1.0, 0.5], 0.3, below=True) is None
    # NaN samples (the rows after a stopped flow) are skipped, not read as crossings
    assert first_crossing([0.0, 1.0, 2.0, 3.0], [0.0, np.nan, 1.0, np.nan], 0.5) == pytest.approx(1.0)
    # an exact series: linear between samples gives the exact crossing
    t = np.linspace(0, 5, 11)
    assert first_crossing(t, 3.0 * t + 1.0, 7.3) == pytest.approx(2.1)


def test_first_crossings_per_column_and_shape_check():
    values = np.array([[0.0, 0.0, 1.0], [1.0, 0.2, 1.0], [2.0, 0.4, 1.0]])
    out = first_crossings([0.0, 1.0, 2.0], values, 0.5)
    np.testing.assert_allclose(out, [0.5, np.nan, 0.0])
    with pytest.raises(ValueError, match="same length"):
        first_crossing([0.0, 1.0], [0.0, 1.0, 2.0], 0.5)


def test_checks_name_the_field():
    assert _checks.check_fraction("eps", 0.5) == 0.5
    assert _checks.check_fraction("c", 1.0, 0.0, 1.0, inclusive=True) == 1.0
    for bad in (0.0, 1.0, float("nan"), "x", None, True):
        with pytest.raises(ValueError, match="eps"):
            _checks.check_fraction("eps", bad)
    assert _checks.check_nonnegative("c0", 0) == 0.0
    for bad in (-1e-9, float("inf"), float("nan"), "1", None):
        with pytest.raises(ValueError, match="c0"):
            _checks.check_nonnegative("c0", bad)
    np.testing.assert_array_equal(_checks.as_float_array((1, 2)), [1.0, 2.0])
    assert _checks.as_float_array(3).dtype == np.float64
    for bad in ("ab", None, [1, "a"], object()):
        with pytest.raises(ValueError, match="theta0"):
            _checks.as_float_array(bad, name="theta0")
    with pytest.raises(ValueError, match="t1"):
        _checks.check_finite("t1", [1.0, np.inf])
    with pytest.raises(ValueError, match="solver"):
        _checks.check_choice("solver", ["unhashable"], {"tsit5": 1})
