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

import jax
import numpy as np

from gradflow import ChainTask, ModelSpec, Theta
from gradflow._series import first_crossing
from gradflow.flow import FlowParams, simulate, simulate_many
from gradflow.noise import critical_batch, critical_batch_along, gradient_covariance, simulate_sgd
from gradflow.plotting import TIME_LABEL, color, experiment_parser, log_times, panel_label, save_figure, subplots

try:
    from gradflow.training import train
except ImportError:  # older layout
    from gradflow.sampling import train

NAME = "noise"
N = 6
LR = 0.05
LEVEL = 0.9
BATCHES = (8, 128)  # 16x apart
Z_TOLERANCE = 3.0  # |z| bound for SDE vs sampled hit-time statistics (8 comparisons: ~2 % false alarms)
CRITICAL_N = 8
THETA0 = (0.3, 0.0, 0.0)


def _task_presets(n: int) -> dict[str, ChainTask]:
    return {
        "uniform": ChainTask.uniform(n),
        "mixture (10% on d=1)": ChainTask.mixture(n, 0.1),
        "hardest only": ChainTask.hardest(n),
    }


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


def compare(sde: dict, sampled: dict) -> dict:
    """z-scores of the SDE's hit-time mean and spread against sampling's (combined standard errors)."""
    z = {}
    for stat in ("restricted_mean", "restricted_std"):
        se = np.hypot(sde[f"{stat}_se"], sampled[f"{stat}_se"])
        z[stat] = float((sde[stat] - sampled[stat]) / se) if se > 0 else 0.0
    return {"z": z, "tolerance": Z_TOLERANCE, "agree": bool(all(abs(v) <= Z_TOLERANCE for v in z.values()))}


def _sampled_runs(params: FlowParams, batch: int, steps: int, seeds: int):
    """Sampled SGD for ``seeds`` seeds: rewards (seeds, steps + 1), hit times, seconds after the first."""
    rewards, times = [], []
    start = first = time.perf_counter()
    for seed in range(seeds):
        run = train(params, LR, steps, batch, jax.random.key(1000 + seed))
        rewards.append(np.asarray(run.reward))
        hit = first_crossing(run.ts, run.reward, LEVEL)
        times.append(np.inf if hit is None else hit)
        if seed == 0:
            first = time.perf_counter()
    steady = (time.perf_counter() - first) / max(seeds - 1, 1)  # per seed, compiled
    return (
        np.asarray(run.ts),
        np.asarray(rewards),
        np.asarray(times),
        {"first_seconds": first - start, "seconds_per_seed": steady},
    )


def _sde_runs(params: FlowParams, batch: int, horizon: float, seeds: int, timed: bool):
    keys = jax.random.split(jax.random.key(batch), seeds)
    paths = simulate_sgd(params, LR, batch, keys, baseline="leave_one_out", t1=horizon)
    timing = {"first_seconds": paths.stats["seconds"]}
    if timed:  # a second call with fresh keys: compiled
        again = simulate_sgd(
            params, LR, batch, jax.random.split(jax.random.key(batch + 1), seeds), baseline="leave_one_out", t1=horizon
        )
        timing["seconds"] = again.stats["seconds"]
    return paths, timing


