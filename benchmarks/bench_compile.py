"""Compilation against work: what a new user waits for (issue 21's targets), measured in one run on all cores.

Rows, each with the target it is held to:
- the default flow's first solve (compile + run, persistent cache off) against a trivial diffrax
  solve with the same solver, controller, tolerances and 201 saves (target: within 3x);
- ``simulate`` on a new n in a warm process (n = 7 after n = 8, one bucket; target: under 0.3 s); in the before/after probe,
  also the default flow's other options (four self-masks and isolated counts at n = 8, after the default);
- a warm ``gradflow run`` in a fresh process (persistent cache filled by a first run; target: 3 s);
- sweep throughput: 1,024 mixtures at n = 16, easy mass 1e-3..1, default t1 and tolerances
  (target: 2,000 flows/s), against solving a sample of them one by one.
Floors, measured in the same run, that bound two of these on this machine: a fresh process that imports
gradflow's CLI and writes an empty four-panel figure (what a ``gradflow run`` that draws its figure pays before it
solves; a warm run copies its figure from ``gradflow.figure_cache``, so only the imports bound it), and
the sweep's flows/s if every core did nothing but its grad J evaluations (steps x 6 per flow, each timed in a
compiled loop over a 64-member chunk); and where a plain vmapped diffrax solve of such a chunk spends a step (the
sweep's mean steps, constant): diffrax's own work (a field that costs nothing) against the six grad J evaluations.
Before/after: ``--baseline REV`` (default ``BASELINE``, the tree before issue 21's work) runs
``compile_probe.py`` in fresh processes on that revision (``git archive``) and on this tree, alternating, twice
each in this run, and prints the best of each with their ratio.
Run: python benchmarks/bench_compile.py [--baseline REV | --baseline none]
"""

import os

os.environ.setdefault("GRADFLOW_BENCH_ALL_CORES", "1")  # the targets are stated for both cores
os.environ["GRADFLOW_NO_CACHE"] = "1"  # this process measures compilation, never loads it
# one jax CPU device per core, so the sweep can also be sharded over both cores (simulate_many(devices=...))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={os.cpu_count()}").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402,F401
import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import best_time, check, finish, header, table  # noqa: E402
from bench_sweep import vector_field_seconds  # noqa: E402

import gradflow as gf  # noqa: E402
from gradflow import flow as flow_module  # noqa: E402

SWEEP_SIZE, SWEEP_N, SAMPLE = 1024, 16, 16
PROBE_ROUNDS = 2  # alternating fresh-process probes of the baseline and this tree
BASELINE = "ba55733"  # main before issue 21's compile-once work (2026-12-06)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def probe(tree: str) -> dict:
    """``compile_probe.py``'s timings for the gradflow package in ``tree``, in a fresh process on all cores."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = tree
    done = subprocess.run([sys.executable, os.path.join(HERE, "compile_probe.py")], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compile_probe.py failed on {tree}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """Each probe row's best over runs: the smallest time, the largest throughput."""
    pick = lambda name: max if name.endswith("_per_s") else min
    return {name: pick(name)(run[name] for run in runs) for name in runs[0]}


