"""A flow config: what is solved (``Problem``), how (``Numerics``), what is recorded (``Recording``).

``FlowParams`` holds one of each and keeps the flat keywords and attributes of earlier versions
(``FlowParams(task, model, theta0, t1=..., solver=..., save_ts=...)``, ``params.t1``, ...); mixing a
part with flat keywords that belong to it is refused (ValueError naming them).  ``to_dict`` /
``from_dict`` round-trip a config through JSON.  The flow's vector field d theta/dt = grad J is written
once, here (``FlowParams.vector_field``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import readouts, schedules
from gradflow._checks import as_float_array, check_choice, check_int, check_positive, is_concrete, optional_float_array
from gradflow.ceilings import closed_form_ceiling, reward_ceiling_warning
from gradflow.integrator import AUTO, SOLVER_CHOICES, flow_clock, resolve_solver
from gradflow.model import ModelSpec, Theta, default_theta0, orbit_sizes, with_extended_numbers
from gradflow.objective import expected_reward
from gradflow.task import ChainTask

COORDS = ("reduced", "full")
STOP_AT = (None, "threshold", "converged")
EVENTS = ("threshold", "converged")
EVENT_NAMES = {"threshold": "reward_threshold", "converged": "converged"}  # Trajectory.events keys
TIME_SCALES = ("linear", "log")
RECORDED = ("reward", "forward_prob", "switch_prob", "expected_length", "traversal_prob")  # the read-outs a Solution holds
N_DEFAULT_SAVES = 200


# ---------------------------------------------------------------------------------------------------
# Field converters and checks
# ---------------------------------------------------------------------------------------------------


def _float_converter(name: str):
    return lambda x: as_float_array(x, name)


def _optional_float_converter(name: str):
    return lambda x: optional_float_array(x, name)


def as_theta(x, name: str = "theta0") -> Theta:
    """A Theta from a Theta, from its first 1 to P numbers in ``Theta.fields()`` order (the rest 0), or from all
    ten numbers of ``Theta.fields("trained")`` (A then V: a two-matrix start, docs/THEORY.md §10).

    Args:
        x (Theta | ArrayLike): a ``Theta``, 1 to P numbers (P = ``Theta.size()``) or ``Theta.size("trained")``
            numbers; a traced array is taken as it is.
        name: what x is called in the error message.

    Returns:
        The ``Theta`` (x itself when it is one).

    Raises:
        ValueError: x is not a Theta nor 1 to P (or ten) numbers; the message names ``name``.
    """
    if isinstance(x, Theta):
        return x
    if np.shape(x) == (Theta.size("trained"),):
        return Theta.from_array(x, "trained")
    size, fields = Theta.size(), ", ".join(Theta.fields())
    if isinstance(x, jax.core.Tracer):
        arr = x
    else:
        if isinstance(x, (str, bytes, dict)) or x is None:
            raise ValueError(f"{name} must be a gradflow.Theta or 1 to {size} numbers ({fields}), got {x!r}")
        try:
            arr = np.asarray(x, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a gradflow.Theta or 1 to {size} numbers ({fields}), got {x!r}") from None
    if arr.ndim != 1 or not 1 <= arr.shape[0] <= size:
        raise ValueError(f"{name} must hold 1 to {size} numbers ({fields}; the rest 0), got shape {arr.shape}")
    if arr.shape[0] < size:
        arr = jnp.concatenate([jnp.asarray(arr, dtype=float), jnp.zeros(size - arr.shape[0])])
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
    """How it is solved: the diffrax solver, PID tolerances and max_steps.

    solver: a key of ``SOLVERS``, or "auto" (the default): Kvaerno5 with Newton iterations for a stiff capped
    flow with self-loops allowed, tsit5 otherwise (``gradflow.integrator.resolve_solver``).
    """

    solver: str = eqx.field(static=True, default=AUTO)
    rtol: jnp.ndarray = eqx.field(converter=_float_converter("rtol"), default=1e-8)
    atol: jnp.ndarray = eqx.field(converter=_float_converter("atol"), default=1e-10)
    max_steps: int = eqx.field(static=True, default=1_000_000)

    def __check_init__(self):
        check_choice("solver", self.solver, SOLVER_CHOICES)
        check_int("max_steps", self.max_steps, 1)
        check_positive("rtol", self.rtol)
        check_positive("atol", self.atol)

    def with_solver(self, solver: str) -> Numerics:
        """These numerics with ``solver`` (themselves when they have it)."""
        return self if self.solver == solver else dataclasses.replace(self, solver=solver)


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
_FLAT_ORDER = (
    "task",
    "model",
    "theta0",
    "t0",
    "t1",
    "coords",
    "n_vocab",
    "solver",
    "rtol",
    "atol",
    "save_ts",
    "max_steps",
    "reward_threshold",
    "schedule",
    "convergence_loss",
    "stop_at",
)
_UNSET = object()  # a flat keyword that was not given
_FLAT_DEFAULTS = {
    "task": None,
    "model": None,
    "theta0": None,
    "t0": 0.0,
    "t1": 1e4,
    "coords": "reduced",
    "n_vocab": None,
    "solver": AUTO,
    "rtol": 1e-8,
    "atol": 1e-10,
    "save_ts": None,
    "max_steps": 1_000_000,
    "reward_threshold": 0.9,
    "schedule": None,
    "convergence_loss": 1e-3,
    "stop_at": None,
    "eval_tasks": None,
    "events": EVENTS,
    "readouts": True,
    "time_scale": "linear",
}


def _check_no_conflict(given: dict, **parts) -> None:
    """ValueError naming the flat keywords given together with the structured part they belong to."""
    owners = {"problem": _PROBLEM_KEYS, "numerics": _NUMERICS_KEYS, "recording": _RECORDING_KEYS}
    clashes = {name: sorted(set(given) & set(owners[name])) for name, part in parts.items() if part is not None}
    clashes = {name: keys for name, keys in clashes.items() if keys}
    if clashes:
        listed = "; ".join(f"{name}= with {', '.join(keys)}" for name, keys in clashes.items())
        raise ValueError(f"FlowParams: give each field once, either in its part or as a flat keyword, not both ({listed})")


def stop_at_refusal(params) -> str | None:
    """Why ``params.stop_at`` can never fire (its level at or above the model's closed-form reward ceiling sup J,
    ``gradflow.ceilings.closed_form_ceiling``: the solve would run to t1 or max_steps), else None."""
    if params.stop_at is None or not is_concrete((params.reward_threshold, params.convergence_loss)):
        return None
    ceiling = closed_form_ceiling(params.task, params.model)
    if ceiling is None or ceiling >= 1.0:
        return None
    note = reward_ceiling_warning(params, float(params.event_level(params.stop_at)))
    return None if note is None else f"stop_at={params.stop_at!r} can never fire: the {note}"


class FlowParams(eqx.Module):
    """One gradient-flow run: a ``Problem``, its ``Numerics`` and its ``Recording``.

    Built from the flat keywords (positional order: task, model, theta0, t0, t1, coords, n_vocab,
    solver, rtol, atol, save_ts, max_steps, reward_threshold, schedule, convergence_loss, stop_at;
    keyword-only: eval_tasks, events, readouts, time_scale) or from the parts
    (``FlowParams(problem=..., numerics=..., recording=...)``); a part given with a flat keyword of
    that part raises ValueError naming them (a part not given is built from the flat keywords, with
    the defaults of ``Problem``, ``Numerics`` and ``Recording``).  Every flat name reads back as an
    attribute (``params.t1``); ``params.replace(t1=...)`` returns a modified copy.

    Structural (static; changing them recompiles): task.n, model kinds, coords, n_vocab, solver,
    max_steps, a plain-callable schedule (a ``gradflow.schedules`` module is traced), stop_at,
    events, readouts, time_scale, the eval task names, whether save_ts is given and its length.
    Everything else is traced.  See ``Problem``, ``Numerics`` and ``Recording`` for each field.
    """

    problem: Problem
    numerics: Numerics
    recording: Recording

    def __init__(
        self,
        task=_UNSET,
        model=_UNSET,
        theta0=_UNSET,
        t0=_UNSET,
        t1=_UNSET,
        coords=_UNSET,
        n_vocab=_UNSET,
        solver=_UNSET,
        rtol=_UNSET,
        atol=_UNSET,
        save_ts=_UNSET,
        max_steps=_UNSET,
        reward_threshold=_UNSET,
        schedule=_UNSET,
        convergence_loss=_UNSET,
        stop_at=_UNSET,
        *,
        eval_tasks=_UNSET,
        events=_UNSET,
        readouts=_UNSET,
        time_scale=_UNSET,
        problem=None,
        numerics=None,
        recording=None,
    ):
        values = (
            task,
            model,
            theta0,
            t0,
            t1,
            coords,
            n_vocab,
            solver,
            rtol,
            atol,
            save_ts,
            max_steps,
            reward_threshold,
            schedule,
            convergence_loss,
            stop_at,
            eval_tasks,
            events,
            readouts,
            time_scale,
        )
        given = {key: value for key, value in zip(_FLAT_DEFAULTS, values) if value is not _UNSET}
        _check_no_conflict(given, problem=problem, numerics=numerics, recording=recording)
        flat = {**_FLAT_DEFAULTS, **given}
        if problem is None:
            if flat["task"] is None:
                raise ValueError("task: FlowParams needs a gradflow.ChainTask (or problem=Problem(...))")
            flat["model"] = ModelSpec() if flat["model"] is None else flat["model"]
            flat["theta0"] = default_theta0() if flat["theta0"] is None else flat["theta0"]
            problem = Problem(*(flat[key] for key in _PROBLEM_KEYS))
        self.problem = problem
        self.numerics = Numerics(*(flat[key] for key in _NUMERICS_KEYS)) if numerics is None else numerics
        self.recording = Recording(*(flat[key] for key in _RECORDING_KEYS)) if recording is None else recording

    def __check_init__(self):
        for name, part, cls in (
            ("problem", self.problem, Problem),
            ("numerics", self.numerics, Numerics),
            ("recording", self.recording, Recording),
        ):
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
        refusal = stop_at_refusal(self)
        if refusal is not None:
            raise ValueError(refusal)

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

    @property
    def resolved_solver(self) -> str:
        """The key of ``SOLVERS`` the solve steps with (``solver`` itself, or what "auto" stands for on this model)."""
        return resolve_solver(self.solver, self.model)

    def solver_resolved(self) -> FlowParams:
        """This config (or stacked batch) with "auto" replaced by the solver it stands for: both trace the same
        program, so what is compiled from this form serves either spelling (one compilation, not two)."""
        solver = self.resolved_solver
        if self.solver == solver:
            return self
        # one flatten and unflatten with the numerics as a leaf (eqx.tree_at took 0.46 ms a config: 0.47 s of a
        # 1,024-config batch's set-up)
        is_numerics = lambda x: isinstance(x, Numerics)
        return jax.tree_util.tree_map(lambda x: x.with_solver(solver) if is_numerics(x) else x, self, is_leaf=is_numerics)

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

    def replace(self, **changes) -> FlowParams:
        """A copy with some flat fields changed (``params.replace(t1=10.0, stop_at="threshold")``)."""
        unknown = set(changes) - set(_PROBLEM_KEYS + _NUMERICS_KEYS + _RECORDING_KEYS)
        if unknown:
            raise ValueError(f"replace: unknown field(s) {sorted(unknown)}")
        get = lambda key: changes[key] if key in changes else getattr(self, key)
        problem = self.problem
        if set(changes) & set(_PROBLEM_KEYS):
            problem = Problem(*(get(k) if k != "schedule" else changes.get(k, self.problem.schedule) for k in _PROBLEM_KEYS))
        numerics = Numerics(*(get(k) for k in _NUMERICS_KEYS)) if set(changes) & set(_NUMERICS_KEYS) else self.numerics
        recording = Recording(*(get(k) for k in _RECORDING_KEYS)) if set(changes) & set(_RECORDING_KEYS) else self.recording
        return FlowParams(problem=problem, numerics=numerics, recording=recording)

    def event_level(self, event: str) -> jnp.ndarray:
        """The reward level of an event: reward_threshold for "threshold", 1 - convergence_loss for "converged"."""
        return self.reward_threshold if event == "threshold" else 1.0 - self.convergence_loss

    @property
    def vocabulary_size(self) -> int:
        """N, the number of vertex tokens the full matrix A is over."""
        return self.n_vocab or 2 * self.task.n + self.model.n_isolated

    def orbit_sizes(self) -> jnp.ndarray:
        """Entries per query row of A that share each of the five numbers (docs/THEORY.md §4.2), and of V's five
        when the model trains V (``Theta.fields(model.values)`` order)."""
        return jnp.asarray(orbit_sizes(self.vocabulary_size, self.model.values), dtype=float)

    def times(self) -> jnp.ndarray:
        """The save times: ``save_ts`` or t0 followed by 200 log-spaced times up to t1."""
        if self.save_ts is not None:
            return self.save_ts
        span = self.t1 - self.t0
        logspaced = jnp.minimum(self.t0 + jnp.geomspace(span * 1e-6, span, N_DEFAULT_SAVES), self.t1)
        return jnp.concatenate([self.t0[None], logspaced])

    def to_solver_time(self, t):
        """Flow time t -> the time the solver steps in (t, or s = log(1 + t - t0) for time_scale "log")."""
        return flow_clock(self).to_solver(t)

    def to_flow_time(self, s):
        """Inverse of ``to_solver_time``."""
        return flow_clock(self).to_time(s)

    def n_saves(self) -> int:
        """How many save times the solve records."""
        return N_DEFAULT_SAVES + 1 if self.save_ts is None else int(np.shape(self.save_ts)[0])

    def training_task(self, t) -> ChainTask:
        """The start distribution the flow ascends at time t (``task`` unless a schedule is given)."""
        schedule = self.problem.schedule
        return self.task if schedule is None else ChainTask(self.task.n, schedule(t))

    def jump_times(self):
        """The times where the schedule jumps (the solver ends a step on each), or None."""
        schedule = self.problem.schedule
        jumps = getattr(schedule, "jump_times", None) if _is_schedule_module(schedule) else None
        return None if jumps is None else jumps()

    def vector_field(self, t, y, args=None, *, coords: str | None = None) -> jnp.ndarray:
        """d theta/dt = grad J(theta) at the training distribution of time t, divided by the orbit sizes for coords "full".

        Args:
            t (float): the time (picks the training distribution when the config has a schedule).
            y (jax.Array): theta as an array of shape (5,).
            args (None): unused (diffrax's vector-field signature).
            coords: "orbit" or "full" (default: the config's coords).

        Returns:
            d theta/dt, an array shaped like y.
        """
        grad = jax.grad(lambda x: expected_reward(Theta.from_array(x), self.training_task(t), self.model))(y)
        return grad / self.orbit_sizes() if (coords or self.coords) == "full" else grad

    def to_dict(self) -> dict:
        """A JSON-ready description; a schedules module is stored as its ``to_dict()``, a callable by name.

        theta0 holds the numbers the model trains (``Theta.fields(model.values)``): A's five with the fixed V
        (the record of earlier versions), A's then V's five (sigma, rho, omega, mu, nu) with ``values="trained"``.
        """
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
            "theta0": np.asarray(self.theta0.as_array(self.model.values)).tolist(),  # A's five (and V's five when trained)
            "t0": float(self.t0),
            "t1": float(self.t1),
            "coords": self.coords,
            "n_vocab": self.n_vocab,
            "solver": self.solver,
            "resolved_solver": self.resolved_solver,
            "rtol": float(self.rtol),
            "atol": float(self.atol),
            "save_ts": None if self.save_ts is None else np.asarray(self.save_ts).tolist(),
            "max_steps": self.max_steps,
            "reward_threshold": float(self.reward_threshold),
            "schedule": schedule_record,
            "convergence_loss": float(self.convergence_loss),
            "stop_at": self.stop_at,
            "events": list(self.events),
            "readouts": self.readouts if isinstance(self.readouts, bool) else list(self.readouts),
            "eval_tasks": {name: _task_dict(task) for name, task in self.eval_tasks.items()},
            "time_scale": self.time_scale,
        }
        return out

    @classmethod
    def from_dict(cls, config: dict) -> FlowParams:
        """Inverse of ``to_dict``; ValueError naming a missing or unknown key, or a schedule stored by name only.

        "resolved_solver" is a record only: the config resolves its solver anew (``resolved_solver``).
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict (FlowParams.to_dict()), got {type(config).__name__}")
        config = dict(config)
        known = set(_FLAT_ORDER) | {"events", "readouts", "eval_tasks", "time_scale", "resolved_solver"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; known keys are {sorted(known)}")
        if "task" not in config:
            raise ValueError("config: missing key 'task'")
        skipped = ("task", "model", "theta0", "schedule", "eval_tasks", "resolved_solver")
        kwargs = {k: v for k, v in config.items() if k not in skipped}
        kwargs["task"] = _task_from_dict(config["task"], "task")
        if config.get("model") is not None:
            kwargs["model"] = _model_from_dict(config["model"])
        if config.get("theta0") is not None:
            kwargs["theta0"] = as_theta(config["theta0"], "theta0")
        schedule = config.get("schedule")
        if isinstance(schedule, Mapping):
            kwargs["schedule"] = schedules.from_dict(dict(schedule))
        elif schedule is not None:
            raise ValueError(
                f"schedule: the function {schedule!r} was recorded by name only and cannot be rebuilt "
                "from JSON; use a gradflow.schedules module"
            )
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


def extended_config(params: FlowParams) -> FlowParams | None:
    """The config with its closed forms in extended numbers (``model.with_extended_numbers``): what a solve or a
    training run runs again where float64 gave a NaN; None where the model has them already or they do not reach it."""
    model = with_extended_numbers(params.model)
    return None if model is None else params.replace(model=model)


def extended_configs(configs, failed) -> dict[int, FlowParams]:
    """{index: ``extended_config(configs[index])``} for the ``failed`` indices whose closed form takes extended
    numbers: the members of a batch to run again, in a batch of their own."""
    extended = {index: extended_config(configs[index]) for index in failed}
    return {index: config for index, config in extended.items() if config is not None}


def _model_dict(model: ModelSpec) -> dict:
    out = {name: getattr(model, name) for name in ModelSpec.__dataclass_fields__}
    out["tau"] = float(model.tau)
    return out


def _model_from_dict(d) -> ModelSpec:
    if not isinstance(d, Mapping):
        raise ValueError(f"model must be a dict of ModelSpec fields, got {d!r}")
    unknown = sorted(set(d) - set(ModelSpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown}")
    return ModelSpec(**d)


# ---------------------------------------------------------------------------------------------------
# A config's identity: its canonical JSON, its hash, and a one-line label for messages
# ---------------------------------------------------------------------------------------------------

# The keys of FlowParams.to_dict() in gradflow 0.1.0.  A key added later is left out of the canonical
# JSON while it holds its default value, so the hash (the result's file name) of every config that
# could be written before stays the same and results on disk stay valid.
_HASHED_KEYS_0_1 = {
    "task": {"n": None, "start_probs": None},
    "model": {"attention": None, "tau": None, "mask_self": None, "n_isolated": None, "context": None},
    **dict.fromkeys(
        "theta0 t0 t1 coords n_vocab solver rtol atol save_ts max_steps reward_threshold schedule convergence_loss "
        "stop_at".split()
    ),
}


@functools.lru_cache(maxsize=1)
def _default_dict() -> str:
    return json.dumps(FlowParams(ChainTask.uniform(2)).to_dict())


def _drop_new_defaults(config: dict, defaults: dict, known: dict) -> dict:
    out = {}
    for key, value in config.items():
        if key in known:
            if isinstance(known[key], dict) and isinstance(value, dict):
                value = _drop_new_defaults(value, defaults.get(key) or {}, known[key])
            out[key] = value
        elif not (key in defaults and value == defaults[key]):
            out[key] = value
    return out


def canonical_json(config) -> str:
    """The canonical JSON of a config (FlowParams or its dict): normalised, sorted keys, compact.

    Normalised means passed through ``FlowParams.from_dict(...).to_dict()``; keys added to
    ``to_dict`` after gradflow 0.1.0 are left out while they hold their default value.  The solver is
    the resolved one: "auto" hashes as what it steps with, so a default config that resolves to tsit5
    (every uncapped one) keeps the hash it had when tsit5 was the default, and configs that step alike
    share their result file.
    """
    normalised = FlowParams.from_dict(config.to_dict() if isinstance(config, FlowParams) else dict(config)).to_dict()
    normalised["solver"] = normalised.pop("resolved_solver")
    normalised = _drop_new_defaults(normalised, json.loads(_default_dict()), _HASHED_KEYS_0_1)
    return json.dumps(normalised, sort_keys=True, separators=(",", ":"))


def config_hash(config) -> str:
    """First 16 hex digits of sha256(canonical JSON of the config): the config's result file name."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def config_label(config: FlowParams) -> str:
    """A config named in one line for messages: its hash (``config_hash``) when it has one, then n, model and theta0.

    A config with a plain-callable schedule cannot be rebuilt from JSON and so has no hash; it is named by
    its schedule's function instead.
    """
    try:
        name = f"config {config_hash(config)}"
    except ValueError:
        name = f"config with schedule {config.to_dict()['schedule']}"
    model = config.model
    theta0 = np.round(np.asarray(config.theta0.as_array(), dtype=float), 6).tolist()
    return (
        f"{name} (n = {config.task.n}, {model.attention} attention, tau = {float(model.tau):g}, "
        f"mask_self = {model.mask_self}, theta0 = {theta0})"
    )
