"""Figure `lazy_walk`: what self-loops do.  The same flow read with and without the self mask.

A self-loop never changes which terminal is reached, so the reward, its gradient and hence the flow
are identical with ``ModelSpec(mask_self=True)`` (default: the walk moves every step) and
``mask_self=False``.  The chain-of-thought length is not: staying at a_i has logit alpha + beta,
moving forward alpha + gamma, so with gamma -> -infinity the walk lingers e^{(beta - gamma)/tau}
times per forward step and the expected length grows without bound while the reward goes to 1.
Regenerate: ``gradflow figures lazy_walk``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, step_probabilities
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

NAME = "lazy_walk"


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="vertices per chain (default 8)")
    parser.add_argument("--t1", type=float, default=None, help="last flow time (default 1e6; quick 1e3)")
    args = parser.parse_args(argv)
    t1 = args.t1 or (1e3 if args.quick else 1e6)
    task = ChainTask.uniform(args.n)
    variants = {"self masked (default)": ModelSpec(mask_self=True), "self-loops allowed": ModelSpec(mask_self=False)}
    runs = {
        name: simulate(FlowParams(task, model, default_theta0(), t1=t1, save_ts=log_times(t1, 300, t_min=1e-2)), progress=False)
        for name, model in variants.items()
    }
    masked, lazy = runs.values()
    ts = masked.ts
    keep = ts > 0
    middle = args.n // 2
    probs = jax.jit(jax.vmap(lambda x: step_probabilities(Theta.from_array(x), task, variants["self-loops allowed"])))
    steps = probs(jnp.asarray(lazy.theta))
    p_self, p_fwd = np.asarray(steps.stay)[:, middle - 1], np.asarray(steps.forward)[:, middle - 1]

    theta_gap = float(np.nanmax(np.abs(masked.theta - lazy.theta)))
    reward_gap = float(np.nanmax(np.abs(masked.reward - lazy.reward)))
    fig, axes = subplots(1, 3, width=4.3, height=3.5)
    ax_r, ax_len, ax_p = axes[0]
    for j, (name, run) in enumerate(runs.items()):
        style = dict(color=color(j), ls="-" if j == 0 else "--")
        ax_r.plot(ts[keep], run.reward[keep], label=name, **style)
        ax_len.plot(ts[keep], run.expected_length[keep], label=name, **style)
    ax_r.set(xscale="log", xlabel=TIME_LABEL, ylabel="reward J", title="reward: identical", ylim=(0.45, 1.02))
    ax_r.legend(loc="lower right", title=f"max |ΔJ| = {reward_gap:.1e}")
    ax_len.axhline(masked.minimal_length, color="k", lw=1, ls=":", label=f"minimal = {masked.minimal_length:.1f}")
    ax_len.set(
        xscale="log", yscale="log", xlabel=TIME_LABEL, ylabel="expected tokens until a terminal", title="chain-of-thought length"
    )
    ax_len.legend(loc="upper left")
    ax_p.plot(ts[keep], p_self[keep], color=color(1), label=rf"stay at $a_{{{middle}}}$ (self-loop)")
    ax_p.plot(ts[keep], p_fwd[keep], color=color(2), label=rf"forward $a_{{{middle}}} \to a_{{{middle + 1}}}$")
    ax_p.plot(ts[keep], 1.0 - p_self[keep] - p_fwd[keep], color=color(3), ls="-.", label="anything else")
    ax_p.set(xscale="log", xlabel=TIME_LABEL, ylabel="next-vertex probability", ylim=(0, 1), title="self-loops allowed: one step")
    ax_p.legend(loc="center right")
    for ax, letter in zip(axes.flat, "abc"):
        panel_label(ax, letter)
    fig.suptitle(f"Lazy walk: the same flow read with and without the self mask (n = {args.n}, uniform starts)")

    data = {
        "n": args.n,
        "t1": t1,
        "ts": ts,
        "reward": {name: run.reward for name, run in runs.items()},
        "expected_length": {name: run.expected_length for name, run in runs.items()},
        "theta_masked": masked.theta[:, :3],
        "p_self_middle": p_self,
        "p_forward_middle": p_fwd,
        "minimal_length": masked.minimal_length,
        "max_abs_theta_difference": theta_gap,
        "max_abs_reward_difference": reward_gap,
        "final": {
            "reward_masked": float(masked.reward[-1]),
            "reward_self_loops": float(lazy.reward[-1]),
            "length_masked": float(masked.expected_length[-1]),
            "length_self_loops": float(lazy.expected_length[-1]),
        },
    }
    print(
        f"{NAME}: max |d theta| = {theta_gap:.2e}, max |d J| = {reward_gap:.2e}, final length "
        f"{data['final']['length_masked']:.3f} (masked) vs {data['final']['length_self_loops']:.3f} (self-loops)"
    )
    save_figure(fig, NAME, args.out, data)
    return data


if __name__ == "__main__":
    use_headless_backend()
    main()
