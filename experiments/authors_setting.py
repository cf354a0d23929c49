"""Figure `authors_setting`: the authors' simple-examples experiment in their own setting, exactly.

n = 5, training uniform on the k hardest starts (k = 1..4; only k = 4 holds d = 1), rollouts capped
at max_len = n + 1 = 6 tokens (no terminal within the cap: reward 0), self-loops allowed, linear
attention, tau = 0.2, theta0 = 0, Adam with lr 1e-2 on the exact gradient of the capped reward
(``gradflow.training.gradient_descent``), with sampled REINFORCE + Adam (same cap, leave-one-out
baseline, 3 seeds, mean +- std) overlaid.  Panels by Adam step: (a) reward on the hardest start
(d = 4, the authors' test); (b) probability that a rollout from the hardest start writes any terminal
within the cap; (c) greedy decoding on the hardest start under both tie rules ("first"/"last",
``gradflow.greedy``): where they differ, a tie decides the greedy answer; (d) alpha, beta, gamma.

What gradflow predicts.  At theta = 0 every start is a coin flip between the two terminals and, for
d >= 2, the capped gradient only raises P(some terminal within the cap) (it lowers gamma most: the
terminals have degree 1, so a smaller gamma favours jumping to them); it carries no information about
*which* terminal.  k = 1, 2, 3 (no d = 1 start) therefore learn to jump to a terminal at once (alpha,
beta, gamma all fall, reach -> 1) and their reward on the hardest start stalls just below 1/2 (the
authors: 48-53%); their greedy path jumps to a degree-1 vertex chosen by an exact tie, so greedy
"accuracy" there is an artefact of the tie rule.  k = 4 holds d = 1, which alone tells the terminals
apart, and learns forward traversal with alpha > gamma > 0 > beta (the authors' learned A: +1.38,
+0.05, -0.88): the cap makes the forward step beat the self-loop (gamma > beta).
Regenerate: ``gradflow figures authors_setting``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta
from gradflow.flow import FlowParams
from gradflow.greedy import greedy_per_start
from gradflow.plotting import claim_failures, color, experiment_parser, format_theta, panel_label, run_experiment, subplots
from gradflow.training import gradient_descent, train

NAME = "authors_setting"
PARAMS = ("alpha", "beta", "gamma")


@dataclass(frozen=True)
class Preset:
    """The authors' setting: n, training on the k hardest starts (ks), cap n + 1, self-loops, linear
    attention at temperature tau, theta0; exact-gradient Adam (lr, steps); sampled REINFORCE + Adam with
    ``batch`` rollouts per step and ``seeds`` seeds (its claim checked when ``check_sampled``)."""

    steps: int
    batch: int
    check_sampled: bool
    seeds: int = 3
    n: int = 5
    ks: tuple[int, ...] = (1, 2, 3, 4)
    lr: float = 1e-2
    tau: float = 0.2
    theta0: tuple[float, float, float] = (0.0, 0.0, 0.0)
    report_steps: tuple[int, ...] = (200, 1000)


QUICK = Preset(steps=300, batch=200, check_sampled=False)
FULL = Preset(steps=1000, batch=5000, check_sampled=True)  # sampling noise is small at batch 5000


def model_spec(preset: Preset) -> ModelSpec:
    return ModelSpec(attention="linear", tau=preset.tau, mask_self=False, max_len=preset.n + 1)


def greedy_hardest(thetas: np.ndarray, task: ChainTask, model: ModelSpec, tie_break: str) -> dict:
    """Greedy correct / reached / tied on the hardest start at each theta (rows of ``thetas``)."""
    fn = jax.jit(jax.vmap(lambda x: greedy_per_start(Theta.from_array(x), task, model, tie_break=tie_break)))
    per = jax.device_get(fn(jnp.asarray(thetas)))
    return {
        "correct": per.correct[:, -1].astype(float),
        "reached": per.reached[:, -1].astype(float),
        "tied": per.tied[:, -1].astype(float),
    }


def compute(preset: Preset) -> dict:
    """Per k: exact-gradient Adam (hardest-start reward and reach, greedy under both tie rules, theta) and
    sampled REINFORCE + Adam (mean and std over seeds)."""
    model = model_spec(preset)
    keys = jax.random.split(jax.random.PRNGKey(0), preset.seeds)
    exact, sampled = {}, {}
    for k in preset.ks:
        params = FlowParams(ChainTask.k_hardest(preset.n, k), model, Theta(*preset.theta0))
        run = gradient_descent(params, preset.lr, preset.steps, optimizer="adam")
        hardest, reach = run.success_per_start[:, -1], run.reach_per_start[:, -1]
        greedy = {rule: greedy_hardest(run.theta, params.task, model, rule) for rule in ("first", "last")}
        exact[k] = {
            "hardest_reward": hardest,
            "hardest_reach": reach,
            "reward": run.reward,
            "reach": run.reach_probability,
            "theta": run.theta[:, :3],
            "greedy_hardest": greedy,
            "greedy_accuracy": run.greedy_accuracy,
            "greedy_conditional_accuracy": run.greedy_conditional_accuracy,
            "greedy_reach_rate": run.greedy_reach_rate,
            "greedy_traversal_accuracy": run.greedy_traversal_accuracy,
            "theta_at": {s: run.theta[s, :3] for s in preset.report_steps if s <= preset.steps},
            "final": {
                "theta": run.theta[-1, :3],
                "hardest_reward": float(hardest[-1]),
                "hardest_reach": float(reach[-1]),
                "greedy_first": float(greedy["first"]["correct"][-1]),
                "greedy_last": float(greedy["last"]["correct"][-1]),
                "greedy_tied": bool(greedy["first"]["tied"][-1]),
            },
        }
        runs = [train(params, preset.lr, preset.steps, preset.batch, key, optimizer="adam") for key in keys]
        h = np.stack([r.success_per_start[:, -1] for r in runs])
        sampled[k] = {
            "hardest_reward_mean": h.mean(0),
            "hardest_reward_std": h.std(0),
            "theta_mean": np.mean([r.theta[:, :3] for r in runs], axis=0),
            "final_hardest_reward": h[:, -1],
            "final_theta": [r.theta[-1, :3] for r in runs],
        }
        final = exact[k]["final"]
        print(
            f"{NAME}: k={k}: theta {np.round(final['theta'], 3).tolist()}, hardest {final['hardest_reward']:.4f}, "
            f"reach {final['hardest_reach']:.4f}, sampled hardest {h[:, -1].mean():.4f}"
        )
    return {
        "n": preset.n,
        "ks": preset.ks,
        "lr": preset.lr,
        "steps": preset.steps,
        "max_len": preset.n + 1,
        "tau": preset.tau,
        "theta0": preset.theta0,
        "sampling": {"optimizer": "adam", "lr": preset.lr, "batch": preset.batch, "seeds": preset.seeds},
        "exact": exact,
        "sampled": sampled,
        "sampled_final_hardest_reward": {k: float(np.mean(sampled[k]["final_hardest_reward"])) for k in preset.ks},
    }


def check(data: dict) -> list[str]:
    """k < n - 1 (no d = 1 start): the hardest-start reward never exceeds 0.55 and ends in [0.45, 0.55] while reach
    passes 0.95 and alpha < 0 (they learn to jump to a terminal); k = n - 1: hardest-start reward > 0.9 with
    alpha > gamma > 0 > beta; with ``check_sampled``, sampled REINFORCE agrees (< 0.6 and > 0.8)."""
    preset, exact = data["preset"], data["exact"]
    *without, full = (str(k) for k in preset["ks"])
    finals = {k: exact[k]["final"] for k in exact}
    alpha, beta, gamma = finals[full]["theta"]
    conditions = {
        f"k = {k}: hardest-start reward <= 0.55 throughout, in [0.45, 0.55] at the end, reach > 0.95, alpha < 0": bool(
            np.all(np.asarray(exact[k]["hardest_reward"]) <= 0.55)
            and 0.45 <= finals[k]["hardest_reward"]
            and finals[k]["hardest_reach"] > 0.95
            and finals[k]["theta"][0] < 0
        )
        for k in without
    }
    conditions[f"k = {full}: hardest-start reward > 0.9, alpha > gamma > 0 > beta"] = (
        finals[full]["hardest_reward"] > 0.9 and alpha > gamma > 0 > beta
    )
    if preset["check_sampled"]:
        sampled = data["sampled_final_hardest_reward"]
        conditions["sampled: k without d = 1 end below 0.6, k with it above 0.8"] = (
            all(sampled[k] < 0.6 for k in without) and sampled[full] > 0.8
        )
    return claim_failures(conditions)


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, 4, width=4.0, height=3.4)
    ax_r, ax_reach, ax_greedy, ax_theta = axes[0]
    step_axis = np.arange(preset.steps + 1)
    for j, k in enumerate(preset.ks):
        run, c = data["exact"][str(k)], color(j)
        ax_r.plot(
            step_axis,
            np.asarray(run["hardest_reward"], dtype=float),
            color=c,
            label=f"k = {k}" + (" (hardest only)" if k == 1 else ""),
        )
        ax_reach.plot(step_axis, np.asarray(run["hardest_reach"], dtype=float), color=c)
        ax_greedy.plot(step_axis, np.asarray(run["greedy_hardest"]["first"]["correct"]) + 0.02 * j, color=c, ls="-")
        ax_greedy.plot(step_axis, np.asarray(run["greedy_hardest"]["last"]["correct"]) - 0.02 * j, color=c, ls=":")
        theta = np.asarray(run["theta"], dtype=float)
        for i, ls in enumerate(("-", "--", ":")):
            ax_theta.plot(step_axis, theta[:, i], color=c, ls=ls)
        m, sd = (np.asarray(data["sampled"][str(k)][key], dtype=float) for key in ("hardest_reward_mean", "hardest_reward_std"))
        ax_r.plot(step_axis, m, color=c, ls="--", lw=0.9)
        ax_r.fill_between(step_axis, np.clip(m - sd, 0, 1), np.clip(m + sd, 0, 1), color=c, alpha=0.2, lw=0)

    label = f"REINFORCE + Adam, batch {preset.batch} (± std, {preset.seeds} seeds)"
    ax_r.plot([], [], color="0.3", ls="--", lw=0.9, label=label)
    ax_r.axhline(0.5, color="0.5", lw=0.8, ls=":")
    ax_r.set(
        xlabel="Adam step",
        ylabel=f"reward on the hardest start (d = {preset.n - 1})",
        ylim=(0, 1.02),
        title=f"exact-gradient Adam (lr {preset.lr:g}), cap {preset.n + 1}",
    )
    ax_r.legend(loc="lower right", fontsize=6.5)
    ax_reach.set(
        xlabel="Adam step", ylabel="P(any terminal within the cap)", ylim=(0, 1.02), title="reach, hardest start (exact)"
    )
    ax_greedy.plot([], [], color="0.3", ls="-", label='tie rule "first"')
    ax_greedy.plot([], [], color="0.3", ls=":", label='tie rule "last"')
    ax_greedy.set(
        xlabel="Adam step",
        ylabel="greedy answer correct, hardest start",
        ylim=(-0.1, 1.1),
        title="greedy (rules differ: a tie decides)",
    )
    ax_greedy.legend(loc="center right", fontsize=7)
    for name, ls in zip(PARAMS, ("-", "--", ":")):
        ax_theta.plot([], [], color="0.3", ls=ls, label=f"$\\{name}$")
    ax_theta.set(xlabel="Adam step", ylabel="attention score", title="circuit (colour: k)")
    ax_theta.legend(loc="lower left", fontsize=7)
    for ax, letter in zip(axes.flat, "abcd"):
        panel_label(ax, letter)
    fig.suptitle(
        f"The authors' setting (n = {preset.n}, k hardest starts, cap n + 1, self-loops, θ0 = {format_theta(preset.theta0)}): "
        "without d = 1 the capped reward teaches reaching a terminal, not which"
    )
    return fig


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help=f"Adam steps (default {FULL.steps}; quick {QUICK.steps})")
    parser.add_argument("--seeds", type=int, default=None, help=f"REINFORCE seeds (default {FULL.seeds})")
    parser.add_argument(
        "--batch", type=int, default=None, help=f"rollouts per REINFORCE step (default {FULL.batch}; quick {QUICK.batch})"
    )
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
