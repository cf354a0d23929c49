"""Figure `ood`: out-of-distribution length generalisation of the learned forward traversal.

Parameters learned by the flow on short chains (n = 4, and n = 8; uniform starts) are frozen at
several training times and evaluated, in closed form, on chains of n = 4..64 (uniform starts).  The
last panel is the paper's vocabulary setting: trained at n = 4 inside a 24-vertex vocabulary (16
isolated vertices, ``ModelSpec(n_isolated=16)``), evaluated at n = 4, 8, 12 in the same vocabulary
(24 - 2n isolated vertices).  Regenerate: ``gradflow figures ood``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, expected_reward, traversal_probability
from gradflow.flow import FlowParams, simulate
from gradflow.model import default_theta0
from gradflow.plotting import (
    TIME_LABEL,
    color,
    experiment_parser,
    log_times,
    panel_label,
    save_figure,
    subplots,
    use_headless_backend,
)

NAME = "ood"
VOCABULARY = 24
SNAPSHOTS = (1.0, 3.0, 10.0, 100.0, 1e4)


@jax.jit
def _reward_and_traversal(thetas, task: ChainTask, model: ModelSpec):
    both = lambda x: (expected_reward(Theta.from_array(x), task, model), traversal_probability(Theta.from_array(x), task, model))
    return jax.vmap(both)(thetas)


def evaluate(thetas: np.ndarray, n: int, model: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(reward J, exact-traversal probability) on uniform starts at chain length n, per row of thetas."""
    reward, traversal = _reward_and_traversal(jnp.asarray(thetas), ChainTask.uniform(n), model)
    return np.asarray(reward), np.asarray(traversal)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    train_ns = (4,) if args.quick else (4, 8)
    eval_ns = (4, 8, 12) if args.quick else (4, 6, 8, 12, 16, 24, 32, 48, 64)
    t1 = SNAPSHOTS[-1]
    save_ts = np.array((0.0,) + SNAPSHOTS)
    model = ModelSpec()

    fig, axes = subplots(1, 3, width=4.4, height=3.6)
    data = {"snapshots": SNAPSHOTS, "eval_ns": eval_ns, "trained": {}}
    for p, n_train in enumerate(train_ns):
        run = simulate(FlowParams(ChainTask.uniform(n_train), model, default_theta0(), t1=t1, save_ts=save_ts), progress=False)
        thetas = run.theta[1:]
        evaluated = [evaluate(thetas, m, model) for m in eval_ns]
        rewards = np.stack([r for r, _ in evaluated], axis=1)  # (snapshots, eval_ns)
        traversal = np.stack([t for _, t in evaluated], axis=1)
        ax = axes[0, p]
        for j, t in enumerate(SNAPSHOTS):
            ax.plot(eval_ns, 1.0 - rewards[j], marker="o", ms=3, color=color(j), label=f"t = {t:g}")
        ax.axvline(n_train, color="0.5", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="evaluation chain length n (uniform starts)",
            ylabel="loss 1 − J at evaluation n",
            title=f"trained at n = {n_train}",
        )
        ax.set_xticks(eval_ns, [str(m) for m in eval_ns], minor=False)
        ax.minorticks_off()
        ax.legend(loc="lower right", title="training time")
        data["trained"][n_train] = {
            "theta": thetas[:, :3],
            "reward": rewards,
            "traversal_prob": traversal,
            "reward_final": dict(zip(eval_ns, rewards[-1])),
        }

    data["isolated"] = _isolated(axes[0, 2], args.quick)
    for ax, letter in zip(axes.flat, "abc"):
        panel_label(ax, letter)
    if len(train_ns) == 1:
        axes[0, 1].set_axis_off()
    fig.suptitle("Out of distribution: parameters learned on short chains, evaluated on longer ones")
    final = data["trained"][4]["reward_final"]
    data["claim"] = {
        "statement": "parameters trained at n = 4 (t = 1e4) reach reward >= 0.99 at n = 8 and 12",
        "reward_n8": final[8],
        "reward_n12": final[12],
        "holds": bool(final[8] >= 0.99 and final[12] >= 0.99),
        "isolated_final": data["isolated"]["reward_final"],
    }
    print(f"{NAME}: trained at n=4, t=1e4: " + ", ".join(f"J(n={m})={r:.5f}" for m, r in final.items()))
    save_figure(fig, NAME, args.out, data)
    return data


def _isolated(ax, quick: bool) -> dict:
    """Train at n = 4 with 16 isolated vertices; reward at n = 4, 8, 12 in the 24-vertex vocabulary."""
    ts = log_times(1e4, 60 if quick else 200, t_min=1e-2)
    train_model = ModelSpec(n_isolated=VOCABULARY - 8)
    run = simulate(FlowParams(ChainTask.uniform(4), train_model, default_theta0(), t1=ts[-1], save_ts=ts), progress=False)
    keep = ts > 0
    out = {"ts": ts, "reward": {}, "traversal_prob": {}, "reward_final": {}}
    for j, m in enumerate((4, 8, 12)):
        model = ModelSpec(n_isolated=VOCABULARY - 2 * m)
        reward, traversal = evaluate(run.theta, m, model)
        ax.plot(ts[keep], reward[keep], color=color(j), label=f"evaluate n = {m} (J)")
        ax.plot(ts[keep], traversal[keep], color=color(j), ls="--", lw=1.0, label=f"n = {m}, exact traversal")
        out["reward"][m], out["traversal_prob"][m], out["reward_final"][m] = reward, traversal, float(reward[-1])
    ax.set(
        xscale="log",
        xlabel=TIME_LABEL + ", training at n = 4",
        ylabel="reward / traversal probability",
        ylim=(0, 1.02),
        title=f"paper's setting: {VOCABULARY}-vertex vocabulary\n(trained at n = 4, evaluated at n = 4, 8, 12)",
    )
    ax.legend(loc="lower right", ncol=1)
    return out


if __name__ == "__main__":
    use_headless_backend()
    main()
