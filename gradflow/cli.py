"""The ``gradflow`` command line: run (the main job), simulate, check, train, figures, sweep, info, design.

Errors: a bad flag value, a missing or malformed config or result file, or an output path that
cannot be written is reported in one line naming the problem, with exit status 2, before anything
is solved.  A solve that cannot finish (e.g. it ran out of ``max_steps``) or a sweep with failed
configs is reported in one line with exit status 1.  Anything else is a bug in gradflow and is
raised with its traceback (Python's exit status 1), never reported as a bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jaxlib
import numpy as np

from gradflow import design, flow, schedules, sweep, theory, training
from gradflow._checks import check_positive
from gradflow._deprecated import deprecated_flag
from gradflow._imports import diffrax  # a stand-in: diffrax is imported when first read
from gradflow._version import __version__
from gradflow.flow import COORDS, RECORDED, SOLVER_CHOICES, FlowParams, Trajectory, as_theta
from gradflow.model import ATTENTION_KINDS, VALUE_FIELDS, VALUE_KINDS, ModelSpec, Theta
from gradflow.plotting import DEFAULT_OUT, draw_emergence, emergence_data, save_drawn, use_headless_backend
from gradflow.readouts import READOUTS
from gradflow.task import ChainTask

DEFAULT_N = 8
REPORT_TIMES = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4)
EXIT_INPUT = 2  # bad input: flag value, config or result file, output path
EXIT_FAILED = 1  # a solve or sweep that could not finish
FIGURE_PACKAGE = "gradflow.experiments"
EXAMPLES = {  # shown at the end of each command's --help
    "run": "gradflow run --n 8 --dist uniform --t1 1e4",
    "simulate": "gradflow simulate --n 8 --dist mixture --easy-mass 0.1 --eval hard=hardest --out runs/mix",
    "check": "gradflow check --n 6 --dist mixture --easy-mass 0.3 --eval hard=hardest --t1 1e3",
    "train": "gradflow train --n 5 --dist k_hardest --k 4 --allow-self --max-len 6 --optimizer adam --lr 0.01 "
    "--steps 300 --theta0 0 --eval hard=hardest",
    "figures": "gradflow figures emergence --quick --out figures",
    "sweep": "gradflow sweep configs.json --out results --resume --max-len 12 --eval hard=hardest",
    "info": "gradflow info",
    "design": "gradflow design --n 8 --budget 2.5 --curriculum 4 --families step --max-mean-easy-mass 0.1",
}
RUN_FIGURE = "runs/emergence.png"  # gradflow run's figure: beside the user's runs, never over the committed figures/
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


def eval_tasks_from_flags(items, n: int) -> dict[str, ChainTask]:
    """``--eval NAME=TASK`` strings -> {NAME: ChainTask(n, schedules.named_distribution(TASK, n))}.

    Args:
        items (Sequence[str] | None): the ``--eval`` values, each NAME=TASK (NAME without '/'); None: none.
        n: the chain length of every eval task.

    Returns:
        The eval tasks by name, in the order given.

    Raises:
        ValueError: an item is malformed, a name is given twice, or a TASK is not a known distribution.
    """
    tasks = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name or not text or "/" in name:
            raise ValueError(f"--eval must look like NAME=TASK (NAME without '/'), e.g. hard=hardest, got {item!r}")
        if name in tasks:
            raise ValueError(f"--eval {name!r} is given twice")
        try:
            tasks[name] = ChainTask(n, schedules.named_distribution(text, n))
        except ValueError as error:
            raise ValueError(f"--eval {item!r}: {error}") from None
    return tasks


def _model_from_args(args) -> ModelSpec:
    return ModelSpec(
        attention=args.attention,
        tau=args.tau,
        mask_self=not args.allow_self,
        n_isolated=args.n_isolated,
        max_len=args.max_len,
        values=args.values,
    )


def _problem_from_args(args, **extra) -> FlowParams:
    """The task, model, start, threshold and eval tasks of the shared flags (``_add_problem_arguments``)."""
    if args.theta0 is not None:
        if len(args.theta0) == Theta.size("trained") and args.values != "trained":
            raise ValueError(f"--theta0 with {Theta.size('trained')} numbers (A and V) needs --values trained")
        extra["theta0"] = as_theta(args.theta0, "--theta0")
    task = _task_from_args(args)
    eval_tasks = eval_tasks_from_flags(args.eval, task.n)
    return FlowParams(task, _model_from_args(args), reward_threshold=args.threshold, eval_tasks=eval_tasks, **extra)


def _flow_from_args(args):
    extra = {} if args.readouts is None else {"readouts": tuple(args.readouts)}
    return _problem_from_args(args, t1=args.t1, coords=args.coords, solver=args.solver, rtol=args.rtol, atol=args.atol, **extra)


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
    """``Trajectory.load(path)`` with one-line ValueErrors naming the file (missing, truncated, foreign).

    Args:
        path (str | Path): the result's path (its .npz and .json files; any suffix is replaced).
        flag: the command-line flag named in error messages.

    Returns:
        trajectory (Trajectory): the loaded result.

    Raises:
        ValueError: the .npz or .json file is missing or is not a readable gradflow result.
    """
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
    return {
        "solver": SOLVER_CHOICES,
        "coords": tuple(COORDS),
        "attention": tuple(ATTENTION_KINDS),
        "readouts": RECORDED,
        "values": VALUE_KINDS,
    }


def _add_max_len_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-len",
        type=int,
        default=None,
        metavar="L",
        help="rollout cap: reward 1 iff the own terminal is written within L tokens (default: no cap)",
    )


def _add_eval_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval",
        action="append",
        metavar="NAME=TASK",
        help="an evaluation task, recorded beside the training task (repeatable); TASK: uniform, hardest, easiest, "
        "d<k>, k_hardest:<k>, mix<c> or p1/p2/... (gradflow.schedules.named_distribution)",
    )


def _add_problem_arguments(parser: argparse.ArgumentParser, choices: dict) -> None:
    """Task, model, start, threshold and eval tasks: the flags every solving command shares."""
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
    _add_max_len_argument(parser)
    parser.add_argument("--n-isolated", type=int, default=0, help="isolated vertices in the vocabulary (default 0)")
    parser.add_argument(
        "--values",
        choices=choices["values"],
        default="fixed",
        help="the value matrix V: fixed at the theory's value (default) or trained with A (the two-matrix model)",
    )
    parser.add_argument(
        "--theta0",
        type=float,
        nargs="+",
        default=None,
        metavar="X",
        help="start: 1 to 5 numbers alpha beta gamma eta delta, the rest 0 (default 0.3 0 0 0 0; V at its fixed value "
        "1 1 0 0 0), or with --values trained all 10: then sigma rho omega mu nu",
    )
    parser.add_argument("--threshold", type=float, default=0.9, help="reward level whose hitting time is reported (default 0.9)")
    _add_eval_argument(parser)


def _add_config_arguments(parser: argparse.ArgumentParser, choices: dict) -> None:
    _add_problem_arguments(parser, choices)
    parser.add_argument("--t1", type=float, default=1e4, help="final time of the flow (default 1e4)")
    parser.add_argument("--coords", choices=choices["coords"], default="reduced", help="flow coordinates (default reduced)")
    parser.add_argument(
        "--solver",
        choices=choices["solver"],
        default="auto",
        help="ODE solver (default auto: kvaerno5_newton for a capped model with self-loops allowed, tsit5 otherwise)",
    )
    parser.add_argument("--rtol", type=float, default=1e-8, help="relative tolerance (default 1e-8)")
    parser.add_argument("--atol", type=float, default=1e-10, help="absolute tolerance (default 1e-10)")
    parser.add_argument(
        "--readouts",
        nargs="+",
        choices=choices["readouts"],
        default=None,
        metavar="NAME",
        help=f"read-outs to record (gradflow.readouts; the reward always is): {', '.join(choices['readouts'])} (default all)",
    )
    meter = parser.add_mutually_exclusive_group()
    meter.add_argument(
        "--progress",
        action="store_true",
        help="show diffrax's progress meter (a host callback: that solve is compiled afresh, never loaded from the cache)",
    )
    meter.add_argument("--no-progress", action="store_true", help="no progress meter (the default)")


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
    lines += _value_lines(trajectory.config, np.asarray(trajectory.theta)[last])
    lines += _readout_lines(trajectory, last)
    lines += _eval_lines(trajectory, last, threshold)
    stats = trajectory.stats
    lines.append(
        f"solver: {_solver_name(trajectory.config)}, {stats.get('num_steps')} steps "
        f"({stats.get('num_rejected_steps')} rejected), "
        f"compile {stats.get('compile_seconds', 0.0):.2f} s, run {stats.get('run_seconds', 0.0):.3f} s"
    )
    return "\n".join(lines)


def _value_lines(config, theta) -> list[str]:
    """The value numbers of theta (and the differences the policy reads) when the model trains V, else none."""
    if config.model.values != "trained":
        return []
    v = dict(zip(VALUE_FIELDS, np.asarray(theta)[len(VALUE_FIELDS) :]))
    numbers = ", ".join(f"{name} = {x:.4f}" for name, x in v.items())
    s, r, m = v["sigma"] - v["omega"], v["rho"] - v["omega"], v["mu"] - v["nu"]
    return [f"final {numbers}", f"  V as the policy reads it: sigma - omega = {s:.4f}, rho - omega = {r:.4f}, mu - nu = {m:.4f}"]


def _solver_name(config) -> str:
    """The solver a config stepped with, and "(auto)" when it was chosen for it."""
    return config.resolved_solver + (" (auto)" if config.solver != config.resolved_solver else "")


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


def _eval_lines(trajectory, k: int, threshold: float) -> list[str]:
    """Each eval task's reward at save k and the first save where it reaches the threshold (``check`` root-finds it)."""
    ts = np.asarray(trajectory.ts)
    lines = []
    for name, reward in trajectory.eval_reward.items():
        reward = np.asarray(reward)
        hit = np.flatnonzero(reward >= threshold)
        when = "not reached" if not hit.size else f"first at the save t = {ts[hit[0]]:.6g}"
        lines.append(f"eval {name}: reward = {reward[k]:.6f} at the final save; >= {threshold:g} {when}")
    return lines


