"""Figure `phase_diagram`: when is learning feasible?  log10 of the flow time to reward 0.9 over (n, c).

Training distribution: mass c on the one-step start d = 1, the rest on the hardest start d = n-1
(``ChainTask.mixture(n, c)``; c = 0 is hardest-only); the reward is J on that distribution.  One
vmapped learning-time solve per n over all c (``gradflow.theory.learning_times``: log-time
integration, stop at J = 0.9), so one compilation per chain length n (n is a shape, not yet data).
Default grid: 24 chain lengths n = 4..256 x 33 masses (c = 0 and 32 values 1e-4..1).  Cells not
reached by t1 are grey (∞); the white contour is the budget beyond which we call learning
infeasible.  The JSON records the wall and CPU seconds of each n and of the whole run.
Regenerate: ``gradflow figures phase_diagram``.
"""

from __future__ import annotations

import resource
import time

import numpy as np
from matplotlib.colors import Normalize

from gradflow import ChainTask, ModelSpec
from gradflow.model import default_theta0
from gradflow.plotting import SEQUENTIAL_CMAP, experiment_parser, save_figure, subplots, use_headless_backend
from gradflow.theory import learning_times

NAME = "phase_diagram"
LEVEL = 0.9
FULL_NS = (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256)
QUICK_NS = (4, 6)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--t1", type=float, default=1e8, help="longest flow time solved (default 1e8)")
    parser.add_argument("--budget", type=float, default=1e3, help="time budget drawn as the feasibility boundary (default 1e3)")
    parser.add_argument(
        "--ns",
        type=int,
        nargs="+",
        default=None,
        help=f"chain lengths (default {FULL_NS[0]}..{FULL_NS[-1]}, {len(FULL_NS)} values)",
    )
    parser.add_argument("--n-masses", type=int, default=32, help="number of easy masses c > 0, log-spaced 1e-4..1 (default 32)")
    args = parser.parse_args(argv)
    ns = tuple(args.ns) if args.ns else (QUICK_NS if args.quick else FULL_NS)
    cs = (0.0, 1e-3, 1e-1, 1.0) if args.quick else (0.0,) + tuple(np.logspace(-4, 0, args.n_masses))
    model, theta0 = ModelSpec(), default_theta0()

    times = np.full((len(cs), len(ns)), np.nan)
    seconds, cpu_seconds = {}, {}
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for j, n in enumerate(ns):
        tick, cpu_tick = time.perf_counter(), _cpu_seconds()
        row = learning_times([ChainTask.mixture(n, c) for c in cs], model, theta0, level=LEVEL, t1=args.t1)
        seconds[n], cpu_seconds[n] = time.perf_counter() - tick, _cpu_seconds() - cpu_tick
        times[:, j] = [np.nan if t is None else t for t in row]
        print(
            f"{NAME}: n = {n} ({seconds[n]:.1f} s, cpu {cpu_seconds[n]:.1f} s): "
            + ", ".join(f"c={c:.3g}: {'-' if np.isnan(t) else f'{t:.3g}'}" for c, t in zip(cs, times[:, j])),
            flush=True,
        )
    total, total_cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    print(f"{NAME}: {len(ns)} chain lengths x {len(cs)} masses in {total:.1f} s (cpu {total_cpu:.1f} s), one compilation per n")
    log_t = np.log10(times)

    big = len(ns) * len(cs) > 300  # too many cells to print each value
    fig, axes = subplots(1, 1, width=10.0 if big else 7.0, height=7.0 if big else 4.8)
    ax = axes[0, 0]
    x_edges, y_edges = np.arange(len(ns) + 1) - 0.5, np.arange(len(cs) + 1) - 0.5
    finite = log_t[np.isfinite(log_t)]
    norm = Normalize(vmin=min(finite.min(), 0.0) if finite.size else -1, vmax=np.log10(args.t1))
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(log_t), cmap=SEQUENTIAL_CMAP, norm=norm)
    for (i, j), value in np.ndenumerate(log_t):
        if big and np.isfinite(value):
            continue
        text = f"{value:.1f}" if np.isfinite(value) else "∞"
        ax.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=5.5 if big else 6.5,
            color="white" if not np.isfinite(value) or value < norm.vmax * 0.6 else "black",
        )
    ax.patch.set_facecolor("0.35")
    feasible = np.isfinite(times) & (times <= args.budget)
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
        title=f"log10 flow time to reward {LEVEL} (∞: not by t1 = {args.t1:g});\n"
        f"white line: budget T = {args.budget:g}, learning infeasible below it",
    )
    ax.grid(False)
    fig.colorbar(mesh, ax=ax, label=f"log10 T (flow time to reward {LEVEL})")

    boundary = {n: (float(cs[np.argmax(feasible[:, j])]) if feasible[:, j].any() else None) for j, n in enumerate(ns)}
    data = {
        "ns": ns,
        "cs": cs,
        "level": LEVEL,
        "t1": args.t1,
        "budget": args.budget,
        "times": times,
        "log10_times": log_t,
        "seconds_per_n": seconds,
        "cpu_seconds_per_n": cpu_seconds,
        "seconds_total": total,
        "cpu_seconds_total": total_cpu,
        "compilations": len(ns),
        "smallest_feasible_c": boundary,
        "slope_logT_logc_small_c": _small_c_slopes(ns, cs, times),
        "claim": {
            "statement": "at fixed n, more easy mass is never slower (for c <= 0.5); hardest-only is slowest",
            "monotone_in_c": bool(
                all(
                    np.all(np.diff(np.nan_to_num(times[1:, j][np.asarray(cs[1:]) <= 0.5], nan=np.inf)) <= 1e-9)
                    for j in range(len(ns))
                )
            ),
            "hardest_slowest": bool(
                all(
                    np.nanmax(np.nan_to_num(times[:, j], nan=np.inf)) == np.nan_to_num(times[0, j], nan=np.inf)
                    for j in range(len(ns))
                )
            ),
        },
    }
    print(f"{NAME}: smallest c within budget {args.budget:g}: {boundary}")
    save_figure(fig, NAME, args.out, data)
    return data


def _small_c_slopes(ns, cs, times) -> dict:
    """Per n: slope of log T against log c over 0 < c <= 0.01 (-1 means T ~ 1/c); None if < 2 points."""
    cs = np.asarray(cs)
    out = {}
    for j, n in enumerate(ns):
        keep = (cs > 0) & (cs <= 0.01) & np.isfinite(times[:, j])
        out[n] = float(np.polyfit(np.log(cs[keep]), np.log(times[keep, j]), 1)[0]) if keep.sum() >= 2 else None
    return out


if __name__ == "__main__":
    use_headless_backend()
    main()
