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

from dataclasses import dataclass

import numpy as np

from gradflow import ChainTask, ModelSpec, Theta
from gradflow.model import default_theta0
from gradflow.plotting import claim_failures, color, experiment_parser, format_theta, panel_label, run_experiment, subplots
from gradflow.theory import scaling

NAME = "scaling"
MIXTURE_MASSES = (0.5, 0.1, 0.01)  # mass c on d = 1, the rest on the hardest start


@dataclass(frozen=True)
class Preset:
    """ns: chain lengths of every curve but hardest-only (hard_ns); level: the reward level timed; t1: far
    past every time measured (log-time solve: the plateau costs a few hundred steps); theta0: (alpha, beta, gamma)."""

    ns: tuple[int, ...]
    hard_ns: tuple[int, ...]
    level: float = 0.9
    t1: float = 1e100
    theta0: tuple[float, float, float] = tuple(float(x) for x in default_theta0().as_array()[:3])


QUICK = Preset(ns=(4, 5, 6), hard_ns=(4, 5, 6))
FULL = Preset(ns=(4, 6, 8, 10, 12, 16, 20, 24, 32), hard_ns=(4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 30, 40))


def distributions(preset: Preset) -> dict:
    """name -> (make_task, ns)."""
    mixtures = {f"c = {c} on d = 1": (lambda n, c=c: ChainTask.mixture(n, c), preset.ns) for c in MIXTURE_MASSES}
    return {"uniform": (ChainTask.uniform, preset.ns), "hardest only": (ChainTask.hardest, preset.hard_ns)} | mixtures


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


def compute(preset: Preset) -> dict:
    """Learning times and both fits per distribution; the hardest-only law; the hardest / uniform ratio."""
    model, theta0 = ModelSpec(), Theta(*preset.theta0)
    curves = {}
    for name, (make_task, ns) in distributions(preset).items():
        result = scaling(ns, make_task, model, theta0, level=preset.level, t1=preset.t1)
        times = np.array([np.nan if t is None else t for t in result.times])
        curves[name] = {
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
    hard, uniform = curves["hardest only"], curves["uniform"]
    common = [n for n in hard["ns"] if n in uniform["ns"]]
    ratio = {n: hard["times"][hard["ns"].index(n)] / uniform["times"][uniform["ns"].index(n)] for n in common}
    return {
        "level": preset.level,
        "theta0": preset.theta0,
        "curves": curves,
        "hardest_only_law": hardest_only_law(hard["ns"], hard["times"]),
        "hardest_over_uniform": ratio,
    }


def check(data: dict) -> list[str]:
    """Hardest-only grows faster in n than uniform: a larger exponential rate and a growing ratio."""
    curves, ratio = data["curves"], list(data["hardest_over_uniform"].values())
    return claim_failures(
        {
            "hardest-only has the larger exponential rate": curves["hardest only"]["rate"] > curves["uniform"]["rate"],
            "the hardest / uniform ratio grows with n": len(ratio) >= 2 and ratio[-1] > ratio[0],
        }
    )


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, 2, width=5.2, height=4.0)
    ax_lin, ax_log = axes[0]
    for j, (name, curve) in enumerate(data["curves"].items()):
        ns, times = np.asarray(curve["ns"], dtype=float), np.asarray(curve["times"], dtype=float)
        reached = ns[np.isfinite(times)]
        grid = np.linspace(reached.min(), reached.max(), 100)
        if curve["better"] == "exponential":
            fit_line = np.exp(curve["exp_intercept"] + curve["rate"] * grid)
        else:
            fit_line = np.exp(curve["power_intercept"] + curve["degree"] * np.log(grid))
        label = (
            f"{name}: T ∝ $e^{{{curve['rate']:.2f}\\,n}}$ (rss {curve['exp_rss']:.2g}) or "
            f"$n^{{{curve['degree']:.2f}}}$ (rss {curve['power_rss']:.2g})"
        )
        for ax in (ax_lin, ax_log):
            ax.plot(ns, times, "o", ms=4, color=color(j), label=label)
            ax.plot(grid, fit_line, "-", lw=1.2, color=color(j), alpha=0.8)
    ylabel = f"flow time to reward {preset.level:g} (log)"
    ax_lin.set(
        yscale="log",
        xlabel="chain length n (vertices per chain)",
        ylabel=ylabel,
        title="log T against n: exponential = straight line",
    )
    ax_log.set(
        xscale="log",
        yscale="log",
        xlabel="chain length n (log)",
        ylabel=ylabel,
        title="log T against log n: power law = straight line",
    )
    ax_log.set_xticks(sorted(set(preset.ns) | set(preset.hard_ns)))
    ax_log.xaxis.set_major_formatter("{x:g}")
    ax_log.minorticks_off()
    handles, labels = ax_lin.get_legend_handles_labels()
    fig.legend(
        handles[: len(labels)],
        labels,
        loc="outside lower center",
        ncol=2,
        fontsize=8,
        title=f"points: flow time to reward {preset.level:g}; line: the better fit (exponential or power law; both printed)",
    )
    panel_label(ax_lin, "a")
    panel_label(ax_log, "b")
    fig.suptitle(
        "Simple examples make learning polynomial in n; hardest-only training is exponential "
        f"(θ0 = {format_theta(preset.theta0)})"
    )
    return fig


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
