"""Figure `ood`: out-of-distribution length generalisation of the learned forward traversal.

Parameters learned by the flow on short chains (n = 4, and n = 8; uniform starts) are frozen at
several training times and evaluated, in closed form, on chains of n = 4..64 (uniform starts).  The
last panel is the paper's vocabulary setting: trained at n = 4 inside a 24-vertex vocabulary (16
isolated vertices, ``ModelSpec(n_isolated=16)``), evaluated at n = 4, 8, 12 in the same vocabulary
(24 - 2n isolated vertices).  Regenerate: ``gradflow figures ood``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, expected_reward, traversal_probability
from gradflow.flow import FlowParams, simulate
from gradflow.model import default_theta0
from gradflow.plotting import (
    TIME_LABEL,
    claim_failures,
    color,
    experiment_parser,
    format_theta,
    log_times,
    panel_label,
    run_experiment,
    subplots,
)

NAME = "ood"


@dataclass(frozen=True)
class Preset:
    """train_ns: training chain lengths (uniform starts), frozen at the flow times ``snapshots`` and
    evaluated at eval_ns; vocabulary: vertices of the paper's setting, trained at vocabulary_train_n
    (``saves`` log-spaced times) and evaluated at vocabulary_eval_ns; level: the claim's reward."""

    train_ns: tuple[int, ...]
    eval_ns: tuple[int, ...]
    saves: int
    snapshots: tuple[float, ...] = (1.0, 3.0, 10.0, 100.0, 1e4)
    vocabulary: int = 24
    vocabulary_train_n: int = 4
    vocabulary_eval_ns: tuple[int, ...] = (4, 8, 12)
    claim_ns: tuple[int, ...] = (8, 12)
    level: float = 0.99
    theta0: tuple[float, float, float] = tuple(float(x) for x in default_theta0().as_array()[:3])


QUICK = Preset(train_ns=(4,), eval_ns=(4, 8, 12), saves=60)
FULL = Preset(train_ns=(4, 8), eval_ns=(4, 6, 8, 12, 16, 24, 32, 48, 64), saves=200)


@jax.jit
def _reward_and_traversal(thetas, task: ChainTask, model: ModelSpec):
    both = lambda x: (expected_reward(Theta.from_array(x), task, model), traversal_probability(Theta.from_array(x), task, model))
    return jax.vmap(both)(thetas)


