"""Reward + gradient is O(n), and far faster than a dense solve of the same system.

Targets (one CPU core, float64): time(n = 1e5) / time(n = 1e4) < 15; n = 1e5 under 50 ms after
compilation; at n = 512 at least 100x faster than a dense solve of (I - Q) h = r, same values to 1e-10.
Run: python benchmarks/bench_objective.py   (pins itself to one core; see _common.py)
"""

import _common  # noqa: F401  (first: pins the core before jax starts)
from _common import best_time, check, finish, header, table

import time

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, expected_reward, same_side_probability, transition_matrix

MODEL = ModelSpec()
THETA = jnp.array([0.3, 0.0, 0.0, 0.0, 0.0])


def reward_and_grad(n):
    task = ChainTask.uniform(n)
    return jax.jit(jax.value_and_grad(lambda x: expected_reward(Theta.from_array(x), task, MODEL)))


def dense_same_side(theta_array, n):
    """h for every start from one dense LU solve of (I - Q) h = r on the 2n - 2 transient vertices."""
    p = transition_matrix(Theta.from_array(theta_array), n, MODEL)
    transient = np.array([v for v in range(2 * n) if v not in (n - 1, 2 * n - 1)])
    q = p[np.ix_(transient, transient)]
    h = jnp.linalg.solve(jnp.eye(transient.size) - q, p[transient, n - 1])
    return h[: n - 1][::-1]  # by d = 1..n-1


def main():
    header("bench_objective: reward + gradient")
    rows, times = [], {}
    for n in (1_000, 10_000, 100_000):
        fn = reward_and_grad(n)
        start = time.perf_counter()
        jax.block_until_ready(fn(THETA))
        compile_s = time.perf_counter() - start
        times[n] = best_time(lambda: fn(THETA), repeats=20, min_total=1.0)
        rows.append((n, f"{compile_s:.2f}", f"{times[n] * 1e3:.3f}", f"{times[n] / n * 1e9:.1f}"))
    table(rows, ("n", "compile s", "value+grad ms", "ns per n"))
    ratio = times[100_000] / times[10_000]
    print(f"ratio t(1e5)/t(1e4) = {ratio:.2f}")

    n = 512
    task = ChainTask.uniform(n)
    closed = jax.jit(lambda x: same_side_probability(Theta.from_array(x), task, MODEL))
    dense = jax.jit(lambda x: dense_same_side(x, n))
    theta = jnp.array([1.0, -0.3, -0.4, 0.0, 0.0])
    diff = float(jnp.max(jnp.abs(closed(theta) - dense(theta))))
    t_closed = best_time(lambda: closed(theta), repeats=20, min_total=0.5)
    t_dense = best_time(lambda: dense(theta), repeats=5)
    table([(n, f"{t_closed * 1e3:.3f}", f"{t_dense * 1e3:.2f}", f"{t_dense / t_closed:.0f}", f"{diff:.1e}")],
          ("n", "closed ms", "dense ms", "speed-up", "max |dh|"))

    check("O(n): t(n=1e5)/t(n=1e4) < 15", ratio < 15, f"{ratio:.2f}")
    check("n=1e5 value+grad < 50 ms", times[100_000] < 0.05, f"{times[100_000] * 1e3:.2f} ms")
    check("n=512 closed form >= 100x faster than dense", t_dense / t_closed >= 100, f"{t_dense / t_closed:.0f}x")
    check("n=512 closed form = dense to 1e-10", diff <= 1e-10, f"max diff {diff:.1e}")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
