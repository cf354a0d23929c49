"""A full default-preset flow (n = 8, uniform, t1 = 1e4, default tolerances, Tsit5), and warm starts.

Targets (one CPU core, float64): run under 0.5 s after compilation; compilation under 10 s; a fresh
process whose persistent compilation cache already holds the flow (``~/.cache/gradflow/jax``, here a
temporary folder) solves it in under 3 s of wall time from the start of Python, and `gradflow run`
(report + figure) finishes in under 3 s with a warm cache and no slower than with a cold one.
Function evaluations: Tsit5 has 7 stages with first-same-as-last, so 6 vector-field (gradient)
evaluations per attempted step, plus 1 at the start.
Run: python benchmarks/bench_flow.py [--no-processes]
"""

import os
import subprocess
import sys
import tempfile
import time

import _common  # noqa: F401
from _common import check, finish, header, table

from gradflow import ChainTask
from gradflow.flow import FlowParams, simulate

STAGES_PER_STEP = 6
FRESH_SIMULATE = (
    "import time; start = time.perf_counter(); import gradflow as gf; "
    "tr = gf.simulate(gf.FlowParams(gf.ChainTask.uniform(8))); "
    "print(time.perf_counter() - start, tr.stats['compile_seconds'])"
)
FRESH_RUN = "import sys; from gradflow.cli import main; sys.exit(main(['run', '--no-progress', '--figure', sys.argv[1]]))"


def _fresh(code: str, cache: str, *args: str) -> tuple[float, str]:
    """Wall time of a new Python process running ``code`` with the persistent cache in ``cache``."""
    env = {**os.environ, "GRADFLOW_CACHE_DIR": cache}
    env.pop("GRADFLOW_NO_CACHE", None)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout


def main():
    header("bench_flow: default preset")
    params = FlowParams(ChainTask.uniform(8))
    first = simulate(params, progress=False)
    runs = [simulate(params, progress=False).stats["run_seconds"] for _ in range(5)]
    stats = first.stats
    evals = STAGES_PER_STEP * stats["num_steps"] + 1
    run_s = min(runs)
    table(
        [
            (
                8,
                f"{stats['compile_seconds']:.2f}",
                f"{run_s:.4f}",
                stats["num_steps"],
                stats["num_accepted_steps"],
                stats["num_rejected_steps"],
                evals,
                f"{run_s / evals * 1e6:.1f}",
                f"{first.reward[-1]:.6f}",
            )
        ],
        ("n", "compile s", "run s", "steps", "accepted", "rejected", "grad evals", "us/eval", "J(1e4)"),
    )
    check("default flow run < 0.5 s after compilation", run_s < 0.5, f"{run_s:.4f} s")
    check("default flow compilation < 10 s", stats["compile_seconds"] < 10, f"{stats['compile_seconds']:.2f} s")
    if "--no-processes" not in sys.argv:
        with tempfile.TemporaryDirectory() as folder:
            cache = os.path.join(folder, "cache")
            figure = os.path.join(folder, "emergence.png")
            cold_sim, cold_out = _fresh(FRESH_SIMULATE, cache)
            warm_sim, warm_out = _fresh(FRESH_SIMULATE, cache)
            run_cache = os.path.join(folder, "run-cache")
            cold_run, _ = _fresh(FRESH_RUN, run_cache, figure)
            warm_run, _ = _fresh(FRESH_RUN, run_cache, figure)
        cold_compile, warm_compile = float(cold_out.split()[1]), float(warm_out.split()[1])
        table(
            [
                ("simulate (fresh process)", f"{cold_sim:.2f}", f"{warm_sim:.2f}", f"{cold_compile:.2f}", f"{warm_compile:.2f}"),
                ("gradflow run (fresh process)", f"{cold_run:.2f}", f"{warm_run:.2f}", "-", "-"),
            ],
            ("", "cold cache wall s", "warm cache wall s", "cold compile s", "warm compile s"),
        )
        check("fresh-process simulate with a warm cache < 3 s", warm_sim < 3, f"{warm_sim:.2f} s (cold {cold_sim:.2f} s)")
        check("gradflow run with a warm cache < 3 s", warm_run < 3, f"{warm_run:.2f} s (cold {cold_run:.2f} s)")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
