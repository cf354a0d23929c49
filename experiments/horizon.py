"""Figure `horizon`: what a cap on the generated length does to the learned circuit (self-loops allowed).

The same gradient flow (uniform starts, theta0 = (0.3, 0, 0), linear attention, tau 0.2) with
self-loops allowed (mask_self=False), three times: without a cap (a self-loop costs nothing, the flow
converges to a lazy walk whose chain of thought grows without bound), and with the authors' cap
max_len = n + 1 and a looser one, 2n (a rollout without a terminal within the cap earns 0, so every
wasted token risks the reward).  Panels: (a) alpha, beta, gamma over time; (b) expected generated
length (E[min(L, max_len)] with a cap) against the minimal one; (c) reward J (each flow on its own
objective); (d) at the end, P(forward step) and P(self-loop) per position.  The cap flips the sign
of gamma - beta: capped flows end with beta < 0 < gamma (succ = alpha + gamma beats self = alpha + beta),
the uncapped one with gamma < 0 and beta ~ 0 (self-loop and forward step almost tied, the walk stays).
Regenerate: ``gradflow figures horizon``.
"""

from __future__ import annotations

import numpy as np

from gradflow import ChainTask, ModelSpec, Theta
from gradflow.flow import FlowParams, simulate
from gradflow.model import default_theta0, step_probabilities
from gradflow.plotting import PARAM_COLORS, TIME_LABEL, color, experiment_parser, log_times, panel_label, save_figure, subplots

NAME = "horizon"
STYLES = ("-", "--", ":")


def caps(n: int) -> dict[str, int | None]:
    return {"uncapped": None, f"max_len = n + 1 = {n + 1}": n + 1, f"max_len = 2n = {2 * n}": 2 * n}


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="vertices per chain (default 8; quick 5)")
    parser.add_argument("--horizon", type=float, default=None, help="last flow time (default 1e4; quick 1e3)")
    args = parser.parse_args(argv)
    n = args.n or (5 if args.quick else 8)
    horizon = args.horizon or (1e3 if args.quick else 1e4)
    ts = log_times(horizon, 40 if args.quick else 200, t_min=1e-2)
    task = ChainTask.uniform(n)
    theta0 = default_theta0()

    fig, axes = subplots(1, 4, width=4.0, height=3.4)
    ax_theta, ax_len, ax_j, ax_pos = axes[0]
    data = {"n": n, "horizon": horizon, "theta0": np.asarray(theta0.as_array()), "runs": {}}
    positions = np.arange(1, n)
    for j, (label, cap) in enumerate(caps(n).items()):
        model = ModelSpec(mask_self=False, max_len=cap)
        traj = simulate(FlowParams(task, model, theta0, t1=horizon, save_ts=ts), progress=False)
        keep = traj.ts > 0
        for k, name in enumerate(("alpha", "beta", "gamma")):
            ax_theta.plot(traj.ts[keep], traj.theta[keep, k], color=PARAM_COLORS[name], ls=STYLES[j])
        ax_len.plot(traj.ts[keep], traj.expected_length[keep], color=color(j + 3), ls=STYLES[j], label=label)
        ax_j.plot(traj.ts[keep], traj.reward[keep], color=color(j + 3), ls=STYLES[j], label=label)
        final = Theta.from_array(traj.theta[-1])
        steps = step_probabilities(final, task, model)
        forward, stay = np.asarray(steps.forward), np.asarray(steps.stay)
        ax_pos.plot(positions, forward, "o", color=color(j + 3), ls=STYLES[j], label=f"forward, {label}")
        ax_pos.plot(positions, stay, "s", color=color(j + 3), ls=STYLES[j], mfc="none", label=f"self-loop, {label}")
        alpha, beta, gamma = (float(x) for x in traj.theta[-1, :3])
        data["runs"][label] = {
            "max_len": cap,
            "ts": traj.ts,
            "theta": traj.theta[:, :3],
            "reward": traj.reward,
            "expected_length": traj.expected_length,
            "final_theta": [alpha, beta, gamma],
            "final_forward": forward,
            "final_stay": stay,
            "final_reward": float(traj.reward[-1]),
            "final_length": float(traj.expected_length[-1]),
        }
    minimal = float(np.mean(positions))
    ax_len.axhline(minimal, color="0.4", lw=0.8, ls="-.", label=f"minimal (forward traversal) {minimal:g}")
    ax_theta.plot([], [], color="0.3", ls=STYLES[0], label="uncapped")
    ax_theta.plot([], [], color="0.3", ls=STYLES[1], label="cap n + 1")
    ax_theta.plot([], [], color="0.3", ls=STYLES[2], label="cap 2n")
    for name in ("alpha", "beta", "gamma"):
        ax_theta.plot([], [], color=PARAM_COLORS[name], label=f"$\\{name}$")
    ax_theta.set(xscale="log", xlabel=TIME_LABEL, ylabel="attention score", title="circuit")
    ax_theta.legend(loc="upper left", fontsize=7)
    ax_len.set(xscale="log", yscale="log", xlabel=TIME_LABEL, ylabel="generated tokens", title="expected length")
    ax_len.legend(loc="upper left", fontsize=7)
    ax_j.set(xscale="log", xlabel=TIME_LABEL, ylabel="reward J (own objective)", title="reward")
    ax_j.legend(loc="lower right", fontsize=7)
    ax_pos.set(
        xlabel="position i of a_i",
        ylabel="probability at t = horizon",
        title="final step probabilities",
        ylim=(-0.02, 1.02),
        xticks=positions,
    )
    ax_pos.legend(loc="center left", fontsize=6)
    for ax, letter in zip(axes.flat, "abcd"):
        panel_label(ax, letter)
    fig.suptitle(f"Self-loops allowed, n = {n}, uniform starts: the cap turns a lazy walk into forward traversal")

    runs = list(data["runs"].values())
    uncapped, capped_runs = runs[0], runs[1:]
    data["claim"] = {
        "statement": "uncapped: gamma < 0 and the walk stays more than it moves at every interior position; "
        "capped (n + 1 and 2n): beta < 0 < gamma at the end and the forward step beats the self-loop "
        "at every position, with the tighter cap further (larger gamma - beta)",
        "final_theta": {label: run["final_theta"] for label, run in data["runs"].items()},
        "holds": bool(
            uncapped["final_theta"][2] < 0
            and np.all(uncapped["final_stay"][1:-1] > uncapped["final_forward"][1:-1])
            and all(r["final_theta"][1] < 0 < r["final_theta"][2] for r in capped_runs)
            and all(np.all(r["final_forward"] > r["final_stay"]) for r in capped_runs)
            and (capped_runs[0]["final_theta"][2] - capped_runs[0]["final_theta"][1])
            > (capped_runs[1]["final_theta"][2] - capped_runs[1]["final_theta"][1])
        ),
    }
    print(
        f"{NAME}: final (alpha, beta, gamma): "
        + "; ".join(f"{k}: {np.round(v, 3).tolist()}" for k, v in data["claim"]["final_theta"].items())
        + f"; claim holds: {data['claim']['holds']}"
    )
    save_figure(fig, NAME, args.out, data)
    return data


if __name__ == "__main__":
    main()
