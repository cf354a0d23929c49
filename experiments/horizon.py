"""Figure `horizon`: what a cap on the generated length does to the learned circuit (self-loops allowed).

The same gradient flow (uniform starts, theta0 = (0.3, 0, 0), linear attention, tau 0.2) with
self-loops allowed (mask_self=False), three times: without a cap (a self-loop costs nothing, the flow
converges to a lazy walk whose chain of thought grows without bound), and with the authors' cap
max_len = n + 1 and a looser one, 2n (a rollout without a terminal within the cap earns 0, so every
wasted token risks the reward).  Panels: (a) alpha, beta, gamma over time; (b) expected generated
length (E[min(L, max_len)] with a cap) against the minimal one; (c) reward J (each flow on its own
objective); at the end, per position, (d) P(forward | the walk moves), the README's ``forward_prob``
(dotted: the unconditional P(forward step)), and (e) P(self-loop).  The cap flips the sign of
gamma - beta: capped flows end with beta < 0 < gamma (succ = alpha + gamma beats self = alpha + beta),
the uncapped one with gamma < 0 and beta ~ 0 (self-loop and forward step almost tied, the walk stays).
Regenerate: ``gradflow figures horizon``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.lines import Line2D

from gradflow import ChainTask, ModelSpec, Theta
from gradflow.flow import FlowParams, simulate
from gradflow.model import default_theta0, step_probabilities
from gradflow.plotting import (
    PARAM_COLORS,
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

NAME = "horizon"
STYLES = ("-", "--", ":")


@dataclass(frozen=True)
class Preset:
    """n: vertices per chain (uniform starts); horizon: last flow time (``saves`` log-spaced times);
    theta0: (alpha, beta, gamma); the model: linear attention, temperature tau, self-loops allowed."""

    n: int
    horizon: float
    saves: int
    tau: float = 0.2
    theta0: tuple[float, float, float] = tuple(float(x) for x in default_theta0().as_array()[:3])


QUICK = Preset(n=5, horizon=1e3, saves=40)
FULL = Preset(n=8, horizon=1e4, saves=200)


def caps(n: int) -> dict[str, int | None]:
    """Run label -> max_len: uncapped, the authors' n + 1 and a looser 2n."""
    return {"uncapped": None, f"max_len = n + 1 = {n + 1}": n + 1, f"max_len = 2n = {2 * n}": 2 * n}


def compute(preset: Preset) -> dict:
    """Per cap: theta, reward and length over time, and the final per-position step probabilities."""
    task, theta0 = ChainTask.uniform(preset.n), Theta(*preset.theta0)
    ts = log_times(preset.horizon, preset.saves, t_min=1e-2)
    runs = {}
    for label, cap in caps(preset.n).items():
        model = ModelSpec(attention="linear", tau=preset.tau, mask_self=False, max_len=cap)
        traj = simulate(FlowParams(task, model, theta0, t1=preset.horizon, save_ts=ts), progress=False)
        steps = step_probabilities(Theta.from_array(traj.theta[-1]), task, model)
        runs[label] = {
            "max_len": cap,
            "ts": traj.ts,
            "theta": traj.theta[:, :3],
            "reward": traj.reward,
            "expected_length": traj.expected_length,
            "final_theta": traj.theta[-1, :3],
            "final_forward_given_move": steps.forward_given_move,
            "final_forward_unconditional": steps.forward,
            "final_stay": steps.stay,
            "final_reward": float(traj.reward[-1]),
            "final_length": float(traj.expected_length[-1]),
        }
    print(
        f"{NAME}: final (alpha, beta, gamma): "
        + "; ".join(f"{k}: {np.round(r['final_theta'], 3).tolist()}" for k, r in runs.items())
    )
    return {"n": preset.n, "horizon": preset.horizon, "theta0": preset.theta0, "minimal_length": preset.n / 2, "runs": runs}


