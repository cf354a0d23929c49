"""A 64-config sweep of one structure: one compilation, and >= 10x faster than 64 simulate calls.

Both timed after compilation (the first call of each compiles; the timed calls reuse it).
Configs: n = 8, uniform / mixture start distributions and alpha0 in [0.1, 0.5], t1 = 1e4.
Run: python benchmarks/bench_sweep.py
"""

import _common  # noqa: F401
from _common import check, finish, header, table

import time

import numpy as np

from gradflow import ChainTask, Theta
from gradflow.flow import FlowParams, compilation_count, simulate, simulate_many

N, SIZE = 8, 64


def configs():
    out = []
    for k in range(SIZE):
        task = ChainTask.uniform(N) if k % 2 == 0 else ChainTask.mixture(N, 0.1 + 0.8 * k / SIZE)
        out.append(FlowParams(task, theta0=Theta(0.1 + 0.4 * k / SIZE, 0.0, 0.0)))
    return out


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
    table([(SIZE, compiles, f"{compile_batch:.2f}", f"{t_batch:.3f}", f"{t_single:.3f}", f"{t_single / t_batch:.1f}",
            f"{diff:.1e}")],
          ("configs", "compilations", "compile s", "batched s", "64 x simulate s", "speed-up", "max |dtheta|"))
    check("64-config sweep is one compilation", compiles == 1, f"{compiles}")
    check("sweep >= 10x faster than 64 simulate calls", t_single / t_batch >= 10, f"{t_single / t_batch:.1f}x")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