def before_after(revision: str) -> None:
    """The probe on ``revision`` and on this tree, measured in this run in fresh processes alternating between the
    two (PROBE_ROUNDS each, best of them: the second of two back-to-back processes measured slower on one program),
    with the ratio now / before."""
    folder = tempfile.mkdtemp(prefix="gradflow-baseline-")
    try:
        archive = subprocess.run(["git", "-C", ROOT, "archive", revision], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        rounds = [(probe(folder), probe(ROOT)) for _ in range(PROBE_ROUNDS)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    before, now = best_of([b for b, _ in rounds]), best_of([n for _, n in rounds])
    rows = [(name, f"{before[name]:.3g}", f"{now[name]:.3g}", f"{now[name] / before[name]:.2f}") for name in now]
    table(rows, (f"probe (fresh processes, best of {PROBE_ROUNDS})", f"before ({revision})", "now", "now / before"))
    ratio = now["value_grad_1e5_ms"] / now["value_grad_1e4_ms"]
    grad_now, grad_before = now["value_grad_1e5_ms"], before["value_grad_1e5_ms"]
    detail = f"{grad_now:.2f} ms against {grad_before:.2f} ms"
    check("value+grad at n = 1e5 no slower than before (5%)", grad_now <= grad_before * 1.05, detail)
    check("t(1e5) / t(1e4) under 15", ratio < 15, f"{ratio:.1f}")


def trivial_solve_seconds(params: gf.FlowParams) -> float:
    """Compile + run of dy/dt = -y (3 numbers) with the flow's solver, controller, tolerances and saves."""
    saves = jnp.asarray(params.times())

    def solve(y0):
        term = diffrax.ODETerm(lambda t, y, args: -y)
        controller = diffrax.PIDController(rtol=params.rtol, atol=params.atol)
        return diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, params.t1, None, y0, saveat=diffrax.SaveAt(ts=saves), stepsize_controller=controller
        ).ys

    start = time.perf_counter()
    jax.block_until_ready(jax.jit(solve)(jnp.ones(3)))
    return time.perf_counter() - start


def first_solve_seconds(params: gf.FlowParams) -> float:
    start = time.perf_counter()
    gf.simulate(params)
    return time.perf_counter() - start


def warm_cli_seconds() -> tuple[float, float]:
    """Wall time of `gradflow run` in a fresh process: cold (empty cache folder), then warm."""
    folder = tempfile.mkdtemp(prefix="gradflow-bench-cache-")
    env = {k: v for k, v in os.environ.items() if k not in ("GRADFLOW_NO_CACHE", "XLA_FLAGS")}
    env["GRADFLOW_CACHE_DIR"] = folder
    figure = os.path.join(folder, "emergence.png")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "gradflow.cli", "run", "--figure", figure], env=env, check=True, capture_output=True
        )
        times.append(time.perf_counter() - start)
    shutil.rmtree(folder, ignore_errors=True)
    return times[0], times[1]


FLOOR_SCRIPT = """
import sys
import time
start = time.perf_counter()
import gradflow, gradflow.cli, gradflow.plotting as plotting
imported = time.perf_counter()
plotting.use_headless_backend()
import numpy as np
fig, axes = plotting.subplots(2, 2)
for ax in axes.flat:
    ax.plot(np.geomspace(1e-2, 1e4, 201), np.linspace(0, 1, 201))
    ax.set_xscale("log")
    ax.set_xlabel(plotting.TIME_LABEL)
    ax.set_title("panel")
plotting.save_figure(fig, "floor", sys.argv[1], {})
print(imported - start, time.perf_counter() - imported)
"""


def cli_floor_seconds() -> tuple[float, float, float]:
    """What any `gradflow run` costs on this machine before it solves anything: a fresh process that imports
    gradflow's CLI (jax, equinox; matplotlib when the figure is drawn) and writes a four-panel log-time figure of no
    data as PNG, PDF and JSON in gradflow's style.  Returns (wall s, of it imports s, of it the figure s)."""
    folder = tempfile.mkdtemp(prefix="gradflow-bench-floor-")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, folder], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    imports, figure = (float(x) for x in done.stdout.split()[-2:])
    return wall, imports, figure


