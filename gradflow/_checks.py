"""Input validation shared by the configs: clear ValueErrors that name the field and its range.

The one home of gradflow's validators (every module imports these instead of writing its own):

* ``as_float_array(x, name=None)``: the float-array field converter (``eqx.field(converter=...)``);
* ``check_int``, ``check_choice``, ``check_positive``, ``check_nonnegative``, ``check_fraction``,
  ``check_finite``, ``check_distribution``: raise ``ValueError`` naming the field, or return the value.

Every check accepts JAX tracers (inside jit / vmap / grad) and then checks only what is known
statically (shapes), never the numbers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds numbers we can inspect (not a tracer inside jit/vmap/grad)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


_SCALARS: dict = {}  # Python numbers already converted: JAX arrays are immutable, so configs can share them
_SCALARS_KEPT = 4096


def _scalar_array(x: float | int, dtype) -> jnp.ndarray:
    """A Python float or int as a JAX array of the float ``dtype``, the same array for the same number (a sweep's
    thousands of configs repeat their defaults; each new array costs about 30 us)."""
    key = (float(x).hex(), dtype)  # hex tells -0.0 from 0.0
    if (array := _SCALARS.get(key)) is None:
        if len(_SCALARS) >= _SCALARS_KEPT:
            _SCALARS.clear()
        array = _SCALARS[key] = jnp.asarray(x, dtype=dtype)
    return array


def as_float_array(x, name: str | None = None) -> jnp.ndarray:
    """``x`` as a float JAX array (float64 when x64 is on): the converter of every float field.

    Anything that is not a number or a (nested) sequence of numbers raises ValueError (naming
    ``name`` when given) instead of the TypeError numpy or JAX would raise.

    Args:
        x (Any): the value to convert (a tracer passes through ``jnp.asarray``).
        name: the field's name for the error message; None: "value".

    Returns:
        ``x`` as a float array.

    Raises:
        ValueError: ``x`` is not a number or an array of numbers (a str, bytes, bool or None included).
    """
    if isinstance(x, jax.core.Tracer):
        return jnp.asarray(x, dtype=float)
    dtype = jnp.result_type(float)  # float64 when x64 is on
    if isinstance(x, jax.Array) and x.dtype == dtype:
        return x  # already one (jnp.asarray would take about 33 us to return it: configs are rebuilt often)
    if type(x) is float or (type(x) is int and abs(x) <= 2**53):
        return _scalar_array(x, dtype)
    try:
        if isinstance(x, (str, bytes, bool)) or x is None:  # a flag or a name is never a float field
            raise TypeError
        return jnp.asarray(x, dtype=float)
    except (TypeError, ValueError, OverflowError):
        label = name or "value"
        raise ValueError(f"{label} must be a number or an array of numbers, got {x!r}") from None


def optional_float_array(x, name: str | None = None):
    """``as_float_array`` that lets None through (optional float fields).

    Args:
        x (Any | None): the value to convert, or None.
        name (str | None): the field's name for the error message.

    Returns:
        array (jax.Array | None): ``x`` as a float array, or None when ``x`` is None.
    """
    return None if x is None else as_float_array(x, name)


def check_int(name: str, value, low: int) -> int:
    """Return ``value`` as an int, raising ValueError unless it is an integer >= ``low``.

    Args:
        name: the name in the error message.
        value (Any): the value to check (bools are rejected).
        low: the smallest allowed value.

    Returns:
        ``value`` as a Python int.

    Raises:
        ValueError: ``value`` is not an integer or is below ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    return int(value)


def check_choice(name: str, value, allowed) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``.

    Args:
        name: the name in the error message.
        value (Any): the value to check.
        allowed (Container): the allowed values.

    Raises:
        ValueError: ``value`` is not in ``allowed`` (or cannot be looked up there).
    """
    try:
        ok = value in allowed
    except TypeError:  # unhashable value against a dict/set
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _as_number(name: str, value, what: str) -> float:
    """``value`` as a Python float, or ValueError naming ``name`` ("must be <what>")."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


def check_fraction(name: str, value, low: float = 0.0, high: float = 1.0, *, inclusive: bool = False) -> float:
    """Return ``value`` as a float, raising ValueError unless low < value < high.

    ``inclusive=True`` accepts the end points (low <= value <= high).  NaN is always rejected.

    Args:
        name: the name in the error message.
        value (Any): the value to check.
        low: the lower end.
        high: the upper end.
        inclusive: accept the end points.

    Returns:
        ``value`` as a Python float.

    Raises:
        ValueError: ``value`` is not a number or lies outside the interval.
    """
    interval = f"[{low}, {high}]" if inclusive else f"({low}, {high})"
    number = _as_number(name, value, f"a number in {interval}")
    ok = (low <= number <= high) if inclusive else (low < number < high)
    if not ok:
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return number


def check_nonnegative(name: str, value) -> float:
    """Return ``value`` as a float, raising ValueError unless it is a finite number >= 0.

    Args:
        name: the name in the error message.
        value (Any): the value to check.

    Returns:
        ``value`` as a Python float.

    Raises:
        ValueError: ``value`` is not a finite number >= 0.
    """
    number = _as_number(name, value, "a finite number >= 0")
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    """Raise ValueError unless every entry of ``value`` is finite and > 0 (>= 0 with allow_zero).

    Traced values (inside jit/vmap/grad) are not checked.

    Args:
        name: the name in the error message.
        value (float | array-like): the number or array to check.
        allow_zero: accept entries equal to 0.

    Raises:
        ValueError: an entry is not finite or not > 0 (< 0 with ``allow_zero``).
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value, dtype=float)
    bad = ~np.isfinite(arr) | ((arr < 0) if allow_zero else (arr <= 0))
    if np.any(bad):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


def check_finite(name: str, value) -> None:
    """Raise ValueError unless every entry of ``value`` is finite (no NaN, no inf).

    Traced values (inside jit/vmap/grad) are not checked.

    Args:
        name: the name in the error message.
        value (float | array-like): the number or array to check.

    Raises:
        ValueError: an entry is NaN or infinite.
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr}")


def check_distribution(name: str, probs, size: int, tol: float = 1e-9) -> None:
    """Raise ValueError unless ``probs`` is a length-``size`` probability vector (sum 1 within tol).

    The shape is always checked; the entries only when ``probs`` is concrete (not traced).

    Args:
        name: the name in the error message.
        probs (array-like): the probabilities.
        size: the required length.
        tol: the allowed deviation of the sum from 1.

    Raises:
        ValueError: the shape is wrong, an entry is negative or not finite, or the sum is not 1.
    """
    shape = np.shape(probs)
    if shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {shape}")
    if not is_concrete(probs):
        return
    arr = np.asarray(probs, dtype=float)
    if np.any(~np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} entries must be finite and >= 0, got {arr}")
    if abs(arr.sum() - 1.0) > tol:
        raise ValueError(f"{name} must sum to 1 (tolerance {tol}), sums to {arr.sum()!r}")
