"""Peak resident memory of a 64-config sweep at n = 1,000 (target < 2 GB).

The sweep runs in a fresh subprocess (so the peak is its own): 64 configs of n = 1000 (uniform,
alpha0 in [0.1, 0.5]), t1 = 1 (short, to keep the benchmark fast; memory does not grow with t1:
the save buffers are fixed at 201 times), reported as resource.getrusage(RUSAGE_SELF).ru_maxrss.
Run: python benchmarks/bench_memory.py [--n N] [--t1 T]
"""

import argparse
import os
import subprocess
import sys

import _common  # noqa: F401
from _common import check, finish, header, table

CHILD = """
import resource, sys, time
sys.path.insert(0, {bench!r})
import _common
from gradflow import ChainTask, Theta
from gradflow.flow import FlowParams, simulate_many
configs = [FlowParams(ChainTask.uniform({n}), theta0=Theta(0.1 + 0.4 * k / 64, 0.0, 0.0), t1={t1}) for k in range(64)]
start = time.perf_counter()
out = simulate_many(configs)
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - start,
      out[0].stats["num_steps"], min(t.reward[-1] for t in out))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--t1", type=float, default=1.0)
    args = parser.parse_args()
    header(f"bench_memory: 64-config sweep, n = {args.n}, t1 = {args.t1:g}")
    bench = os.path.dirname(os.path.abspath(__file__))
    child = CHILD.format(bench=bench, n=args.n, t1=args.t1)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=dict(os.environ))
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT")]
    if result.returncode != 0 or not line:
        print(result.stdout + result.stderr)
        check("64-config sweep at n=1000 peak RSS < 2 GB", False, "child failed")
        return finish()
    _, maxrss_kb, seconds, steps, reward = line[0].split()
    gb = int(maxrss_kb) / 1024**2  # Linux reports kilobytes
    table(
        [(64, args.n, args.t1, f"{float(seconds):.2f}", steps, f"{int(maxrss_kb) / 1024:.0f}")],
        ("configs", "n", "t1", "compile+run s", "steps[0]", "peak RSS MiB"),
    )
    check(f"64-config sweep at n={args.n} peak RSS < 2 GB", gb < 2.0, f"{gb:.3f} GB")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
