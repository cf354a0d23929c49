"""The ``gradflow`` command line: run (the main job), simulate, check, figures, sweep, info.

Errors: a bad flag value, a missing or malformed config or result file, or an output path that
cannot be written is reported in one line naming the problem, with exit status 2, before anything
is solved.  A solve that cannot finish (e.g. it ran out of ``max_steps``) or a sweep with failed
configs is reported in one line with exit status 1.  Anything else is a bug in gradflow and is
raised with its traceback (Python's exit status 1), never reported as a bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import diffrax
import jax
import jaxlib
import numpy as np

from gradflow import design, flow, schedules, sweep, theory
from gradflow._version import __version__
from gradflow.flow import COORDS, RECORDED, SOLVERS, FlowParams, Trajectory, as_theta
from gradflow.model import ATTENTION_KINDS, ModelSpec
from gradflow.plotting import emergence_figure, save_figure, use_headless_backend
from gradflow.readouts import READOUTS
from gradflow.task import ChainTask

DEFAULT_N = 8
REPORT_TIMES = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4)
EXIT_INPUT = 2  # bad input: flag value, config or result file, output path
EXIT_FAILED = 1  # a solve or sweep that could not finish
FIGURE_PACKAGE = "gradflow.experiments"
SIMULATE_NAME = "run"  # gradflow simulate --out FOLDER writes FOLDER/run.npz and run.json


class InputError(ValueError):
    """A user input the CLI rejects (reported in one line, exit status 2)."""


@contextlib.contextmanager
def _input_stage():
    """Turn ValueError / OSError raised while reading the inputs into an InputError (one line)."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, OSError) as error:
        raise InputError(str(error)) from None


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) naming the flag."""

    def error(self, message):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _task_from_args(args):
    if args.dist == "uniform":
        return ChainTask.uniform(args.n)
    if args.dist == "hardest":
        return ChainTask.hardest(args.n)
    if args.dist == "k_hardest":
        return ChainTask.k_hardest(args.n, args.k)
    return ChainTask.mixture(args.n, args.easy_mass, tuple(args.easy_steps))


def _flow_from_args(args):
    model = ModelSpec(attention=args.attention, tau=args.tau, mask_self=not args.allow_self, n_isolated=args.n_isolated)
    extra = {} if args.theta0 is None else {"theta0": as_theta(args.theta0, "--theta0")}
    if args.readouts is not None:
        extra["readouts"] = tuple(args.readouts)
    return FlowParams(
        _task_from_args(args),
        model,
        t1=args.t1,
        coords=args.coords,
        solver=args.solver,
        rtol=args.rtol,
        atol=args.atol,
        reward_threshold=args.threshold,
        **extra,
    )


def _writable_dir(path, flag: str) -> Path:
    """``path`` as a directory we can write into (created if missing), or ValueError naming ``flag``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {str(path)!r}: cannot write there ({error.strerror or error})") from None
    return path


def _writable_files(path, flag: str, suffixes: Sequence) -> Path:
    """Check that ``path`` with each of ``suffixes`` can be written; returns ``path``."""
    path = Path(path)
    try:
        _writable_dir(path.parent, "folder")
    except ValueError as error:
        raise ValueError(f"{flag} {str(path)!r}: {error}") from None
    for suffix in suffixes:
        target = path.with_suffix(suffix)
        if target.is_dir():
            raise ValueError(f"{flag} {str(path)!r}: {target} is a directory")
        if target.exists() and not os.access(target, os.W_OK):
            raise ValueError(f"{flag} {str(path)!r}: {target} is not writable")
    return path


def load_trajectory(path, flag: str = "--run"):
    """``Trajectory.load(path)`` with one-line ValueErrors naming the file (missing, truncated, foreign)."""
    path = Path(path)
    npz = path.with_suffix(".npz")
    for file in (npz, npz.with_suffix(".json")):
        if not file.is_file():
            raise ValueError(f"{flag} {str(path)!r}: no such result file {str(file)!r}")
    try:
        return Trajectory.load(npz)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
        detail = (
            f"missing key {error}"
            if isinstance(error, KeyError)
            else str(error).strip().splitlines()[0]
            if str(error).strip()
            else ""
        )
        raise ValueError(f"{flag} {str(path)!r}: not a readable gradflow result ({type(error).__name__}: {detail})") from None


def _choices():
    """The choice lists, read from the modules that define them."""
    return {"solver": tuple(SOLVERS), "coords": tuple(COORDS), "attention": tuple(ATTENTION_KINDS), "readouts": RECORDED}


