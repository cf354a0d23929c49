"""The ``gradflow`` command line: run (the main job), simulate, check, figures, sweep, info."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DEFAULT_N = 8
REPORT_TIMES = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4)


def _task_from_args(args):
    from gradflow.task import ChainTask

    if args.dist == "uniform":
        return ChainTask.uniform(args.n)
    if args.dist == "hardest":
        return ChainTask.hardest(args.n)
    return ChainTask.mixture(args.n, args.easy_mass, tuple(args.easy_steps))


def _flow_from_args(args):
    from gradflow.flow import FlowParams
    from gradflow.model import ModelSpec, Theta

    model = ModelSpec(attention=args.attention, tau=args.tau, mask_self=not args.allow_self, n_isolated=args.n_isolated)
    return FlowParams(
        _task_from_args(args),
        model,
        theta0=Theta(*args.theta0),
        t1=args.t1,
        coords=args.coords,
        solver=args.solver,
        rtol=args.rtol,
        atol=args.atol,
        reward_threshold=args.threshold,
    )


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="vertices per chain (>= 2), default 8")
    parser.add_argument("--dist", choices=("uniform", "hardest", "mixture"), default="uniform",
                        help="start distribution over distances d = 1..n-1 (default uniform)")
    parser.add_argument("--easy-mass", type=float, default=0.1, help="mixture: mass on the easy distances (default 0.1)")
    parser.add_argument("--easy-steps", type=int, nargs="+", default=[1], help="mixture: the easy distances (default 1)")
    parser.add_argument("--attention", choices=("linear", "softmax"), default="linear", help="attention kind (default linear)")
    parser.add_argument("--tau", type=float, default=0.2, help="logit temperature > 0 (default 0.2)")
    parser.add_argument("--allow-self", action="store_true", help="let the model write the current vertex (self-loops)")
    parser.add_argument("--n-isolated", type=int, default=0, help="isolated vertices in the vocabulary (default 0)")
    parser.add_argument("--theta0", type=float, nargs=5, default=[0.3, 0.0, 0.0, 0.0, 0.0],
                        metavar=("ALPHA", "BETA", "GAMMA", "ETA", "DELTA"), help="start (default 0.3 0 0 0 0)")
    parser.add_argument("--t1", type=float, default=1e4, help="final time of the flow (default 1e4)")
    parser.add_argument("--coords", choices=("reduced", "full"), default="reduced", help="flow coordinates (default reduced)")
    parser.add_argument("--solver", choices=("tsit5", "dopri5", "dopri8", "kvaerno5"), default="tsit5", help="ODE solver")
    parser.add_argument("--rtol", type=float, default=1e-8, help="relative tolerance (default 1e-8)")
    parser.add_argument("--atol", type=float, default=1e-10, help="absolute tolerance (default 1e-10)")
    parser.add_argument("--threshold", type=float, default=0.9, help="reward level whose hitting time is reported (default 0.9)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress meter")


def report(trajectory) -> str:
    """A short human-readable summary of a trajectory."""
    lines = [f"config: n={trajectory.config.task.n}, start_probs={np.round(np.asarray(trajectory.config.task.start_probs), 4).tolist()}"]
    for t in REPORT_TIMES:
        if trajectory.ts[0] <= t <= trajectory.ts[-1]:
            k = int(np.argmin(np.abs(trajectory.ts - t)))
            lines.append(f"  t = {trajectory.ts[k]:>10.4g}   reward = {trajectory.reward[k]:.6f}")
    threshold = float(trajectory.config.reward_threshold)
    t_hit = trajectory.events["reward_threshold"]
    lines.append(f"t_hit({threshold:g}) = {'not reached' if t_hit is None else f'{t_hit:.6g}'}")
    alpha, beta, gamma = trajectory.theta[-1, :3]
    lines.append(f"final alpha = {alpha:.4f}, beta = {beta:.4f}, gamma = {gamma:.4f}")
    lines.append(f"expected length = {trajectory.expected_length[-1]:.4f} (minimal {trajectory.minimal_length:.4f})")
    lines.append(f"solver: {trajectory.stats['num_steps']} steps ({trajectory.stats['num_rejected_steps']} rejected), "
                 f"compile {trajectory.stats['compile_seconds']:.2f} s, run {trajectory.stats['run_seconds']:.3f} s")
    return "\n".join(lines)


def cmd_run(args) -> int:
    """The main job: the default preset, a report and figures/emergence.png."""
    from gradflow.flow import simulate

    trajectory = simulate(_flow_from_args(args), progress=not args.no_progress)
    print(report(trajectory))
    _plot_emergence(trajectory, Path(args.figure))
    return 0


def _plot_emergence(trajectory, out: Path) -> None:
    """The emergence figure of ``experiments/emergence.py`` (one code path): out.png, .pdf and .json."""
    from gradflow.plotting import emergence_figure, save_figure

    out = Path(out)
    fig, data = emergence_figure(trajectory)
    save_figure(fig, out.with_suffix("").name, out.parent, data)


def cmd_simulate(args) -> int:
    """Run any config and save it (npz + JSON sidecar)."""
    from gradflow.flow import simulate

    trajectory = simulate(_flow_from_args(args), progress=not args.no_progress)
    print(report(trajectory))
    print(f"saved {trajectory.save(args.out)}")
    return 0


def cmd_check(args) -> int:
    """Condition and phase reports for a preset or a saved run."""
    from gradflow import theory
    from gradflow.flow import Trajectory, simulate

    if args.run:
        trajectory = Trajectory.load(args.run)
    else:
        trajectory = simulate(_flow_from_args(args), progress=not args.no_progress)
    print(theory.check_conditions(trajectory.config))
    print(theory.phases(trajectory))
    return 0


def cmd_figures(args) -> int:
    """Run experiments/<name>.py for one figure or all of them."""
    import runpy

    folder = Path(__file__).resolve().parents[1] / "experiments"
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")) if args.all else [args.name]
    if not names or names == [None]:
        print("give a figure name or --all", file=sys.stderr)
        return 2
    for name in names:
        script = folder / f"{name}.py"
        if not script.exists():
            print(f"unknown figure {name!r}; known: {sorted(p.stem for p in folder.glob('*.py'))}", file=sys.stderr)
            return 2
        argv = sys.argv
        sys.argv = [str(script)] + (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
    return 0


def cmd_sweep(args) -> int:
    """Job-array mode: run the configs of a JSON file, skipping results already in --out."""
    from gradflow.sweep import run_sweep

    run_sweep(args.config, args.out, resume=args.resume, progress=not args.no_progress, index=args.index, count=args.count)
    return 0


def cmd_info(args) -> int:
    """Versions, backend, devices and float64 status."""
    import diffrax
    import jax
    import jaxlib

    import gradflow

    print(f"gradflow {gradflow.__version__}")
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, diffrax {diffrax.__version__}")
    print(f"default backend: {jax.default_backend()}")
    for device in jax.devices():
        print(f"  device {device.id}: {device.platform} {device.device_kind}")
    print(f"float64 enabled: {bool(jax.config.jax_enable_x64)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="simulate the default preset, print a report, write figures/emergence.png")
    _add_config_arguments(run)
    run.add_argument("--figure", default="figures/emergence.png",
                     help="where to write the figure (also writes the .pdf and the .json of numbers beside it)")
    run.set_defaults(func=cmd_run)

    simulate = sub.add_parser("simulate", help="simulate any config and save the trajectory")
    _add_config_arguments(simulate)
    simulate.add_argument("--out", required=True, help="output path (writes PATH.npz and PATH.json)")
    simulate.set_defaults(func=cmd_simulate)

    check = sub.add_parser("check", help="the paper's conditions and the observed phases")
    _add_config_arguments(check)
    check.add_argument("--run", help="a saved trajectory (.npz) instead of simulating the preset")
    check.set_defaults(func=cmd_check)

    figures = sub.add_parser("figures", help="regenerate figures from experiments/")
    figures.add_argument("name", nargs="?", help="figure name (script in experiments/)")
    figures.add_argument("--all", action="store_true", help="every figure")
    figures.add_argument("--quick", action="store_true", help="fast, reduced version (seconds)")
    figures.add_argument("--out", help="output directory for NAME.png/.pdf/.json (default figures/)")
    figures.set_defaults(func=cmd_figures)

    sweep = sub.add_parser("sweep", help="job-array mode over a JSON file of configs")
    sweep.add_argument("config", help="JSON file: a list of FlowParams.to_dict() configs (or one)")
    sweep.add_argument("--out", required=True, help="directory of results, one per config hash")
    sweep.add_argument("--resume", action="store_true", help="skip configs whose result already exists")
    sweep.add_argument("--index", type=int, default=0, help="job-array slice: take configs index, index+count, ... (default 0)")
    sweep.add_argument("--count", type=int, default=1, help="job-array slice: number of array tasks (default 1)")
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress meter")
    sweep.set_defaults(func=cmd_sweep)

    info = sub.add_parser("info", help="versions, backend, devices, float64")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"gradflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
