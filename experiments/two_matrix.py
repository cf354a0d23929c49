"""Figure `two_matrix`: the authors' two-matrix model (A and V trained) against the fixed V, from their near-zero start.

The authors' simple-examples experiment (n = 5, training uniform on the k hardest starts, k = 1..4;
only k = 4 holds d = 1), in their setting: rollouts capped at max_len = n + 1 = 6 tokens, self-loops
allowed, linear attention, tau = 0.2, exact-gradient Adam with lr 1e-2 on the capped reward
(``gradflow.training.gradient_descent_many``).  V trained: ``ModelSpec(values="trained")`` from
``gradflow.model.authors_start(1e-8)`` (every A number and sigma, rho, mu at 1e-8, omega = nu = 0);
V fixed: today's model from the same A numbers.  Both in ``coords="full"``: Adam on every matrix entry
with per-entry moments and eps = 1e-8, the authors' optimizer (``gradflow.training`` docstring), not
Adam on the orbit numbers.  Read-outs on the hardest start (``ChainTask.hardest(5)``, d = 4) by Adam
step, V trained solid, V fixed dashed: (a) reward, (b) greedy reach rate and (c) greedy exact
traversal (tie rule "first").  Overlaid in (a), thin: sampled REINFORCE + Adam (``gradflow.training.train``:
token-level capped rollouts, ``sampled_batch`` per step, leave-one-out baseline), ``sampled_seeds`` seeds per
k, its exact hardest-start reward.  A choice: the sampled runs step on the orbit numbers (A's five, V's
five), so the policy stays symmetric and the closed form is its reward; per-entry Adam on the full
matrices leaves the symmetric subspace under sampling noise, where the reward at the orbit means is not
the policy's.

(d) The learned effective logit terms at the last step.  With S = sigma - omega, R = rho - omega and
M = mu - nu (``two_matrix.value_differences``), query u's logit of w is (1/tau) times a sum of A
coordinates each times the value difference its token writes on w: the successor gets alpha R (its
own edge) + gamma S (the next edge), the predecessor beta S + gamma R, u itself alpha S + beta R +
M eta (the self-loop term: its own vertex token) and the start M delta; the fixed V is S = R = 1,
M = 0.  Bars: each product per k (filled: V trained; hatched: V fixed).  A negative M eta is the
authors' learned V putting negative weight on the current vertex, which suppresses self-loops.

(e) The saddle: A V started near zero is a product of two small matrices, whose gradient is O(scale),
so the two-matrix gradient flow (full coordinates, capped, trained on k = 4) first sits at the saddle
and leaves it after a time ~ log(1/scale) / lambda (``theory.escape_times``: the first t with
J(theta_t) >= J(theta_0) + rise), against the start scale of ``authors_start``; the fixed V from the
same A numbers has no saddle.  Regenerate: ``gradflow figures two_matrix``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta, theory, two_matrix
from gradflow.flow import FlowParams
from gradflow.model import authors_start
from gradflow.plotting import claim_failures, color, experiment_parser, panel_label, run_experiment, subplots
from gradflow.training import gradient_descent_many, train

NAME = "two_matrix"
VALUES = ("trained", "fixed")
STYLES = {"trained": "-", "fixed": "--"}
# (label, the A coordinate, the value difference it multiplies: 0 S, 1 R, 2 M; two_matrix.value_differences)
TERMS = (
    ("successor α·R", "alpha", 1),
    ("successor γ·S", "gamma", 0),
    ("predecessor β·S", "beta", 0),
    ("predecessor γ·R", "gamma", 1),
    ("self α·S", "alpha", 0),
    ("self β·R", "beta", 1),
    ("self-loop η·M", "eta", 2),
    ("start δ·M", "delta", 2),
)
SELF_LOOP = next(i for i, (_, name, _) in enumerate(TERMS) if name == "eta")  # (mu - nu) eta


@dataclass(frozen=True)
class Preset:
    """The authors' setting: n, the k hardest starts (ks), cap n + 1, self-loops, linear attention at tau,
    Adam (lr, steps) in full coordinates from ``authors_start(scale)``; the escape time of the flow to
    ``escape_t1`` at a rise of ``rise`` from each of ``scales``; the claim: k = 4 passes ``high`` by the last
    step and k = 1 stays below ``low``; the reward recorded at ``report_step``; sampled REINFORCE + Adam with
    ``sampled_batch`` rollouts per step, ``sampled_seeds`` seeds per k."""

    steps: int
    scales: tuple[float, ...]
    n: int = 5
    ks: tuple[int, ...] = (1, 2, 3, 4)
    lr: float = 1e-2
    tau: float = 0.2
    scale: float = 1e-8
    rise: float = 1e-3
    escape_t1: float = 1e4
    high: float = 0.9
    low: float = 0.6
    report_step: int = 300
    sampled_seeds: int = 3
    sampled_batch: int = 64


QUICK = Preset(steps=300, scales=(1e-8, 1e-4, 1e-1), sampled_seeds=2)
FULL = Preset(steps=1000, scales=tuple(10.0**-e for e in range(8, 0, -1)))


def model_spec(preset: Preset, values: str) -> ModelSpec:
    return ModelSpec(attention="linear", tau=preset.tau, mask_self=False, max_len=preset.n + 1, values=values)


def start(scale: float, values: str) -> Theta:
    """``authors_start(scale)``, or its A numbers with the fixed V."""
    theta = authors_start(scale)
    return theta if values == "trained" else Theta.from_array(theta.as_array()[:5])


def logit_terms(theta: np.ndarray) -> list[float]:
    """The products of ``TERMS`` at one theta (5 or 10 numbers)."""
    theta = Theta.from_array(theta)
    differences = two_matrix.value_differences(theta)
    return [float(getattr(theta, name) * differences[which]) for _, name, which in TERMS]


def first_step(values: np.ndarray, level: float) -> int | None:
    """The first step with values >= level, None if never."""
    hit = np.nonzero(np.asarray(values) >= level)[0]
    return int(hit[0]) if hit.size else None


def _sampled(config: FlowParams, preset: Preset) -> dict:
    """Sampled REINFORCE + Adam on the orbit numbers, one run per seed: the exact hardest-start reward by step."""
    rewards = []
    for seed in range(preset.sampled_seeds):
        run = train(
            config, preset.lr, preset.steps, preset.sampled_batch, jax.random.key(seed), optimizer="adam", coords="reduced"
        )
        rewards.append(run.eval_readouts["hardest"]["reward"])
    finals = [float(r[-1]) for r in rewards]
    print(f"{NAME}: sampled, V {config.model.values}: final hardest {np.round(finals, 4).tolist()}")
    return {"hardest_reward": rewards, "final_reward": finals, "mean_final_reward": float(np.mean(finals))}


def compute(preset: Preset) -> dict:
    """Per V kind and k: Adam's hardest-start reward and greedy read-outs by step, the final theta and logit terms;
    the flow's escape time per start scale (both V kinds)."""
    hardest = ChainTask.hardest(preset.n)
    runs = {}
    for values in VALUES:
        configs = [
            FlowParams(
                ChainTask.k_hardest(preset.n, k),
                model_spec(preset, values),
                start(preset.scale, values),
                coords="full",
                eval_tasks={"hardest": hardest},
            )
            for k in preset.ks
        ]
        runs[values] = {}
        for k, run in zip(preset.ks, gradient_descent_many(configs, preset.lr, preset.steps, optimizer="adam")):
            read = run.eval_readouts["hardest"]
            runs[values][k] = {
                "hardest_reward": read["reward"],
                "greedy_reach": read["greedy_reach_rate"],
                "greedy_traversal": read["greedy_traversal_accuracy"],
                "final_theta": run.theta[-1],
                "final_terms": logit_terms(run.theta[-1]),
                "final_reward": float(read["reward"][-1]),
                "max_reward": float(np.max(read["reward"])),
            }
            print(f"{NAME}: V {values}, k={k}: hardest {read['reward'][-1]:.4f}, theta {np.round(run.theta[-1], 3).tolist()}")
        for config, k in zip(configs, preset.ks):
            runs[values][k]["sampled"] = _sampled(config, preset)
    escape = {}
    for values in VALUES:
        configs = [
            FlowParams(ChainTask.k_hardest(preset.n, preset.ks[-1]), model_spec(preset, values), start(s, values), coords="full")
            for s in preset.scales
        ]
        escape[values] = theory.escape_times([c.replace(t1=preset.escape_t1) for c in configs], rise=preset.rise)
    trained = np.asarray(escape["trained"], dtype=float)
    slope = float(np.polyfit(np.log(1.0 / np.asarray(preset.scales)), trained, 1)[0]) if np.all(np.isfinite(trained)) else None
    self_loop = {values: runs[values][preset.ks[-1]]["final_terms"][SELF_LOOP] for values in VALUES}
    return {
        "n": preset.n,
        "ks": preset.ks,
        "terms": [label for label, _, _ in TERMS],
        "runs": runs,
        "escape": {"scales": preset.scales, "times": escape, "slope": slope},
        "summary": {
            values: {
                "k4_step_0.9": first_step(runs[values][preset.ks[-1]]["hardest_reward"], preset.high),
                "reward_at_report_step": {
                    k: float(runs[values][k]["hardest_reward"][preset.report_step]) for k in preset.ks[:-1]
                },
                "self_loop_term": self_loop[values],
                "self_loop_sign": int(np.sign(self_loop[values])),
                "sampled_mean_final_reward": {k: runs[values][k]["sampled"]["mean_final_reward"] for k in preset.ks},
            }
            for values in VALUES
        },
    }


