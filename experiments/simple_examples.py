"""Figure `simple_examples`: simple examples are needed (the authors' n = 5 experiment).

Training is uniform over the k hardest starts (``ChainTask.k_hardest(5, k)``, k = 1..4; only k = 4
holds the one-step start d = 1); every curve is the reward on the hardest start alone,
``same_side_probability(theta, task, model)[-1]``, along the closed-form gradient flow (no cap), with
sampled REINFORCE (plain SGD, t = lr * step, mean +- std over seeds) overlaid.  The authors' own
setting (cap n + 1, self-loops, Adam) is the figure `authors_setting`.  Two starts: near theta = 0
(the authors' initialisation, where starts with d >= 2 carry no gradient at all) and the theory's
base model theta0 = (0.3, 0, 0), which already prefers forward steps, so that even k = 1 learns.
Regenerate: ``gradflow figures simple_examples``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, same_side_probability
from gradflow._series import first_crossing
from gradflow.flow import FlowParams, simulate_many
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
from gradflow.training import train

NAME = "simple_examples"
BASE = tuple(float(x) for x in default_theta0().as_array()[:3])


@dataclass(frozen=True)
class Preset:
    """The flow to ``horizon`` (``saves`` log-spaced times) from each start of ``starts``, training on the
    k hardest starts of n; sampled REINFORCE + SGD (lr, steps, batch, seeds) from ``claim_start``; the
    claim: k = 1 stays below ``low`` while k = 4 passes ``high`` by the horizon."""

    horizon: float
    saves: int
    seeds: int
    batch: int
    steps: int
    lr: float = 0.1
    n: int = 5
    ks: tuple[int, ...] = (1, 2, 3, 4)
    starts: tuple[tuple[str, tuple[float, float, float]], ...] = (("near zero (authors)", (0.01, 0.0, 0.0)), ("base model", BASE))
    claim_start: str = "near zero (authors)"
    low: float = 0.6
    high: float = 0.9


QUICK = Preset(horizon=1e3, saves=120, seeds=2, batch=32, steps=20)
FULL = Preset(horizon=1e3, saves=400, seeds=3, batch=1000, steps=200)


@jax.jit
def _hardest_reward(thetas, task: ChainTask, model: ModelSpec):
    return jax.vmap(lambda x: same_side_probability(Theta.from_array(x), task, model)[-1])(thetas)


def hardest_reward(thetas: np.ndarray, n: int, model: ModelSpec) -> np.ndarray:
    """Same-side probability of the hardest start (d = n-1) at each theta (rows of ``thetas``)."""
    return np.asarray(_hardest_reward(jnp.nan_to_num(jnp.asarray(thetas)), ChainTask.hardest(n), model))


def compute(preset: Preset) -> dict:
    """The hardest-start reward along the flow per start and k, and of sampled REINFORCE from the claim's start."""
    model = ModelSpec()
    ts = log_times(preset.horizon, preset.saves, t_min=1e-2)
    starts = dict(preset.starts)
    configs = [
        FlowParams(ChainTask.k_hardest(preset.n, k), model, Theta(*theta0), t1=preset.horizon, save_ts=ts)
        for theta0 in starts.values()
        for k in preset.ks
    ]
    runs = iter(simulate_many(configs))
    flow = {}
    for name in starts:
        flow[name] = {}
        for k in preset.ks:
            traj = next(runs)
            h = hardest_reward(traj.theta, preset.n, model)
            flow[name][k] = {
                "ts": traj.ts,
                "hardest_reward": h,
                "t_hit_0.9": first_crossing(traj.ts, h, preset.high),
                "max_reward": float(np.nanmax(h)),
                "final_reward": float(h[-1]),
            }
    return {
        "n": preset.n,
        "ks": preset.ks,
        "horizon": preset.horizon,
        "starts": starts,
        "flow": flow,
        "sampled": _sampled(preset, starts[preset.claim_start], model),
        "sampling": {"optimizer": "sgd", "lr": preset.lr, "steps": preset.steps, "batch": preset.batch, "seeds": preset.seeds},
        "t_hit_0.9": {name: {k: flow[name][k]["t_hit_0.9"] for k in preset.ks} for name in starts},
    }


