"""Continuous-time gradient flow d theta/dt = grad J(theta), integrated with diffrax (THEORY.md 4).

A config says three things, each its own typed module:

- ``Problem`` -- what is solved: task, model, theta0, the span t0..t1, coords, schedule and the time
  variable the solver steps in (``time_scale``: "linear", or "log" for s = log(1 + t - t0), which
  takes few steps to t = 1e40);
- ``Numerics`` -- how: solver, tolerances, max_steps;
- ``Recording`` -- what is recorded: save times, which events are located, which read-outs of
  ``gradflow.readouts``, extra evaluation tasks and where to stop.

``FlowParams`` holds one of each and keeps the flat keywords and attributes of earlier versions
(``FlowParams(task, model, theta0, t1=..., solver=..., save_ts=...)``, ``params.t1``, ...).

``solve(config) -> Solution`` is the one pure solve: a jitted function of the config whose output is
an ``eqx.Module`` of arrays (times, theta, reward, read-outs, event times with "reached" flags,
solver result and step counts).  Called on a concrete config it runs a cached compiled executable;
called inside ``jax.jit`` / ``jax.vmap`` / ``jax.grad`` it is traced like any JAX function, so a
solution can be batched and differentiated with respect to every number of the config.
``simulate`` and ``simulate_many`` wrap it into the host-side ``Trajectory`` (with save/load);
``hitting_times`` is the lean stop-at-event solve behind ``gradflow.theory.learning_time(s)``.

Every number in a config is a traced array: changing it never recompiles.  Compiled executables are
kept in one bounded cache (``compilation_count()`` counts every compilation); on first use the solve
turns on JAX's persistent compilation cache in ``~/.cache/gradflow/jax`` (``GRADFLOW_CACHE_DIR``
relocates it, ``GRADFLOW_NO_CACHE=1`` turns it off), so a new process loads the executable from disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from gradflow import readouts
from gradflow._checks import as_float_array, check_choice, check_int, check_positive, is_concrete, optional_float_array
from gradflow.model import ModelSpec, Theta
from gradflow.objective import expected_reward
from gradflow.task import ChainTask

SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "kvaerno5": diffrax.Kvaerno5,
}
COORDS = ("reduced", "full")
STOP_AT = (None, "threshold", "converged")
EVENTS = ("threshold", "converged")
EVENT_NAMES = {"threshold": "reward_threshold", "converged": "converged"}  # Trajectory.events keys
TIME_SCALES = ("linear", "log")
RECORDED = ("reward", "forward_prob", "switch_prob", "expected_length", "traversal_prob")  # the read-outs a Solution holds
QUANTITIES = RECORDED + ("eval_reward",)
N_DEFAULT_SAVES = 200
BISECTION_STEPS = 60
LOCAL_MAX_STEPS = 16_384  # dense re-solve of one bracket in Trajectory.t_hit
BRACKET_MAX_STEPS = 128  # the same inside the (vmapped) solve; a bracket needing more falls back to t_hit
METRIC_CHUNK_ELEMENTS = 4096
CACHE_SIZE = 64  # compiled executables kept in memory (least recently used dropped first)
CACHE_MAX_BYTES = 2 << 30  # the persistent cache folder's size limit when gradflow sets it up


# ---------------------------------------------------------------------------------------------------
# Field converters and checks
# ---------------------------------------------------------------------------------------------------


def _float_converter(name: str):
    return lambda x: as_float_array(x, name)


def _optional_float_converter(name: str):
    return lambda x: optional_float_array(x, name)


def default_theta0() -> Theta:
    """The default start (alpha, beta, gamma) = (0.3, 0, 0) (``gradflow.model.default_theta0`` when present)."""
    from gradflow import model

    factory = getattr(model, "default_theta0", None)
    return factory() if factory is not None else Theta(0.3, 0.0, 0.0)


def as_theta(x, name: str = "theta0") -> Theta:
    """A Theta from a Theta or from 3 (alpha, beta, gamma) or 5 numbers; ValueError naming ``name`` otherwise."""
    if isinstance(x, Theta):
        return x
    if isinstance(x, jax.core.Tracer):
        arr = x
    else:
        if isinstance(x, (str, bytes, dict)) or x is None:
            raise ValueError(f"{name} must be a gradflow.Theta or 3 or 5 numbers (alpha, beta, gamma[, eta, delta]), got {x!r}")
        try:
            arr = np.asarray(x, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a gradflow.Theta or 3 or 5 numbers, got {x!r}") from None
    if arr.shape not in ((3,), (5,)):
        raise ValueError(f"{name} must hold 3 or 5 numbers (alpha, beta, gamma[, eta, delta]), got shape {arr.shape}")
    if arr.shape == (3,):
        arr = jnp.concatenate([jnp.asarray(arr, dtype=float), jnp.zeros(2)])
    return Theta.from_array(arr)


def _check_finite(name: str, value) -> None:
    if is_concrete(value) and not np.all(np.isfinite(np.asarray(value, dtype=float))):
        raise ValueError(f"{name} must be finite, got {np.asarray(value)}")


def _check_open_unit(name: str, value) -> None:
    if is_concrete(value) and not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {float(value)}")


class _CallableSchedule(eqx.Module):
    """A plain Python schedule t -> start_probs, held as static (a new function compiles anew)."""

    fn: Callable = eqx.field(static=True)

    def __call__(self, t) -> jnp.ndarray:
        return jnp.asarray(self.fn(t), dtype=float)


def _is_schedule_module(obj) -> bool:
    """A traced schedule (``gradflow.schedules`` family): an eqx.Module with ``to_dict``."""
    return isinstance(obj, eqx.Module) and not isinstance(obj, _CallableSchedule) and hasattr(obj, "to_dict")


def _as_schedule(x):
    if x is None or isinstance(x, _CallableSchedule) or _is_schedule_module(x):
        return x
    if callable(x):
        return _CallableSchedule(x)
    raise ValueError(f"schedule must be None, a gradflow.schedules module or a callable t -> start_probs, got {x!r}")


# ---------------------------------------------------------------------------------------------------
# The three parts of a config
# ---------------------------------------------------------------------------------------------------


class Problem(eqx.Module):
    """What is solved: d theta/dt = grad J_{schedule(t) or task}(theta) from theta0 over [t0, t1].

    coords "full": each rate is divided by its orbit size in the full matrix A (N = n_vocab or
    2n + n_isolated).  schedule: None, a ``gradflow.schedules`` module (traced: schedules of one
    family and shape share a compilation and vmap) or a plain callable (static: each new function
    compiles anew).  time_scale: the variable the solver steps in, "linear" (t) or "log"
    (s = log(1 + t - t0), d theta/ds = (1 + t - t0) grad J: few steps to t = 1e40).
    """

    task: ChainTask
    model: ModelSpec = eqx.field(default_factory=ModelSpec)
    theta0: Theta = eqx.field(converter=as_theta, default_factory=default_theta0)
    t0: jnp.ndarray = eqx.field(converter=_float_converter("t0"), default=0.0)
    t1: jnp.ndarray = eqx.field(converter=_float_converter("t1"), default=1e4)
    coords: str = eqx.field(static=True, default="reduced")
    n_vocab: int | None = eqx.field(static=True, default=None)
    schedule: object = eqx.field(converter=_as_schedule, default=None)
    time_scale: str = eqx.field(static=True, default="linear")

    def __check_init__(self):
        if not isinstance(self.task, ChainTask):
            raise ValueError(f"task must be a gradflow.ChainTask, got {type(self.task).__name__}")
        if not isinstance(self.model, ModelSpec):
            raise ValueError(f"model must be a gradflow.ModelSpec, got {type(self.model).__name__}")
        check_choice("coords", self.coords, COORDS)
        check_choice("time_scale", self.time_scale, TIME_SCALES)
        if self.n_vocab is not None:
            check_int("n_vocab", self.n_vocab, 2 * self.task.n + self.model.n_isolated)
        if _is_schedule_module(self.schedule) and hasattr(type(self.schedule), "n"):
            n = self.schedule.n
            if n != self.task.n:
                raise ValueError(f"schedule: its distributions are over n = {n}, the task has n = {self.task.n}")
        if not is_concrete((self.t0, self.t1, self.theta0)):
            return
        _check_finite("theta0", self.theta0.as_array())
        _check_finite("t0", self.t0)
        _check_finite("t1", self.t1)
        if not float(self.t1) > float(self.t0):
            raise ValueError(f"t1 must be > t0, got t0={float(self.t0)}, t1={float(self.t1)}")


class Numerics(eqx.Module):
    """How it is solved: the diffrax solver (a key of ``SOLVERS``), PID tolerances and max_steps."""

    solver: str = eqx.field(static=True, default="tsit5")
    rtol: jnp.ndarray = eqx.field(converter=_float_converter("rtol"), default=1e-8)
    atol: jnp.ndarray = eqx.field(converter=_float_converter("atol"), default=1e-10)
    max_steps: int = eqx.field(static=True, default=1_000_000)

    def __check_init__(self):
        check_choice("solver", self.solver, tuple(SOLVERS))
        check_int("max_steps", self.max_steps, 1)
        check_positive("rtol", self.rtol)
        check_positive("atol", self.atol)


def _as_eval_tasks(x) -> dict:
    if x is None:
        return {}
    if not isinstance(x, Mapping):
        raise ValueError(f"eval_tasks must be a dict name -> ChainTask, got {x!r}")
    return dict(x)


def _as_readouts(x):
    """True / False as given; a name or a sequence of names as a tuple (a static field must hash)."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, str):
        return (x,)
    try:
        return tuple(x)
    except TypeError:
        raise ValueError(f"readouts must be True, False or a tuple of read-out names {list(RECORDED)}, got {x!r}") from None


