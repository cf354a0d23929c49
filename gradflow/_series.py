"""Read-outs of sampled series: the one helper for "when does this series first reach a level".

Every module that reads a crossing time off saved values (plots, sampled training, theory's
grid read-outs, the figure scripts) uses ``first_crossing`` (one column) or ``first_crossings``
(each column of a 2-D array), so they agree on the interpolation and on NaN handling.
Exact crossings of the flow itself are root-found on the solution (``Trajectory.t_hit``); these
helpers only read between samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def first_crossing(
    ts: Sequence[float],
    values: Sequence[float],
    level: float,
    *,
    below: bool = False,
    log_time: bool = False,
) -> float | None:
    """The first time the sampled series ``values`` (at times ``ts``) reaches ``level``.

    Reaching means ``value >= level`` (``below=True``: ``value <= level``).  Between the last sample
    short of the level and the first that reaches it the series is interpolated linearly, in t
    (default) or in log t (``log_time=True``, when both times are > 0), so the answer is exact for a
    series that is linear between samples.  Samples with a NaN value or time are skipped (e.g. the
    NaN rows saved after a stopped flow).

    Args:
        ts: the sample times.
        values: the series at ``ts`` (same length).
        level: the level to reach.
        below: reaching means falling to ``level`` or below.
        log_time: interpolate in log t (when both bracketing times are > 0).

    Returns:
        The crossing time: ``ts[0]`` if the first sample already reaches the level, None if no sample does.

    Raises:
        ValueError: ``ts`` and ``values`` differ in length.
    """
    ts = np.asarray(ts, dtype=float).reshape(-1)
    values = np.asarray(values, dtype=float).reshape(-1)
    if ts.shape != values.shape:
        raise ValueError(f"ts and values must have the same length, got {ts.shape} and {values.shape}")
    ok = np.isfinite(ts) & ~np.isnan(values)
    ts, values = ts[ok], values[ok]
    sign = -1.0 if below else 1.0
    reached = np.flatnonzero(sign * values >= sign * level)
    if reached.size == 0:
        return None
    k = int(reached[0])
    if k == 0:
        return float(ts[0])
    v0, v1 = values[k - 1], values[k]
    t0, t1 = ts[k - 1], ts[k]
    if not np.isfinite(v0) or not np.isfinite(v1) or v1 == v0:
        return float(t1)
    w = (level - v0) / (v1 - v0)
    if log_time and t0 > 0 and t1 > 0:
        return float(np.exp(np.log(t0) + w * (np.log(t1) - np.log(t0))))
    return float(t0 + w * (t1 - t0))


def first_crossings(
    ts: Sequence[float],
    values,
    level: float,
    *,
    below: bool = False,
    log_time: bool = False,
) -> np.ndarray:
    """``first_crossing`` for each column of ``values`` (T, m): an (m,) array, NaN where never.

    Args:
        ts: the sample times, length T.
        values (array-like): the series, shape (T, ...); each trailing index is one series.
        level: the level to reach.
        below: reaching means falling to ``level`` or below.
        log_time: interpolate in log t.

    Returns:
        The crossing times, shape values.shape[1:], NaN where a series never reaches the level.
    """
    values = np.asarray(values, dtype=float)
    columns = values.reshape(values.shape[0], -1)
    out = [first_crossing(ts, columns[:, j], level, below=below, log_time=log_time) for j in range(columns.shape[1])]
    return np.array([np.nan if t is None else t for t in out], dtype=float).reshape(values.shape[1:])
