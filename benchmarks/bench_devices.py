"""Throughput on whatever backend jax sees (CPU, GPU): reward + gradient at large n, vmapped flows.

Times (after compilation): value+grad of J at n = 1e4, 1e5, 1e6; simulate_many of 1, 64, 1024, 4096
default-preset flows at n = 16 (uniform, alpha0 varied, t1 = 1e4), printing flows per second and the
speed-up over this run's single-flow time.  --quick: n up to 1e5 and 1, 64, 256 flows.
Uses every core / the accelerator (GRADFLOW_BENCH_ALL_CORES=1); no PASS/FAIL targets.
Run: python benchmarks/bench_devices.py [--quick]
"""

import os

os.environ.setdefault("GRADFLOW_BENCH_ALL_CORES", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import best_time, finish, header, table  # noqa: E402

from gradflow import ChainTask, ModelSpec, Theta, expected_reward  # noqa: E402
from gradflow.flow import FlowParams, simulate_many  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="n up to 1e5; 1, 64, 256 flows")
    args = parser.parse_args()
    header("bench_devices")
    print("devices:", ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices()))

    rows = []
    for n in (10_000, 100_000) + (() if args.quick else (1_000_000,)):
        task = ChainTask.uniform(n)
        fn = jax.jit(jax.value_and_grad(lambda x, task=task: expected_reward(Theta.from_array(x), task, ModelSpec())))
        x = jnp.array([0.3, 0.0, 0.0, 0.0, 0.0])
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        compile_s = time.perf_counter() - start
        t = best_time(lambda: fn(x), repeats=10)
        rows.append((n, f"{compile_s:.2f}", f"{t * 1e3:.3f}", f"{n / t / 1e6:.1f}"))
    table(rows, ("n", "compile s", "value+grad ms", "M vertices/s"))

    rows, single = [], None
    for size in (1, 64, 256) if args.quick else (1, 64, 1024, 4096):
        configs = [FlowParams(ChainTask.uniform(16), theta0=Theta(0.1 + 0.4 * k / size, 0.0, 0.0)) for k in range(size)]
        out = simulate_many(configs)
        compile_s = out[0].stats["compile_seconds"]
        start = time.perf_counter()
        simulate_many(configs)
        t = time.perf_counter() - start
        single = single or t
        rows.append((size, f"{compile_s:.2f}", f"{t:.3f}", f"{size / t:.1f}", f"{size * single / t:.2f}"))
    table(rows, ("flows", "compile s", "run s", "flows/s", "x single-flow rate"))
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