def check(data: dict) -> list[str]:
    """Both V kinds, exact and every sampled seed: k = 4 passes ``high`` on the hardest start by the last step,
    k = 1 stays below ``low``;
    V trained: the learned self-loop term (mu - nu) eta is negative for every k; the flow's escape time
    falls as the start scale grows (every one finite)."""
    preset, runs = data["preset"], data["runs"]
    last, first = str(preset["ks"][-1]), str(preset["ks"][0])
    times = data["escape"]["times"]["trained"]
    conditions = {
        f"V {values}: k = {last} passes {preset['high']} by the last step, k = {first} stays below {preset['low']}": (
            runs[values][last]["final_reward"] > preset["high"] and runs[values][first]["max_reward"] < preset["low"]
        )
        for values in VALUES
    }
    for values in VALUES:
        sampled = {k: np.asarray(runs[values][k]["sampled"]["hardest_reward"], dtype=float) for k in (last, first)}
        claim = f"sampled REINFORCE + Adam, V {values}: every seed of k = {last} passes {preset['high']}"
        conditions[f"{claim}, of k = {first} stays below {preset['low']}"] = bool(
            np.all(sampled[last][:, -1] > preset["high"]) and np.all(sampled[first] < preset["low"])
        )
    conditions["V trained: the learned self-loop term (mu - nu) eta < 0 for every k"] = all(
        runs["trained"][k]["final_terms"][SELF_LOOP] < 0 for k in runs["trained"]
    )
    conditions["the two-matrix flow's escape time falls as the start scale grows"] = None not in times and bool(
        np.all(np.diff(times) < 0)
    )
    return claim_failures(conditions)


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, 5, width=4.0, height=3.6)
    ax_r, ax_reach, ax_trav, ax_terms, ax_escape = axes[0]
    step_axis = np.arange(preset.steps + 1)
    for values in VALUES:
        for j, k in enumerate(preset.ks):
            run, c, ls = data["runs"][values][str(k)], color(j), STYLES[values]
            label = f"k = {k}" + (" (hardest only)" if k == 1 else "") if values == "trained" else None
            ax_r.plot(step_axis, np.asarray(run["hardest_reward"], dtype=float), color=c, ls=ls, label=label)
            for reward in run["sampled"]["hardest_reward"]:
                ax_r.plot(step_axis, np.asarray(reward, dtype=float), color=c, ls=ls, lw=0.6, alpha=0.45)
            ax_reach.plot(step_axis, np.asarray(run["greedy_reach"], dtype=float) + 0.02 * j, color=c, ls=ls)
            ax_trav.plot(step_axis, np.asarray(run["greedy_traversal"], dtype=float) + 0.02 * j, color=c, ls=ls)
    for values in VALUES:
        ax_r.plot([], [], color="0.3", ls=STYLES[values], label=f"V {values}")
    ax_r.plot([], [], color="0.3", lw=0.6, alpha=0.45, label=f"sampled REINFORCE + Adam ({preset.sampled_seeds} seeds)")
    ax_r.axhline(preset.high, color="0.5", lw=0.8, ls=":")
    ax_r.set(xlabel="Adam step", ylabel=f"reward on the hardest start (d = {preset.n - 1})", ylim=(0, 1.02))
    ax_r.set_title(f"Adam (lr {preset.lr:g}), cap {preset.n + 1}; thin: sampled, B = {preset.sampled_batch}")
    ax_r.legend(loc="lower right", fontsize=6.5)
    greedy = {"xlabel": "Adam step", "ylim": (-0.1, 1.15)}
    ax_reach.set(ylabel="greedy reach rate, hardest start", title="greedy: reaches a terminal", **greedy)
    ax_trav.set(ylabel="greedy exact traversal, hardest start", title="greedy: the forward path", **greedy)
    _draw_terms(ax_terms, data, preset)
    _draw_escape(ax_escape, data, preset)
    for ax, letter in zip(axes.flat, "abcde"):
        panel_label(ax, letter)
    fig.suptitle(
        f"The two-matrix model (n = {preset.n}, k hardest starts, cap n + 1, self-loops, τ = {preset.tau:g}, "
        f"entries {preset.scale:g}): V trained (solid) vs V fixed (dashed)"
    )
    return fig