def evaluate(thetas: np.ndarray, n: int, model: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(reward J, exact-traversal probability) on uniform starts at chain length n, per row of thetas."""
    reward, traversal = _reward_and_traversal(jnp.asarray(thetas), ChainTask.uniform(n), model)
    return np.asarray(reward), np.asarray(traversal)


def compute(preset: Preset) -> dict:
    """Reward and traversal at every (snapshot, evaluation n) per training n, and the vocabulary runs."""
    model, theta0 = ModelSpec(), Theta(*preset.theta0)
    save_ts = np.array((0.0,) + preset.snapshots)
    trained = {}
    for n_train in preset.train_ns:
        params = FlowParams(ChainTask.uniform(n_train), model, theta0, t1=preset.snapshots[-1], save_ts=save_ts)
        thetas = simulate(params, progress=False).theta[1:]
        evaluated = [evaluate(thetas, m, model) for m in preset.eval_ns]
        rewards = np.stack([r for r, _ in evaluated], axis=1)  # (snapshots, eval_ns)
        trained[n_train] = {
            "theta": thetas[:, :3],
            "reward": rewards,
            "traversal_prob": np.stack([t for _, t in evaluated], axis=1),
            "reward_final": dict(zip(preset.eval_ns, rewards[-1])),
        }
    final = trained[preset.train_ns[0]]["reward_final"]
    print(f"{NAME}: trained at n={preset.train_ns[0]}: " + ", ".join(f"J(n={m})={r:.5f}" for m, r in final.items()))
    return {"snapshots": preset.snapshots, "eval_ns": preset.eval_ns, "trained": trained, "isolated": _isolated(preset)}


def _isolated(preset: Preset) -> dict:
    """Train in the paper's vocabulary; reward and traversal at each evaluation n in the same vocabulary."""
    ts = log_times(preset.snapshots[-1], preset.saves, t_min=1e-2)
    n = preset.vocabulary_train_n
    train_model = ModelSpec(n_isolated=preset.vocabulary - 2 * n)
    run = simulate(FlowParams(ChainTask.uniform(n), train_model, Theta(*preset.theta0), t1=ts[-1], save_ts=ts), progress=False)
    out = {"ts": ts, "reward": {}, "traversal_prob": {}, "reward_final": {}}
    for m in preset.vocabulary_eval_ns:
        reward, traversal = evaluate(run.theta, m, ModelSpec(n_isolated=preset.vocabulary - 2 * m))
        out["reward"][m], out["traversal_prob"][m], out["reward_final"][m] = reward, traversal, float(reward[-1])
    return out


def check(data: dict) -> list[str]:
    """Trained at the first n to the last snapshot: reward >= level at the claim's n; the vocabulary runs too."""
    preset = data["preset"]
    final = data["trained"][str(preset["train_ns"][0])]["reward_final"]
    isolated = data["isolated"]["reward_final"]
    return claim_failures(
        {
            f"trained at n = {preset['train_ns'][0]}: J >= {preset['level']} at n = {m}": final[str(m)] >= preset["level"]
            for m in preset["claim_ns"]
        }
        | {
            f"vocabulary {preset['vocabulary']}: J >= {preset['level']} at n = {m}": r >= preset["level"]
            for m, r in isolated.items()
        }
    )


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, 3, width=4.4, height=3.6)
    for p, n_train in enumerate(preset.train_ns):
        rewards = np.asarray(data["trained"][str(n_train)]["reward"], dtype=float)
        ax = axes[0, p]
        for j, t in enumerate(preset.snapshots):
            ax.plot(preset.eval_ns, 1.0 - rewards[j], marker="o", ms=3, color=color(j), label=f"t = {t:g}")
        ax.axvline(n_train, color="0.5", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="evaluation chain length n (uniform starts)",
            ylabel="loss 1 − J at evaluation n",
            title=f"trained at n = {n_train}",
        )
        ax.set_xticks(preset.eval_ns, [str(m) for m in preset.eval_ns], minor=False)
        ax.minorticks_off()
        ax.legend(loc="lower right", title="training time")
    if len(preset.train_ns) == 1:
        axes[0, 1].set_axis_off()
    _draw_isolated(axes[0, 2], data["isolated"], preset)
    for ax, letter in zip(axes.flat, "abc"):
        panel_label(ax, letter)
    fig.suptitle(
        f"Out of distribution: parameters learned on short chains (θ0 = {format_theta(preset.theta0)}), evaluated on longer ones"
    )
    return fig


def _draw_isolated(ax, isolated: dict, preset: Preset) -> None:
    ts = np.asarray(isolated["ts"], dtype=float)
    keep = ts > 0
    for j, m in enumerate(preset.vocabulary_eval_ns):
        reward, traversal = (np.asarray(isolated[k][str(m)], dtype=float) for k in ("reward", "traversal_prob"))
        ax.plot(ts[keep], reward[keep], color=color(j), label=f"evaluate n = {m} (J)")
        ax.plot(ts[keep], traversal[keep], color=color(j), ls="--", lw=1.0, label=f"n = {m}, exact traversal")
    evals = ", ".join(str(m) for m in preset.vocabulary_eval_ns)
    ax.set(
        xscale="log",
        xlabel=TIME_LABEL + f", training at n = {preset.vocabulary_train_n}",
        ylabel="reward / traversal probability",
        ylim=(0, 1.02),
        title=f"paper's setting: {preset.vocabulary}-vertex vocabulary\n"
        f"(trained at n = {preset.vocabulary_train_n}, evaluated at n = {evals})",
    )
    ax.legend(loc="lower right", ncol=1)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
