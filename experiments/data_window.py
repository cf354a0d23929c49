"""Figure `data_window`: how much easy data the authors' setting needs, and how much is too much.

The authors' setting: cap max_len = n + 1, self-loops allowed, linear attention, tau = 0.2, theta0 = 0,
exact-gradient Adam with lr 1e-2 for a budget of 1,000 steps.  Training puts mass c on the easy starts
(family "d = 1": on d = 1; family "d <= 2": split over d = 1, 2) and the rest on the hardest start
d = n - 1 (``ChainTask.mixture``).  The hardest start counts as learned when its reward reaches 0.9
within the budget; the window is the range of c where it does.  Below it Adam is trapped (the capped
gradient only teaches reaching *a* terminal); above it the hardest start gets too little weight and
the model steps forward but reaches no terminal within the cap.  Against n: the window of exact-gradient
Adam (band), of the gradient flow at the matching time t = lr x steps (dashed), and sampled REINFORCE +
Adam at a few (n, c) (mean +- std over seeds).  Each edge is linearly interpolated on the c grid and
comes with its sensitivity: dR/dc across the grid cell that brackets it (a jump over one cell is a knife
edge the grid does not resolve) and its spread over lr in {5e-3, 1e-2, 2e-2} x steps in {500, 1000,
2000}; the edges are printed with no more digits than that spread (and the grid) supports.
Regenerate: ``gradflow figures data_window``.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import jax
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta
from gradflow.flow import FlowParams, simulate_many
from gradflow.plotting import claim_failures, color, experiment_parser, format_theta, panel_label, run_experiment, subplots
from gradflow.training import gradient_descent_many, train

NAME = "data_window"
HARDEST = "hardest"  # the eval task: the hardest start alone
# The flow runs to t = lr x steps <= 40, before the capped valleys turn stiff: explicit tsit5 keeps a step of order 1
# there and costs 1/16 of "auto"'s implicit Kvaerno5 (21 flows, n = 8, t = 40: 2.2 s against 35.5 s).
FLOW_SOLVER = "tsit5"


@dataclass(frozen=True)
class Preset:
    """ns x cs: chain lengths and easy masses (cs ascending from 0 to 1); families: (name, easy distances);
    the budget: Adam (lr, steps), the hardest start learned at reward >= level; sensitivity: the edges
    at every lr in lrs x steps in step_budgets; the flow at t = lr x steps for each; sampled REINFORCE +
    Adam (lr, steps) on the first family at sampled_ns x sampled_cs, ``seeds`` seeds of ``batch`` rollouts;
    the model: linear attention at temperature tau, self-loops allowed, cap n + 1; theta0."""

    ns: tuple[int, ...]
    cs: tuple[float, ...]
    sampled_ns: tuple[int, ...]
    sampled_cs: tuple[float, ...]
    seeds: int
    batch: int
    families: tuple[tuple[str, tuple[int, ...]], ...] = (("d = 1", (1,)), ("d <= 2", (1, 2)))
    lr: float = 1e-2
    steps: int = 1000
    level: float = 0.9
    lrs: tuple[float, ...] = (5e-3, 1e-2, 2e-2)
    step_budgets: tuple[int, ...] = (500, 1000, 2000)
    tau: float = 0.2
    theta0: tuple[float, float, float] = (0.0, 0.0, 0.0)


QUICK = Preset(
    ns=(4, 5), cs=tuple(np.round(np.linspace(0.0, 1.0, 11), 10)), sampled_ns=(4,), sampled_cs=(0.2, 0.5), seeds=2, batch=100
)
FULL = Preset(  # n = 16 costs about 0.75 s per (c, lr) run of 2,000 steps on one core: a grid of 21 c, 9 n
    ns=(4, 5, 6, 7, 8, 10, 12, 14, 16),
    cs=tuple(np.round(np.linspace(0.0, 1.0, 21), 10)),
    sampled_ns=(5, 8),
    sampled_cs=(0.2, 0.3, 0.4, 0.5, 0.9),
    seeds=3,
    batch=1000,
)


def model_spec(preset: Preset, n: int) -> ModelSpec:
    return ModelSpec(attention="linear", tau=preset.tau, mask_self=False, max_len=n + 1)


def setting_key(lr: float, steps: int) -> str:
    return f"lr={lr:g}, steps={steps}"


def window(cs, reward, level: float) -> dict:
    """The range of c with reward >= level on the grid, each edge linearly interpolated inside its grid cell.

    lower/upper: the edges (None: no c learns; an edge at the grid's end is that end); *_bracket: the grid
    cell holding the edge; *_slope: dR/dc across that cell (its secant); segments: how many separate runs
    of learned c the grid shows (1 for a window).
    """
    cs, reward = np.asarray(cs, dtype=float), np.asarray(reward, dtype=float)
    learned = reward >= level
    out = {"lower": None, "upper": None, "lower_bracket": None, "upper_bracket": None, "lower_slope": None, "upper_slope": None}
    out["segments"] = int(np.sum(np.diff(np.concatenate([[0], learned.astype(int)])) == 1))
    if not learned.any():
        return out
    hits = np.nonzero(learned)[0]
    for side, i, j in (("lower", hits[0] - 1, hits[0]), ("upper", hits[-1], hits[-1] + 1)):
        if i < 0 or j >= cs.size:
            out[side] = float(cs[max(i, 0)] if i >= 0 else cs[j])
            continue
        slope = (reward[j] - reward[i]) / (cs[j] - cs[i])
        out[side] = float(cs[i] + (level - reward[i]) / slope)
        out[f"{side}_bracket"], out[f"{side}_slope"] = [float(cs[i]), float(cs[j])], float(slope)
    return out


def rounded(value: float | None, uncertainty: float) -> str:
    """'0.31 ± 0.05': the value with as many decimals as its uncertainty's leading digit allows."""
    if value is None:
        return "none"
    decimals = max(0, -int(math.floor(math.log10(uncertainty)))) if uncertainty > 0 else 3
    return f"{value:.{decimals}f} ± {uncertainty:.{decimals}f}"


def edges_with_sensitivity(cs, rewards: dict, main: str, level: float) -> dict:
    """The window at the main setting, its edges' spread over every setting (key -> reward on cs) and the
    uncertainty of each edge: the larger of half that spread and half the grid cell holding it."""
    windows = {key: window(cs, reward, level) for key, reward in rewards.items()}
    out = {"window": windows[main], "by_setting": windows}
    for side in ("lower", "upper"):
        values = [w[side] for w in windows.values() if w[side] is not None]
        edge, bracket = windows[main][side], windows[main][f"{side}_bracket"]
        spread = [min(values), max(values)] if values else None
        cell = 0.0 if bracket is None else bracket[1] - bracket[0]
        uncertainty = max((spread[1] - spread[0]) / 2 if spread else 0.0, cell / 2)
        out[f"{side}_spread"], out[f"{side}_uncertainty"] = spread, uncertainty
        out[f"{side}_display"] = rounded(edge, uncertainty)
        out[f"{side}_knife_edge"] = bracket is not None and abs(windows[main][f"{side}_slope"]) * cell > 0.25
    return out


def compute(preset: Preset) -> dict:
    """Per family and n: the hardest-start reward on the c grid for exact Adam (every lr x steps) and the flow
    (every t = lr x steps), the windows with their sensitivity; sampled REINFORCE + Adam at a few points."""
    main = setting_key(preset.lr, preset.steps)
    settings = list(itertools.product(preset.lrs, preset.step_budgets))
    times = sorted({lr * steps for lr, steps in settings})
    t_match = preset.lr * preset.steps
    exact, flow, seconds = {}, {}, {}
    for n in preset.ns:
        tick = time.perf_counter()
        model, evals = model_spec(preset, n), {HARDEST: ChainTask.hardest(n)}
        for family, easy in preset.families:
            tasks = [ChainTask.mixture(n, c, easy) for c in preset.cs]
            configs = [FlowParams(task, model, Theta(*preset.theta0), eval_tasks=evals) for task in tasks for _ in preset.lrs]
            runs = gradient_descent_many(
                configs, lrs=list(preset.lrs) * len(tasks), steps=max(preset.step_budgets), optimizer="adam"
            )
            hardest = np.array([run.eval_readouts[HARDEST]["reward"] for run in runs]).reshape(len(tasks), len(preset.lrs), -1)
            rewards = {setting_key(lr, s): hardest[:, preset.lrs.index(lr), s] for lr, s in settings}
            exact.setdefault(family, {})[n] = {"hardest_reward": rewards} | edges_with_sensitivity(
                preset.cs, rewards, main, preset.level
            )
            params = [
                FlowParams(
                    task, model, Theta(*preset.theta0), t1=times[-1], save_ts=[0.0] + times, eval_tasks=evals, solver=FLOW_SOLVER
                )
                for task in tasks
            ]
            solved = np.array([traj.eval_reward[HARDEST][1:] for traj in simulate_many(params)])  # (cs, times)
            by_time = {f"t={t:g}": solved[:, k] for k, t in enumerate(times)}
            flow.setdefault(family, {})[n] = {"hardest_reward": by_time, "t_match": t_match} | edges_with_sensitivity(
                preset.cs, by_time, f"t={t_match:g}", preset.level
            )
            adam, solved_flow = exact[family][n], flow[family][n]
            print(
                f"{NAME}: n = {n}, {family}: Adam window [{adam['lower_display']}, {adam['upper_display']}], "
                f"flow [{solved_flow['lower_display']}, {solved_flow['upper_display']}]",
                flush=True,
            )
        seconds[n] = time.perf_counter() - tick
    return {
        "ns": preset.ns,
        "cs": preset.cs,
        "families": dict(preset.families),
        "level": preset.level,
        "main_setting": main,
        "t_match": t_match,
        "exact": exact,
        "flow": flow,
        "sampled": _sampled(preset),
        "summary": {
            family: {
                n: {
                    kind: f"[{entry[family][n]['lower_display']}, {entry[family][n]['upper_display']}]"
                    for kind, entry in (("adam", exact), ("flow", flow))
                }
                for n in preset.ns
            }
            for family, _ in preset.families
        },
        "seconds_per_n": seconds,
    }


def _sampled(preset: Preset) -> dict:
    """Sampled REINFORCE + Adam on the first family: the hardest-start reward after the budget, per seed."""
    family, easy = preset.families[0]
    out = {}
    keys = jax.random.split(jax.random.key(0), preset.seeds)
    for n in preset.sampled_ns:
        model, evals = model_spec(preset, n), {HARDEST: ChainTask.hardest(n)}
        for c in preset.sampled_cs:
            params = FlowParams(ChainTask.mixture(n, c, easy), model, Theta(*preset.theta0), eval_tasks=evals)
            finals = [
                float(
                    train(params, preset.lr, preset.steps, preset.batch, key, optimizer="adam").eval_readouts[HARDEST]["reward"][
                        -1
                    ]
                )
                for key in keys
            ]
            out.setdefault(n, {})[c] = {"final": finals, "mean": float(np.mean(finals)), "std": float(np.std(finals))}
    return {"family": family, "batch": preset.batch, "seeds": preset.seeds, "points": out}


def check(data: dict) -> list[str]:
    """Within the budget (exact Adam): hardest only (c = 0) and no hardest start (c = 1) are never learned; the
    smallest n has a window in every family; the lower edge of the first family does not fall with n."""
    preset, exact = data["preset"], data["exact"]
    main = data["main_setting"]
    ns = [str(n) for n in preset["ns"]]
    level = preset["level"]
    first = exact[preset["families"][0][0]]
    lowers = [first[n]["window"]["lower"] for n in ns if first[n]["window"]["lower"] is not None]
    return claim_failures(
        {
            "c = 0 (hardest only) is not learned at any n": all(
                fam[n]["hardest_reward"][main][0] < level for fam in exact.values() for n in ns
            ),
            "c = 1 (no hardest start) is not learned at any n": all(
                fam[n]["hardest_reward"][main][-1] < level for fam in exact.values() for n in ns
            ),
            "the smallest n has a window in every family": all(
                fam[ns[0]]["window"]["lower"] is not None for fam in exact.values()
            ),
            "the lower edge does not fall from the smallest to the largest n with a window": len(lowers) >= 1
            and lowers[-1] >= lowers[0] - first[ns[0]]["lower_uncertainty"],
        }
    )


def _edges(entry: dict, ns: tuple[int, ...], side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The main edge per n and its distance to the spread's ends (NaN where there is none)."""
    value = np.array([np.nan if entry[str(n)]["window"][side] is None else entry[str(n)]["window"][side] for n in ns])
    spread = np.array([entry[str(n)][f"{side}_spread"] or [np.nan, np.nan] for n in ns], dtype=float)
    return value, np.clip(value - spread[:, 0], 0, None), np.clip(spread[:, 1] - value, 0, None)


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, len(preset.families) + 1, width=4.6, height=3.8)
    ns = np.asarray(preset.ns)
    budget = f"Adam lr {preset.lr:g}, {preset.steps} steps"
    for k, (family, _) in enumerate(preset.families):
        ax = axes[0, k]
        exact, flow = data["exact"][family], data["flow"][family]
        lower, lower_lo, lower_hi = _edges(exact, preset.ns, "lower")
        upper, upper_lo, upper_hi = _edges(exact, preset.ns, "upper")
        ax.fill_between(ns, lower, upper, color=color(0), alpha=0.25, lw=0, label=f"learned: exact-gradient {budget}")
        ax.errorbar(ns, lower, yerr=[lower_lo, lower_hi], color=color(0), marker="o", ms=3, lw=1, capsize=2)
        ax.errorbar(ns, upper, yerr=[upper_lo, upper_hi], color=color(0), marker="o", ms=3, lw=1, capsize=2)
        for side in ("lower", "upper"):
            ax.plot(ns, _edges(flow, preset.ns, side)[0], color=color(1), ls="--", marker="x", ms=4)
        ax.plot([], [], color=color(1), ls="--", marker="x", label=f"gradient flow at t = {data['t_match']:g}")
        ax.plot([], [], color=color(0), marker="o", label="error bars: spread over lr × steps")
        ax.set(
            xlabel="chain length n",
            ylabel=f"easy mass c on {family}",
            ylim=(-0.02, 1.02),
            xticks=ns,
            title=f"window: hardest start reward ≥ {preset.level:g}, easy {family}",
        )
        if k == 0:
            _draw_sampled_points(ax, data["sampled"], preset)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7)
        panel_label(ax, "abc"[k])
    ax = axes[0, -1]
    family = preset.families[0][0]
    main = data["main_setting"]
    for j, n in enumerate(preset.sampled_ns):
        ax.plot(
            preset.cs,
            data["exact"][family][str(n)]["hardest_reward"][main],
            color=color(j),
            marker=".",
            label=f"n = {n}: exact Adam",
        )
        flow = data["flow"][family][str(n)]["hardest_reward"][f"t={data['t_match']:g}"]
        ax.plot(preset.cs, flow, color=color(j), ls="--", lw=1, label=f"n = {n}: flow")
        points = data["sampled"]["points"][str(n)]
        cs = [float(c) for c in points]
        means, stds = [points[c]["mean"] for c in points], [points[c]["std"] for c in points]
        ax.errorbar(
            cs, means, yerr=stds, color=color(j), ls="none", marker="s", ms=4, capsize=3, label=f"n = {n}: REINFORCE + Adam"
        )
    ax.axhline(preset.level, color="0.5", lw=0.8, ls=":")
    ax.set(xlabel=f"easy mass c on {family}", ylabel="hardest-start reward after the budget", ylim=(-0.02, 1.02), title=budget)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7, ncol=2)
    panel_label(ax, "abc"[len(preset.families)])
    fig.suptitle(
        f"The data window in the authors' setting (cap n + 1, self-loops, θ0 = {format_theta(preset.theta0)}, "
        f"τ = {preset.tau:g}): too little easy mass traps Adam, too much starves the hardest start"
    )
    return fig


def _draw_sampled_points(ax, sampled: dict, preset: Preset) -> None:
    """Sampled points at (n, c): filled where the mean reward reaches the level, open where it does not."""
    for n, points in sampled["points"].items():
        for c, point in points.items():
            learned = point["mean"] >= preset.level
            ax.plot(int(n), float(c), marker="s", ms=6, color=color(2), mfc=color(2) if learned else "none", ls="none")
    label = f"REINFORCE + Adam (batch {sampled['batch']}, {sampled['seeds']} seeds): filled = mean ≥ {preset.level:g}"
    ax.plot([], [], marker="s", color=color(2), ls="none", label=label)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=None, help=f"chain lengths (default {FULL.ns[0]}..{FULL.ns[-1]})")
    parser.add_argument("--seeds", type=int, default=None, help=f"REINFORCE seeds (default {FULL.seeds}; quick {QUICK.seeds})")
    parser.add_argument(
        "--batch", type=int, default=None, help=f"rollouts per REINFORCE step (default {FULL.batch}; quick {QUICK.batch})"
    )
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
