"""A full default-preset flow (n = 8, uniform, t1 = 1e4, default tolerances, Tsit5).

Targets (one CPU core, float64): run under 0.5 s after compilation; compilation under 10 s.
Function evaluations: Tsit5 has 7 stages with first-same-as-last, so 6 vector-field (gradient)
evaluations per attempted step, plus 1 at the start.
Run: python benchmarks/bench_flow.py
"""

import _common  # noqa: F401
from _common import check, finish, header, table

from gradflow import ChainTask
from gradflow.flow import FlowParams, simulate

STAGES_PER_STEP = 6


def main():
    header("bench_flow: default preset")
    params = FlowParams(ChainTask.uniform(8))
    first = simulate(params, progress=False)
    runs = [simulate(params, progress=False).stats["run_seconds"] for _ in range(5)]
    stats = first.stats
    evals = STAGES_PER_STEP * stats["num_steps"] + 1
    run_s = min(runs)
    table(
        [(8, f"{stats['compile_seconds']:.2f}", f"{run_s:.4f}", stats["num_steps"], stats["num_accepted_steps"],
          stats["num_rejected_steps"], evals, f"{run_s / evals * 1e6:.1f}", f"{first.reward[-1]:.6f}")],
        ("n", "compile s", "run s", "steps", "accepted", "rejected", "grad evals", "us/eval", "J(1e4)"),
    )
    check("default flow run < 0.5 s after compilation", run_s < 0.5, f"{run_s:.4f} s")
    check("default flow compilation < 10 s", stats["compile_seconds"] < 10, f"{stats['compile_seconds']:.2f} s")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