def _add_config_arguments(parser: argparse.ArgumentParser, choices: dict) -> None:
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="vertices per chain (>= 2), default 8")
    parser.add_argument(
        "--dist",
        choices=("uniform", "hardest", "mixture", "k_hardest"),
        default="uniform",
        help="start distribution over distances d = 1..n-1 (default uniform)",
    )
    parser.add_argument("--easy-mass", type=float, default=0.1, help="mixture: mass on the easy distances (default 0.1)")
    parser.add_argument("--easy-steps", type=int, nargs="+", default=[1], help="mixture: the easy distances (default 1)")
    parser.add_argument("--k", type=int, default=1, help="k_hardest: uniform over the k hardest starts (default 1)")
    parser.add_argument("--attention", choices=choices["attention"], default="linear", help="attention kind (default linear)")
    parser.add_argument("--tau", type=float, default=0.2, help="logit temperature > 0 (default 0.2)")
    parser.add_argument("--allow-self", action="store_true", help="let the model write the current vertex (self-loops)")
    parser.add_argument("--n-isolated", type=int, default=0, help="isolated vertices in the vocabulary (default 0)")
    parser.add_argument(
        "--theta0",
        type=float,
        nargs="+",
        default=None,
        metavar="X",
        help="start: 1 to 5 numbers alpha beta gamma eta delta, the rest 0 (default 0.3 0 0 0 0)",
    )
    parser.add_argument("--t1", type=float, default=1e4, help="final time of the flow (default 1e4)")
    parser.add_argument("--coords", choices=choices["coords"], default="reduced", help="flow coordinates (default reduced)")
    parser.add_argument("--solver", choices=choices["solver"], default="tsit5", help="ODE solver (default tsit5)")
    parser.add_argument("--rtol", type=float, default=1e-8, help="relative tolerance (default 1e-8)")
    parser.add_argument("--atol", type=float, default=1e-10, help="absolute tolerance (default 1e-10)")
    parser.add_argument("--threshold", type=float, default=0.9, help="reward level whose hitting time is reported (default 0.9)")
    parser.add_argument(
        "--readouts",
        nargs="+",
        choices=choices["readouts"],
        default=None,
        metavar="NAME",
        help=f"read-outs to record (gradflow.readouts; the reward always is): {', '.join(choices['readouts'])} (default all)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress meter")


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def _event_time(trajectory):
    events = trajectory.events
    for name in ("reward_threshold", "threshold"):
        if name in events:
            return events[name]
    return None


def report(trajectory) -> str:
    """A short human-readable summary of a trajectory (the final save is always listed)."""
    ts = np.asarray(trajectory.ts)
    reward = np.asarray(trajectory.reward)
    finite = np.flatnonzero(np.isfinite(ts))
    task = trajectory.config.task
    lines = [f"config: n={task.n}, start_probs={np.round(np.asarray(task.start_probs), 4).tolist()}"]
    shown = set()
    for t in REPORT_TIMES:
        if finite.size and ts[finite[0]] <= t <= ts[finite[-1]]:
            k = int(finite[np.argmin(np.abs(ts[finite] - t))])
            if k not in shown:
                shown.add(k)
                lines.append(f"  t = {ts[k]:>10.4g}   reward = {reward[k]:.6f}")
    if finite.size and int(finite[-1]) not in shown:  # t1 past the table (or a stopped flow)
        k = int(finite[-1])
        lines.append(f"  t = {ts[k]:>10.4g}   reward = {reward[k]:.6f}   (final)")
    threshold = float(trajectory.config.reward_threshold)
    t_hit = _event_time(trajectory)
    lines.append(f"t_hit({threshold:g}) = {'not reached' if t_hit is None else f'{t_hit:.6g}'}")
    last = int(finite[-1]) if finite.size else -1
    alpha, beta, gamma = np.asarray(trajectory.theta)[last, :3]
    lines.append(f"final alpha = {alpha:.4f}, beta = {beta:.4f}, gamma = {gamma:.4f}")
    lines += _readout_lines(trajectory, last)
    stats = trajectory.stats
    lines.append(
        f"solver: {stats.get('num_steps')} steps ({stats.get('num_rejected_steps')} rejected), "
        f"compile {stats.get('compile_seconds', 0.0):.2f} s, run {stats.get('run_seconds', 0.0):.3f} s"
    )
    return "\n".join(lines)