def _sampled(preset: Preset, theta0, model: ModelSpec) -> dict:
    """REINFORCE (SGD, reduced parameters) per k: mean and std over seeds of the hardest-start reward."""
    out = {}
    keys = jax.random.split(jax.random.PRNGKey(0), preset.seeds)
    for k in preset.ks:
        params = FlowParams(ChainTask.k_hardest(preset.n, k), model, Theta(*theta0))
        runs = [train(params, preset.lr, preset.steps, preset.batch, key, optimizer="sgd") for key in keys]
        rewards = np.stack([hardest_reward(np.asarray(r.theta), preset.n, model) for r in runs])
        mean, std = rewards.mean(axis=0), rewards.std(axis=0)
        out[k] = {"ts": runs[0].ts, "mean": mean, "std": std, "final_mean": float(mean[-1]), "per_seed_final": rewards[:, -1]}
    return out


def check(data: dict) -> list[str]:
    """From the claim's start: k = 1 stays below ``low``, k = 4 passes ``high``, and more simple starts learn sooner."""
    preset = data["preset"]
    flow = data["flow"][preset["claim_start"]]
    hits = [flow[str(k)]["t_hit_0.9"] for k in preset["ks"]]
    return claim_failures(
        {
            f"k = 1 stays below {preset['low']} through the horizon": flow["1"]["max_reward"] < preset["low"],
            f"k = 4 passes {preset['high']} by the horizon": flow["4"]["final_reward"] > preset["high"],
            "k = 4 learns before k = 3 before k = 2 (k = 1 never)": hits[0] is None
            and None not in hits[1:]
            and hits[3] < hits[2] < hits[1],
        }
    )


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, len(preset.starts), width=5.0, height=3.8, sharey=True)
    for s, (name, theta0) in enumerate(preset.starts):
        ax = axes[0, s]
        for j, k in enumerate(preset.ks):
            run = data["flow"][name][str(k)]
            ts, h = np.asarray(run["ts"], dtype=float), np.asarray(run["hardest_reward"], dtype=float)
            ax.plot(ts[1:], h[1:], color=color(j), label=f"k = {k}" + (" (hardest only)" if k == 1 else ""))
        if name == preset.claim_start:
            _draw_sampled(ax, data["sampled"], preset)
        ax.axhline(preset.high, color="0.5", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            xlabel=TIME_LABEL,
            ylim=(0.45, 1.02),
            xlim=(1e-2, preset.horizon),
            title=f"{name}: θ0 = (α, β, γ) = {format_theta(theta0)}",
        )
        panel_label(ax, "ab"[s])
    axes[0, 0].set_ylabel(f"reward on the hardest start (d = {preset.n - 1})")
    axes[0, 0].legend(loc="upper left", title=f"train on the k hardest starts, n = {preset.n}")
    axes[0, -1].legend(loc="upper left", title="closed-form flow")
    fig.suptitle(
        f"Simple examples are needed: only k = {preset.n - 1} holds the one-step start d = 1 "
        "(lines: flow; bands: REINFORCE mean ± std)"
    )
    return fig


def _draw_sampled(ax, sampled: dict, preset: Preset) -> None:
    for j, k in enumerate(preset.ks):
        run = sampled[str(k)]
        ts, mean, std = (np.asarray(run[key], dtype=float)[1:] for key in ("ts", "mean", "std"))
        ax.fill_between(ts, np.clip(mean - std, 0.0, 1.0), np.clip(mean + std, 0.0, 1.0), color=color(j), alpha=0.2, lw=0)
        ax.plot(ts, mean, color=color(j), lw=0.8, ls="--")
    ax.axvline(preset.lr * preset.steps, color="0.3", lw=0.8, ls="-.")
    ax.plot([], [], color="0.3", lw=0.8, ls="--", label=f"REINFORCE (SGD, lr {preset.lr:g}, batch {preset.batch}) ± std")
    ax.plot([], [], color="0.3", lw=0.8, ls="-.", label=f"end of REINFORCE ({preset.steps} steps)")


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, default=None, help=f"last flow time plotted (default {FULL.horizon:g})")
    parser.add_argument("--seeds", type=int, default=None, help=f"REINFORCE seeds (default {FULL.seeds}; quick {QUICK.seeds})")
    parser.add_argument("--batch", type=int, default=None, help=f"rollouts per step (default {FULL.batch}; quick {QUICK.batch})")
    parser.add_argument("--lr", type=float, default=None, help=f"REINFORCE SGD step size (default {FULL.lr:g})")
    parser.add_argument("--steps", type=int, default=None, help=f"REINFORCE steps (default {FULL.steps}; quick {QUICK.steps})")
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
