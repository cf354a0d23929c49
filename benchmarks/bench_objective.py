"""Reward + gradient is O(n), and far faster than a dense solve of the same system.

Targets (one CPU core, float64): time(n = 1e5) / time(n = 1e4) < 15; n = 1e5 under 50 ms after
compilation; at n = 512 at least 100x faster than a dense solve of (I - Q) h = r, same values to 1e-10.
Also times the previous implementation (benchmarks/_previous_objective.py, a frozen copy of the
Woodbury + LAPACK solve of commit 573e434) in the same run and prints new/old ratios (issue 13.1:
value+grad at n = 1e5 no more than 1.3x slower; vmapped small sweeps).
Run: python benchmarks/bench_objective.py   (pins itself to one core; see _common.py)
"""

import time

import _common  # noqa: F401  (first: pins the core before jax starts)
import _previous_objective as previous
import jax
import jax.numpy as jnp
import numpy as np
from _common import best_time, check, finish, header, table

from gradflow import ChainTask, ModelSpec, Theta, expected_reward, same_side_probability, transition_matrix

MODEL = ModelSpec()
THETA = jnp.array([0.3, 0.0, 0.0, 0.0, 0.0])


def reward_and_grad(n, reward=expected_reward):
    task = ChainTask.uniform(n)
    return jax.jit(jax.value_and_grad(lambda x: reward(Theta.from_array(x), task, MODEL)))


def interleaved_best(fns, arg, repeats=15):
    """Best time of each function, calls interleaved so that machine load hits all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn(arg))
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(arg))
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def old_vs_new():
    """(label, old ms, new ms, ratio) rows: value+grad at n = 1e4, 1e5 and vmapped sweeps of 1000 thetas."""
    rows = []
    for n in (10_000, 100_000):
        best = interleaved_best({"old": reward_and_grad(n, previous.expected_reward), "new": reward_and_grad(n)}, THETA)
        rows.append((f"value+grad n={n}", best["old"], best["new"]))
    xs = jnp.asarray(np.random.default_rng(0).normal(0.0, 0.5, size=(1000, 5)))
    for n, attention in ((8, "linear"), (32, "linear"), (8, "softmax")):
        task, model = ChainTask.uniform(n), ModelSpec(attention)
        sweep = lambda reward: jax.jit(jax.vmap(jax.value_and_grad(lambda x: reward(Theta.from_array(x), task, model))))
        best = interleaved_best({"old": sweep(previous.expected_reward), "new": sweep(expected_reward)}, xs, repeats=8)
        rows.append((f"vmap 1000 value+grad n={n} {attention}", best["old"], best["new"]))
    return [(label, f"{o * 1e3:.3f}", f"{w * 1e3:.3f}", f"{w / o:.2f}") for label, o, w in rows], rows


def dense_same_side(theta_array, n):
    """h for every start from one dense LU solve of (I - Q) h = r on the 2n - 2 transient vertices."""
    p = transition_matrix(Theta.from_array(theta_array), ChainTask.uniform(n), MODEL)
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
    table(
        [(n, f"{t_closed * 1e3:.3f}", f"{t_dense * 1e3:.2f}", f"{t_dense / t_closed:.0f}", f"{diff:.1e}")],
        ("n", "closed ms", "dense ms", "speed-up", "max |dh|"),
    )

    printable, raw = old_vs_new()
    table(printable, ("same run", "old ms", "new ms", "new/old"))
    big = [r for r in raw if r[0] == "value+grad n=100000"][0]

    check("O(n): t(n=1e5)/t(n=1e4) < 15", ratio < 15, f"{ratio:.2f}")
    check("n=1e5 value+grad new/old <= 1.3 (same run)", big[2] / big[1] <= 1.3, f"{big[2] / big[1]:.2f}")
    check("n=1e5 value+grad < 50 ms", times[100_000] < 0.05, f"{times[100_000] * 1e3:.2f} ms")
    check("n=512 closed form >= 100x faster than dense", t_dense / t_closed >= 100, f"{t_dense / t_closed:.0f}x")
    check("n=512 closed form = dense to 1e-10", diff <= 1e-10, f"max diff {diff:.1e}")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