def _draw_terms(ax, data: dict, preset: Preset) -> None:
    labels, width = data["terms"], 0.8 / (2 * len(preset.ks))
    x = np.arange(len(labels))
    for v, values in enumerate(VALUES):
        for j, k in enumerate(preset.ks):
            offset = (v * len(preset.ks) + j + 0.5) * width - 0.4
            terms = np.asarray(data["runs"][values][str(k)]["final_terms"], dtype=float)
            hatch = None if values == "trained" else "///"
            ax.bar(x + offset, terms, width, color=color(j), alpha=1.0 if values == "trained" else 0.4, hatch=hatch, lw=0)
    ax.axhline(0.0, color="0.3", lw=0.6)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=6.5)
    ax.set(ylabel="term at the last step (× 1/τ in the logit)", title="learned logit terms (hatched: V fixed)")


def _draw_escape(ax, data: dict, preset: Preset) -> None:
    scales = np.asarray(data["escape"]["scales"], dtype=float)
    for values in VALUES:
        times = np.asarray([np.nan if t is None else t for t in data["escape"]["times"][values]], dtype=float)
        label = f"V {values}" + (" (no saddle)" if values == "fixed" else "")
        ax.plot(scales, times, marker="o", color="0.2", ls=STYLES[values], label=label)
    slope = data["escape"]["slope"]
    if slope is not None:
        times = np.asarray(data["escape"]["times"]["trained"], dtype=float)
        logs = np.log(1.0 / scales)
        intercept = float(np.mean(times - slope * logs))
        ax.plot(scales, intercept + slope * logs, color=color(0), lw=0.8, ls=":", label=f"fit: {slope:.3g} · log(1/scale) + c")
    ax.set(
        xscale="log",
        xlabel="start scale (authors_start)",
        ylabel=f"flow time until J rises by {preset.rise:g}",
        title=f"saddle escape, gradient flow (k = {preset.ks[-1]})",
    )
    ax.legend(loc="upper right", fontsize=6.5)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help=f"Adam steps (default {FULL.steps}; quick {QUICK.steps})")
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
