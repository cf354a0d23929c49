"""Figure `noise`: policy-gradient noise in closed form; the SGD diffusion against sampled SGD.

(a, b) n = 6, uniform starts, theta0 = (0.3, 0, 0), SGD with lr 0.05 at two batch sizes 16x apart:
the reward band (10-90 % over seeds, median line) of the diffusion d theta = grad J dt +
sqrt(lr) Cov_B^{1/2} dW (``gradflow.noise.simulate_sgd``, leave-one-out baseline as in sampled
training) against the band of sampled REINFORCE (``gradflow.training.train``, reduced coordinates),
with the noiseless flow.  (c) The critical batch trace(Sigma) / |grad J|^2 along the flow (n = 8) for
uniform, mixture (10 % on d = 1) and hardest-only data.  (d) The critical batch at the base model per
start distance d, for several n.  The JSON also holds the validation numbers (time to J = 0.9: mean
and spread over seeds, restricted to the horizon so "not reached" counts, with bootstrap standard
errors and z-scores), the speed of the SDE against sampling, and (full run) the diffusion at theta = 0
with hardest-only data, where the mean gradient vanishes.  Regenerate: ``gradflow figures noise``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta
from gradflow._series import first_crossing
from gradflow.flow import FlowParams, simulate, simulate_many
from gradflow.noise import critical_batch, critical_batch_along, gradient_covariance, simulate_sgd
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
from gradflow.training import train

NAME = "noise"
TASKS = {
    "uniform": ChainTask.uniform,
    "mixture (10% on d=1)": lambda n: ChainTask.mixture(n, 0.1),
    "hardest only": ChainTask.hardest,
}


@dataclass(frozen=True)
class Preset:
    """(a, b): n, SGD with lr at the batch sizes ``batches``, to ``horizon``, on the tasks ``validated`` (names
    of TASKS): ``seeds`` sampled runs against ``sde_seeds`` SDE paths, the time to ``level`` compared within
    |z| <= z_tolerance; with ``full_extras`` also the noiseless flow, the timings and the diffusion at theta = 0.
    (c) critical batch along the flow at critical_n to t_flow (``flow_saves`` log-spaced times); (d) at
    theta0 per start distance for ``critical_ns``."""

    seeds: int
    sde_seeds: int
    horizon: float
    validated: tuple[str, ...]
    t_flow: float
    flow_saves: int
    critical_ns: tuple[int, ...]
    full_extras: bool
    n: int = 6
    lr: float = 0.05
    level: float = 0.9
    batches: tuple[int, ...] = (8, 128)  # 16x apart
    z_tolerance: float = 3.0  # 8 comparisons: ~2 % false alarms
    critical_n: int = 8
    theta0: tuple[float, float, float] = (0.3, 0.0, 0.0)


QUICK = Preset(
    seeds=6, sde_seeds=32, horizon=3.0, validated=("uniform",), t_flow=300.0, flow_saves=60, critical_ns=(8,), full_extras=False
)
FULL = Preset(
    seeds=32,
    sde_seeds=256,
    horizon=8.0,
    validated=("uniform", "mixture (10% on d=1)"),
    t_flow=1e3,
    flow_saves=150,
    critical_ns=(4, 8, 12, 16),
    full_extras=True,
)


def hit_statistics(times: np.ndarray, horizon: float, n_boot: int = 2000, seed: int = 0) -> dict:
    """Time to the level per seed (inf = not reached): restricted to the horizon, min(T, horizon), so
    that no seed is dropped; mean and std with bootstrap standard errors, fraction reached, median."""
    times = np.asarray(times, dtype=float)
    restricted = np.minimum(times, horizon)
    rng = np.random.default_rng(seed)
    boot = restricted[rng.integers(0, restricted.size, (n_boot, restricted.size))]
    return {
        "n_seeds": int(times.size),
        "n_not_reached": int(np.sum(~np.isfinite(times))),
        "restricted_mean": float(restricted.mean()),
        "restricted_mean_se": float(boot.mean(axis=1).std(ddof=1)),
        "restricted_std": float(restricted.std(ddof=1)),
        "restricted_std_se": float(boot.std(axis=1, ddof=1).std(ddof=1)),
        "median": float(np.median(times)),
    }


def compare(sde: dict, sampled: dict, tolerance: float) -> dict:
    """z-scores of the SDE's hit-time mean and spread against sampling's (combined standard errors)."""
    z = {}
    for stat in ("restricted_mean", "restricted_std"):
        se = np.hypot(sde[f"{stat}_se"], sampled[f"{stat}_se"])
        z[stat] = float((sde[stat] - sampled[stat]) / se) if se > 0 else 0.0
    return {"z": z, "tolerance": tolerance, "agree": bool(all(abs(v) <= tolerance for v in z.values()))}


def _sampled_runs(params: FlowParams, preset: Preset, batch: int, steps: int):
    """Sampled SGD for ``seeds`` seeds: rewards (seeds, steps + 1), hit times, seconds after the first."""
    rewards, times = [], []
    start = first = time.perf_counter()
    for seed in range(preset.seeds):
        run = train(params, preset.lr, steps, batch, jax.random.key(1000 + seed))
        rewards.append(np.asarray(run.reward))
        hit = first_crossing(run.ts, run.reward, preset.level)
        times.append(np.inf if hit is None else hit)
        if seed == 0:
            first = time.perf_counter()
    steady = (time.perf_counter() - first) / max(preset.seeds - 1, 1)  # per seed, compiled
    return (
        np.asarray(run.ts),
        np.asarray(rewards),
        np.asarray(times),
        {"first_seconds": first - start, "seconds_per_seed": steady},
    )


def _sde_runs(params: FlowParams, preset: Preset, batch: int):
    keys = jax.random.split(jax.random.key(batch), preset.sde_seeds)
    paths = simulate_sgd(params, preset.lr, batch, keys, baseline="leave_one_out", t1=preset.horizon)
    timing = {"first_seconds": paths.stats["seconds"]}
    if preset.full_extras:  # a second call with fresh keys: compiled
        keys = jax.random.split(jax.random.key(batch + 1), preset.sde_seeds)
        again = simulate_sgd(params, preset.lr, batch, keys, baseline="leave_one_out", t1=preset.horizon)
        timing["seconds"] = again.stats["seconds"]
    return paths, timing


def _quantiles(rewards) -> np.ndarray:
    """10 %, median and 90 % over seeds (rows)."""
    return np.quantile(rewards, [0.1, 0.5, 0.9], axis=0)


def compute(preset: Preset) -> dict:
    """Hit-time statistics of the SDE against sampling per task and batch, bands, timings; critical batches."""
    model, theta0 = ModelSpec(), Theta(*preset.theta0)
    steps = int(round(preset.horizon / preset.lr))
    data = {
        "n": preset.n,
        "lr": preset.lr,
        "batches": preset.batches,
        "level": preset.level,
        "horizon": preset.horizon,
        "seeds": preset.seeds,
        "sde_seeds": preset.sde_seeds,
        "theta0": preset.theta0,
        "quick": not preset.full_extras,
        "validation": {},
        "speed": {},
        "bands": {},
        "flow": {},
    }
    for task_name in preset.validated:
        params = FlowParams(
            TASKS[task_name](preset.n), model, theta0, t1=preset.horizon, save_ts=preset.lr * np.arange(steps + 1)
        )
        flow = simulate(params, progress=False) if preset.full_extras else None  # quick: one compile less
        data["validation"][task_name] = {"flow_t_hit": None if flow is None else flow.events["reward_threshold"]}
        if flow is not None:
            data["flow"][task_name] = {"ts": flow.ts, "reward": flow.reward}
        for batch in preset.batches:
            ts, sampled_rewards, sampled_times, sampled_timing = _sampled_runs(params, preset, batch, steps)
            paths, sde_timing = _sde_runs(params, preset, batch)
            sde_stats, sampled_stats = (
                hit_statistics(paths.hit_times, preset.horizon),
                hit_statistics(sampled_times, preset.horizon),
            )
            data["validation"][task_name][batch] = {
                "sde": sde_stats,
                "sampled": sampled_stats,
                **compare(sde_stats, sampled_stats, preset.z_tolerance),
            }
            if task_name == preset.validated[0]:
                data["bands"][batch] = {
                    "ts": ts,
                    "sde_ts": paths.ts,
                    "sde": _quantiles(paths.reward),
                    "sampled": _quantiles(sampled_rewards),
                }
            if preset.full_extras:
                per_seed_sde = sde_timing["seconds"] / preset.sde_seeds
                data["speed"][f"{task_name}, B={batch}"] = {
                    "sampled_seconds_per_seed": sampled_timing["seconds_per_seed"],
                    "sde_seconds_per_seed": per_seed_sde,
                    "ratio": sampled_timing["seconds_per_seed"] / per_seed_sde,
                    "sampled_first_seconds": sampled_timing["first_seconds"],
                    "sde_first_seconds": sde_timing["first_seconds"],
                }

    ts_flow = log_times(preset.t_flow, preset.flow_saves, t_min=1e-2)
    tasks = {name: make(preset.critical_n) for name, make in TASKS.items()}
    flows = simulate_many([FlowParams(task, model, theta0, t1=preset.t_flow, save_ts=ts_flow) for task in tasks.values()])
    data["critical_along"] = {
        name: {
            "ts": traj.ts,
            "critical_batch": critical_batch_along(traj).total,
            "reward": traj.reward,
            "t_hit": traj.events["reward_threshold"],
        }
        for name, traj in zip(tasks, flows)
    }
    data["critical_base"] = {}
    for n in preset.critical_ns:
        crit = critical_batch(theta0, ChainTask.uniform(n), model)
        data["critical_base"][n] = {"per_start": np.asarray(crit.per_start), "uniform_total": float(crit.total)}

    # noise at theta = 0, hardest only: no mean gradient, the run diffuses
    sigma0 = np.asarray(gradient_covariance(Theta(0.0, 0.0, 0.0), ChainTask.hardest(preset.critical_n), model).covariance)
    data["diffusion"] = {
        "n": preset.critical_n,
        "trace_sigma_at_0": float(np.trace(sigma0)),
        "formula": "RMS |theta_k - theta_0| ~= lr * sqrt(k * trace(Sigma(0)) / B)",
    }
    if preset.full_extras:
        data["diffusion"]["runs"] = _diffusion_runs(preset, model)
    return data


def _diffusion_runs(preset: Preset, model: ModelSpec, steps: int = 200, seeds: int = 256) -> dict:
    """RMS displacement after ``steps`` SGD steps from theta = 0, hardest-only data (SDE), vs the formula."""
    out = {}
    task, zero = ChainTask.hardest(preset.critical_n), Theta(0.0, 0.0, 0.0)
    trace0 = float(np.trace(np.asarray(gradient_covariance(zero, task, model).covariance)))
    for batch in (16, 256):
        params = FlowParams(task, model, zero, t1=steps * preset.lr)
        paths = simulate_sgd(params, preset.lr, batch, jax.random.split(jax.random.key(7), seeds), t1=steps * preset.lr)
        displacement = np.linalg.norm(paths.theta[:, -1] - paths.theta[:, 0], axis=1)
        out[batch] = {
            "steps": steps,
            "lr": preset.lr,
            "rms_displacement": float(np.sqrt(np.mean(displacement**2))),
            "formula": preset.lr * np.sqrt(steps * trace0 / batch),
            "final_reward_mean": float(paths.reward[:, -1].mean()),
            "final_reward_max": float(paths.reward[:, -1].max()),
            "rms_by_coordinate": np.sqrt(np.mean((paths.theta[:, -1] - paths.theta[:, 0]) ** 2, axis=0))[:3],
        }
    return out


def check(data: dict) -> list[str]:
    """The SDE's hit-time mean and spread agree with sampling's at every task and batch; the small batch
    spreads more than twice as much; the critical batch grows > 10x per start distance at the base model,
    and starts > 1e4 x larger for hardest-only data than for uniform data; Sigma(0) is not zero."""
    small, large = (str(b) for b in data["preset"]["batches"])
    first = data["validation"][data["preset"]["validated"][0]]
    critical_n = str(data["preset"]["critical_n"])
    per_d = np.asarray(data["critical_base"][critical_n]["per_start"], dtype=float)
    along = data["critical_along"]
    return claim_failures(
        {
            "SDE and sampling agree (|z| within the tolerance) at every task and batch": all(
                entry[b]["agree"] for entry in data["validation"].values() for b in (small, large)
            ),
            "the small batch spreads the hit time more than twice as much": first[small]["sde"]["restricted_std"]
            > 2.0 * first[large]["sde"]["restricted_std"],
            "critical batch at the base model grows > 10x per start distance": bool(np.all(per_d[1:] / per_d[:-1] > 10.0)),
            "hardest-only data starts with a > 1e4 x larger critical batch than uniform": along["hardest only"]["critical_batch"][
                0
            ]
            > 1e4 * along["uniform"]["critical_batch"][0],
            "trace Sigma(0) > 0 for hardest-only data": data["diffusion"]["trace_sigma_at_0"] > 0,
        }
    )


def _band(ax, ts, quantiles, k: int, label: str, hatch: bool = False):
    lo, mid, hi = np.asarray(quantiles, dtype=float)
    if hatch:
        ax.plot(ts, lo, color=color(k), lw=0.9, ls="--")
        ax.plot(ts, hi, color=color(k), lw=0.9, ls="--")
        ax.plot(ts, mid, color=color(k), lw=1.4, ls="--", label=label)
    else:
        ax.fill_between(ts, lo, hi, color=color(k), alpha=0.25, lw=0)
        ax.plot(ts, mid, color=color(k), lw=1.4, label=label)


def draw(data: dict, preset: Preset):
    fig, axes = subplots(1, 4, width=4.0, height=3.4)
    task_name = preset.validated[0]
    for j, batch in enumerate(preset.batches):
        ax, band = axes[0, j], data["bands"][str(batch)]
        _band(ax, np.asarray(band["sde_ts"], dtype=float), band["sde"], 0, f"SDE ({preset.sde_seeds} seeds)")
        _band(ax, np.asarray(band["ts"], dtype=float), band["sampled"], 1, f"sampled SGD ({preset.seeds} seeds)", hatch=True)
        if task_name in data["flow"]:
            flow_ts, flow_reward = (np.asarray(data["flow"][task_name][k], dtype=float) for k in ("ts", "reward"))
            ax.plot(flow_ts, flow_reward, color="k", lw=1.2, label="flow (no noise)")
        ax.axhline(preset.level, color="0.5", lw=0.8, ls=":")
        title = f"n = {preset.n}, {task_name}, lr = {preset.lr:g}, B = {batch}"
        ax.set(xlabel=TIME_LABEL, ylabel="J(theta)", title=title, xlim=(0, preset.horizon))
        ax.legend(loc="lower right")
        panel_label(ax, "ab"[j])

    ax = axes[0, 2]
    for k, (name, run) in enumerate(data["critical_along"].items()):
        ts = np.asarray(run["ts"], dtype=float)
        keep = ts > 0
        ax.plot(ts[keep], np.asarray(run["critical_batch"], dtype=float)[keep], color=color(k), label=name)
        if run["t_hit"] is not None:
            ax.axvline(run["t_hit"], color=color(k), lw=0.7, ls=":")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=TIME_LABEL,
        ylabel="critical batch trace(Σ)/|∇J|²",
        title=f"along the flow, n = {preset.critical_n} (dotted: J = {preset.level:g})",
    )
    ax.legend(loc="best")
    panel_label(ax, "c")

    ax = axes[0, 3]
    for k, n in enumerate(preset.critical_ns):
        per_start = np.asarray(data["critical_base"][str(n)]["per_start"], dtype=float)
        ax.plot(np.arange(1, n), per_start, color=color(k), marker="o", ms=3, label=f"n = {n}")
    ax.set(
        yscale="log",
        xlabel="start distance d",
        ylabel="critical batch (task = start d only)",
        title=f"base model θ0 = {format_theta(preset.theta0)}",
    )
    ax.legend(loc="best")
    panel_label(ax, "d")
    return fig


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"sampled-training seeds (default {FULL.seeds}; quick {QUICK.seeds})"
    )
    parser.add_argument(
        "--sde-seeds", type=int, default=None, help=f"SDE seeds (default {FULL.sde_seeds}; quick {QUICK.sde_seeds})"
    )
    parser.add_argument(
        "--horizon",
        type=float,
        default=None,
        help=f"last flow time of the runs (default {FULL.horizon:g}; quick {QUICK.horizon:g})",
    )
    return run_experiment(NAME, parser.parse_args(argv), QUICK, FULL, compute, check, draw)


if __name__ == "__main__":
    main()
