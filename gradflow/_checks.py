"""Input validation shared by the configs: clear ValueErrors that name the field and its range."""

from __future__ import annotations

import jax
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds numbers we can inspect (not a tracer inside jit/vmap/grad)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def check_int(name: str, value, low: int) -> int:
    """Return ``value`` as an int, raising ValueError unless it is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    return int(value)


def check_choice(name: str, value, allowed) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    """Raise ValueError unless every entry of ``value`` is finite and > 0 (>= 0 with allow_zero)."""
    if not is_concrete(value):
        return
    arr = np.asarray(value, dtype=float)
    bad = ~np.isfinite(arr) | ((arr < 0) if allow_zero else (arr <= 0))
    if np.any(bad):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


def check_distribution(name: str, probs, size: int, tol: float = 1e-9) -> None:
    """Raise ValueError unless ``probs`` is a length-``size`` probability vector (sum 1 within tol)."""
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
