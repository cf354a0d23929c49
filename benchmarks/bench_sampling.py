"""Closed-form flow vs sampled REINFORCE estimates: the reward curve to within 0.01 at 50 time points.

Design (uniform preset, n = 8): the flow gives J(theta(t)) exactly at 50 log-spaced times in
[1e-2, 1e2] (one simulate call, after compilation).  Sampling must estimate J at the same 50 thetas
with standard error <= 0.005 (so a 2-sigma band of 0.01): batch = ceil(0.25 / 0.005^2) = 10,000
rollouts per point (p(1-p) <= 1/4), timed with gradflow.sampling.estimate_reward after compilation.
Only the evaluation is timed; training by sampled gradients would cost far more again.
Run: python benchmarks/bench_sampling.py [--batch B]
"""

import argparse
import math
import time

import _common  # noqa: F401
import jax
import numpy as np
from _common import check, finish, header, table

from gradflow import ChainTask, ModelSpec, Theta
from gradflow.flow import FlowParams, simulate

TOL, POINTS = 0.01, 50


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=math.ceil(0.25 / (TOL / 2) ** 2))
    args = parser.parse_args()
    header(f"bench_sampling: flow vs REINFORCE estimates, n = 8, {POINTS} points")
    from gradflow.sampling import estimate_reward

    task, model = ChainTask.uniform(8), ModelSpec()
    params = FlowParams(task, t1=100.0, save_ts=np.geomspace(1e-2, 1e2, POINTS))
    simulate(params, progress=False)
    t_flow = min(simulate(params, progress=False).stats["run_seconds"] for _ in range(5))
    trajectory = simulate(params, progress=False)

    keys = jax.random.split(jax.random.PRNGKey(0), POINTS)
    thetas = [Theta.from_array(th) for th in trajectory.theta]
    jax.block_until_ready(estimate_reward(thetas[0], task, model, keys[0], args.batch))  # compile
    start = time.perf_counter()
    estimates = [jax.block_until_ready(estimate_reward(th, task, model, k, args.batch)) for th, k in zip(thetas, keys)]
    t_sample = time.perf_counter() - start
    means = np.array([float(m) for m, _ in estimates])
    stderrs = np.array([float(s) for _, s in estimates])
    error = np.abs(means - trajectory.reward)
    ratio = t_sample / t_flow
    table(
        [
            (
                POINTS,
                args.batch,
                f"{t_flow * 1e3:.2f}",
                f"{t_sample:.2f}",
                f"{ratio:.0f}",
                f"{stderrs.max():.4f}",
                f"{error.max():.4f}",
                int((error <= TOL).sum()),
            )
        ],
        ("points", "batch", "flow ms", "sampling s", "ratio", "max stderr", "max |err|", "within 0.01"),
    )
    check("flow faster than sampling by > 100x", ratio > 100, f"{ratio:.0f}x")
    check("sampled stderr <= 0.005 at every point", stderrs.max() <= TOL / 2 + 1e-12, f"{stderrs.max():.4f}")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