def _readout_lines(trajectory, k: int) -> list[str]:
    """The recorded read-outs other than the reward at save k, each with its math (``gradflow.readouts``)."""
    lines = ["read-outs at the final save:"]
    for name in trajectory.config.recording.readout_names()[1:]:
        value = np.asarray(getattr(trajectory, name))[k]
        shown = f"{value:.4f}" if value.ndim == 0 else f"{value.min():.4f} .. {value.max():.4f} over positions"
        if name == "expected_length":
            shown += f" (minimal {trajectory.minimal_length:.4f})"
        lines.append(f"  {name} = {shown}   [{READOUTS[name].description}]")
    return lines


def cmd_run(args) -> int:
    """The main job: the default preset, a report and figures/emergence.png."""
    with _input_stage():
        params = _flow_from_args(args)
        figure = _writable_files(args.figure, "--figure", (".png", ".pdf", ".json"))
    trajectory = flow.simulate(params, progress=not args.no_progress)
    print(report(trajectory))
    _plot_emergence(trajectory, figure)
    return 0


def _plot_emergence(trajectory, out: Path) -> None:
    """The emergence figure of ``experiments/emergence.py`` (one code path): out.png, .pdf and .json."""
    use_headless_backend()
    out = Path(out)
    fig, data = emergence_figure(trajectory)
    save_figure(fig, out.with_suffix("").name, out.parent, data)


def cmd_simulate(args) -> int:
    """Run any config and save it (npz + JSON sidecar)."""
    with _input_stage():
        params = _flow_from_args(args)
        out = Path(args.out) / SIMULATE_NAME if Path(args.out).is_dir() else args.out
        out = _writable_files(out, "--out", (".npz", ".json"))
    trajectory = flow.simulate(params, progress=not args.no_progress)
    print(report(trajectory))
    print(f"saved {trajectory.save(out)}")
    return 0


def cmd_check(args) -> int:
    """Condition and phase reports for a preset or a saved run."""
    with _input_stage():
        if args.run:
            trajectory = load_trajectory(args.run, "--run")
        else:
            params = _flow_from_args(args)
    if not args.run:
        trajectory = flow.simulate(params, progress=not args.no_progress)
    print(theory.check_conditions(trajectory.config))
    print(theory.phases(trajectory))
    return 0


