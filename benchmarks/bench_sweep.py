"""A 64-config sweep of one structure: one compilation, and >= 10x faster than 64 simulate calls.

Both timed after compilation (the first call of each compiles; the timed calls reuse it).
Configs: n = 8, uniform / mixture start distributions and alpha0 in [0.1, 0.5], t1 = 1e4.
Also printed: the cost of one vector-field evaluation (grad J) inside a compiled loop for 1 config
and for the 64 vmapped together.  Their ratio bounds what batching can gain per solver step on this
core, whatever the rest of the sweep costs.
Run: python benchmarks/bench_sweep.py
"""

import time

import _common  # noqa: F401
import jax
import numpy as np
from _common import best_time, check, finish, header, table

from gradflow import ChainTask, Theta
from gradflow.flow import FlowParams, compilation_count, simulate, simulate_many, stack_configs

N, SIZE = 8, 64
LOOP = 1000


def configs():
    out = []
    for k in range(SIZE):
        task = ChainTask.uniform(N) if k % 2 == 0 else ChainTask.mixture(N, 0.1 + 0.8 * k / SIZE)
        out.append(FlowParams(task, theta0=Theta(0.1 + 0.4 * k / SIZE, 0.0, 0.0)))
    return out


def vector_field_seconds(params: FlowParams, batched: bool) -> float:
    """Seconds per evaluation of d theta/dt, from LOOP evaluations chained in one compiled fori_loop."""

    def chained(p):
        step = lambda _, y: y + 1e-12 * p.vector_field(p.t0, y)
        return jax.lax.fori_loop(0, LOOP, step, p.theta0.as_array())

    fn = jax.jit(jax.vmap(chained) if batched else chained)
    return best_time(lambda: fn(params), repeats=5) / LOOP


def main():
    header("bench_sweep: 64 configs, n = 8")
    cfgs = configs()
    before = compilation_count()
    batched = simulate_many(cfgs)
    compiles = compilation_count() - before
    compile_batch = batched[0].stats["compile_seconds"]
    start = time.perf_counter()
    batched = simulate_many(cfgs)
    t_batch = time.perf_counter() - start

    simulate(cfgs[0], progress=False)  # compile the single-config program
    start = time.perf_counter()
    single = [simulate(c, progress=False) for c in cfgs]
    t_single = time.perf_counter() - start
    diff = max(float(np.nanmax(np.abs(a.theta - b.theta))) for a, b in zip(batched, single))
    table(
        [
            (
                SIZE,
                compiles,
                f"{compile_batch:.2f}",
                f"{t_batch:.3f}",
                f"{t_single:.3f}",
                f"{t_single / t_batch:.1f}",
                f"{diff:.1e}",
            )
        ],
        ("configs", "compilations", "compile s", "batched s", "64 x simulate s", "speed-up", "max |dtheta|"),
    )
    t_one, t_batch_eval = vector_field_seconds(cfgs[0], False), vector_field_seconds(stack_configs(cfgs), True)
    table(
        [(f"{t_one * 1e6:.2f}", f"{t_batch_eval * 1e6:.2f}", f"{SIZE * t_one / t_batch_eval:.1f}")],
        ("grad J us, 1 config", f"grad J us, {SIZE} vmapped", "throughput gain per step"),
    )
    check("64-config sweep is one compilation", compiles == 1, f"{compiles}")
    check("sweep >= 10x faster than 64 simulate calls", t_single / t_batch >= 10, f"{t_single / t_batch:.1f}x")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
