"""Figure `design`: the training data that is best for the hardest start, computed by differentiating through the flow.

For the hardest start as target, chains of n = 6..16 and budgets t = 1e1..1e4 (linear attention,
tau 0.2, start (0.3, 0, 0)): (a) the optimal fixed mixture over start distances (stacked mass on
d = 1, the middle distances and the hardest d = n-1); (b) the target loss 1 - J it reaches against
training on the target alone and on uniform starts; (c) the shape of the optimal curriculum (mass on
d = 1, middle and hardest against log t, piecewise linear in log t on 5 knots).  With ``--cap L`` every
model has ModelSpec.max_len = L (finite rollouts).  Regenerate: ``gradflow figures design``
(``--quick``: n = 5, budgets 10 and 100, short optimisations: two compilations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, design
from gradflow.model import default_theta0
from gradflow.plotting import claim_failures, color, experiment_parser, format_theta, panel_label, run_experiment, subplots

NAME = "design"


@dataclass(frozen=True)
class Preset:
    """ns x budgets: the optimal mixtures (``steps`` optimiser steps each); curricula: (n, budget) of each
    optimal curriculum (piecewise linear in log t on ``knots`` knots, ``curriculum_steps`` steps); cap:
    ModelSpec.max_len of every model (None: uncapped); theta0: (alpha, beta, gamma)."""

    ns: tuple[int, ...]
    budgets: tuple[float, ...]
    steps: int
    curricula: tuple[tuple[int, float], ...]
    knots: int
    curriculum_steps: int
    cap: int | None = None
    theta0: tuple[float, float, float] = tuple(float(x) for x in default_theta0().as_array()[:3])


FULL = Preset(
    ns=(6, 8, 10, 12, 14, 16),
    budgets=(1e1, 1e2, 1e3, 1e4),
    steps=60,
    curricula=((8, 1e2), (12, 1e2), (12, 1e3)),
    knots=5,
    curriculum_steps=40,
)
QUICK = Preset(ns=(5,), budgets=(1e1, 1e2), steps=4, curricula=((5, 1e1),), knots=3, curriculum_steps=4)


def _groups(probs: np.ndarray) -> tuple[float, float, float]:
    """Mass on d = 1, on 2 <= d <= n-2, on d = n-1."""
    probs = np.asarray(probs)
    return float(probs[0]), float(probs[1:-1].sum()), float(probs[-1])


def compute(preset: Preset) -> dict:
    """The optimal mixture per (n, budget) against the target alone and uniform; the optimal curricula."""
    model = ModelSpec(max_len=preset.cap)
    theta0 = Theta(*preset.theta0)
    cells = []
    for n in preset.ns:
        target = ChainTask.hardest(n)
        for budget in preset.budgets:
            result = design.optimal_mixture(target, budget, model, theta0, steps=preset.steps)
            rows = {row["name"]: row for row in result.rows}
            best_c = result.rows[2]
            cells.append(
                {
                    "n": n,
                    "budget": budget,
                    "probs": result.probs.tolist(),
                    "reward": result.reward,
                    "target_only_reward": rows["target itself"]["reward"],
                    "uniform_reward": rows["uniform"]["reward"],
                    "best_c": best_c["c"],
                    "best_c_reward": best_c["reward"],
                    "source": result.source,
                    "seconds": result.timings["total_seconds"],
                }
            )
            print(
                f"n = {n:2d}, t = {budget:8.0f}: reward {result.reward:.6f} (target only "
                f"{cells[-1]['target_only_reward']:.6f}), mass d=1/middle/hardest "
                f"{'/'.join(f'{m:.3f}' for m in _groups(result.probs))}  [{result.timings['total_seconds']:.1f} s]"
            )
    curricula = []
    for n, budget in preset.curricula:
        target = ChainTask.hardest(n)
        mixture = (
            next(c for c in cells if c["n"] == n and c["budget"] == budget)
            if any(c["n"] == n and c["budget"] == budget for c in cells)
            else None
        )
        mix_result = None
        if mixture is not None:
            mix_result = design.DesignResult(
                kind="mixture",
                n=n,
                target=np.asarray(target.start_probs).tolist(),
                t_budget=budget,
                reward=mixture["reward"],
                probs=np.asarray(mixture["probs"]),
            )
        result = design.optimal_curriculum(
            target,
            budget,
            preset.knots,
            model,
            theta0,
            families=("piecewise_linear",),
            steps=preset.curriculum_steps,
            mixture=mix_result,
        )
        ts = np.geomspace(budget * 1e-4, budget, 60)
        shape = np.array([_groups(result.schedule(t)) for t in ts])
        curricula.append(
            {
                "n": n,
                "budget": budget,
                "reward": result.reward,
                "mixture_reward": result.mixture_reward,
                "gain": result.gain,
                "schedule": result.schedule.to_dict(),
                "source": result.source,
                "ts": ts.tolist(),
                "easy": shape[:, 0].tolist(),
                "middle": shape[:, 1].tolist(),
                "hardest": shape[:, 2].tolist(),
            }
        )
        print(
            f"curriculum n = {n}, t = {budget:g}: reward {result.reward:.6f} vs fixed mixture "
            f"{result.mixture_reward:.6f} (gain {result.gain:+.2e}), {result.source}"
        )
    return {"cells": cells, "curricula": curricula}


def check(data: dict) -> list[str]:
    """The optimum is never worse than the target alone, puts mass on d = 1 where the target alone is stuck
    (J < 0.9), is a distribution; a curriculum is never worse than the fixed mixture."""
    cells, curricula = data["cells"], data["curricula"]
    return claim_failures(
        {
            "each optimal mixture is a distribution": all(abs(sum(c["probs"]) - 1) < 1e-9 for c in cells),
            "the optimal mixture beats training on the target alone": all(
                c["reward"] >= c["target_only_reward"] - 1e-15 for c in cells
            ),
            "where the target alone is stuck (J < 0.9) the optimum puts mass on d = 1": all(
                c["probs"][0] > 0.0 for c in cells if c["target_only_reward"] < 0.9
            ),
            "the optimal curriculum beats the fixed mixture": all(c["reward"] >= c["mixture_reward"] - 1e-15 for c in curricula),
        }
    )


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, 3, width=4.4, height=3.5)
    ax = axes[0, 0]
    cells = data["cells"]
    ns = sorted({c["n"] for c in cells})
    budgets = sorted({c["budget"] for c in cells})
    # bars grouped by n (one gap between groups), one bar per budget
    x = np.array([ns.index(c["n"]) * (len(budgets) + 1) + budgets.index(c["budget"]) for c in cells], dtype=float)
    bottoms = np.zeros(len(cells))
    for k, name in enumerate(("d = 1", "2 <= d <= n-2", "d = n-1 (target)")):
        heights = np.array([_groups(c["probs"])[k] for c in cells])
        ax.bar(x, heights, bottom=bottoms, color=color(k), label=name, width=0.8)
        bottoms += heights
    ax.set_xticks(x, [f"$10^{{{np.log10(c['budget']):.0f}}}$" for c in cells], fontsize=6)
    for i, n in enumerate(ns):
        centre = i * (len(budgets) + 1) + (len(budgets) - 1) / 2
        ax.text(centre, -0.1, f"n = {n}", ha="center", va="top", fontsize=7, transform=ax.get_xaxis_transform())
    ax.set_xlabel("budget t, grouped by n", labelpad=14)
    ax.set_ylabel("optimal training mass")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    panel_label(ax, "a")

    ax = axes[0, 1]
    for i, n in enumerate(ns):
        row = [c for c in cells if c["n"] == n]
        budgets = [c["budget"] for c in row]
        ax.loglog(budgets, [max(1 - c["reward"], 1e-16) for c in row], "-o", color=color(i), ms=3, label=f"n = {n} optimal")
        ax.loglog(budgets, [max(1 - c["target_only_reward"], 1e-16) for c in row], ":", color=color(i))
    ax.set_xlabel("budget t")
    ax.set_ylabel("target loss 1 - J (dotted: target only)")
    ax.legend(fontsize=6)
    panel_label(ax, "b")

    ax = axes[0, 2]
    for i, curve in enumerate(data["curricula"]):
        ts = np.asarray(curve["ts"])
        label = f"n = {curve['n']}, t = {curve['budget']:g}"
        ax.semilogx(ts, curve["easy"], "-", color=color(i), label=f"{label}: d = 1")
        ax.semilogx(ts, curve["hardest"], "--", color=color(i), label=f"{label}: d = n-1")
    ax.set_xlabel("training time t")
    ax.set_ylabel("optimal curriculum: mass")
    ax.legend(fontsize=6)
    panel_label(ax, "c")
    cap = "uncapped" if preset.cap is None else f"cap {preset.cap}"
    fig.suptitle(f"Optimal training data for the hardest start (θ0 = {format_theta(preset.theta0)}, {cap})")
    return fig


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=None, help="finite rollouts: ModelSpec.max_len (default none)")
    args = parser.parse_args(argv)
    name = NAME if args.cap is None else f"{NAME}_cap{args.cap}"
    return run_experiment(name, args, QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