def cmd_run(args) -> int:
    """The main job: the default preset, a report and runs/emergence.png (not with V trained: its panels read
    P(forward | move), which then depends on the start).  The committed figures/ are drawn only by their scripts
    (``gradflow figures``), which record their provenance: a run never overwrites them."""
    with _input_stage():
        params = _flow_from_args(args)
        figure = _writable_files(args.figure, "--figure", (".png", ".pdf", ".json"))
    trajectory = flow.simulate(params, progress=args.progress)
    print(report(trajectory))
    if params.model.values == "trained":
        print("no emergence figure with --values trained: P(forward | move) depends on the start (use simulate's result)")
        return 0
    _plot_emergence(trajectory, figure)
    return 0


def _plot_emergence(trajectory, out: Path) -> None:
    """The emergence figure of ``experiments/emergence.py`` (one code path): out.png, .pdf and .json, the images
    copied from the figure cache when it holds this figure (``plotting.save_drawn``)."""
    out = Path(out)
    save_drawn(draw_emergence, emergence_data(trajectory), out.with_suffix("").name, out.parent)


def cmd_simulate(args) -> int:
    """Run any config and save it (npz + JSON sidecar)."""
    with _input_stage():
        params = _flow_from_args(args)
        out = Path(args.out) / SIMULATE_NAME if Path(args.out).is_dir() else args.out
        out = _writable_files(out, "--out", (".npz", ".json"))
    trajectory = flow.simulate(params, progress=args.progress)
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
        if (trajectory.config if args.run else params).model.values == "trained":
            raise ValueError("check: the conditions and phases are derived for the fixed V, not for --values trained")
    if not args.run:
        trajectory = flow.simulate(params, progress=args.progress)
    print(theory.check_conditions(trajectory.config))
    print(theory.phases(trajectory))
    return 0