def _as_events(x) -> tuple:
    if x is None:
        return EVENTS
    if isinstance(x, str):
        x = (x,)
    return tuple(x)


class Recording(eqx.Module):
    """What is recorded: saves, events, read-outs, extra evaluation tasks, and where to stop.

    save_ts None: t0 plus 200 log-spaced times from (t1-t0)*1e-6 to t1.  events: which reward
    events are located ("threshold": J reaches reward_threshold; "converged": the loss 1 - J falls
    below convergence_loss).  readouts: which read-outs of ``gradflow.readouts`` are saved, a tuple
    of names from ``RECORDED`` (the reward is always saved), True for all of them, False for the
    reward only; the others are NaN.  eval_tasks: name -> ChainTask of the same n whose
    reward is recorded at every save.  stop_at: None, "threshold" or "converged": stop the solve
    at that event (saves after the stop are NaN).
    """

    save_ts: jnp.ndarray | None = eqx.field(converter=_optional_float_converter("save_ts"), default=None)
    reward_threshold: jnp.ndarray = eqx.field(converter=_float_converter("reward_threshold"), default=0.9)
    convergence_loss: jnp.ndarray = eqx.field(converter=_float_converter("convergence_loss"), default=1e-3)
    stop_at: str | None = eqx.field(static=True, default=None)
    events: tuple = eqx.field(static=True, converter=_as_events, default=EVENTS)
    readouts: bool | tuple = eqx.field(static=True, converter=_as_readouts, default=True)
    eval_tasks: dict = eqx.field(converter=_as_eval_tasks, default=None)

    def __check_init__(self):
        check_choice("stop_at", self.stop_at, STOP_AT)
        for event in self.events:
            check_choice("events entry", event, EVENTS)
        if not isinstance(self.readouts, bool):
            for name in readouts.check_names(self.readouts):
                if name not in RECORDED:
                    raise ValueError(f"readouts: the flow records the read-outs {list(RECORDED)}, not {name!r}")
        for name, task in self.eval_tasks.items():
            if not isinstance(name, str) or not isinstance(task, ChainTask):
                raise ValueError(f"eval_tasks must map names (str) to gradflow.ChainTask, got {name!r}: {task!r}")
        if self.save_ts is not None:
            shape = np.shape(self.save_ts)
            if len(shape) != 1 or shape[0] < 2:
                raise ValueError(f"save_ts must be a 1-D array of at least 2 times, got shape {shape}")
        if not is_concrete((self.save_ts, self.reward_threshold, self.convergence_loss)):
            return
        _check_open_unit("reward_threshold", self.reward_threshold)
        _check_open_unit("convergence_loss", self.convergence_loss)
        if self.save_ts is not None:
            ts = np.asarray(self.save_ts)
            if not np.all(np.isfinite(ts)):
                raise ValueError(f"save_ts must be finite (no NaN or inf), got {ts}")
            if np.any(np.diff(ts) <= 0):
                raise ValueError("save_ts must be strictly increasing")

    def readout_names(self) -> tuple[str, ...]:
        """The read-outs saved at every save time: the reward, then those ``readouts`` asks for."""
        if isinstance(self.readouts, bool):
            return RECORDED if self.readouts else ("reward",)
        return ("reward",) + tuple(name for name in RECORDED[1:] if name in self.readouts)


# ---------------------------------------------------------------------------------------------------
# FlowParams: the three parts, with the flat keywords of earlier versions
# ---------------------------------------------------------------------------------------------------

_PROBLEM_KEYS = ("task", "model", "theta0", "t0", "t1", "coords", "n_vocab", "schedule", "time_scale")
_NUMERICS_KEYS = ("solver", "rtol", "atol", "max_steps")
_RECORDING_KEYS = ("save_ts", "reward_threshold", "convergence_loss", "stop_at", "events", "readouts", "eval_tasks")
_FLAT_ORDER = ("task", "model", "theta0", "t0", "t1", "coords", "n_vocab", "solver", "rtol", "atol", "save_ts",
               "max_steps", "reward_threshold", "schedule", "convergence_loss", "stop_at")
_UNSET = object()


