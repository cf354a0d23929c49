"""Figure `lazy_walk`: what self-loops do.  The same flow read with and without the self mask.

A self-loop never changes which terminal is reached, so the reward, its gradient and hence the flow
are identical with ``ModelSpec(mask_self=True)`` (default: the walk moves every step) and
``mask_self=False``.  The chain-of-thought length is not: staying at a_i has logit alpha + beta,
moving forward alpha + gamma, so with gamma -> -infinity the walk lingers e^{(beta - gamma)/tau}
times per forward step and the expected length grows without bound while the reward goes to 1.
Regenerate: ``gradflow figures lazy_walk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, step_probabilities
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

NAME = "lazy_walk"
VARIANTS = {"self masked (default)": True, "self-loops allowed": False}  # name -> ModelSpec.mask_self


@dataclass(frozen=True)
class Preset:
    """n: vertices per chain (uniform starts); t1: last flow time (``saves`` log-spaced times); the claim:
    |J masked - J self-loops| < reward_tolerance and the final length with self-loops above length_ratio x masked."""

    t1: float
    n: int = 8
    saves: int = 300
    reward_tolerance: float = 1e-6
    length_ratio: float = 2.0
    theta0: tuple[float, float, float] = tuple(float(x) for x in default_theta0().as_array()[:3])


QUICK = Preset(t1=1e3)
FULL = Preset(t1=1e6)


def compute(preset: Preset) -> dict:
    """Both flows' reward and length; one-step probabilities at the middle vertex with self-loops allowed."""
    task = ChainTask.uniform(preset.n)
    save_ts = log_times(preset.t1, preset.saves, t_min=1e-2)
    runs = {
        name: simulate(FlowParams(task, ModelSpec(mask_self=mask), Theta(*preset.theta0), t1=preset.t1, save_ts=save_ts))
        for name, mask in VARIANTS.items()
    }
    masked, lazy = runs.values()
    middle = preset.n // 2
    probs = jax.jit(jax.vmap(lambda x: step_probabilities(Theta.from_array(x), task, lazy.config.model)))
    steps = probs(jnp.asarray(lazy.theta))
    theta_gap = float(np.nanmax(np.abs(masked.theta - lazy.theta)))
    reward_gap = float(np.nanmax(np.abs(masked.reward - lazy.reward)))
    final = {
        "reward_masked": float(masked.reward[-1]),
        "reward_self_loops": float(lazy.reward[-1]),
        "length_masked": float(masked.expected_length[-1]),
        "length_self_loops": float(lazy.expected_length[-1]),
    }
    print(
        f"{NAME}: max |d theta| = {theta_gap:.2e}, max |d J| = {reward_gap:.2e}, final length "
        f"{final['length_masked']:.3f} (masked) vs {final['length_self_loops']:.3f} (self-loops)"
    )
    return {
        "n": preset.n,
        "t1": preset.t1,
        "ts": masked.ts,
        "reward": {name: run.reward for name, run in runs.items()},
        "expected_length": {name: run.expected_length for name, run in runs.items()},
        "theta_masked": masked.theta[:, :3],
        "middle": middle,
        "p_self_middle": np.asarray(steps.stay)[:, middle - 1],
        "p_forward_middle": np.asarray(steps.forward)[:, middle - 1],
        "minimal_length": masked.minimal_length,
        "max_abs_theta_difference": theta_gap,
        "max_abs_reward_difference": reward_gap,
        "final": final,
    }


def check(data: dict) -> list[str]:
    """The same flow, the same reward; self-loops make the final walk longer than ``length_ratio`` x the masked one."""
    preset, lengths = data["preset"], data["expected_length"]
    masked, lazy = (np.asarray(data["reward"][name], dtype=float) for name in VARIANTS)
    return claim_failures(
        {
            f"|J masked - J self-loops| < {preset['reward_tolerance']:g} at every save": np.nanmax(np.abs(masked - lazy))
            < preset["reward_tolerance"],
            f"final length with self-loops > {preset['length_ratio']:g} x masked": lengths["self-loops allowed"][-1]
            > preset["length_ratio"] * lengths["self masked (default)"][-1],
        }
    )


def draw(data: dict, preset: Preset):
    ts = np.asarray(data["ts"], dtype=float)
    keep = ts > 0
    fig, axes = subplots(1, 3, width=4.3, height=3.5)
    ax_r, ax_len, ax_p = axes[0]
    for j, name in enumerate(VARIANTS):
        style = dict(color=color(j), ls="-" if j == 0 else "--")
        ax_r.plot(ts[keep], np.asarray(data["reward"][name], dtype=float)[keep], label=name, **style)
        ax_len.plot(ts[keep], np.asarray(data["expected_length"][name], dtype=float)[keep], label=name, **style)
    ax_r.set(xscale="log", xlabel=TIME_LABEL, ylabel="reward J", title="reward: identical", ylim=(0.45, 1.02))
    ax_r.legend(loc="lower right", title=f"max |ΔJ| = {data['max_abs_reward_difference']:.1e}")
    minimal = data["minimal_length"]
    ax_len.axhline(minimal, color="k", lw=1, ls=":", label=f"minimal = {minimal:.1f}")
    ax_len.set(
        xscale="log", yscale="log", xlabel=TIME_LABEL, ylabel="expected tokens until a terminal", title="chain-of-thought length"
    )
    ax_len.legend(loc="upper left")
    middle = data["middle"]
    p_self, p_fwd = (np.asarray(data[k], dtype=float)[keep] for k in ("p_self_middle", "p_forward_middle"))
    ax_p.plot(ts[keep], p_self, color=color(1), label=rf"stay at $a_{{{middle}}}$ (self-loop)")
    ax_p.plot(ts[keep], p_fwd, color=color(2), label=rf"forward $a_{{{middle}}} \to a_{{{middle + 1}}}$")
    ax_p.plot(ts[keep], 1.0 - p_self - p_fwd, color=color(3), ls="-.", label="anything else")
    ax_p.set(xscale="log", xlabel=TIME_LABEL, ylabel="next-vertex probability", ylim=(0, 1), title="self-loops allowed: one step")
    ax_p.legend(loc="center right")
    for ax, letter in zip(axes.flat, "abc"):
        panel_label(ax, letter)
    fig.suptitle(
        f"Lazy walk: the same flow read with and without the self mask "
        f"(n = {preset.n}, uniform starts, θ0 = {format_theta(preset.theta0)})"
    )
    return fig


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help=f"vertices per chain (default {FULL.n})")
    parser.add_argument("--t1", type=float, default=None, help=f"last flow time (default {FULL.t1:g}; quick {QUICK.t1:g})")
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
