"""Figure `phase_diagram`: when is learning feasible?  log10 of the flow time to reward 0.9 over (n, c).

Training distribution: mass c on the one-step start d = 1, the rest on the hardest start d = n-1
(``ChainTask.mixture(n, c)``; c = 0 is hardest-only); the reward is J on that distribution.  One
vmapped learning-time solve per bucket of n over all c (``gradflow.theory.learning_times``: log-time
integration, stop at J = 0.9); n is data, so one program serves every n of a bucket (n padded to the
next power of two), and the buckets' programs compile side by side (or load from the persistent
compilation cache).
Default grid: 24 chain lengths n = 4..256 x 33 masses (c = 0 and 32 values 1e-4..1).  Cells not
reached by t1 are grey (∞); the white contour is the budget beyond which we call learning
infeasible.  The JSON records the wall and CPU seconds of the whole run and the programs compiled or loaded
(``programs``).
Regenerate: ``gradflow figures phase_diagram``.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import Normalize

from gradflow import ChainTask, ModelSpec, Theta, compile_cache
from gradflow.model import default_theta0
from gradflow.plotting import SEQUENTIAL_CMAP, claim_failures, experiment_parser, format_theta, run_experiment, subplots
from gradflow.theory import learning_times

NAME = "phase_diagram"


def masses(count: int) -> tuple[float, ...]:
    """c = 0 (hardest only) and ``count`` masses log-spaced over 1e-4..1."""
    return (0.0,) + tuple(float(c) for c in np.logspace(-4, 0, count))


@dataclass(frozen=True)
class Preset:
    """ns x cs: the grid (c sorted, c[0] = 0); t1: the longest flow time solved; budget: the time drawn as
    the feasibility boundary; level: the reward level timed; theta0: (alpha, beta, gamma)."""

    ns: tuple[int, ...]
    cs: tuple[float, ...]
    t1: float = 1e8
    budget: float = 1e3
    level: float = 0.9
    theta0: tuple[float, float, float] = tuple(float(x) for x in default_theta0().as_array()[:3])


QUICK = Preset(ns=(4, 6), cs=(0.0, 1e-3, 1e-1, 1.0))
FULL = Preset(ns=(4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256), cs=masses(32))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def compute(preset: Preset) -> dict:
    """Flow time to the level per (c, n) (NaN: not by t1), the smallest c within budget per n, timings."""
    ns, cs = preset.ns, preset.cs
    model, theta0 = ModelSpec(), Theta(*preset.theta0)
    start, cpu_start, programs = time.perf_counter(), _cpu_seconds(), compile_cache.compilation_count()
    tasks = [ChainTask.mixture(n, c) for n in ns for c in cs]  # one call: the buckets' programs compile side by side
    flat = learning_times(tasks, model, theta0, level=preset.level, t1=preset.t1, progress=True)
    times = np.array([np.nan if t is None else t for t in flat]).reshape(len(ns), len(cs)).T
    for j, n in enumerate(ns):
        found = (f"c={c:.3g}: {'-' if np.isnan(t) else f'{t:.3g}'}" for c, t in zip(cs, times[:, j]))
        print(f"{NAME}: n = {n}: " + ", ".join(found))
    total, total_cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    programs = compile_cache.compilation_count() - programs
    print(f"{NAME}: {len(ns)} chain lengths x {len(cs)} masses in {total:.1f} s (cpu {total_cpu:.1f} s), {programs} programs")
    feasible = np.isfinite(times) & (times <= preset.budget)
    return {
        "ns": ns,
        "cs": cs,
        "level": preset.level,
        "t1": preset.t1,
        "budget": preset.budget,
        "times": times,
        "log10_times": np.log10(times),
        "seconds_total": total,
        "cpu_seconds_total": total_cpu,
        "programs": programs,
        "smallest_feasible_c": {n: (cs[np.argmax(feasible[:, j])] if feasible[:, j].any() else None) for j, n in enumerate(ns)},
        "slope_logT_logc_small_c": _small_c_slopes(ns, cs, times),
    }


def _small_c_slopes(ns, cs, times) -> dict:
    """Per n: slope of log T against log c over 0 < c <= 0.01 (-1 means T ~ 1/c); None if < 2 points."""
    cs = np.asarray(cs)
    out = {}
    for j, n in enumerate(ns):
        keep = (cs > 0) & (cs <= 0.01) & np.isfinite(times[:, j])
        out[n] = float(np.polyfit(np.log(cs[keep]), np.log(times[keep, j]), 1)[0]) if keep.sum() >= 2 else None
    return out


def check(data: dict) -> list[str]:
    """At fixed n, more easy mass is never slower (for 0 < c <= 0.5) and hardest-only (c = 0) is the slowest of
    the mixtures that hold the hardest start (c < 1: at c = 1 it is never trained and, at small n, never learned)."""
    slow = np.nan_to_num(np.asarray(data["times"], dtype=float), nan=np.inf)  # NaN: not learned by t1
    cs = np.asarray(data["cs"], dtype=float)
    easy = (cs > 0) & (cs <= 0.5)
    step = np.diff(slow[easy], axis=0)  # NaN: neither learned by t1
    never_slower = np.all((step <= 1e-9 * np.maximum(1.0, slow[easy][:-1])) | np.isnan(step))
    return claim_failures(
        {
            "more easy mass is never slower (0 < c <= 0.5)": bool(never_slower),
            "hardest only (c = 0) is the slowest (c < 1)": cs[0] == 0.0 and bool(np.all(slow[0] >= slow[cs < 1].max(axis=0))),
        }
    )


def draw(data: dict, preset: Preset):
    ns, cs = preset.ns, preset.cs
    times = np.asarray(data["times"], dtype=float)
    log_t = np.log10(times)
    big = len(ns) * len(cs) > 300  # too many cells to print each value
    fig, axes = subplots(1, 1, width=10.0 if big else 7.0, height=7.0 if big else 4.8)
    ax = axes[0, 0]
    x_edges, y_edges = np.arange(len(ns) + 1) - 0.5, np.arange(len(cs) + 1) - 0.5
    finite = log_t[np.isfinite(log_t)]
    norm = Normalize(vmin=min(finite.min(), 0.0) if finite.size else -1, vmax=np.log10(preset.t1))
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(log_t), cmap=SEQUENTIAL_CMAP, norm=norm)
    for (i, j), value in np.ndenumerate(log_t):
        if big and np.isfinite(value):
            continue
        light = not np.isfinite(value) or value < norm.vmax * 0.6
        text = f"{value:.1f}" if np.isfinite(value) else "∞"
        ax.text(j, i, text, ha="center", va="center", fontsize=5.5 if big else 6.5, color="white" if light else "black")
    ax.patch.set_facecolor("0.35")
    feasible = np.isfinite(times) & (times <= preset.budget)
    # rows are sorted by c: the boundary of each column sits below its lowest feasible row
    lowest = np.array([np.argmax(feasible[:, j]) if feasible[:, j].any() else len(cs) for j in range(len(ns))])
    ax.stairs(lowest - 0.5, x_edges, baseline=None, color="white", lw=2.5)
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    labels = ["0 (hardest only)"] + [f"{c:.2g}" if c < 1 else "1 (d = 1 only)" for c in cs[1:]]
    every = 4 if big else 1
    rows = [i for i in range(len(cs)) if i == 0 or (len(cs) - 1 - i) % every == 0]
    ax.set_yticks(rows, [labels[i] for i in rows])
    ax.set(
        xlabel="chain length n (vertices per chain)",
        ylabel="mass c on the one-step start d = 1 (rest on d = n − 1)",
        title=f"log10 flow time to reward {preset.level:g} (∞: not by t1 = {preset.t1:g}), θ0 = {format_theta(preset.theta0)};\n"
        f"white line: budget T = {preset.budget:g}, learning infeasible below it",
    )
    ax.grid(False)
    fig.colorbar(mesh, ax=ax, label=f"log10 T (flow time to reward {preset.level:g})")
    return fig


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--t1", type=float, default=None, help=f"longest flow time solved (default {FULL.t1:g})")
    parser.add_argument("--budget", type=float, default=None, help=f"time budget drawn as the boundary (default {FULL.budget:g})")
    parser.add_argument(
        "--ns",
        type=int,
        nargs="+",
        default=None,
        help=f"chain lengths (default {FULL.ns[0]}..{FULL.ns[-1]}, {len(FULL.ns)} values)",
    )
    parser.add_argument("--n-masses", type=int, default=None, help="number of easy masses c > 0, log-spaced 1e-4..1 (default 32)")
    args = parser.parse_args(argv)
    args.cs = None if args.n_masses is None else masses(args.n_masses)
    return run_experiment(NAME, args, QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
