"""Figure `scaling`: time for the flow to reach reward 0.9 against the chain length n.

Training distributions: uniform over d = 1..n-1, hardest start only (d = n-1), and mixtures with
mass c = 0.01, 0.1, 0.5 on d = 1 and the rest on the hardest start.  The hardest-only curve runs to
n = 40 (learning time 1.2e49): ``learning_times`` integrates in log time across the plateau on the exact
closed form, then in linear-time segments that restart the clock (docs/THEORY.md §12.4).  The hardest-only
times are also fitted with log T = c + a n + b n log n against the pure exponential log T = c + a n, and
their local rate d log T / dn is recorded.  Each curve carries
``gradflow.theory.scaling``'s exponential (T ~ e^{rate n}) and power-law (T ~ n^degree) fits, the
better of which is drawn and both printed in the legend.  Hardest-only grows exponentially
(docs/THEORY.md §5.4), the others polynomially (§5.5).  Regenerate: ``gradflow figures scaling``.
"""

from __future__ import annotations

import numpy as np

from gradflow import ChainTask, ModelSpec
from gradflow.model import default_theta0
from gradflow.plotting import color, experiment_parser, panel_label, save_figure, subplots, use_headless_backend
from gradflow.theory import scaling

NAME = "scaling"
LEVEL = 0.9
T1 = 1e100  # far past every time measured (log-time solve: the plateau costs a few hundred steps)
HARD_NS = (4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 30, 40)


def distributions(quick: bool) -> dict:
    """name -> (make_task, ns)."""
    ns = (4, 5, 6) if quick else (4, 6, 8, 10, 12, 16, 20, 24, 32)
    hard_ns = (4, 5, 6) if quick else HARD_NS
    return {
        "uniform": (ChainTask.uniform, ns),
        "hardest only": (ChainTask.hardest, hard_ns),
        "c = 0.5 on d = 1": (lambda n: ChainTask.mixture(n, 0.5), ns),
        "c = 0.1 on d = 1": (lambda n: ChainTask.mixture(n, 0.1), ns),
        "c = 0.01 on d = 1": (lambda n: ChainTask.mixture(n, 0.01), ns),
    }


def hardest_only_law(ns, times) -> dict:
    """Least-squares fits of log T: c + a n (exponential) and c + a n + b n log n, and the local rate d log T / dn."""
    ns, times = np.asarray(ns, float), np.asarray(times, float)
    keep = np.isfinite(times)
    ns, log_t = ns[keep], np.log(times[keep])
    fits = {}
    for name, columns in (("exp", [np.ones_like(ns), ns]), ("exp_n_log_n", [np.ones_like(ns), ns, ns * np.log(ns)])):
        design = np.stack(columns, axis=1)
        coef = np.linalg.lstsq(design, log_t, rcond=None)[0]
        fits[name] = {"coef": coef, "rss": float(np.sum((design @ coef - log_t) ** 2))}
    local = np.diff(log_t) / np.diff(ns)
    return {"ns": ns, "fits": fits, "local_rate": local, "local_rate_at": 0.5 * (ns[1:] + ns[:-1])}


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    model, theta0 = ModelSpec(), default_theta0()
    fig, axes = subplots(1, 2, width=5.2, height=4.0)
    data = {"level": LEVEL, "theta0": theta0.as_array(), "curves": {}}
    for j, (name, (make_task, ns)) in enumerate(distributions(args.quick).items()):
        result = scaling(ns, make_task, model, theta0, level=LEVEL, t1=T1)
        times = np.array([np.nan if t is None else t for t in result.times])
        label = (
            f"{name}: T ∝ $e^{{{result.rate:.2f}\\,n}}$ (rss {result.exp_rss:.2g}) or "
            f"$n^{{{result.degree:.2f}}}$ (rss {result.power_rss:.2g})"
        )
        reached = [n for n, t in zip(ns, times) if np.isfinite(t)]
        grid = np.linspace(min(reached), max(reached), 100)
        if result.better == "exponential":
            fit_line = np.exp(result.exp_intercept + result.rate * grid)
        else:
            fit_line = np.exp(result.power_intercept + result.degree * np.log(grid))
        for ax in axes[0]:
            ax.plot(ns, times, "o", ms=4, color=color(j), label=label)
            ax.plot(grid, fit_line, "-", lw=1.2, color=color(j), alpha=0.8)
        data["curves"][name] = {
            "ns": ns,
            "times": times,
            "rate": result.rate,
            "factor_per_n": result.factor,
            "exp_intercept": result.exp_intercept,
            "exp_rss": result.exp_rss,
            "degree": result.degree,
            "power_intercept": result.power_intercept,
            "power_rss": result.power_rss,
            "better": result.better,
        }
        print(f"{NAME}: {name}: " + ", ".join(f"T({n})={t:.4g}" for n, t in zip(ns, times)) + f"; better fit {result.better}")
    ax_lin, ax_log = axes[0]
    ax_lin.set(
        yscale="log",
        xlabel="chain length n (vertices per chain)",
        ylabel=f"flow time to reward {LEVEL} (log)",
        title="log T against n: exponential = straight line",
    )
    ax_log.set(
        xscale="log",
        yscale="log",
        xlabel="chain length n (log)",
        ylabel=f"flow time to reward {LEVEL} (log)",
        title="log T against log n: power law = straight line",
    )
    ax_log.set_xticks(sorted({n for _, ns in distributions(args.quick).values() for n in ns}))
    ax_log.xaxis.set_major_formatter("{x:g}")
    ax_log.minorticks_off()
    handles, labels = ax_lin.get_legend_handles_labels()
    fig.legend(
        handles[: len(labels)],
        labels,
        loc="outside lower center",
        ncol=2,
        fontsize=8,
        title="points: flow time to reward 0.9; line: the better fit (exponential or power law; both printed)",
    )
    panel_label(ax_lin, "a")
    panel_label(ax_log, "b")
    fig.suptitle("Simple examples make learning polynomial in n; hardest-only training is exponential")

    curves = data["curves"]
    common = [n for n in curves["hardest only"]["ns"] if n in curves["uniform"]["ns"]]
    ratio = {
        n: curves["hardest only"]["times"][list(curves["hardest only"]["ns"]).index(n)]
        / curves["uniform"]["times"][list(curves["uniform"]["ns"]).index(n)]
        for n in common
    }
    data["hardest_only_law"] = hardest_only_law(curves["hardest only"]["ns"], curves["hardest only"]["times"])
    data["claim"] = {
        "statement": "hardest-only grows faster in n than uniform (larger exponential rate, growing ratio)",
        "rate_hardest": curves["hardest only"]["rate"],
        "rate_uniform": curves["uniform"]["rate"],
        "hardest_over_uniform": ratio,
        "holds": bool(curves["hardest only"]["rate"] > curves["uniform"]["rate"] and ratio[common[-1]] > ratio[common[0]]),
    }
    save_figure(fig, NAME, args.out, data)
    return data


if __name__ == "__main__":
    use_headless_backend()
    main()