def experiments_dir() -> Path:
    """The folder of figure scripts: the installed ``gradflow.experiments`` package (a wheel ships
    the repository's ``experiments/`` as it), else ``experiments/`` of a source checkout."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(FIGURE_PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    source = Path(__file__).resolve().parents[1] / "experiments"
    if (source / "emergence.py").is_file():
        return source
    raise FileNotFoundError(f"no figure scripts found (neither the {FIGURE_PACKAGE} package nor {source})")


def figure_names() -> list[str]:
    """Every figure: the scripts NAME.py in ``experiments_dir()`` (names starting with _ excluded)."""
    return sorted(p.stem for p in experiments_dir().glob("*.py") if not p.stem.startswith("_"))


def cmd_figures(args) -> int:
    """Run experiments/<name>.py for one figure or all of them."""
    import runpy

    with _input_stage():
        known = figure_names()
        if args.list:
            print("\n".join(known))
            return 0
        if args.all == (args.name is not None):
            raise ValueError("figures: give one figure NAME or --all (--list shows the names)")
        names = known if args.all else [args.name]
        for name in names:
            if name not in known:
                raise ValueError(f"figures: unknown figure {name!r}; known: {', '.join(known)}")
        if args.out:
            _writable_dir(args.out, "--out")
    use_headless_backend()
    folder = experiments_dir()
    for name in names:
        script = folder / f"{name}.py"
        argv = sys.argv
        sys.argv = [str(script)] + (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
    return 0


def _executor_params(items) -> dict:
    """KEY=VALUE strings -> dict (VALUE parsed as JSON when it is JSON, else kept as a string)."""
    params = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--executor-param must look like KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def cmd_sweep(args) -> int:
    """Job-array mode: run the configs of a JSON file, skipping results already in --out."""
    with _input_stage():
        sweep.read_configs(args.config)  # a missing or malformed file fails here, in one line
        _writable_dir(args.out, "--out")
        if args.count < 1 or not 0 <= args.index < args.count:
            raise ValueError(f"--index/--count: need 0 <= index < count, got index={args.index}, count={args.count}")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.executor is None:
            if args.array_size is not None or args.executor_param or args.executor_folder:
                raise ValueError("--array-size, --executor-param and --executor-folder need --executor")
        else:
            if (args.index, args.count) != (0, 1):
                raise ValueError("--index/--count cannot be combined with --executor (it splits the sweep itself)")
            if args.array_size is not None and args.array_size < 1:
                raise ValueError(f"--array-size must be >= 1, got {args.array_size}")
        params = _executor_params(args.executor_param)
        if args.executor is not None:
            try:
                sweep.check_executor_params(args.executor, params)
            except ValueError as error:
                raise ValueError(f"--executor-param: {error}") from None
    kwargs = {}
    if args.executor is not None:
        kwargs = dict(
            executor=args.executor, array_size=args.array_size, executor_params=params, executor_folder=args.executor_folder
        )
    try:
        paths = sweep.run_sweep(
            args.config,
            args.out,
            resume=args.resume or args.executor is not None,
            progress=not args.no_progress,
            index=args.index,
            count=args.count,
            batch_size=args.batch_size,
            **kwargs,
        )
    except sweep.SweepError as error:
        print(f"gradflow sweep: {error}", file=sys.stderr)
        return EXIT_FAILED
    if not args.no_progress:
        print(f"sweep: {len(paths)} results in {args.out}")
    return 0


def cmd_info(args) -> int:
    """Versions, backend, devices and float64 status."""
    print(f"gradflow {__version__}")
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, diffrax {diffrax.__version__}")
    print(f"default backend: {jax.default_backend()}")
    for device in jax.devices():
        print(f"  device {device.id}: {device.platform} {device.device_kind}")
    print(f"float64 enabled: {bool(jax.config.jax_enable_x64)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    choices = _choices()
    parser = _Parser(prog="gradflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="simulate the default preset, print a report, write figures/emergence.png")
    _add_config_arguments(run, choices)
    run.add_argument(
        "--figure",
        default="figures/emergence.png",
        help="where to write the figure (also writes the .pdf and the .json of numbers beside it)",
    )
    run.set_defaults(func=cmd_run)

    simulate = sub.add_parser("simulate", help="simulate any config and save the trajectory")
    _add_config_arguments(simulate, choices)
    simulate.add_argument(
        "--out",
        required=True,
        help=f"output path: writes PATH.npz and PATH.json (an existing folder: PATH/{SIMULATE_NAME}.npz and .json)",
    )
    simulate.set_defaults(func=cmd_simulate)

    check = sub.add_parser("check", help="the paper's conditions and the observed phases")
    _add_config_arguments(check, choices)
    check.add_argument("--run", help="a saved trajectory (.npz) instead of simulating the preset")
    check.set_defaults(func=cmd_check)

    figures = sub.add_parser("figures", help="regenerate figures (one script per figure in experiments/)")
    figures.add_argument("name", nargs="?", help="figure name (a script NAME.py in experiments/; --list shows them)")
    figures.add_argument("--all", action="store_true", help="every figure")
    figures.add_argument("--list", action="store_true", help="print the figure names and exit")
    figures.add_argument("--quick", action="store_true", help="fast, reduced version (seconds)")
    figures.add_argument("--out", help="output directory for NAME.png/.pdf/.json (default figures/)")
    figures.set_defaults(func=cmd_figures)

    sweep_cmd = sub.add_parser("sweep", help="job-array mode over a JSON file of configs")
    sweep_cmd.add_argument("config", help="JSON file: a list of FlowParams.to_dict() configs (or one)")
    sweep_cmd.add_argument("--out", required=True, help="directory of results, one per config hash")
    sweep_cmd.add_argument("--resume", action="store_true", help="skip configs whose result already loads completely")
    sweep_cmd.add_argument(
        "--index", type=int, default=0, help="job-array slice: take configs index, index+count, ... (default 0)"
    )
    sweep_cmd.add_argument("--count", type=int, default=1, help="job-array slice: number of array tasks (default 1)")
    sweep_cmd.add_argument("--batch-size", type=int, default=None, help="solve (and save) at most this many configs at once")
    sweep_cmd.add_argument(
        "--executor", choices=("local", "slurm"), default=None, help="launch the sweep as one submitit job array (always resumes)"
    )
    sweep_cmd.add_argument(
        "--array-size", type=int, default=None, help="--executor: number of array tasks (default min(#configs, 8))"
    )
    sweep_cmd.add_argument(
        "--executor-param",
        action="append",
        metavar="KEY=VALUE",
        help="--executor: a submitit parameter, e.g. timeout_min=60 or slurm_partition=gpu (repeatable; a name the "
        "executor does not accept is refused, see gradflow.sweep.executor_param_names)",
    )
    sweep_cmd.add_argument("--executor-folder", default=None, help="--executor: submitit's log folder (default OUT/.submitit)")
    sweep_cmd.add_argument("--no-progress", action="store_true", help="hide the progress lines")
    sweep_cmd.set_defaults(func=cmd_sweep)

    info = sub.add_parser("info", help="versions, backend, devices, float64")
    info.set_defaults(func=cmd_info)

    design_cmd = sub.add_parser("design", help="the training distribution (or curriculum) best for a target at a budget")
    design_cmd.add_argument("--n", type=int, default=10, help="vertices per chain (>= 3), default 10")
    design_cmd.add_argument(
        "--target",
        default="hardest",
        help="target start distribution: hardest (default), uniform, easiest, d<k>, mix<c> or p1/p2/...",
    )
    design_cmd.add_argument("--budget", type=float, default=100.0, help="training time t of the flow (default 100)")
    design_cmd.add_argument(
        "--curriculum",
        type=int,
        default=None,
        metavar="K",
        help="also optimise schedules with K pieces / knots (step, piecewise constant, piecewise linear)",
    )
    design_cmd.add_argument(
        "--families",
        nargs="+",
        default=None,
        metavar="FAMILY",
        help="with --curriculum: step, piecewise_constant, piecewise_linear (default all three)",
    )
    design_cmd.add_argument(
        "--mean-easy-mass",
        type=float,
        default=None,
        help="cap on the time-averaged training mass off the target's support (default none)",
    )
    design_cmd.add_argument(
        "--schedule",
        default=None,
        metavar="SPEC",
        help="also report the target reward of this schedule, e.g. step:t=2.5,before=easiest,after=hardest "
        "or a JSON file (see gradflow.schedules.schedule_from_spec)",
    )
    design_cmd.add_argument("--tau", type=float, default=0.2, help="logit temperature > 0 (default 0.2)")
    design_cmd.add_argument(
        "--theta0",
        type=float,
        nargs="+",
        default=[0.3],
        metavar="X",
        help="start: 1 to 5 numbers alpha beta gamma eta delta, the rest 0 (default 0.3 0 0 0 0)",
    )
    design_cmd.add_argument("--steps", type=int, default=80, help="at most this many Adam steps per family (default 80)")
    design_cmd.add_argument("--restarts", type=int, default=3, help="Adam starts run together (default 3)")
    design_cmd.add_argument("--lr", type=float, default=0.1, help="Adam step size (default 0.1)")
    design_cmd.add_argument("--seed", type=int, default=0, help="seed of the random restarts (default 0)")
    design_cmd.add_argument(
        "--out",
        default=None,
        help="JSON result file (default design-n<N>-t<BUDGET>.json; an existing folder: that name inside it)",
    )
    design_cmd.set_defaults(func=cmd_design)
    return parser


def cmd_design(args) -> int:
    """Optimal training mixture (and curriculum) for a target task at a budget; prints and writes JSON."""
    with _input_stage():
        if args.n < 3:
            raise ValueError(f"--n must be an integer >= 3, got {args.n}")
        if args.curriculum is not None and args.curriculum < 1:
            raise ValueError(f"--curriculum must be an integer >= 1, got {args.curriculum}")
        target = ChainTask(args.n, schedules.named_distribution(args.target, args.n))
        model = ModelSpec(tau=args.tau)
        given = None if args.schedule is None else schedules.schedule_from_spec(args.schedule, args.n)
        if args.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
        name = f"design-n{args.n}-t{args.budget:g}.json"
        out = Path(args.out or name)
        out = out / name if out.is_dir() else out
        _writable_dir(out.parent if str(out.parent) else ".", "--out")
        options = dict(steps=args.steps, restarts=args.restarts, lr=args.lr, seed=args.seed, mean_easy_mass=args.mean_easy_mass)
        theta0 = as_theta(args.theta0, "--theta0")
        result = design.optimal_mixture(target, args.budget, model, theta0, **options)
        if args.curriculum is not None:
            families = design.FAMILIES if args.families is None else tuple(args.families)
            result = design.optimal_curriculum(
                target, args.budget, args.curriculum, model, theta0, families=families, mixture=result, **options
            )
        if given is not None:
            result.rows.append(
                {
                    "name": f"given schedule {args.schedule}",
                    "feasible": True,
                    "schedule": given.to_dict(),
                    "reward": design.reward_of(given, target, args.budget, model, theta0),
                    "note": "not part of the optimisation",
                }
            )
    print(result.summary())
    print(f"wrote {result.save(out)}")
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag (already reported in one line)
        return exit_.code if isinstance(exit_.code, int) else EXIT_INPUT
    try:
        return args.func(args)
    except InputError as error:
        print(f"gradflow {args.command}: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except RuntimeError as error:
        if type(error) is not RuntimeError:  # e.g. an XLA runtime error: a bug, raise it
            raise
        # the flow's own "could not finish" report (max_steps, an unresolved event bracket)
        print(f"gradflow {args.command}: solve failed: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