def sweep_chunk(configs: list[gf.FlowParams]) -> gf.FlowParams:
    """64 of the sweep's configs, spread over its masses, bucketed and stacked (one batch chunk)."""
    return flow_module.stack_configs([flow_module.bucketed(c) for c in configs[:: len(configs) // 64][:64]])


def grad_j_floor(configs: list[gf.FlowParams], steps: float) -> tuple[float, float, float]:
    """The sweep's bound from its vector field alone: (evaluations per flow, us per member-evaluation of grad J in
    a compiled loop over a 64-member vmapped chunk of the sweep's bucketed configs, flows/s on every core if the
    solve did nothing else).  Evaluations: 6 per Tsit5 step, accepted or rejected (first same as last)."""
    per_eval = vector_field_seconds(sweep_chunk(configs), batched=True) / 64
    evaluations = 6 * steps
    return evaluations, per_eval * 1e6, os.cpu_count() / (evaluations * per_eval)


def step_costs(configs: list[gf.FlowParams], steps: float) -> tuple[float, float]:
    """A plain vmapped diffrax solve of a 64-member chunk (Tsit5, ``steps`` constant steps over [0, t1], the flow's
    201 saves), once with a field that costs nothing and once with the flow's grad J: (us per member-step of
    diffrax's own work, us per member-step of the six grad J evaluations), on one core."""
    chunk, count = sweep_chunk(configs), int(round(steps))
    saves = jnp.asarray(configs[0].times())

    def solver(field):
        def one(p):
            term = diffrax.ODETerm(lambda t, y, args: field(p, t, y))
            y0, t1 = p.theta0.as_array(), p.t1
            return diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, t1, t1 / count, y0, saveat=diffrax.SaveAt(ts=saves)).ys

        solve = jax.jit(jax.vmap(one))
        jax.block_until_ready(solve(chunk))
        return best_time(lambda: jax.block_until_ready(solve(chunk)), repeats=3) / (64 * count) * 1e6

    machinery = solver(lambda p, t, y: -1e-6 * y)
    return machinery, solver(lambda p, t, y: p.vector_field(t, y)) - machinery


def sweep_configs() -> list[gf.FlowParams]:
    masses = np.geomspace(1e-3, 1.0, SWEEP_SIZE)
    return [gf.FlowParams(gf.ChainTask.mixture(SWEEP_N, float(c)), events=()) for c in masses]


def main():
    parser = argparse.ArgumentParser(description="compilation against work (issue 21)")
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with, or 'none'")
    args = parser.parse_args()
    header("bench_compile: compilation against work (issue 21)")
    default = gf.FlowParams(gf.ChainTask.uniform(8))
    trivial = trivial_solve_seconds(default)
    flow_first = first_solve_seconds(default)
    start = time.perf_counter()
    gf.simulate(default)
    flow_warm = time.perf_counter() - start
    new_n = first_solve_seconds(gf.FlowParams(gf.ChainTask.uniform(7)))  # bucket 8, compiled by n = 8
    new_bucket = first_solve_seconds(gf.FlowParams(gf.ChainTask.uniform(9)))  # bucket 16: compiles
    row = (trivial, flow_first, flow_first / trivial, flow_warm * 1e3, new_n, new_bucket)
    table(
        [tuple(f"{x:.2f}" for x in row)],
        ("trivial diffrax s", "flow first solve s", "ratio", "flow warm ms", "new n (7 after 8) s", "new bucket (9) s"),
    )
    check("first solve within 3x of a trivial diffrax solve", flow_first / trivial <= 3.0, f"{flow_first / trivial:.1f}x")
    check("new n of a compiled bucket in a warm process under 0.3 s", new_n < 0.3, f"{new_n:.2f} s")

    cold, warm = warm_cli_seconds()
    floor, floor_imports, floor_figure = cli_floor_seconds()
    table(
        [(f"{cold:.2f}", f"{warm:.2f}", f"{floor:.2f}", f"{floor_imports:.2f}", f"{floor_figure:.2f}")],
        ("gradflow run, cold cache s", "warm cache, fresh process s", "floor s", "of it imports s", "empty figure s"),
    )
    check("warm `gradflow run` in a fresh process under 3 s", warm < 3.0, f"{warm:.2f} s")

    configs = sweep_configs()
    gf.simulate_many(configs)  # compile the batched program once (the throughput excludes it)
    start = time.perf_counter()
    solved = gf.simulate_many(configs)
    batched = time.perf_counter() - start
    devices = jax.devices()
    gf.simulate_many(configs, devices=devices)  # the same batch sharded over one device per core
    start = time.perf_counter()
    gf.simulate_many(configs, devices=devices)
    sharded = time.perf_counter() - start
    gf.simulate(configs[0])
    start = time.perf_counter()
    for cfg in configs[:: SWEEP_SIZE // SAMPLE]:
        gf.simulate(cfg)
    one_by_one = (time.perf_counter() - start) / SAMPLE
    table(
        [
            (SWEEP_SIZE, f"{batched:.2f}", f"{SWEEP_SIZE / batched:.0f}", len(devices))
            + (f"{SWEEP_SIZE / sharded:.0f}", f"{1 / one_by_one:.0f}")
        ],
        ("flows", "batched s", "batched flows/s", "devices", "sharded flows/s", "one by one flows/s"),
    )
    steps = np.mean([t.stats["num_steps"] for t in solved])
    evaluations, per_eval_us, bound = grad_j_floor(configs, steps)
    table(
        [(f"{evaluations:.0f}", f"{per_eval_us:.2f}", os.cpu_count(), f"{bound:.0f}")],
        ("grad J evaluations per flow", "us per member-evaluation", "cores", "flows/s if grad J were all"),
    )
    machinery_us, field_us = step_costs(configs, steps)
    table(
        [(f"{steps:.0f}", f"{machinery_us:.2f}", f"{field_us:.2f}", f"{field_us / (machinery_us + field_us):.0%}")],
        ("plain vmapped diffrax solve, steps", "diffrax us per member-step", "grad J x6 us per member-step", "grad J share"),
    )
    best = SWEEP_SIZE / min(batched, sharded)
    check("sweep at >= 2,000 flows/s", best >= 2000, f"{best:.0f} flows/s")
    if args.baseline != "none":
        before_after(args.baseline)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
