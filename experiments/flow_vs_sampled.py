"""Figure `flow_vs_sampled`: the flow, exact gradient descent and sampled REINFORCE on one time axis.

Gradient descent theta_{k+1} = theta_k + lr grad J(theta_k) is the flow sampled at t = lr * k, up to
an O(lr) error; sampled REINFORCE (``gradflow.training.train``, leave-one-out baseline, SGD or Adam,
reduced parameters) adds noise around it.  n = 6, uniform starts, theta0 = (0.3, 0, 0).
Regenerate: ``gradflow figures flow_vs_sampled``.
"""

from __future__ import annotations

import jax
import numpy as np

from gradflow import ChainTask, ModelSpec
from gradflow.flow import FlowParams, simulate
from gradflow.model import default_theta0
from gradflow.plotting import TIME_LABEL, color, experiment_parser, panel_label, save_figure, subplots
from gradflow.training import gradient_descent, train

NAME = "flow_vs_sampled"
BASE_LR = 0.05  # every gradient-descent step size is a multiple of it (exact comparison times)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6, help="vertices per chain (default 6)")
    parser.add_argument("--horizon", type=float, default=None, help="last flow time (default 10; quick 4)")
    parser.add_argument("--seeds", type=int, default=None, help="REINFORCE seeds (default 3; quick 2)")
    parser.add_argument("--batch", type=int, default=None, help="rollouts per step (default 500; quick 32)")
    args = parser.parse_args(argv)
    horizon = args.horizon or (4.0 if args.quick else 10.0)
    seeds = args.seeds or (2 if args.quick else 3)
    batch = args.batch or (32 if args.quick else 500)
    gd_lrs = (0.25, 1.0) if args.quick else (0.05, 0.25, 1.0, 2.0)
    sampled = {"REINFORCE + SGD": ("sgd", 0.05), "REINFORCE + Adam": ("adam", 0.05)}
    if args.quick:
        sampled = {"REINFORCE + SGD": ("sgd", 0.2), "REINFORCE + Adam": ("adam", 0.2)}

    base = FlowParams(
        ChainTask.uniform(args.n),
        ModelSpec(),
        default_theta0(),
        t1=horizon,
        save_ts=BASE_LR * np.arange(round(horizon / BASE_LR) + 1),
    )
    flow = simulate(base, progress=False)
    fig, axes = subplots(1, 3, width=4.4, height=3.6)
    ax_r, ax_p, ax_err = axes[0]
    keep = flow.ts > 0
    ax_r.plot(flow.ts[keep], flow.reward[keep], color="k", lw=2.4, label="gradient flow", zorder=5)
    for name in ("alpha", "gamma"):
        k = 0 if name == "alpha" else 2
        ax_p.plot(flow.ts[keep], flow.theta[keep, k], color="k", lw=2.4, zorder=5)

    data = {
        "n": args.n,
        "horizon": horizon,
        "flow": {"ts": flow.ts, "reward": flow.reward, "theta": flow.theta[:, :3]},
        "gradient_descent": {},
        "sampled": {},
    }
    errors = []
    for j, lr in enumerate(gd_lrs):
        steps = round(horizon / lr)
        gd = gradient_descent(base, lr, steps)
        ts, theta, reward = np.asarray(gd.ts), np.asarray(gd.theta), np.asarray(gd.reward)
        index = np.round(ts / BASE_LR).astype(int)
        error = float(np.max(np.abs(theta[:, :3] - flow.theta[index, :3])))
        errors.append(error)
        style = dict(color=color((0, 2, 3, 5)[j % 4]), marker="o", ms=2.5, lw=1.0)
        ax_r.plot(ts[1:], reward[1:], label=f"gradient descent, lr = {lr:g}", **style)
        ax_p.plot(ts[1:], theta[1:, 0], **style)
        ax_p.plot(ts[1:], theta[1:, 2], **style)
        data["gradient_descent"][lr] = {"ts": ts, "reward": reward, "theta": theta[:, :3], "max_theta_error": error}

    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    for j, (name, (optimizer, lr)) in enumerate(sampled.items()):
        steps = round(horizon / lr)
        runs = [train(base, lr, steps, batch, key, optimizer=optimizer) for key in keys]
        ts = np.asarray(runs[0].ts)
        reward = np.stack([np.asarray(r.reward) for r in runs])
        theta = np.stack([np.asarray(r.theta)[:, :3] for r in runs])
        c = color((4, 1)[j])
        m, s = reward.mean(0), reward.std(0)
        ax_r.plot(ts[1:], m[1:], color=c, ls="--", label=f"{name}, lr = {lr:g}, batch {batch} (± std, {seeds} seeds)")
        ax_r.fill_between(ts[1:], np.clip(m - s, 0, 1)[1:], np.clip(m + s, 0, 1)[1:], color=c, alpha=0.25, lw=0)
        for k in (0, 2):
            m, s = theta[:, :, k].mean(0), theta[:, :, k].std(0)
            ax_p.plot(ts[1:], m[1:], color=c, ls="--")
            ax_p.fill_between(ts[1:], (m - s)[1:], (m + s)[1:], color=c, alpha=0.25, lw=0)
        data["sampled"][name] = {
            "optimizer": optimizer,
            "lr": lr,
            "steps": steps,
            "batch": batch,
            "seeds": seeds,
            "ts": ts,
            "reward_mean": reward.mean(0),
            "reward_std": reward.std(0),
            "theta_mean": theta.mean(0),
            "theta_std": theta.std(0),
            "final_reward_mean": float(reward[:, -1].mean()),
        }

    ax_r.set(xscale="log", xlabel=TIME_LABEL, ylabel="reward J (closed form at the current θ)", title="reward")
    ax_r.legend(loc="upper left", fontsize=6.5)
    ax_p.set(xscale="log", xlabel=TIME_LABEL, ylabel="attention score", title=r"$\alpha$ (rising) and $\gamma$ (falling)")
    ax_p.plot([], [], color="k", lw=2.4, label="gradient flow")
    ax_p.legend(loc="upper left")
    slope = float(np.polyfit(np.log(gd_lrs), np.log(errors), 1)[0])
    ax_err.loglog(gd_lrs, errors, "o-", color=color(0), label=f"gradient descent (slope {slope:.2f})")
    ax_err.loglog(gd_lrs, errors[0] * np.asarray(gd_lrs) / gd_lrs[0], ":", color="0.4", label="∝ lr")
    ax_err.set(
        xlabel="step size lr", ylabel=r"max over t of $|\theta_{\rm GD}(t) - \theta_{\rm flow}(t)|$", title="discretisation error"
    )
    ax_err.legend(loc="upper left")
    for ax, letter in zip(axes.flat, "abc"):
        panel_label(ax, letter)
    fig.suptitle(f"Flow, gradient descent and sampled REINFORCE on one axis t = lr × step (n = {args.n}, uniform starts)")
    data["gd_error_slope"] = slope
    data["claim"] = {
        "statement": "gradient descent converges to the flow as lr -> 0 (error ~ lr)",
        "errors": dict(zip(gd_lrs, errors)),
        "slope": slope,
        "holds": bool(all(np.diff(errors) > 0)),
    }
    print(
        f"{NAME}: GD max |theta error| by lr: {dict(zip(gd_lrs, np.round(errors, 5)))}, slope {slope:.2f}; "
        + ", ".join(f"{k}: final J {v['final_reward_mean']:.4f}" for k, v in data["sampled"].items())
        + f"; flow final J {flow.reward[-1]:.4f}"
    )
    save_figure(fig, NAME, args.out, data)
    return data


if __name__ == "__main__":
    main()
