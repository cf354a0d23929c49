"""Shared set-up for the benchmarks: one CPU core, float64, timing helpers, PASS/FAIL lines.

Import this module before jax.  It pins the process to one core (``os.sched_setaffinity`` to the
first allowed CPU) and sets ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`` so XLA runs single-threaded.  Set GRADFLOW_BENCH_ALL_CORES=1 to
skip both (bench_devices.py does: it measures whatever backend jax sees).  Equivalent from a shell:
``taskset -c 0 python benchmarks/bench_objective.py``.
"""

from __future__ import annotations

import os
import sys
import time

ONE_CORE = os.environ.get("GRADFLOW_BENCH_ALL_CORES") != "1"
if ONE_CORE:
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax  # noqa: E402

import gradflow  # noqa: E402,F401  (float64)

RESULTS: list[tuple[str, bool, str]] = []


def best_time(fn, repeats: int = 10, min_total: float = 0.0) -> float:
    """Minimum wall time of ``fn()`` (results blocked on) over ``repeats`` calls, after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_total:
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, bool(ok), detail))


def header(title: str) -> None:
    cores = "1 CPU core (pinned), float64" if ONE_CORE else "all cores, float64"
    print(f"== {title} ==  [{jax.default_backend()}: {jax.devices()[0].device_kind}; {cores}]")


def table(rows: list[tuple], names: tuple[str, ...]) -> None:
    widths = [max(len(str(x)) for x in [name] + [r[k] for r in rows]) for k, name in enumerate(names)]
    print("  ".join(str(n).rjust(w) for n, w in zip(names, widths)))
    for r in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def finish() -> int:
    """Print one PASS/FAIL line per target; exit status 0 (benchmarks report, they do not gate)."""
    for name, ok, detail in RESULTS:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    sys.stdout.flush()
    return 0