class FlowParams(eqx.Module):
    """One gradient-flow run: a ``Problem``, its ``Numerics`` and its ``Recording``.

    Built from the flat keywords (positional order: task, model, theta0, t0, t1, coords, n_vocab,
    solver, rtol, atol, save_ts, max_steps, reward_threshold, schedule, convergence_loss, stop_at;
    keyword-only: eval_tasks, events, readouts, time_scale) or from the parts
    (``FlowParams(problem=..., numerics=..., recording=...)``).  Every flat name reads back as an
    attribute (``params.t1``); ``params.replace(t1=...)`` returns a modified copy.

    Structural (static; changing them recompiles): task.n, model kinds, coords, n_vocab, solver,
    max_steps, a plain-callable schedule (a ``gradflow.schedules`` module is traced), stop_at,
    events, readouts, time_scale, the eval task names, whether save_ts is given and its length.
    Everything else is traced.  See ``Problem``, ``Numerics`` and ``Recording`` for each field.
    """

    problem: Problem
    numerics: Numerics
    recording: Recording

    def __init__(self, task=None, model=None, theta0=None, t0=0.0, t1=1e4, coords="reduced", n_vocab=None,
                 solver="tsit5", rtol=1e-8, atol=1e-10, save_ts=None, max_steps=1_000_000, reward_threshold=0.9,
                 schedule=None, convergence_loss=1e-3, stop_at=None, *, eval_tasks=None, events=EVENTS,
                 readouts=True, time_scale="linear", problem=None, numerics=None, recording=None):
        if problem is None:
            if task is None:
                raise ValueError("task: FlowParams needs a gradflow.ChainTask (or problem=Problem(...))")
            problem = Problem(task, ModelSpec() if model is None else model,
                              default_theta0() if theta0 is None else theta0, t0, t1, coords, n_vocab, schedule,
                              time_scale)
        elif task is not None:
            raise ValueError("task: give either the flat keywords or problem=, not both")
        self.problem = problem
        self.numerics = Numerics(solver, rtol, atol, max_steps) if numerics is None else numerics
        self.recording = (Recording(save_ts, reward_threshold, convergence_loss, stop_at, events, readouts, eval_tasks)
                          if recording is None else recording)

    def __check_init__(self):
        for name, part, cls in (("problem", self.problem, Problem), ("numerics", self.numerics, Numerics),
                                ("recording", self.recording, Recording)):
            if not isinstance(part, cls):
                raise ValueError(f"{name} must be a gradflow.flow.{cls.__name__}, got {type(part).__name__}")
        n = self.task.n
        for name, task in self.eval_tasks.items():
            if task.n != n:
                raise ValueError(f"eval_tasks[{name!r}] has n = {task.n}, the task has n = {n}")
        if self.save_ts is not None and is_concrete((self.save_ts, self.t0, self.t1)):
            ts = np.asarray(self.save_ts)
            if ts.min() < float(self.t0) or ts.max() > float(self.t1):
                raise ValueError(f"save_ts must lie in [t0, t1] = [{float(self.t0)}, {float(self.t1)}]")

    # flat read access (the names of earlier versions)
    task = property(lambda self: self.problem.task)
    model = property(lambda self: self.problem.model)
    theta0 = property(lambda self: self.problem.theta0)
    t0 = property(lambda self: self.problem.t0)
    t1 = property(lambda self: self.problem.t1)
    coords = property(lambda self: self.problem.coords)
    n_vocab = property(lambda self: self.problem.n_vocab)
    time_scale = property(lambda self: self.problem.time_scale)
    solver = property(lambda self: self.numerics.solver)
    rtol = property(lambda self: self.numerics.rtol)
    atol = property(lambda self: self.numerics.atol)
    max_steps = property(lambda self: self.numerics.max_steps)
    save_ts = property(lambda self: self.recording.save_ts)
    reward_threshold = property(lambda self: self.recording.reward_threshold)
    convergence_loss = property(lambda self: self.recording.convergence_loss)
    stop_at = property(lambda self: self.recording.stop_at)
    events = property(lambda self: self.recording.events)
    readouts = property(lambda self: self.recording.readouts)
    eval_tasks = property(lambda self: self.recording.eval_tasks)

    @property
    def schedule(self):
        """The training schedule as given: None, a schedules module, or the plain callable."""
        s = self.problem.schedule
        return s.fn if isinstance(s, _CallableSchedule) else s

    def replace(self, **changes) -> "FlowParams":
        """A copy with some flat fields changed (``params.replace(t1=10.0, stop_at="threshold")``)."""
        unknown = set(changes) - set(_PROBLEM_KEYS + _NUMERICS_KEYS + _RECORDING_KEYS)
        if unknown:
            raise ValueError(f"replace: unknown field(s) {sorted(unknown)}")
        get = lambda key: changes[key] if key in changes else getattr(self, key)
        problem = self.problem
        if set(changes) & set(_PROBLEM_KEYS):
            problem = Problem(*(get(k) if k != "schedule" else changes.get(k, self.problem.schedule) for k in _PROBLEM_KEYS))
        numerics = Numerics(*(get(k) for k in _NUMERICS_KEYS)) if set(changes) & set(_NUMERICS_KEYS) else self.numerics
        recording = (Recording(*(get(k) for k in _RECORDING_KEYS)) if set(changes) & set(_RECORDING_KEYS)
                     else self.recording)
        return FlowParams(problem=problem, numerics=numerics, recording=recording)

    def event_level(self, event: str) -> jnp.ndarray:
        """The reward level of an event: reward_threshold for "threshold", 1 - convergence_loss for "converged"."""
        return self.reward_threshold if event == "threshold" else 1.0 - self.convergence_loss

    @property
    def vocabulary_size(self) -> int:
        """N, the number of vertex tokens the full matrix A is over."""
        return self.n_vocab or 2 * self.task.n + self.model.n_isolated

    def orbit_sizes(self) -> jnp.ndarray:
        """Entries per query row of A that share each of the five numbers (THEORY.md section 4)."""
        from gradflow import model

        helper = getattr(model, "orbit_sizes", None)
        if helper is not None:
            return jnp.asarray(helper(self.vocabulary_size), dtype=float)
        big_n = self.vocabulary_size
        return jnp.array([big_n - 1, big_n - 1, (big_n - 1) * (big_n - 2), 1, big_n - 1], dtype=float)

    def times(self) -> jnp.ndarray:
        """The save times: ``save_ts`` or t0 followed by 200 log-spaced times up to t1."""
        if self.save_ts is not None:
            return self.save_ts
        span = self.t1 - self.t0
        logspaced = jnp.minimum(self.t0 + jnp.geomspace(span * 1e-6, span, N_DEFAULT_SAVES), self.t1)
        return jnp.concatenate([self.t0[None], logspaced])

    def to_solver_time(self, t):
        """Flow time t -> the time the solver steps in (t, or s = log(1 + t - t0) for time_scale "log")."""
        return _clock(self).to_solver(t)

    def to_flow_time(self, s):
        """Inverse of ``to_solver_time``."""
        return _clock(self).to_time(s)

    def n_saves(self) -> int:
        """How many save times the solve records."""
        return N_DEFAULT_SAVES + 1 if self.save_ts is None else int(np.shape(self.save_ts)[0])

    def training_task(self, t) -> ChainTask:
        """The start distribution the flow ascends at time t (``task`` unless a schedule is given)."""
        schedule = self.problem.schedule
        return self.task if schedule is None else ChainTask(self.task.n, schedule(t))

    def vector_field(self, t, y, args=None) -> jnp.ndarray:
        """d theta/dt = grad J(theta) at the training distribution of time t (scaled for coords)."""
        grad = jax.grad(lambda x: expected_reward(Theta.from_array(x), self.training_task(t), self.model))(y)
        return grad / self.orbit_sizes() if self.coords == "full" else grad

    def to_dict(self) -> dict:
        """A JSON-ready description; a schedules module is stored as its ``to_dict()``, a callable by name."""
        schedule = self.problem.schedule
        if schedule is None:
            schedule_record = None
        elif isinstance(schedule, _CallableSchedule):
            schedule_record = getattr(schedule.fn, "__name__", repr(schedule.fn))
        else:
            schedule_record = schedule.to_dict()
        out = {
            "task": _task_dict(self.task),
            "model": _model_dict(self.model),
            "theta0": np.asarray(self.theta0.as_array()).tolist(),
            "t0": float(self.t0),
            "t1": float(self.t1),
            "coords": self.coords,
            "n_vocab": self.n_vocab,
            "solver": self.solver,
            "rtol": float(self.rtol),
            "atol": float(self.atol),
            "save_ts": None if self.save_ts is None else np.asarray(self.save_ts).tolist(),
            "max_steps": self.max_steps,
            "reward_threshold": float(self.reward_threshold),
            "schedule": schedule_record,
            "convergence_loss": float(self.convergence_loss),
            "stop_at": self.stop_at,
        }
        # newer keys only when they differ from their defaults, so older configs keep their JSON (and hash)
        if self.events != EVENTS:
            out["events"] = list(self.events)
        if self.readouts is not True:
            out["readouts"] = self.readouts if self.readouts is False else list(self.readouts)
        if self.eval_tasks:
            out["eval_tasks"] = {name: _task_dict(task) for name, task in self.eval_tasks.items()}
        if self.time_scale != "linear":
            out["time_scale"] = self.time_scale
        return out

    @classmethod
    def from_dict(cls, config: dict) -> "FlowParams":
        """Inverse of ``to_dict``; ValueError naming a missing or unknown key, or a schedule stored by name only."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict (FlowParams.to_dict()), got {type(config).__name__}")
        config = dict(config)
        known = set(_FLAT_ORDER) | {"events", "readouts", "eval_tasks", "time_scale"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; known keys are {sorted(known)}")
        if "task" not in config:
            raise ValueError("config: missing key 'task'")
        kwargs = {k: v for k, v in config.items() if k not in ("task", "model", "theta0", "schedule", "eval_tasks")}
        kwargs["task"] = _task_from_dict(config["task"], "task")
        if config.get("model") is not None:
            kwargs["model"] = _model_from_dict(config["model"])
        if config.get("theta0") is not None:
            kwargs["theta0"] = as_theta(config["theta0"], "theta0")
        schedule = config.get("schedule")
        if isinstance(schedule, Mapping):
            from gradflow import schedules

            kwargs["schedule"] = schedules.from_dict(dict(schedule))
        elif schedule is not None:
            raise ValueError(f"schedule: the function {schedule!r} was recorded by name only and cannot be rebuilt "
                             "from JSON; use a gradflow.schedules module")
        if config.get("eval_tasks"):
            kwargs["eval_tasks"] = {name: _task_from_dict(d, f"eval_tasks.{name}") for name, d in config["eval_tasks"].items()}
        return cls(**kwargs)


def _task_dict(task: ChainTask) -> dict:
    return {"n": task.n, "start_probs": np.asarray(task.start_probs).tolist()}


def _task_from_dict(d, name: str) -> ChainTask:
    if not isinstance(d, Mapping):
        raise ValueError(f"{name} must be a dict with keys 'n' and 'start_probs', got {d!r}")
    for key in ("n", "start_probs"):
        if key not in d:
            raise ValueError(f"{name}: missing key '{key}'")
    unknown = sorted(set(d) - {"n", "start_probs"})
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}")
    return ChainTask(d["n"], d["start_probs"])


def _model_dict(model: ModelSpec) -> dict:
    out = {"attention": model.attention, "tau": float(model.tau), "mask_self": model.mask_self,
           "n_isolated": model.n_isolated, "context": model.context}
    for name in ModelSpec.__dataclass_fields__:  # fields added later (e.g. max_len), when set
        if name not in out and getattr(model, name) is not None:
            out[name] = getattr(model, name)
    return out


def _model_from_dict(d) -> ModelSpec:
    if not isinstance(d, Mapping):
        raise ValueError(f"model must be a dict of ModelSpec fields, got {d!r}")
    unknown = sorted(set(d) - set(ModelSpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown}")
    return ModelSpec(**d)


# ---------------------------------------------------------------------------------------------------
# Integration (in the config's solver time) and read-outs
# ---------------------------------------------------------------------------------------------------


class _Clock(eqx.Module):
    """Map between flow time t and solver time s: s = t (linear) or s = log(1 + t - origin) (log)."""

    origin: jnp.ndarray
    log: bool = eqx.field(static=True)

    def to_solver(self, t):
        return jnp.log1p(t - self.origin) if self.log else t

    def to_time(self, s):
        return self.origin + jnp.expm1(s) if self.log else s

    def rate(self, s):
        """dt/ds."""
        return jnp.exp(s) if self.log else jnp.ones_like(s)


def _clock(params: FlowParams) -> _Clock:
    return _Clock(params.t0, params.time_scale == "log")


def _reward(params: FlowParams, y, task: ChainTask | None = None):
    return expected_reward(Theta.from_array(y), params.task if task is None else task, params.model)


def level_event(params: FlowParams, level, quantity: Callable | None = None, rising=True) -> diffrax.Event:
    """A terminating event at quantity(theta) = level (default: the reward J on ``task``), root-found by bisection.

    The condition is written to fall through zero (level - q, or q - level for a falling quantity)
    with ``flip=True``: diffrax root-finds every batch member when one member's event fires, and the
    members whose event did not fire get the function t_next - t, which also falls; with a rising
    condition and ``flip=False`` their bisection ran the wrong way and failed (issue 12.4).
    """
    quantity = (lambda y: _reward(params, y)) if quantity is None else quantity
    sign = 1.0 if rising else -1.0
    cond = lambda t, y, args, **kw: sign * (level - quantity(y))
    return diffrax.Event(cond, root_finder=optx.Bisection(rtol=1e-14, atol=1e-12, flip=True))


def _stop_event(params: FlowParams) -> diffrax.Event | None:
    """The event ``stop_at`` asks for, or None."""
    if params.stop_at is None:
        return None
    return level_event(params, params.event_level(params.stop_at))


def _jump_ts(params: FlowParams, clock: _Clock):
    schedule = params.problem.schedule
    jumps = getattr(schedule, "jump_times", None) if _is_schedule_module(schedule) else None
    jumps = jumps() if jumps is not None else None
    return None if jumps is None else clock.to_solver(jnp.maximum(jnp.asarray(jumps, dtype=float), params.t0))


def integrate(params: FlowParams, saveat: diffrax.SaveAt, *, t0=None, t1=None, y0=None, max_steps=None,
              event=None, progress: bool = False, adjoint=None) -> diffrax.Solution:
    """diffeqsolve of the flow with the config's solver and tolerances; never throws (read ``result``).

    Times (t0, t1, the saveat times and the solution's ts) are in the config's solver time: flow
    time t for time_scale "linear", s = log(1 + t - params.t0) for "log" (``_clock(params)`` maps
    them).  Defaults: the config's span, theta0 and max_steps.
    """
    clock = _clock(params)

    def field_fn(s, y, args):
        return clock.rate(s) * params.vector_field(clock.to_time(s), y)

    return diffrax.diffeqsolve(
        diffrax.ODETerm(field_fn),
        SOLVERS[params.solver](),
        clock.to_solver(params.t0) if t0 is None else t0,
        clock.to_solver(params.t1) if t1 is None else t1,
        None,
        params.theta0.as_array() if y0 is None else y0,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=params.rtol, atol=params.atol, jump_ts=_jump_ts(params, clock)),
        event=event,
        max_steps=params.max_steps if max_steps is None else max_steps,
        throw=False,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        progress_meter=diffrax.TqdmProgressMeter(refresh_steps=200) if progress else diffrax.NoProgressMeter(),
    )


def metrics_at(params: FlowParams, theta: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """The read-outs a Solution holds (``RECORDED``, from ``gradflow.readouts``) at one theta (5,) on the task."""
    return readouts.read(RECORDED, theta, params.task, params.model)


def _recorded_at(params: FlowParams, theta: jnp.ndarray) -> dict:
    """What the recording asks for at one theta: its read-outs and the reward on each eval task."""
    out = readouts.read(params.recording.readout_names(), theta, params.task, params.model)
    out["eval_reward"] = {name: readouts.read(("reward",), theta, task, params.model)["reward"]
                          for name, task in params.eval_tasks.items()}
    return out


def _quantity_fn(params: FlowParams, quantity: str, index) -> Callable:
    """theta (5,) -> the scalar read-out ``quantity`` (per-position ones: entry ``index``, or the min)."""
    check_choice("quantity", quantity, QUANTITIES)
    task = params.task
    if quantity == "eval_reward":
        if index not in params.eval_tasks:
            raise ValueError(f"index must name one of eval_tasks {sorted(params.eval_tasks)} for quantity 'eval_reward', got {index!r}")
        task, quantity = params.eval_tasks[index], "reward"
    readout = readouts.READOUTS[quantity]

    def read(y):
        value = readout.fn(Theta.from_array(y), task, params.model)
        if readout.axis is None:
            return value
        return jnp.min(value) if index is None else value[index]

    return read


def _crossing(params: FlowParams, ts, thetas, values, level, quantity_fn, max_steps: int):
    """First t at which the read-out reaches ``level``: bracket on the saves, re-solve densely, bisect.

    ``values`` are the read-out at the saves (NaN rows skipped); the crossing direction is up when
    the first value lies below the level, down otherwise.  Returns (t, reached, resolved): t is NaN
    when no save reaches the level; resolved is False when the bracket's dense re-solve needed more
    than ``max_steps`` steps (t is then meaningless).
    """
    clock = _clock(params)
    finite = jnp.isfinite(values) & jnp.isfinite(ts)
    rising = values[0] < level
    hit = finite & jnp.where(rising, values >= level, values <= level)
    reached = jnp.any(hit)
    k = jnp.argmax(hit)
    k_lo = jnp.maximum(k - 1, 0)
    s_lo, s_hi = clock.to_solver(ts[k_lo]), clock.to_solver(ts[k])
    s_end = jnp.where(s_hi > s_lo, s_hi, s_lo + 1.0)
    solution = integrate(params, diffrax.SaveAt(dense=True), t0=s_lo, t1=s_end, y0=thetas[k_lo], max_steps=max_steps)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        value = quantity_fn(solution.evaluate(mid))
        short = jnp.where(rising, value < level, value > level)
        return jnp.where(short, mid, lo), jnp.where(short, hi, mid)

    _, s_hit = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (s_lo, s_hi))
    t_hit = jnp.where(k == 0, ts[0], clock.to_time(s_hit))
    resolved = (solution.result == diffrax.RESULTS.successful) | (k == 0) | ~reached
    return jnp.where(reached, t_hit, jnp.nan), reached, resolved


# ---------------------------------------------------------------------------------------------------
# The pure solve
# ---------------------------------------------------------------------------------------------------


class Solution(eqx.Module):
    """The arrays of one solve (a leading batch axis on every field under ``solve_many`` / vmap).

    ts (T,) flow times of the saves (NaN after a stop), theta (T, 5), reward (T,); forward_prob and
    switch_prob (T, n-1), expected_length and traversal_prob (T,) (NaN when not recorded);
    eval_reward: name -> (T,).  event_times / event_reached / event_resolved: event name ->
    time (NaN if not reached), whether it was reached, and whether its bracket re-solve fitted in
    its step budget.  t_stop: where the solve ended (t1, or the stop event); theta_stop its state.
    result: diffrax's result code (``diffrax.RESULTS``); success: ended at t1 or at the asked event;
    field_finite: the vector field is finite at the end state.  Step counts as diffrax reports them.
    """

    ts: jnp.ndarray
    theta: jnp.ndarray
    reward: jnp.ndarray
    forward_prob: jnp.ndarray
    switch_prob: jnp.ndarray
    expected_length: jnp.ndarray
    traversal_prob: jnp.ndarray
    eval_reward: dict
    event_times: dict
    event_reached: dict
    event_resolved: dict
    t_stop: jnp.ndarray
    theta_stop: jnp.ndarray
    result: jnp.ndarray
    success: jnp.ndarray
    field_finite: jnp.ndarray
    num_steps: jnp.ndarray
    num_accepted_steps: jnp.ndarray
    num_rejected_steps: jnp.ndarray


def _solve(params: FlowParams, progress: bool = False) -> Solution:
    """Integrate the flow, read the closed-form metrics at the saves and locate the events (traceable)."""
    _require_x64()
    clock = _clock(params)
    requested = params.times()
    requested_s = clock.to_solver(requested)
    solution = integrate(params, diffrax.SaveAt(ts=requested_s, t1=True), event=_stop_event(params), progress=progress)
    # after a requested stop diffrax writes the stop state into the next save slot (with its time)
    # and inf into the rest: keep the real times, NaN the unused slots
    saved_s, saved_ys = solution.ts[:-1], solution.ys[:-1]
    valid = jnp.isfinite(saved_s) & jnp.all(jnp.isfinite(saved_ys), axis=1)
    # a save at its requested time reports that time exactly (no round trip through log time)
    as_time = lambda s, want_s, want_t: jnp.where(s == want_s, want_t, clock.to_time(s))
    ts = jnp.where(valid, as_time(jnp.where(valid, saved_s, 0.0), requested_s, requested), jnp.nan)
    thetas = jnp.where(valid[:, None], saved_ys, jnp.nan)
    # lax.map in chunks of ~4096 / n saves bounds the intermediates of large n (a full vmap over the
    # saves of a 64-config sweep at n = 1000 peaks at 4.4 GB); small n stays one vmapped chunk
    chunk = max(1, min(thetas.shape[0], METRIC_CHUNK_ELEMENTS // params.task.n))
    recorded = jax.lax.map(lambda y: _recorded_at(params, y), jnp.nan_to_num(thetas), batch_size=chunk)
    mask = lambda v: jnp.where(valid.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.nan)
    recorded = jax.tree_util.tree_map(mask, recorded)
    n_saves, width = thetas.shape[0], params.task.n - 1
    nan = lambda *shape: jnp.full(shape, jnp.nan)
    # the end of the solve: the last finite saved time (t1, or the stop event's time)
    finite_s = jnp.isfinite(solution.ts)
    last = jnp.argmax(jnp.where(finite_s, solution.ts, -jnp.inf))
    finite_stop = jnp.any(finite_s)
    s_stop = jnp.where(finite_s, solution.ts, 0.0)[last]
    t_stop = jnp.where(finite_stop, as_time(s_stop, clock.to_solver(params.t1), params.t1), jnp.nan)
    theta_stop = solution.ys[last]
    stopped = solution.event_mask if params.stop_at is not None else jnp.asarray(False)
    stopped = jnp.asarray(stopped) & (solution.result == diffrax.RESULTS.event_occurred)

    event_times, event_reached, event_resolved = {}, {}, {}
    names = tuple(EVENTS[k] for k in range(len(EVENTS)) if EVENTS[k] in params.events or EVENTS[k] == params.stop_at)
    for event in names:
        if event == params.stop_at and event not in params.events:
            t, reached, resolved = t_stop, stopped, jnp.asarray(True)
        else:
            level = params.event_level(event)
            t, reached, resolved = _crossing(params, jnp.nan_to_num(ts), jnp.nan_to_num(thetas), recorded["reward"], level,
                                             lambda y: _reward(params, y), BRACKET_MAX_STEPS)
            if event == params.stop_at:
                t, reached, resolved = jnp.where(stopped, t_stop, t), stopped | reached, stopped | resolved
        event_times[event] = jnp.where(reached, t, jnp.nan)
        event_reached[event] = reached
        event_resolved[event] = resolved

    result = solution.result._value if hasattr(solution.result, "_value") else solution.result
    success = (solution.result == diffrax.RESULTS.successful) | stopped
    field = params.vector_field(jnp.where(finite_stop, t_stop, params.t0), jnp.nan_to_num(theta_stop))
    return Solution(
        ts=ts,
        theta=thetas,
        reward=recorded["reward"],
        forward_prob=recorded.get("forward_prob", nan(n_saves, width)),
        switch_prob=recorded.get("switch_prob", nan(n_saves, width)),
        expected_length=recorded.get("expected_length", nan(n_saves)),
        traversal_prob=recorded.get("traversal_prob", nan(n_saves)),
        eval_reward=recorded["eval_reward"],
        event_times=event_times,
        event_reached=event_reached,
        event_resolved=event_resolved,
        t_stop=t_stop,
        theta_stop=theta_stop,
        result=jnp.asarray(result),
        success=success,
        field_finite=jnp.all(jnp.isfinite(field)) & jnp.all(jnp.isfinite(theta_stop)),
        num_steps=solution.stats["num_steps"],
        num_accepted_steps=solution.stats["num_accepted_steps"],
        num_rejected_steps=solution.stats["num_rejected_steps"],
    )


def _require_x64() -> None:
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "gradflow needs float64: jax_enable_x64 was turned off after importing gradflow. Rewards approach 1 and "
            "gradients become tiny, so a float32 flow would stall; turn it back on with "
            "jax.config.update('jax_enable_x64', True)"
        )


# ---------------------------------------------------------------------------------------------------
# One bounded cache of compiled executables, and the persistent compilation cache
# ---------------------------------------------------------------------------------------------------

_COMPILED: OrderedDict = OrderedDict()
_COMPILATIONS = 0
_PERSISTENT_CACHE: dict = {"configured": False, "dir": None}


def compilation_count() -> int:
    """How many flow executables have been compiled in this process (solves, batches, crossings)."""
    return _COMPILATIONS


def persistent_cache_dir() -> str | None:
    """The folder of JAX's persistent compilation cache that gradflow set up (None: off or not yet)."""
    return _PERSISTENT_CACHE["dir"]


def enable_persistent_cache() -> str | None:
    """Turn on JAX's persistent compilation cache once per process; returns its folder or None.

    Default folder: ``$GRADFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradflow/jax``, else
    ``~/.cache/gradflow/jax``, limited to 2 GiB (least recently used entries evicted) when the
    ``filelock`` package is installed (JAX needs it for the limit), unlimited otherwise.
    ``GRADFLOW_NO_CACHE=1`` turns it off; a folder the user already gave JAX
    (``jax_compilation_cache_dir``) is kept.  Called by the first compiled solve, not at import.
    """
    if _PERSISTENT_CACHE["configured"]:
        return _PERSISTENT_CACHE["dir"]
    _PERSISTENT_CACHE["configured"] = True
    if os.environ.get("GRADFLOW_NO_CACHE", "") not in ("", "0"):
        return None
    path = jax.config.jax_compilation_cache_dir
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.environ.get("GRADFLOW_CACHE_DIR") or os.path.join(base, "gradflow", "jax")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            return None
        jax.config.update("jax_compilation_cache_dir", path)
        if jax.config.jax_compilation_cache_max_size in (None, -1) and _has_filelock():
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)  # LRU eviction past 2 GiB
        try:  # jax reads the folder once, at its first compilation: start over if that already happened
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()
        except Exception:  # noqa: BLE001  (an older or newer jax without it: the setting still applies)
            pass
    _PERSISTENT_CACHE["dir"] = path
    return path


