"""The shared read-outs: gradflow._series.first_crossing and the validators of gradflow._checks."""

import jax.numpy as jnp
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
    for bad in (True, False, 10**400):  # a flag is never a float field; an int past float64's range is refused too
        with pytest.raises(ValueError, match="tau"):
            _checks.as_float_array(bad, name="tau")
    with pytest.raises(ValueError, match="t1"):
        _checks.check_finite("t1", [1.0, np.inf])


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-300, -2.5, 3, -(2**53), 2**53 + 1, float("inf"), float("nan"), 7.0])
def test_a_python_number_converts_to_one_shared_float64_array(value):
    """as_float_array keeps the array it made for a Python number and hands the same one out again (configs of a sweep
    share their defaults): the value, its float64 dtype and the sign of a zero are those of jnp.asarray, and a zero of
    the other sign is another array; an int past 2**53 is converted each time; a float64 JAX array comes back as it is."""
    first, again = _checks.as_float_array(value), _checks.as_float_array(value)
    assert first.dtype == jnp.float64 and first.shape == ()
    assert (first is again) == (abs(value) <= 2**53 or isinstance(value, float))
    np.testing.assert_array_equal(first, jnp.asarray(value, dtype=float))
    assert np.signbit(first) == np.signbit(float(value))
    assert _checks.as_float_array(first) is first
    if value == 0:
        assert np.signbit(_checks.as_float_array(-value)) != np.signbit(first)
    with pytest.raises(ValueError, match="solver"):
        _checks.check_choice("solver", ["unhashable"], {"tsit5": 1})
