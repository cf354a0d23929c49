"""One fresh process's compile-bound timings, printed as JSON (run by bench_compile.py on this tree and on a baseline).

Run: PYTHONPATH=<a gradflow tree> python benchmarks/compile_probe.py   (persistent cache off: it measures compilation)
"""

import json
import os
import time

os.environ["GRADFLOW_NO_CACHE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gradflow as gf  # noqa: E402

SWEEP_SIZE, SWEEP_N = 1024, 16
OPTIONS = [(False, 0), (True, 2), (False, 2), (True, 16)]  # (mask_self, n_isolated) after the default flow, n = 8
CAPPED = [5, 6, 7, 8]  # n of four capped flows in the authors' setting (max_len = n + 1, self-loops allowed)


def seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def value_and_grad_ms(n: int) -> float:
    """Best of 5: value and gradient of J at the uniform task of length n (compiled beforehand)."""
    task, model = gf.ChainTask.uniform(n), gf.ModelSpec()
    fn = jax.jit(jax.value_and_grad(lambda x: gf.expected_reward(gf.Theta.from_array(x), task, model)))
    x = jnp.array([0.3, 0.1, -0.1, 0.0, 0.0])
    jax.block_until_ready(fn(x))
    return 1e3 * min(seconds(lambda: fn(x)) for _ in range(5))


def capped_flows() -> list:
    """Four capped flows of different n and caps: one batch where they share a program (the cap as data); a tree
    whose batch refuses them (they differed in structure) solves them one by one, as its users had to."""
    configs = [gf.FlowParams(gf.ChainTask.uniform(n), gf.ModelSpec(mask_self=False, max_len=n + 1)) for n in CAPPED]
    try:
        return [t.reward for t in gf.simulate_many(configs)]
    except ValueError:
        return [gf.simulate(cfg).reward for cfg in configs]


def main() -> None:
    out = {"first_solve_s": seconds(lambda: gf.simulate(gf.FlowParams(gf.ChainTask.uniform(8))).reward)}
    out["new_n_s"] = seconds(lambda: gf.simulate(gf.FlowParams(gf.ChainTask.uniform(7))).reward)
    options = [gf.ModelSpec(mask_self=mask, n_isolated=m) for mask, m in OPTIONS]
    out["other_options_s"] = seconds(lambda: [gf.simulate(gf.FlowParams(gf.ChainTask.uniform(8), o)).reward for o in options])
    out["capped_flows_s"] = seconds(capped_flows)
    out["learning_time_first_s"] = seconds(lambda: float(gf.theory.learning_time(gf.ChainTask.hardest(12))))  # compile + run
    configs = [gf.FlowParams(gf.ChainTask.mixture(SWEEP_N, float(c)), events=()) for c in np.geomspace(1e-3, 1.0, SWEEP_SIZE)]
    out["sweep_first_s"] = seconds(lambda: [t.reward for t in gf.simulate_many(configs)][-1])  # compile + run
    out["sweep_flows_per_s"] = SWEEP_SIZE / seconds(lambda: [t.reward for t in gf.simulate_many(configs)][-1])
    out["value_grad_1e4_ms"] = value_and_grad_ms(10_000)
    out["value_grad_1e5_ms"] = value_and_grad_ms(100_000)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