def _band(ax, ts, rewards, k: int, label: str, hatch: bool = False):
    lo, mid, hi = np.quantile(rewards, [0.1, 0.5, 0.9], axis=0)
    if hatch:
        ax.plot(ts, lo, color=color(k), lw=0.9, ls="--")
        ax.plot(ts, hi, color=color(k), lw=0.9, ls="--")
        ax.plot(ts, mid, color=color(k), lw=1.4, ls="--", label=label)
    else:
        ax.fill_between(ts, lo, hi, color=color(k), alpha=0.25, lw=0)
        ax.plot(ts, mid, color=color(k), lw=1.4, label=label)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="sampled-training seeds (default 32; quick 6)")
    parser.add_argument("--sde-seeds", type=int, default=None, help="SDE seeds (default 256; quick 32)")
    parser.add_argument("--horizon", type=float, default=None, help="last flow time of the runs (default 8; quick 3)")
    args = parser.parse_args(argv)
    quick = args.quick
    seeds = args.seeds or (6 if quick else 32)
    sde_seeds = args.sde_seeds or (32 if quick else 256)
    horizon = args.horizon or (3.0 if quick else 8.0)
    steps = int(round(horizon / LR))
    model = ModelSpec()
    tasks = (
        {"uniform": ChainTask.uniform(N)}
        if quick
        else {"uniform": ChainTask.uniform(N), "mixture (10% on d=1)": ChainTask.mixture(N, 0.1)}
    )
    data = {
        "n": N,
        "lr": LR,
        "batches": BATCHES,
        "level": LEVEL,
        "horizon": horizon,
        "seeds": seeds,
        "sde_seeds": sde_seeds,
        "theta0": THETA0,
        "quick": quick,
        "validation": {},
        "speed": {},
        "bands": {},
    }

    fig, axes = subplots(1, 4, width=4.0, height=3.4)
    for task_name, task in tasks.items():
        params = FlowParams(task, model, Theta(*THETA0), t1=horizon, save_ts=LR * np.arange(steps + 1))
        flow = None if quick else simulate(params, progress=False)  # quick: no noiseless line (one compile less)
        data["validation"][task_name] = {"flow_t_hit": None if flow is None else flow.events["reward_threshold"]}
        for j, batch in enumerate(BATCHES):
            ts, sampled_rewards, sampled_times, sampled_timing = _sampled_runs(params, batch, steps, seeds)
            paths, sde_timing = _sde_runs(params, batch, horizon, sde_seeds, timed=not quick)
            sde_stats = hit_statistics(paths.hit_times, horizon)
            sampled_stats = hit_statistics(sampled_times, horizon)
            data["validation"][task_name][batch] = {
                "sde": sde_stats,
                "sampled": sampled_stats,
                **compare(sde_stats, sampled_stats),
            }
            if task_name == "uniform":
                ax = axes[0, j]
                _band(ax, paths.ts, paths.reward, 0, f"SDE ({sde_seeds} seeds)")
                _band(ax, ts, sampled_rewards, 1, f"sampled SGD ({seeds} seeds)", hatch=True)
                if flow is not None:
                    ax.plot(flow.ts, flow.reward, color="k", lw=1.2, label="flow (no noise)")
                ax.axhline(LEVEL, color="0.5", lw=0.8, ls=":")
                ax.set(xlabel=TIME_LABEL, ylabel="J(theta)", title=f"n = {N}, uniform, lr = {LR}, B = {batch}", xlim=(0, horizon))
                ax.legend(loc="lower right")
                panel_label(ax, "ab"[j])
                band = lambda r: np.quantile(r, [0.1, 0.5, 0.9], axis=0)
                data["bands"][batch] = {"ts": ts, "sde": band(paths.reward[:, : ts.size]), "sampled": band(sampled_rewards)}
            if not quick:
                per_seed_sde = sde_timing["seconds"] / sde_seeds
                data["speed"][f"{task_name}, B={batch}"] = {
                    "sampled_seconds_per_seed": sampled_timing["seconds_per_seed"],
                    "sde_seconds_per_seed": per_seed_sde,
                    "ratio": sampled_timing["seconds_per_seed"] / per_seed_sde,
                    "sampled_first_seconds": sampled_timing["first_seconds"],
                    "sde_first_seconds": sde_timing["first_seconds"],
                }

    # (c) critical batch along the flow, n = 8
    presets = _task_presets(CRITICAL_N)
    t_flow = 300.0 if quick else 1e3
    ts_flow = log_times(t_flow, 60 if quick else 150, t_min=1e-2)
    flows = simulate_many([FlowParams(task, model, Theta(*THETA0), t1=t_flow, save_ts=ts_flow) for task in presets.values()])
    ax = axes[0, 2]
    data["critical_along"] = {}
    for k, (name, traj) in enumerate(zip(presets, flows)):
        crit = critical_batch_along(traj)
        keep = traj.ts > 0
        ax.plot(traj.ts[keep], crit.total[keep], color=color(k), label=name)
        t_hit = traj.events["reward_threshold"]
        if t_hit is not None:
            ax.axvline(t_hit, color=color(k), lw=0.7, ls=":")
        data["critical_along"][name] = {"ts": traj.ts, "critical_batch": crit.total, "reward": traj.reward, "t_hit": t_hit}
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=TIME_LABEL,
        ylabel="critical batch trace(Σ)/|∇J|²",
        title=f"along the flow, n = {CRITICAL_N} (dotted: J = 0.9)",
    )
    ax.legend(loc="best")
    panel_label(ax, "c")

    # (d) critical batch at the base model per start distance
    ax = axes[0, 3]
    data["critical_base"] = {}
    for k, n in enumerate((CRITICAL_N,) if quick else (4, 8, 12, 16)):
        crit = critical_batch(Theta(*THETA0), ChainTask.uniform(n), model)
        per_d = np.asarray(crit.per_start)
        ax.plot(np.arange(1, n), per_d, color=color(k), marker="o", ms=3, label=f"n = {n}")
        data["critical_base"][n] = {"per_start": per_d, "uniform_total": float(crit.total)}
    ax.set(
        yscale="log",
        xlabel="start distance d",
        ylabel="critical batch (task = start d only)",
        title="base model θ0 = (0.3, 0, 0)",
    )
    ax.legend(loc="best")
    panel_label(ax, "d")

    # noise at theta = 0, hardest only: no mean gradient, the run diffuses
    zero = Theta(0.0, 0.0, 0.0)
    sigma0 = np.asarray(gradient_covariance(zero, ChainTask.hardest(CRITICAL_N), model).covariance)
    data["diffusion"] = {
        "n": CRITICAL_N,
        "trace_sigma_at_0": float(np.trace(sigma0)),
        "formula": "RMS |theta_k - theta_0| ~= lr * sqrt(k * trace(Sigma(0)) / B)",
    }
    if not quick:
        data["diffusion"]["runs"] = _diffusion_runs(model)

    save_figure(fig, NAME, args.out, data)
    return data


def _diffusion_runs(model: ModelSpec, steps: int = 200, seeds: int = 256) -> dict:
    """RMS displacement after ``steps`` SGD steps from theta = 0, hardest-only data (SDE), vs the formula."""
    out = {}
    task = ChainTask.hardest(CRITICAL_N)
    trace0 = float(np.trace(np.asarray(gradient_covariance(Theta(0.0, 0.0, 0.0), task, model).covariance)))
    for batch in (16, 256):
        params = FlowParams(task, model, Theta(0.0, 0.0, 0.0), t1=steps * LR)
        paths = simulate_sgd(params, LR, batch, jax.random.split(jax.random.key(7), seeds), t1=steps * LR)
        displacement = np.linalg.norm(paths.theta[:, -1] - paths.theta[:, 0], axis=1)
        out[batch] = {
            "steps": steps,
            "lr": LR,
            "rms_displacement": float(np.sqrt(np.mean(displacement**2))),
            "formula": LR * np.sqrt(steps * trace0 / batch),
            "final_reward_mean": float(paths.reward[:, -1].mean()),
            "final_reward_max": float(paths.reward[:, -1].max()),
            "rms_by_coordinate": np.sqrt(np.mean((paths.theta[:, -1] - paths.theta[:, 0]) ** 2, axis=0))[:3],
        }
    return out


if __name__ == "__main__":
    main()