def _has_filelock() -> bool:
    """JAX's size-limited cache needs the filelock package (without it every cache read fails)."""
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _no_host_callbacks():
    """Trace with equinox's runtime checks as NaN-returning selects instead of host callbacks.

    diffrax checks ``SaveAt(ts=...)`` with ``eqx.error_if``, which lowers to a Python callback; JAX
    never writes an executable holding a callback to its persistent cache (and its key would hold a
    process-specific pointer).  The configs validate their save times at construction, so nothing
    is lost.  The diffrax progress meter is a callback too: ``progress=True`` is never cached.
    """
    try:
        from equinox import _errors
    except ImportError:  # pragma: no cover
        yield
        return
    old = getattr(_errors, "EQX_ON_ERROR", None)
    _errors.EQX_ON_ERROR = "nan"
    try:
        yield
    finally:
        _errors.EQX_ON_ERROR = old


def _structure_key(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


def _compiled(kind: str, fn: Callable, args: tuple, static_key=()) -> tuple[Callable, float]:
    """The compiled ``fn(*args)`` for this structure (bounded LRU cache), and its compile time (0 when cached)."""
    global _COMPILATIONS
    key = (kind, _structure_key(args), static_key)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    _require_x64()
    enable_persistent_cache()
    start = time.perf_counter()
    with _no_host_callbacks():
        compiled = jax.jit(fn).lower(*args).compile()
    _COMPILATIONS += 1
    _COMPILED[key] = compiled
    while len(_COMPILED) > CACHE_SIZE:
        _COMPILED.popitem(last=False)
    return compiled, time.perf_counter() - start


def solve(config: FlowParams, *, progress: bool = False) -> Solution:
    """The pure solve of one config: a ``Solution`` of arrays.

    Concrete config: runs the cached compiled executable.  Inside jit / vmap / grad (a traced
    config): traced inline, so ``jax.grad(lambda p: solve(cfg(p)).eval_reward["target"][-1])`` and
    ``jax.vmap(solve)(stacked_configs)`` work.  Reverse-mode derivatives go through the solver steps
    (discretise-then-optimise, binomial checkpointing); they need second derivatives of J.
    """
    if not isinstance(config, FlowParams):
        raise ValueError(f"config must be a gradflow.FlowParams, got {type(config).__name__}")
    if not is_concrete(config):
        return _solve(config, progress)
    compiled, _ = _compiled("solve", lambda p: _solve(p, progress), (config,), progress)
    return compiled(config)


def solve_many(configs: Sequence[FlowParams] | FlowParams, *, progress: bool = False, devices=None) -> Solution:
    """``solve`` vmapped over configs of one structure (a list, or configs already stacked by ``stack_configs``).

    Every field of the returned ``Solution`` has a leading axis of len(configs).  devices: None or a
    sequence of jax devices to shard the batch over (padded to a multiple of their count).
    """
    batch = stack_configs(configs) if not isinstance(configs, FlowParams) else configs
    size = int(np.shape(batch.t0)[0])
    if devices is not None:
        batch = _shard(batch, size, list(devices))
    out, _ = _run_batch(batch, progress, 1 if devices is None else len(devices))
    return jax.tree_util.tree_map(lambda x: x[:size], out)


def _run_batch(batch: FlowParams, progress: bool, n_devices: int):
    compiled, compile_s = _compiled("solve_many", jax.vmap(lambda p: _solve(p, progress)), (batch,), (progress, n_devices))
    return compiled(batch), compile_s


# ---------------------------------------------------------------------------------------------------
# Trajectory: the host-side record of one solve
# ---------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A solved flow: arrays over the save times, events, solver statistics and the config.

    ts (T,), theta (T, 5) in (alpha, beta, gamma, eta, delta) order, reward (T,), forward_prob (T, n-1)
    = P(forward | the walk moves) at each position of chain a, switch_prob (T, n-1) = P(jump to the
    other chain | moves), expected_length (T,), traversal_prob (T,).  eval_reward: name -> (T,) reward
    on each of the config's eval_tasks.  events maps "reward_threshold" and "converged" to a time or
    None.  Times after a requested stop are NaN.
    """

    config: FlowParams
    ts: np.ndarray
    theta: np.ndarray
    reward: np.ndarray
    forward_prob: np.ndarray
    switch_prob: np.ndarray
    expected_length: np.ndarray
    traversal_prob: np.ndarray
    events: dict[str, float | None]
    stats: dict[str, float] = field(default_factory=dict)
    eval_reward: dict[str, np.ndarray] = field(default_factory=dict)

    ARRAYS = ("ts", "theta", "reward", "forward_prob", "switch_prob", "expected_length", "traversal_prob")

    @property
    def loss(self) -> np.ndarray:
        """1 - J along the trajectory."""
        return 1.0 - self.reward

    @property
    def minimal_length(self) -> float:
        """The expected length of exact forward traversal: sum_d p[d-1] d."""
        return float(np.asarray(self.config.task.start_probs) @ np.arange(1, self.config.task.n))

    def _values(self, quantity: str, index) -> np.ndarray:
        if quantity == "eval_reward":
            if index not in self.eval_reward:
                raise ValueError(f"index must name one of eval_tasks {sorted(self.eval_reward)}, got {index!r}")
            return np.asarray(self.eval_reward[index], dtype=float)
        values = np.asarray(getattr(self, quantity), dtype=float)
        if values.ndim == 2:
            values = values.min(axis=1) if index is None else values[:, index]
        return values

    def t_hit(self, level: float, quantity: str = "reward", index=None) -> float | None:
        """First (absolute) flow time at which a read-out reaches ``level``, root-found; None if never.

        quantity: "reward" (default), "forward_prob" or "switch_prob" (entry ``index`` = position
        i - 1, or the minimum over positions when index is None), "expected_length",
        "traversal_prob", or "eval_reward" (``index`` = the eval task's name).  The crossing goes up
        when the quantity starts below the level and down otherwise.  It is bracketed on the saves,
        the bracket is re-solved densely and bisected (60 halvings of the bracket), so the time is
        exact to the solver tolerance.  The returned time is absolute (it includes t0).
        """
        check_choice("quantity", quantity, QUANTITIES)
        if not isinstance(level, (int, float, np.floating, np.integer)) or not math.isfinite(float(level)):
            raise ValueError(f"level must be a finite number, got {level!r}")
        if (quantity == "eval_reward" or readouts.READOUTS[quantity].probability) and not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1) for {quantity}, got {level}")
        if quantity != "eval_reward" and quantity not in self.config.recording.readout_names():
            raise ValueError(f"quantity {quantity!r} was not recorded (readouts={self.config.readouts!r})")
        values = self._values(quantity, index)
        if quantity != "eval_reward" and readouts.READOUTS[quantity].axis is not None and index is not None:
            index = int(index)
        thetas = jnp.asarray(np.nan_to_num(self.theta))
        ts = jnp.asarray(np.nan_to_num(self.ts))

        def crossing(config, ts, thetas, values, level):
            return _crossing(config, ts, thetas, values, level, _quantity_fn(config, quantity, index), LOCAL_MAX_STEPS)

        args = (self.config, ts, thetas, jnp.asarray(values), jnp.asarray(float(level)))
        compiled, _ = _compiled("crossing", crossing, args, (quantity, index))
        t, reached, resolved = jax.device_get(compiled(*args))
        if not bool(resolved):
            raise RuntimeError(
                f"t_hit({level}, {quantity!r}): the bracket needs over {LOCAL_MAX_STEPS} steps; save more times (save_ts)"
            )
        return float(t) if bool(reached) else None

    def save(self, path: str | Path) -> Path:
        """Write ``path``.npz (arrays) and then ``path``.json (config, events, stats, versions), each atomically.

        Each file is written to a temporary name in the same folder and renamed into place, the
        JSON last: a present ``.json`` means the pair is complete.
        """
        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        npz, sidecar = path.with_suffix(".npz"), path.with_suffix(".json")
        arrays = {k: np.asarray(getattr(self, k)) for k in self.ARRAYS}
        arrays.update({f"eval_reward/{name}": np.asarray(v) for name, v in self.eval_reward.items()})
        meta = {
            "config": self.config.to_dict(),
            "events": self.events,
            "stats": self.stats,
            "eval_tasks": sorted(self.eval_reward),
            "versions": _versions(),
        }
        if sidecar.exists():  # a rewrite: drop the old marker first, so a crash in between leaves no stale pair
            sidecar.unlink()
        _atomic_write(npz, lambda f: np.savez(f, **arrays))
        _atomic_write(sidecar, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return npz

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        """Read a trajectory written by ``save``; ValueError naming the field when the files disagree."""
        path = Path(path).with_suffix("")
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.with_suffix('.json')}: not valid JSON ({error})") from None
        for key in ("config", "events", "stats"):
            if key not in meta:
                raise ValueError(f"{path.with_suffix('.json')}: missing key '{key}'")
        config = FlowParams.from_dict(meta["config"])
        eval_names = meta.get("eval_tasks", [])
        try:
            with np.load(path.with_suffix(".npz")) as data:
                missing = [k for k in cls.ARRAYS if k not in data.files]
                missing += [f"eval_reward/{name}" for name in eval_names if f"eval_reward/{name}" not in data.files]
                if missing:
                    raise ValueError(f"{path.with_suffix('.npz')}: missing array(s) {missing}")
                arrays = {k: data[k] for k in cls.ARRAYS}
                eval_reward = {name: data[f"eval_reward/{name}"] for name in eval_names}
        except (OSError, EOFError) as error:
            raise ValueError(f"{path.with_suffix('.npz')}: cannot be read ({error})") from None
        except Exception as error:  # noqa: BLE001  (a truncated zip raises zipfile.BadZipFile and others)
            if isinstance(error, ValueError):
                raise
            raise ValueError(f"{path.with_suffix('.npz')}: cannot be read ({type(error).__name__}: {error})") from None
        _check_shapes(config, arrays, eval_reward, path)
        events = {k: (None if v is None else float(v)) for k, v in meta["events"].items()}
        return cls(config=config, events=events, stats=meta["stats"], eval_reward=eval_reward, **arrays)


def _check_shapes(config: FlowParams, arrays: dict, eval_reward: dict, path) -> None:
    """Every array must have the sidecar config's number of saves and n."""
    saves, width = config.n_saves(), config.task.n - 1
    expected = {"ts": (saves,), "theta": (saves, 5), "reward": (saves,), "forward_prob": (saves, width),
                "switch_prob": (saves, width), "expected_length": (saves,), "traversal_prob": (saves,)}
    expected.update({f"eval_reward/{name}": (saves,) for name in eval_reward})
    found = {**arrays, **{f"eval_reward/{k}": v for k, v in eval_reward.items()}}
    for name, shape in expected.items():
        if np.shape(found[name]) != shape:
            raise ValueError(f"{path}: array {name} has shape {np.shape(found[name])}, the config implies {shape} "
                             f"({saves} saves, n = {config.task.n})")


def _atomic_write(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _versions() -> dict[str, str]:
    import gradflow

    return {"gradflow": gradflow.__version__, "jax": jax.__version__, "diffrax": diffrax.__version__}


def failure_message(params: FlowParams, out) -> str | None:
    """What went wrong in a solve (None when it succeeded): steps ran out, a NaN field, a failed root-find, ..."""
    if bool(out.success):
        return None
    code = int(out.result)
    t_stop = float(out.t_stop)
    where = f"at t={t_stop:.6g} < t1={float(params.t1):.6g} after {int(out.num_steps)} steps"
    if not bool(out.field_finite):
        return (f"the flow's vector field grad J is not finite (NaN or inf) {where}, theta = "
                f"{np.round(np.asarray(out.theta_stop), 6).tolist()}: the closed form cannot be evaluated there")
    if code == diffrax.RESULTS.max_steps_reached._value:
        return f"the flow solve ran out of steps {where}: raise max_steps (now {params.max_steps}) or loosen rtol/atol"
    if code in (diffrax.RESULTS.nonlinear_max_steps_reached._value, diffrax.RESULTS.nonlinear_divergence._value):
        return (f"the root-find of the stop event ({params.stop_at}) failed {where}; the event level was "
                f"{float(params.event_level(params.stop_at)) if params.stop_at else float('nan'):.6g}")
    message = diffrax.RESULTS._index_to_message.get(code, f"result code {code}") if hasattr(
        diffrax.RESULTS, "_index_to_message") else f"result code {code}"
    return f"the flow solve failed {where}: {str(message).strip().splitlines()[0] if message else code}"


def _trajectory(params: FlowParams, out, stats: dict) -> Trajectory:
    """Package one config's solution on the host, raising if the solve failed."""
    message = failure_message(params, out)
    if message is not None:
        raise RuntimeError(message)
    events = {}
    for event in params.events:
        events[EVENT_NAMES[event]] = float(out.event_times[event]) if bool(out.event_reached[event]) else None
    if params.stop_at is not None and params.stop_at not in params.events:
        event = params.stop_at
        events[EVENT_NAMES[event]] = float(out.event_times[event]) if bool(out.event_reached[event]) else None
    trajectory = Trajectory(
        config=params,
        events=events,
        stats={
            **stats,
            "num_steps": int(out.num_steps),
            "num_accepted_steps": int(out.num_accepted_steps),
            "num_rejected_steps": int(out.num_rejected_steps),
        },
        eval_reward={name: np.asarray(v) for name, v in out.eval_reward.items()},
        **{k: np.asarray(getattr(out, k)) for k in Trajectory.ARRAYS},
    )
    for event in out.event_resolved:
        if not bool(out.event_resolved[event]):  # the in-solve bracket ran out of steps: redo it with a larger buffer
            trajectory.events[EVENT_NAMES[event]] = trajectory.t_hit(float(params.event_level(event)))
    return trajectory


def simulate(flow_params: FlowParams, progress: bool = False) -> Trajectory:
    """Integrate d theta/dt = grad J(theta) from theta0 over [t0, t1]; see ``Trajectory``.

    progress=True shows diffrax's tqdm meter (that executable holds a host callback, so JAX's
    persistent cache never stores it: a new process compiles it again).
    """
    if not isinstance(flow_params, FlowParams):
        raise ValueError(f"flow_params must be a gradflow.FlowParams, got {type(flow_params).__name__}")
    compiled, compile_s = _compiled("solve", lambda p: _solve(p, progress), (flow_params,), progress)
    start = time.perf_counter()
    out = jax.device_get(compiled(flow_params))
    stats = {"compile_seconds": compile_s, "run_seconds": time.perf_counter() - start}
    return _trajectory(flow_params, out, stats)


def stack_configs(configs: Sequence[FlowParams]) -> FlowParams:
    """Stack configs of one structure on a leading axis; ValueError names what differs."""
    configs = list(configs)
    if not configs:
        raise ValueError("configs must hold at least one FlowParams")
    structure = jax.tree_util.tree_structure(configs[0])
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(configs[0])]
    for index, cfg in enumerate(configs):
        if not isinstance(cfg, FlowParams):
            raise ValueError(f"configs[{index}] must be a gradflow.FlowParams, got {type(cfg).__name__}")
        if jax.tree_util.tree_structure(cfg) != structure or [np.shape(x) for x in jax.tree_util.tree_leaves(cfg)] != shapes:
            raise ValueError(
                f"configs[{index}] differs in structure from configs[0] (n, attention kind, solver, coords, "
                "n_vocab, max_steps, schedule, stop_at, events, readouts, eval task names, time_scale and "
                "save_ts length must match): run it separately"
            )
    # stacked on the host, then one transfer per leaf (jnp.stack of 64 device scalars is ~1.5x slower)
    return jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *configs)


def simulate_many(configs: Sequence[FlowParams], progress: bool = False, devices=None) -> list[Trajectory]:
    """Solve configs of one structure as one vmapped compilation; results match ``simulate``.

    Configs may stop at different times or never reach their stop event.  devices: None (default
    device) or a sequence of jax devices (``jax.devices()`` for all): the batch is padded to a
    multiple of the device count and sharded along a 1-D mesh.
    """
    configs = list(configs)
    batch = stack_configs(configs)
    size = len(configs)
    n_devices = 1 if devices is None else len(devices)
    if devices is not None:
        batch = _shard(batch, size, list(devices))
    start = time.perf_counter()
    out, compile_s = _run_batch(batch, progress, n_devices)
    out = jax.device_get(out)
    stats = {"compile_seconds": compile_s, "run_seconds": time.perf_counter() - start - compile_s, "batch": size}
    return [_trajectory(cfg, jax.tree_util.tree_map(lambda v: v[i], out), stats) for i, cfg in enumerate(configs)]


def hitting_times(configs: Sequence[FlowParams]) -> list[float | None]:
    """The time each config's ``stop_at`` event happens (None when t1 comes first), by lean solves.

    Each config is solved with saves at t0 and t1 only, no read-outs and no brackets (its own
    time_scale, solver and tolerances are kept); configs of one structure share one vmapped
    compilation.  A config already past its level at theta0 returns t0.  RuntimeError naming the
    config and what happened when a solve fails (steps ran out, a NaN vector field, ...).
    This is the solve behind ``gradflow.theory.learning_time(s)``.
    """
    configs = list(configs)
    for index, cfg in enumerate(configs):
        if not isinstance(cfg, FlowParams) or cfg.stop_at is None:
            raise ValueError(f"configs[{index}] must be a FlowParams with stop_at set")
    lean = [cfg.replace(save_ts=jnp.stack([cfg.t0, cfg.t1]), events=(), readouts=False, eval_tasks={}) for cfg in configs]
    out: list[float | None] = [None] * len(lean)
    groups: dict = {}
    for index, cfg in enumerate(lean):
        groups.setdefault(_structure_key(cfg), []).append(index)
    for indices in groups.values():
        batch = stack_configs([lean[i] for i in indices])
        solution = jax.device_get(solve_many(batch))
        for row, index in enumerate(indices):
            one = jax.tree_util.tree_map(lambda v: v[row], solution)
            cfg = configs[index]
            message = failure_message(cfg, one)
            if message is not None:
                raise RuntimeError(f"configs[{index}] (n = {cfg.task.n}): {message}")
            level = float(cfg.event_level(cfg.stop_at))
            if float(one.reward[0]) >= level:
                out[index] = float(cfg.t0)
            elif bool(one.event_reached[cfg.stop_at]):
                out[index] = float(one.event_times[cfg.stop_at])
    return out


def _shard(batch: FlowParams, size: int, devices: list) -> FlowParams:
    """Pad the leading axis to a multiple of len(devices) (repeating the last config) and shard it."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    padded = -(-size // len(devices)) * len(devices)
    pad = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], padded - size, axis=0)]) if padded > size else x
    batch = jax.tree_util.tree_map(pad, batch)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("batch",)), PartitionSpec("batch"))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)
