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

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, same_side_probability
from gradflow._series import first_crossing
from gradflow.flow import FlowParams, simulate_many
from gradflow.model import default_theta0
from gradflow.plotting import TIME_LABEL, color, experiment_parser, log_times, panel_label, save_figure, subplots
from gradflow.training import train

NAME = "simple_examples"
N = 5
KS = (1, 2, 3, 4)
STARTS = {"near zero (authors)": (0.01, 0.0, 0.0), "base model": tuple(float(x) for x in default_theta0().as_array()[:3])}
CLAIM_START = "near zero (authors)"
LOW, HIGH = 0.6, 0.9


@jax.jit
def _hardest_reward(thetas, task: ChainTask, model: ModelSpec):
    return jax.vmap(lambda x: same_side_probability(Theta.from_array(x), task, model)[-1])(thetas)


def hardest_reward(thetas: np.ndarray, n: int, model: ModelSpec) -> np.ndarray:
    """Same-side probability of the hardest start (d = n-1) at each theta (rows of ``thetas``)."""
    return np.asarray(_hardest_reward(jnp.nan_to_num(jnp.asarray(thetas)), ChainTask.hardest(n), model))


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, default=1e3, help="last flow time plotted (default 1e3)")
    parser.add_argument("--seeds", type=int, default=None, help="REINFORCE seeds (default 3; quick 2)")
    parser.add_argument("--batch", type=int, default=None, help="rollouts per step (default 1000; quick 32)")
    parser.add_argument("--lr", type=float, default=0.1, help="REINFORCE SGD step size (default 0.1)")
    parser.add_argument("--steps", type=int, default=None, help="REINFORCE steps (default 200; quick 20)")
    args = parser.parse_args(argv)
    seeds = args.seeds or (2 if args.quick else 3)
    batch = args.batch or (32 if args.quick else 1000)
    steps = args.steps or (20 if args.quick else 200)
    model = ModelSpec()
    ts = log_times(args.horizon, 120 if args.quick else 400, t_min=1e-2)

    configs = [
        FlowParams(ChainTask.k_hardest(N, k), model, Theta(*theta0), t1=args.horizon, save_ts=ts)
        for theta0 in STARTS.values()
        for k in KS
    ]
    trajectories = simulate_many(configs)

    fig, axes = subplots(1, len(STARTS), width=5.0, height=3.8, sharey=True)
    data = {
        "n": N,
        "ks": KS,
        "horizon": args.horizon,
        "starts": STARTS,
        "flow": {},
        "sampled": {},
        "sampling": {"optimizer": "sgd", "lr": args.lr, "steps": steps, "batch": batch, "seeds": seeds},
    }
    for s, (start_name, theta0) in enumerate(STARTS.items()):
        ax = axes[0, s]
        data["flow"][start_name] = {}
        for j, k in enumerate(KS):
            traj = trajectories[s * len(KS) + j]
            h = hardest_reward(traj.theta, N, model)
            ax.plot(traj.ts[1:], h[1:], color=color(j), label=f"k = {k}" + (" (hardest only)" if k == 1 else ""))
            data["flow"][start_name][k] = {
                "ts": traj.ts,
                "hardest_reward": h,
                "t_hit_0.9": first_crossing(traj.ts, h, HIGH),
                "max_reward": float(np.nanmax(h)),
                "final_reward": float(h[-1]),
            }
        if start_name == CLAIM_START:
            data["sampled"] = _sampled(ax, theta0, model, args.lr, steps, batch, seeds)
        ax.axhline(HIGH, color="0.5", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            xlabel=TIME_LABEL,
            ylim=(0.45, 1.02),
            xlim=(ts[1], args.horizon),
            title=f"{start_name}: θ0 = (α, β, γ) = {theta0}",
        )
        panel_label(ax, "ab"[s])
    axes[0, 0].set_ylabel(f"reward on the hardest start (d = {N - 1})")
    axes[0, 0].legend(loc="upper left", title=f"train on the k hardest starts, n = {N}")
    axes[0, 1].legend(loc="upper left", title="closed-form flow")
    fig.suptitle(
        "Simple examples are needed: only k = 4 holds the one-step start d = 1 (lines: flow; bands: REINFORCE mean ± std)"
    )

    claim = data["flow"][CLAIM_START]
    data["claim"] = {
        "start": CLAIM_START,
        "statement": f"k = 1 stays below {LOW} while k = 4 passes {HIGH} by the horizon",
        "horizon": args.horizon,
        "k1_max_reward": claim[1]["max_reward"],
        "k4_final_reward": claim[4]["final_reward"],
        "holds": bool(claim[1]["max_reward"] < LOW and claim[4]["final_reward"] > HIGH),
    }
    data["t_hit_0.9"] = {name: {k: data["flow"][name][k]["t_hit_0.9"] for k in KS} for name in STARTS}
    print(f"{NAME}: t_hit(0.9) on the hardest start: {data['t_hit_0.9']}; claim holds: {data['claim']['holds']}")
    save_figure(fig, NAME, args.out, data)
    return data


def _sampled(ax, theta0, model, lr, steps, batch, seeds) -> dict:
    """REINFORCE (SGD, reduced parameters) per k: mean +- std over seeds of the hardest-start reward."""
    out = {}
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    for j, k in enumerate(KS):
        params = FlowParams(ChainTask.k_hardest(N, k), model, Theta(*theta0))
        runs = [train(params, lr, steps, batch, key, optimizer="sgd") for key in keys]
        rewards = np.stack([hardest_reward(np.asarray(r.theta), N, model) for r in runs])
        ts = np.asarray(runs[0].ts)
        mean, std = rewards.mean(axis=0), rewards.std(axis=0)
        low, high = np.clip(mean - std, 0.0, 1.0), np.clip(mean + std, 0.0, 1.0)
        ax.fill_between(ts[1:], low[1:], high[1:], color=color(j), alpha=0.2, lw=0)
        ax.plot(ts[1:], mean[1:], color=color(j), lw=0.8, ls="--")
        out[k] = {"ts": ts, "mean": mean, "std": std, "final_mean": float(mean[-1]), "per_seed_final": rewards[:, -1]}
    ax.axvline(lr * steps, color="0.3", lw=0.8, ls="-.")
    ax.plot([], [], color="0.3", lw=0.8, ls="--", label=f"REINFORCE (SGD, lr {lr:g}, batch {batch}) ± std")
    ax.plot([], [], color="0.3", lw=0.8, ls="-.", label=f"end of REINFORCE ({steps} steps)")
    return out


if __name__ == "__main__":
    main()
