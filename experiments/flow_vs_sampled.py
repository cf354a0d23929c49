"""Figure `flow_vs_sampled`: the flow, exact gradient descent and sampled REINFORCE on one time axis.

Gradient descent theta_{k+1} = theta_k + lr grad J(theta_k) is the flow sampled at t = lr * k, up to
an O(lr) error; sampled REINFORCE (``gradflow.training.train``, leave-one-out baseline, SGD or Adam,
reduced parameters) adds noise around it.  n = 6, uniform starts, theta0 = (0.3, 0, 0).
Regenerate: ``gradflow figures flow_vs_sampled``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta
from gradflow.flow import FlowParams, simulate
from gradflow.model import default_theta0
from gradflow.plotting import (
    TIME_LABEL,
    claim_failures,
    color,
    experiment_parser,
    format_theta,
    panel_label,
    run_experiment,
    subplots,
)
from gradflow.training import gradient_descent, train

NAME = "flow_vs_sampled"


@dataclass(frozen=True)
class Preset:
    """n: vertices per chain (uniform starts); horizon: last flow time; gd_lrs: gradient-descent step sizes,
    each a multiple of base_lr (exact comparison times); sampled: (name, optimizer, lr) of each REINFORCE
    run, ``seeds`` seeds of ``batch`` rollouts per step; level: the flow's final reward claimed."""

    horizon: float
    seeds: int
    batch: int
    gd_lrs: tuple[float, ...]
    sampled: tuple[tuple[str, str, float], ...]
    n: int = 6
    base_lr: float = 0.05
    level: float = 0.9
    theta0: tuple[float, float, float] = tuple(float(x) for x in default_theta0().as_array()[:3])


QUICK = Preset(
    horizon=4.0,
    seeds=2,
    batch=32,
    gd_lrs=(0.25, 1.0),
    sampled=(("REINFORCE + SGD", "sgd", 0.2), ("REINFORCE + Adam", "adam", 0.2)),
)
FULL = Preset(
    horizon=10.0,
    seeds=3,
    batch=500,
    gd_lrs=(0.05, 0.25, 1.0, 2.0),
    sampled=(("REINFORCE + SGD", "sgd", 0.05), ("REINFORCE + Adam", "adam", 0.05)),
)


def compute(preset: Preset) -> dict:
    """The flow at multiples of base_lr, gradient descent per lr with its max theta error, sampled runs (mean, std)."""
    base = FlowParams(
        ChainTask.uniform(preset.n),
        ModelSpec(),
        Theta(*preset.theta0),
        t1=preset.horizon,
        save_ts=preset.base_lr * np.arange(round(preset.horizon / preset.base_lr) + 1),
    )
    flow = simulate(base, progress=False)
    descent = {}
    for lr in preset.gd_lrs:
        gd = gradient_descent(base, lr, round(preset.horizon / lr))
        ts, theta = np.asarray(gd.ts), np.asarray(gd.theta)
        index = np.round(ts / preset.base_lr).astype(int)
        error = float(np.max(np.abs(theta[:, :3] - flow.theta[index, :3])))
        descent[lr] = {"ts": ts, "reward": gd.reward, "theta": theta[:, :3], "max_theta_error": error}
    errors = [d["max_theta_error"] for d in descent.values()]
    slope = float(np.polyfit(np.log(preset.gd_lrs), np.log(errors), 1)[0])
    sampled = {}
    keys = jax.random.split(jax.random.PRNGKey(0), preset.seeds)
    for name, optimizer, lr in preset.sampled:
        steps = round(preset.horizon / lr)
        runs = [train(base, lr, steps, preset.batch, key, optimizer=optimizer) for key in keys]
        reward = np.stack([np.asarray(r.reward) for r in runs])
        theta = np.stack([np.asarray(r.theta)[:, :3] for r in runs])
        sampled[name] = {
            "optimizer": optimizer,
            "lr": lr,
            "steps": steps,
            "batch": preset.batch,
            "seeds": preset.seeds,
            "ts": runs[0].ts,
            "reward_mean": reward.mean(0),
            "reward_std": reward.std(0),
            "theta_mean": theta.mean(0),
            "theta_std": theta.std(0),
            "final_reward_mean": float(reward[:, -1].mean()),
        }
    print(
        f"{NAME}: GD max |theta error| by lr: {dict(zip(preset.gd_lrs, np.round(errors, 5)))}, slope {slope:.2f}; "
        + ", ".join(f"{k}: final J {v['final_reward_mean']:.4f}" for k, v in sampled.items())
        + f"; flow final J {flow.reward[-1]:.4f}"
    )
    return {
        "n": preset.n,
        "horizon": preset.horizon,
        "flow": {"ts": flow.ts, "reward": flow.reward, "theta": flow.theta[:, :3]},
        "gradient_descent": descent,
        "sampled": sampled,
        "gd_error_slope": slope,
        "gd_errors": dict(zip(preset.gd_lrs, errors)),
    }


