"""The chain-identification task: two chains of n vertices and a distribution over start distances.

A start at distance d sits at a_{n-d}; it needs d forward steps to reach its terminal a_n.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow._checks import as_float_array, check_distribution, check_fraction, check_int


class ChainTask(eqx.Module):
    """Two disjoint chains a_1..a_n, b_1..b_n; ``start_probs[d-1]`` = P(start is d steps from its end).

    ``n`` is structural (it fixes array shapes, changing it recompiles); ``start_probs`` is a traced
    array, so sweeping over distributions of one ``n`` never recompiles.
    """

    n: int = eqx.field(static=True, converter=lambda n: int(n) if isinstance(n, np.integer) else n)
    start_probs: jnp.ndarray = eqx.field(converter=partial(as_float_array, name="start_probs"))

    def __check_init__(self):
        check_int("n", self.n, 2)
        check_distribution("start_probs", self.start_probs, self.n - 1)

    @property
    def distances(self) -> jnp.ndarray:
        """The start distances d = 1..n-1, aligned with ``start_probs``."""
        return jnp.arange(1, self.n)

    @classmethod
    def uniform(cls, n: int) -> ChainTask:
        """Starts uniform over d = 1..n-1."""
        n = check_int("n", n, 2)
        return cls(n, np.full(n - 1, 1.0 / (n - 1)))

    @classmethod
    def hardest(cls, n: int) -> ChainTask:
        """All mass on the hardest start d = n-1 (v_start = a_1)."""
        n = check_int("n", n, 2)
        return cls(n, np.eye(n - 1)[-1])

    @classmethod
    def mixture(cls, n: int, easy_mass: float, easy_steps: Sequence[int] = (1,)) -> ChainTask:
        """Mass ``easy_mass`` spread evenly over the distances ``easy_steps``, the rest on d = n-1.

        Args:
            n: the chain length, >= 2.
            easy_mass: the mass on the easy distances, in [0, 1].
            easy_steps: the easy distances, each in 1..n-1.

        Returns:
            The ``ChainTask``.

        Raises:
            ValueError: n < 2, easy_mass outside [0, 1], or an easy distance outside 1..n-1.
        """
        n = check_int("n", n, 2)
        mass = check_fraction("easy_mass", easy_mass, 0.0, 1.0, inclusive=True)
        steps = _distances("easy_steps", easy_steps, n)
        probs = np.zeros(n - 1)
        probs[np.asarray(steps) - 1] += mass / len(steps)
        probs[-1] += 1.0 - mass
        return cls(n, probs)

    @classmethod
    def k_hardest(cls, n: int, k: int) -> ChainTask:
        """Uniform over the k hardest starts d = n-k..n-1 (the authors' simple-examples experiment).

        Args:
            n: the chain length, >= 2.
            k: the number of hardest distances, in 1..n-1.

        Returns:
            The ``ChainTask``.

        Raises:
            ValueError: n < 2 or k outside 1..n-1.
        """
        n = check_int("n", n, 2)
        k = check_int("k", k, 1)
        if k > n - 1:
            raise ValueError(f"k must lie in 1..{n - 1}, got {k!r}")
        probs = np.zeros(n - 1)
        probs[n - 1 - k :] = 1.0 / k
        return cls(n, probs)


def _distances(name: str, steps, n: int) -> list[int]:
    """``steps`` as a list of distinct integer distances in 1..n-1 (a single int is one distance)."""
    message = f"{name} must be distinct integer distances in 1..{n - 1}, got {steps!r}"
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        steps = (steps,)
    try:
        steps = list(steps)
    except TypeError:
        raise ValueError(message) from None
    ok = bool(steps) and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 1 <= d <= n - 1 for d in steps)
    if not ok or len(set(int(d) for d in steps)) != len(steps):
        raise ValueError(message)
    return [int(d) for d in steps]


class PaddedTask(eqx.Module):
    """A ChainTask laid out in a bucket of ``size`` vertices per chain, its length ``n`` <= size traced.

    ``start_probs`` has size - 1 entries, zero beyond d = n - 1; the closed forms that take it solve
    size - 1 rows whose rows past n - 1 are exact no-ops, so every n up to ``size`` shares one compiled
    program (``gradflow.flow`` pads linear-attention flows to the next power of two).  Built from a
    validated ChainTask by ``padded``; not a public task (nothing checks it again).
    """

    size: int = eqx.field(static=True)
    n: jnp.ndarray
    start_probs: jnp.ndarray

    @classmethod
    def padded(cls, task: ChainTask, size: int) -> PaddedTask:
        """``task`` in a bucket of ``size`` >= task.n vertices per chain."""
        if size < task.n:
            raise ValueError(f"size must be at least n = {task.n}, got {size}")
        if not isinstance(task.start_probs, jax.core.Tracer):
            probs = np.zeros(size - 1)  # on the host: a batch pads a thousand tasks without device round trips
            probs[: task.n - 1] = np.asarray(task.start_probs)
        else:
            probs = jnp.zeros(size - 1).at[: task.n - 1].set(task.start_probs)
        return cls(size, np.asarray(task.n), probs)


def bucket_size(n: int) -> int:
    """The bucket a chain of length n is padded to: the next power of two, at least 4."""
    return max(4, 1 << (int(n) - 1).bit_length())


def layout(task) -> tuple:
    """(n, rows): a ChainTask's static n and None, or a ``PaddedTask``'s traced n and its row slots (size - 1)."""
    if isinstance(task, PaddedTask):
        return task.n, task.size - 1
    return task.n, None


def by_distance(values, n=None, rows: int | None = None):
    """Chain-a positions 1..n-1 -> start distances d = 1..n-1 (entry d-1 is position n-d); with a
    bucket's ``rows`` (traced n), the slots past d = n - 1 hold 0."""
    if rows is None:
        return values[::-1]
    position = n - 2 - jnp.arange(rows)
    return jnp.where(position >= 0, values[jnp.maximum(position, 0)], 0.0)