TRAIN_COLUMNS = (  # the read-outs the authors report, on the training task and every eval task
    ("reward", "reward"),
    ("greedy_conditional_accuracy", "acc|terminal"),
    ("greedy_reach_rate", "reach"),
    ("greedy_traversal_accuracy", "traversal"),
)


def train_report(result) -> str:
    """The authors' read-outs at a few steps and the end, on the training task and every eval task."""
    stats, task, model = result.stats, result.config.task, result.config.model
    how = f"sampled REINFORCE, batch {stats['batch']}" if "batch" in stats else "exact gradient"
    cap = "no cap" if model.max_len is None else f"max_len = {model.max_len}"
    loops = "self-loops allowed" if not model.mask_self else "no self-loops"
    lines = [
        f"training: {how}, {stats['optimizer']}, lr = {stats['lr']:g}, {stats['steps']} steps, coords {stats['coords']}",
        f"config: n={task.n}, start_probs={np.round(np.asarray(task.start_probs), 4).tolist()}, {cap}, {loops}",
        f"{'step':>6}  {'task':<12}" + "".join(f"{label:>14}" for _, label in TRAIN_COLUMNS),
        "(greedy read-outs: acc|terminal = greedy accuracy given a terminal, reach = greedy reach rate, "
        "traversal = exact traversal)",
    ]
    last = stats["steps"]
    rows = {"train": {name: getattr(result, name) for name, _ in TRAIN_COLUMNS}} | result.eval_readouts
    for k in sorted({0, last // 4, last // 2, 3 * last // 4, last}):
        for name, values in rows.items():
            cells = "".join(f"{float(np.asarray(values[c])[k]):>14.4f}" for c, _ in TRAIN_COLUMNS)
            lines.append(f"{k:>6}  {name:<12}{cells}")
    if "batch" in stats:
        lines.append(f"sampled reward (batch mean) at the last step: {float(result.sampled_reward[-1]):.4f}")
    threshold = float(result.config.reward_threshold)
    hit = result.events.get("reward_threshold")
    reached = "not reached" if hit is None else f"step {round((hit - float(result.config.t0)) / stats['lr'])} (t = {hit:.6g})"
    lines.append(f"training reward >= {threshold:g}: {reached}")
    alpha, beta, gamma = np.asarray(result.theta)[-1, :3]
    lines.append(f"final alpha = {alpha:.4f}, beta = {beta:.4f}, gamma = {gamma:.4f}   ({stats['seconds']:.2f} s)")
    lines += _value_lines(result.config, np.asarray(result.theta)[-1])
    return "\n".join(lines)


def cmd_train(args) -> int:
    """Exact-gradient (or --sampled REINFORCE) training; prints the authors' read-outs and saves the trajectory."""
    with _input_stage():
        params = _problem_from_args(args)
        if not args.sampled and (args.batch is not None or args.seed is not None):
            raise ValueError("--batch and --seed apply to --sampled training only")
        if args.seed is not None and args.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
        batch = (args.batch if args.batch is not None else 32) if args.sampled else None
        settings = training.TrainConfig(lr=args.lr, steps=args.steps, batch=batch, optimizer=args.optimizer, coords=args.coords)
        default_out = f"train-n{params.task.n}-{args.optimizer}{'-sampled' if args.sampled else ''}"
        out = _writable_files(args.out or default_out, "--out", (".npz", ".json"))
    if args.sampled:
        result = training.train(params, key=jax.random.key(args.seed or 0), config=settings)
    else:
        result = training.gradient_descent(params, config=settings)
    print(train_report(result))
    print(f"saved {result.save(out)}")
    return 0


def experiments_dir() -> Path:
    """The folder of figure scripts: ``experiments/`` of the source checkout this package sits in (so a
    checkout, or a worktree beside an editable install, runs its own scripts), else the installed
    ``gradflow.experiments`` package (a wheel ships the repository's ``experiments/`` as it)."""
    import importlib.util

    source = Path(__file__).resolve().parents[1] / "experiments"
    if (source / "emergence.py").is_file() and (source.parent / "pyproject.toml").is_file():
        return source
    try:
        spec = importlib.util.find_spec(FIGURE_PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise FileNotFoundError(f"no figure scripts found (neither {source} nor the {FIGURE_PACKAGE} package)")


def figure_names() -> list[str]:
    """Every figure: the scripts NAME.py in ``experiments_dir()`` (names starting with _ excluded)."""
    return sorted(p.stem for p in experiments_dir().glob("*.py") if not p.stem.startswith("_"))


def cmd_figures(args) -> int:
    """Run experiments/<name>.py for one figure or all of them, and record each figure's provenance in its JSON."""
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
        check_positive("--jobs", args.jobs)
    if args.jobs > 1 and len(names) > 1:
        return _figures_in_parallel(names, args, args.jobs)
    use_headless_backend()
    folder = experiments_dir()
    for name in names:
        script = folder / f"{name}.py"
        argv = sys.argv
        sys.argv = [str(script)] + (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
        start = time.perf_counter()
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
        mode = "quick" if args.quick else "full"
        record_provenance(Path(args.out or DEFAULT_OUT) / f"{name}.json", script, mode, time.perf_counter() - start)
    return 0


def _last_seconds(name: str, out: str | None) -> float:
    """The wall time a figure's last run recorded in its JSON provenance (in ``out``, else in figures/; 0 when none)."""
    for folder in (Path(out or DEFAULT_OUT), Path(DEFAULT_OUT)):
        try:
            return float(json.loads((folder / f"{name}.json").read_text())["provenance"]["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return 0.0


def _figures_in_parallel(names: list[str], args, jobs: int) -> int:
    """``gradflow figures NAME`` for each name in ``jobs`` processes at once, the longest (by its last recorded
    wall time) first; each figure's output is printed when it ends.  Returns 1 when any figure failed."""
    order = sorted(names, key=lambda name: -_last_seconds(name, args.out))
    options = (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
    pending, running, failed = list(order), {}, []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty script never blocks on a full pipe
            command = [sys.executable, "-m", "gradflow.cli", "figures", name, *options]
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True), log)
        name = next((name for name, (proc, _) in running.items() if proc.poll() is not None), None)
        if name is None:
            time.sleep(0.2)
            continue
        proc, log = running.pop(name)
        log.seek(0)
        print(log.read(), end="")
        log.close()
        status = "done" if proc.returncode == 0 else "FAILED"
        done = len(names) - len(pending) - len(running)
        print(f"[{done}/{len(names)}] {name} {status} at {time.perf_counter() - start:.0f} s", flush=True)
        if proc.returncode != 0:
            failed.append(name)
    if failed:
        print(f"figures failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def record_provenance(data_file: Path, script: Path, mode: str, seconds: float) -> dict:
    """Add the figure's provenance to its JSON: which script (sha256 of its bytes), mode, version, wall time.

    Args:
        data_file: the figure's ``NAME.json``, written by its script.
        script: the script that drew it (``experiments/NAME.py``).
        mode: "full" or "quick".
        seconds: the script's wall time.

    Returns:
        The provenance record, also stored under the JSON's "provenance" key.
    """
    record = {
        "figure": script.stem,
        "mode": mode,
        "script_sha256": hashlib.sha256(script.read_bytes()).hexdigest(),
        "gradflow_version": __version__,
        "seconds": round(seconds, 2),
    }
    data = json.loads(data_file.read_text())
    data["provenance"] = record
    tmp = data_file.with_name(f".{data_file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, data_file)
    return record


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


def _sweep_config_file(args, configs) -> Path:
    """The sweep's config file; with --max-len / --eval, those applied to every config and written to OUT."""
    if args.max_len is None and not args.eval:
        return Path(args.config)
    changed = []
    for config in configs:
        model = config.model if args.max_len is None else dataclasses.replace(config.model, max_len=args.max_len)
        evals = {**config.eval_tasks, **eval_tasks_from_flags(args.eval, config.task.n)}
        changed.append(config.replace(model=model, eval_tasks=evals))
    return sweep.write_configs(changed, Path(args.out) / f"{Path(args.config).stem}-with-flags.json")


def cmd_sweep(args) -> int:
    """Job-array mode: run the configs of a JSON file, skipping results already in --out."""
    with _input_stage():
        configs = sweep.read_configs(args.config)  # a missing or malformed file fails here, in one line
        if args.max_len is not None and args.max_len < 1:
            raise ValueError(f"--max-len must be an integer >= 1, got {args.max_len}")
        _writable_dir(args.out, "--out")
        config_file = _sweep_config_file(args, configs)
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
            config_file,
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
    """The ``gradflow`` argument parser: one subcommand per command, each bound to its handler (``func``)."""
    choices = _choices()
    parser = _Parser(prog="gradflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        """A subcommand whose --help ends with its example (``EXAMPLES``)."""
        return sub.add_parser(
            name, help=help_text, epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter
        )

    run = command("run", "simulate the default preset, print a report, write runs/emergence.png")
    _add_config_arguments(run, choices)
    run.add_argument(
        "--figure",
        default=RUN_FIGURE,
        help=f"where to write the figure (also writes the .pdf and the .json of numbers beside it; default {RUN_FIGURE})",
    )
    run.set_defaults(func=cmd_run)

    simulate = command("simulate", "simulate any config and save the trajectory")
    _add_config_arguments(simulate, choices)
    simulate.add_argument(
        "--out",
        required=True,
        help=f"output path: writes PATH.npz and PATH.json (an existing folder: PATH/{SIMULATE_NAME}.npz and .json)",
    )
    simulate.set_defaults(func=cmd_simulate)

    check = command("check", "the paper's conditions and the observed phases (eval tasks' learning times too)")
    _add_config_arguments(check, choices)
    check.add_argument("--run", help="a saved trajectory (.npz) instead of simulating the preset")
    check.set_defaults(func=cmd_check)

    train = command("train", "exact-gradient (or --sampled REINFORCE) training with an optax optimizer")
    _add_problem_arguments(train, choices)
    train.add_argument("--sampled", action="store_true", help="REINFORCE on sampled rollouts instead of the exact gradient")
    train.add_argument("--optimizer", default="sgd", help="sgd (default), adam or any optax optimizer name")
    train.add_argument("--lr", type=float, default=0.1, help="step size (default 0.1); the time axis is t = lr * step")
    train.add_argument("--steps", type=int, default=100, help="number of updates (default 100)")
    train.add_argument(
        "--coords", choices=training.COORDS, default=None, help="reduced (the five numbers, default) or full (the matrix A)"
    )
    train.add_argument("--batch", type=int, default=None, help="--sampled: rollouts per step (>= 2, default 32)")
    train.add_argument("--seed", type=int, default=None, help="--sampled: seed of the rollouts (default 0)")
    train.add_argument("--out", default=None, help="output path (PATH.npz and PATH.json; default train-n<N>-<OPTIMIZER>)")
    train.set_defaults(func=cmd_train)

    figures = command("figures", "regenerate figures (one script per figure in experiments/)")
    figures.add_argument("name", nargs="?", help="figure name (a script NAME.py in experiments/; --list shows them)")
    figures.add_argument("--all", action="store_true", help="every figure")
    figures.add_argument("--list", action="store_true", help="print the figure names and exit")
    figures.add_argument("--quick", action="store_true", help="fast, reduced version (seconds)")
    figures.add_argument("--out", help="output directory for NAME.png/.pdf/.json (default figures/)")
    figures.add_argument(
        "--jobs", type=int, default=1, help="with --all: run this many figure scripts at once, in their own processes (default 1)"
    )
    figures.set_defaults(func=cmd_figures)

    sweep_cmd = command("sweep", "job-array mode over a JSON file of configs")
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
    _add_max_len_argument(sweep_cmd)
    _add_eval_argument(sweep_cmd)
    sweep_cmd.add_argument("--no-progress", action="store_true", help="hide the progress lines")
    sweep_cmd.set_defaults(func=cmd_sweep)

    info = command("info", "versions, backend, devices, float64")
    info.set_defaults(func=cmd_info)

    design_cmd = command("design", "the training distribution (or curriculum) best for a target at a budget")
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
        "--max-mean-easy-mass",
        type=float,
        default=None,
        metavar="C",
        help="at most this time-averaged training mass off the target's support (default: no limit)",
    )
    design_cmd.add_argument(
        "--mean-easy-mass", type=float, default=None, metavar="C", help="deprecated name of --max-mean-easy-mass"
    )
    design_cmd.add_argument(
        "--schedule",
        default=None,
        metavar="SPEC",
        help="also report the target reward of this schedule, e.g. step:t=2.5,before=easiest,after=hardest "
        "or a JSON file (see gradflow.schedules.schedule_from_spec)",
    )
    design_cmd.add_argument("--tau", type=float, default=0.2, help="logit temperature > 0 (default 0.2)")
    design_cmd.add_argument("--allow-self", action="store_true", help="let the model write the current vertex (self-loops)")
    _add_max_len_argument(design_cmd)
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
        model = ModelSpec(tau=args.tau, mask_self=not args.allow_self, max_len=args.max_len)
        limit, notice = _renamed_flag(args, "mean_easy_mass", "max_mean_easy_mass")
        given = None if args.schedule is None else schedules.schedule_from_spec(args.schedule, args.n)
        if args.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
        check_positive("--lr", args.lr)
        name = f"design-n{args.n}-t{args.budget:g}.json"
        out = Path(args.out or name)
        out = out / name if out.is_dir() else out
        _writable_dir(out.parent if str(out.parent) else ".", "--out")
        options = dict(steps=args.steps, restarts=args.restarts, lr=args.lr, seed=args.seed, mean_easy_mass=limit)
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
    if notice is not None:
        print(notice, file=sys.stderr)
    return 0


def _renamed_flag(args, old: str, new: str):
    """(value of flag ``new`` or of its deprecated name ``old``, the one-line notice to print once the command
    has succeeded, or None), so that a bad value still fails in one line."""
    given, current = getattr(args, old), getattr(args, new)
    if given is None:
        return current, None
    old_flag, new_flag = (f"--{name.replace('_', '-')}" for name in (old, new))
    if current is not None and current != given:
        raise ValueError(f"{old_flag} (deprecated) = {given:g} contradicts {new_flag} = {current:g}")
    return given, f"gradflow {args.command}: {deprecated_flag(f'gradflow {args.command} {old_flag}')}"


def main(argv=None) -> int:
    """Run the ``gradflow`` command line; the console script's entry point.

    Args:
        argv (Sequence[str] | None): the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, ``EXIT_INPUT`` (2) for bad input (a flag value, a config or
        result file, an output path; also a bad flag), ``EXIT_FAILED`` (1) when a solve or sweep could
        not finish; ``--help`` returns 0.
    """
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