def check(data: dict) -> list[str]:
    """Gradient descent converges to the flow as lr -> 0 (the error grows with lr); the flow learns."""
    errors = [gd["max_theta_error"] for _, gd in sorted(data["gradient_descent"].items(), key=lambda kv: float(kv[0]))]
    level = data["preset"]["level"]
    return claim_failures(
        {
            "the max theta error of gradient descent grows with lr": len(errors) >= 2 and bool(np.all(np.diff(errors) > 0)),
            f"the flow's final reward exceeds {level}": data["flow"]["reward"][-1] > level,
        }
    )


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, 3, width=4.4, height=3.6)
    ax_r, ax_p, ax_err = axes[0]
    flow_ts, flow_reward, flow_theta = (np.asarray(data["flow"][k], dtype=float) for k in ("ts", "reward", "theta"))
    keep = flow_ts > 0
    ax_r.plot(flow_ts[keep], flow_reward[keep], color="k", lw=2.4, label="gradient flow", zorder=5)
    for k in (0, 2):
        ax_p.plot(flow_ts[keep], flow_theta[keep, k], color="k", lw=2.4, zorder=5)
    for j, lr in enumerate(preset.gd_lrs):
        gd = data["gradient_descent"][f"{lr}"]
        ts, reward, theta = (np.asarray(gd[k], dtype=float)[1:] for k in ("ts", "reward", "theta"))
        style = dict(color=color((0, 2, 3, 5)[j % 4]), marker="o", ms=2.5, lw=1.0)
        ax_r.plot(ts, reward, label=f"gradient descent, lr = {lr:g}", **style)
        ax_p.plot(ts, theta[:, 0], **style)
        ax_p.plot(ts, theta[:, 2], **style)
    for j, (name, _, lr) in enumerate(preset.sampled):
        run = data["sampled"][name]
        ts = np.asarray(run["ts"], dtype=float)[1:]
        c = color((4, 1)[j % 2])
        m, s = (np.asarray(run[k], dtype=float)[1:] for k in ("reward_mean", "reward_std"))
        ax_r.plot(ts, m, color=c, ls="--", label=f"{name}, lr = {lr:g}, batch {preset.batch} (± std, {preset.seeds} seeds)")
        ax_r.fill_between(ts, np.clip(m - s, 0, 1), np.clip(m + s, 0, 1), color=c, alpha=0.25, lw=0)
        theta_mean, theta_std = (np.asarray(run[k], dtype=float)[1:] for k in ("theta_mean", "theta_std"))
        for k in (0, 2):
            ax_p.plot(ts, theta_mean[:, k], color=c, ls="--")
            ax_p.fill_between(
                ts, theta_mean[:, k] - theta_std[:, k], theta_mean[:, k] + theta_std[:, k], color=c, alpha=0.25, lw=0
            )
    ax_r.set(xscale="log", xlabel=TIME_LABEL, ylabel="reward J (closed form at the current θ)", title="reward")
    ax_r.legend(loc="upper left", fontsize=6.5)
    ax_p.set(xscale="log", xlabel=TIME_LABEL, ylabel="attention score", title=r"$\alpha$ (rising) and $\gamma$ (falling)")
    ax_p.plot([], [], color="k", lw=2.4, label="gradient flow")
    ax_p.legend(loc="upper left")
    lrs = np.asarray(preset.gd_lrs)
    errors = np.asarray([data["gd_errors"][f"{lr}"] for lr in preset.gd_lrs])
    ax_err.loglog(lrs, errors, "o-", color=color(0), label=f"gradient descent (slope {data['gd_error_slope']:.2f})")
    ax_err.loglog(lrs, errors[0] * lrs / lrs[0], ":", color="0.4", label="∝ lr")
    ax_err.set(
        xlabel="step size lr", ylabel=r"max over t of $|\theta_{\rm GD}(t) - \theta_{\rm flow}(t)|$", title="discretisation error"
    )
    ax_err.legend(loc="upper left")
    for ax, letter in zip(axes.flat, "abc"):
        panel_label(ax, letter)
    fig.suptitle(
        f"Flow, gradient descent and sampled REINFORCE on one axis t = lr × step "
        f"(n = {preset.n}, uniform starts, θ0 = {format_theta(preset.theta0)})"
    )
    return fig


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help=f"vertices per chain (default {FULL.n})")
    parser.add_argument(
        "--horizon", type=float, default=None, help=f"last flow time (default {FULL.horizon:g}; quick {QUICK.horizon:g})"
    )
    parser.add_argument("--seeds", type=int, default=None, help=f"REINFORCE seeds (default {FULL.seeds}; quick {QUICK.seeds})")
    parser.add_argument("--batch", type=int, default=None, help=f"rollouts per step (default {FULL.batch}; quick {QUICK.batch})")
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