def check(data: dict) -> list[str]:
    """Uncapped: gamma < 0 and the walk stays more than it steps forward at every interior position; capped
    (n + 1 and 2n): beta < 0 < gamma and the forward step beats the self-loop everywhere, the tighter cap further."""
    uncapped, *capped = data["runs"].values()
    spread = [r["final_theta"][2] - r["final_theta"][1] for r in capped]
    stay, forward = (np.asarray(uncapped[k], dtype=float)[1:-1] for k in ("final_stay", "final_forward_unconditional"))
    return claim_failures(
        {
            "uncapped: gamma < 0": uncapped["final_theta"][2] < 0,
            "uncapped: P(self-loop) > P(forward) at every interior position": bool(np.all(stay > forward)),
            "capped: beta < 0 < gamma": all(r["final_theta"][1] < 0 < r["final_theta"][2] for r in capped),
            "capped: P(forward) > P(self-loop) at every position": all(
                np.all(np.asarray(r["final_forward_unconditional"]) > np.asarray(r["final_stay"])) for r in capped
            ),
            "the tighter cap has the larger gamma - beta": spread[0] > spread[1],
        }
    )


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, 5, width=3.6, height=3.4)
    ax_theta, ax_len, ax_j, ax_fwd, ax_stay = axes[0]
    positions = np.arange(1, preset.n)
    for j, (label, run) in enumerate(data["runs"].items()):
        ts, theta = np.asarray(run["ts"], dtype=float), np.asarray(run["theta"], dtype=float)
        keep = ts > 0
        run_style = dict(color=color(j + 3), ls=STYLES[j])
        for k, name in enumerate(("alpha", "beta", "gamma")):
            ax_theta.plot(ts[keep], theta[keep, k], color=PARAM_COLORS[name], ls=STYLES[j])
        ax_len.plot(ts[keep], np.asarray(run["expected_length"], dtype=float)[keep], label=label, **run_style)
        ax_j.plot(ts[keep], np.asarray(run["reward"], dtype=float)[keep], **run_style)
        ax_fwd.plot(positions, np.asarray(run["final_forward_given_move"], dtype=float), marker="o", **run_style)
        ax_fwd.plot(
            positions,
            np.asarray(run["final_forward_unconditional"], dtype=float),
            marker="o",
            mfc="none",
            lw=0.8,
            color=color(j + 3),
            ls=":",
        )
        ax_stay.plot(positions, np.asarray(run["final_stay"], dtype=float), marker="s", **run_style)
    ax_len.axhline(data["minimal_length"], color="0.4", lw=0.8, ls="-.", label="minimal (forward traversal)")
    for name in ("alpha", "beta", "gamma"):
        ax_theta.plot([], [], color=PARAM_COLORS[name], label=f"$\\{name}$")
    ax_theta.set(xscale="log", xlabel=TIME_LABEL, ylabel="attention score", title="circuit (line style: the run)")
    ax_theta.legend(loc="upper left", fontsize=7)
    ax_len.set(xscale="log", yscale="log", xlabel=TIME_LABEL, ylabel="generated tokens", title="expected length")
    ax_j.set(xscale="log", xlabel=TIME_LABEL, ylabel="reward J (own objective)", title="reward")
    final = dict(xlabel="position i of $a_i$", ylim=(-0.02, 1.02), xticks=positions, title="at t = horizon")
    ax_fwd.set(ylabel="P($a_i \\to a_{i+1}$)", **final)
    kinds = [
        Line2D([], [], color="0.3", marker="o", label="given a move (forward_prob)"),
        Line2D([], [], color="0.3", marker="o", mfc="none", lw=0.8, ls=":", label="unconditional"),
    ]
    ax_fwd.legend(handles=kinds, loc="center", fontsize=7)
    ax_stay.set(ylabel="P(self-loop)", **final)
    handles, labels = ax_len.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), title="the runs (line style; colour in b-e)")
    for ax, letter in zip(axes.flat, "abcde"):
        panel_label(ax, letter)
    fig.suptitle(
        f"Self-loops allowed, n = {preset.n}, uniform starts, θ0 = {format_theta(preset.theta0)}, τ = {preset.tau:g}: "
        "the cap turns a lazy walk into forward traversal"
    )
    return fig


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help=f"vertices per chain (default {FULL.n}; quick {QUICK.n})")
    parser.add_argument(
        "--horizon", type=float, default=None, help=f"last flow time (default {FULL.horizon:g}; quick {QUICK.horizon:g})"
    )
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
