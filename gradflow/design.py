"""Data design: the training distribution (or schedule) that maximises a target's reward at a budget.

The reward on a target task q of theta(T) flowed on training data p, J_q(theta(T; p)), is a smooth
function of p, of a schedule's parameters, of theta0 and of tau (docs/THEORY.md §9).
``target_reward`` computes it by one diffrax solve of d theta/dt = grad J_p(theta) that
reverse-mode differentiates (discretise-then-optimise through the solver steps, with binomial
checkpointing; ``adjoint="backsolve"`` solves the continuous adjoint instead).  The vector field is
itself a gradient, so its derivative needs second derivatives of J: ``gradflow.expected_reward``
must be differentiable to second order (the pure-JAX solve of gradflow.objective).

``optimal_mixture`` maximises the target reward over the simplex of fixed start distributions
(softmax parameters, Adam, a few restarts vmapped in one compiled step); ``optimal_curriculum``
does the same over the schedule families of ``gradflow.schedules``.  Each returns a
``DesignResult`` with the optimum, its reward, the optimisation history and comparison rows (training
on the target itself, uniform, the best one-parameter mixture on a grid, for curricula the best
"easy first, then target" step on a grid); the optimum is never worse than a feasible row.

Constraint ``mean_easy_mass`` c: the time-averaged mass of training starts outside the target's
support (the "easy" starts, for a hardest-start target) is at most c; the optimiser maps every
candidate onto this set by moving off-target mass onto the target distribution (exactly feasible).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import objective
from gradflow import schedules as sched
from gradflow._checks import check_choice, check_int, check_positive, is_concrete
from gradflow._imports import diffrax, optax  # stand-ins: each is imported when first read
from gradflow._version import versions
from gradflow.config import FlowParams
from gradflow.integrator import flow_clock, integrate
from gradflow.model import ModelSpec, Theta, default_theta0
from gradflow.task import ChainTask

ADJOINTS = ("recursive", "backsolve")
FAMILIES = ("step", "piecewise_constant", "piecewise_linear")
DEFAULT_MAX_STEPS = 16_384
GRID_SIZE = 64
SMOOTHING = 1e-3  # a row used as a start is mixed with this much uniform mass (softmax logits stay finite)
FIRST_KNOT = 1e-3  # default knots and boundaries are log-spaced from t_budget * FIRST_KNOT to t_budget


# --------------------------------------------------------------------------------------------------
# The differentiable target reward
# --------------------------------------------------------------------------------------------------


def training_probs(flow_params: FlowParams, t, schedule=None) -> jnp.ndarray:
    """The start distribution the flow ascends at time t: ``schedule`` (given here or in flow_params) at t.

    Args:
        flow_params: the config (its schedule, else its task's start_probs).
        t (float | jax.Array): the time.
        schedule (Schedule | Callable | None): a schedule used in place of the config's.

    Returns:
        The start probabilities over d = 1..n-1, shape (n-1,).
    """
    schedule = flow_params.schedule if schedule is None else schedule
    return flow_params.task.start_probs if schedule is None else schedule(t)


def flow_theta(
    flow_params: FlowParams, t_budget, *, schedule=None, adjoint: str = "recursive", max_steps: int | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """theta(t_budget) flowed from flow_params.theta0 at flow_params.t0, and whether the solve succeeded.

    Reverse-mode differentiable in every traced number of flow_params and ``schedule``.  One
    ``gradflow.integrator.integrate`` of the config's own vector field (with ``schedule``, when given, in
    place of the config's); solver, rtol and atol come from flow_params.  A schedule's jump times end a
    step, so the solver steps exactly to each switch.  With flow_params.time_scale "log" the solver
    steps in s = log(1 + t - t0), as ``gradflow.flow`` does.

    Args:
        flow_params: the config to flow.
        t_budget (float | jax.Array): the time to flow to.
        schedule (Schedule | Callable | None): a schedule used in place of the config's.
        adjoint: "recursive" (checkpointed discretise-then-optimise) or "backsolve".
        max_steps: the solver's step budget (default min(flow_params.max_steps, 16384): the checkpointed
            adjoint sizes its buffers by it).

    Returns:
        The end point theta, shape (P,), and whether the solve succeeded (a boolean array).

    Raises:
        ValueError: an unknown adjoint, a schedule that is neither a Schedule nor a callable, or max_steps < 1.
    """
    check_choice("adjoint", adjoint, ADJOINTS)
    if schedule is not None and not sched.is_schedule(schedule) and not callable(schedule):
        raise ValueError(f"schedule must be a gradflow.schedules.Schedule or a callable, got {type(schedule).__name__}")
    max_steps = min(flow_params.max_steps, DEFAULT_MAX_STEPS) if max_steps is None else check_int("max_steps", max_steps, 1)
    params = flow_params if schedule is None else flow_params.replace(schedule=schedule)
    solution = integrate(
        params,
        diffrax.SaveAt(t1=True),
        t1=flow_clock(params).to_solver(t_budget),
        max_steps=max_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint == "recursive" else diffrax.BacksolveAdjoint(),
    )
    return solution.ys[-1], solution.result == diffrax.RESULTS.successful


def _check_target(flow_params: FlowParams, target: ChainTask, t_budget) -> None:
    if not isinstance(target, ChainTask):
        raise ValueError(f"target must be a gradflow.ChainTask, got {type(target).__name__}")
    if target.n != flow_params.task.n:
        raise ValueError(f"target must have the training task's n = {flow_params.task.n}, got n = {target.n}")
    if is_concrete((t_budget, flow_params.t0)):
        budget = np.asarray(t_budget, dtype=float)
        if budget.shape != () or not np.isfinite(budget) or not budget > float(flow_params.t0):
            raise ValueError(f"t_budget must be a finite time > t0 = {float(flow_params.t0)}, got {t_budget!r}")


def target_reward(
    flow_params: FlowParams,
    target: ChainTask,
    t_budget,
    *,
    schedule=None,
    adjoint: str = "recursive",
    max_steps: int | None = None,
) -> jnp.ndarray:
    """J_target(theta(t_budget)): the reward on ``target`` after flowing on flow_params' training data.

    The training data is flow_params' task.start_probs, or its schedule, or ``schedule`` given here; the
    flow runs from theta0 for t_budget - t0.  Differentiable (reverse mode) with respect to the training
    start probabilities, the schedule's parameters, theta0, tau, and the target's start probabilities.

    Args:
        flow_params: the config to flow.
        target: the task to evaluate on (a ChainTask of the same n).
        t_budget (float | jax.Array): the time to flow to, > t0.
        schedule (Schedule | Callable | None): a schedule used in place of the config's.
        adjoint: "recursive" (checkpointed discretise-then-optimise) or "backsolve".
        max_steps: the solver's step budget (default min(flow_params.max_steps, 16384)).

    Returns:
        The scalar J_target; NaN when the solve fails (max_steps reached).

    Raises:
        ValueError: target is not a ChainTask of the same n, or t_budget is not a finite time > t0.
    """
    _check_target(flow_params, target, t_budget)
    theta, ok = flow_theta(flow_params, t_budget, schedule=schedule, adjoint=adjoint, max_steps=max_steps)
    reward = objective.expected_reward(Theta.from_array(theta), target, flow_params.model)
    return jnp.where(ok, reward, jnp.nan)


# --------------------------------------------------------------------------------------------------
# Feasibility: the mean easy-mass constraint
# --------------------------------------------------------------------------------------------------


def _project(probs, mean_off, target_probs, cap):
    """Scale the off-target mass of ``probs`` (..., n-1) by min(1, cap / mean_off), moving the rest
    onto the target distribution; ``cap`` = inf leaves probs unchanged."""
    on = target_probs > 0
    capped = jnp.isfinite(cap)  # where-guarded so that cap = inf has zero (not NaN) derivatives
    factor = jnp.where(capped, jnp.minimum(1.0, jnp.where(capped, cap, 1.0) / jnp.maximum(mean_off, 1e-12)), 1.0)
    off = jnp.where(on, 0.0, probs)
    off_mass = jnp.sum(off, axis=-1, keepdims=True)
    return jnp.where(on, probs, factor * probs) + (1.0 - factor) * off_mass * target_probs


def off_target_mass(probs, target_probs) -> jnp.ndarray:
    """The mass of ``probs`` on distances outside the target's support.

    Args:
        probs (jax.Array): start distributions over d = 1..n-1, shape (..., n-1).
        target_probs (jax.Array): the target's start distribution, shape (n-1,).

    Returns:
        The off-target mass, shape (...).
    """
    return jnp.sum(jnp.where(target_probs > 0, 0.0, probs), axis=-1)


def _feasible_probs(probs, target_probs, cap):
    return _project(probs, off_target_mass(probs, target_probs), target_probs, cap)


def _feasible_schedule(schedule, target_probs, cap, t0, t1):
    mean_off = off_target_mass(schedule.mean_probs(t0, t1), target_probs)
    return schedule.map_distributions(lambda p: _project(p, mean_off, target_probs, cap))


# --------------------------------------------------------------------------------------------------
# Compiled pieces (module level, so every call with one structure reuses one compilation)
# --------------------------------------------------------------------------------------------------


@functools.cache
def _adam() -> tuple:
    """The design's Adam (its learning rate a hyperparameter in its state) and its jitted update: built at the first
    design, so that importing this module does not import optax."""
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=0.05)
    return optimizer, jax.jit(optimizer.update)


def _with_probs(base: FlowParams, probs) -> FlowParams:
    return eqx.tree_at(lambda f: f.task.start_probs, base, probs)


def _build_schedule(kind: str, params: dict, times, t_budget):
    """The schedule of family ``kind`` from unconstrained parameters: params["logits"] (count, n-1)
    through a softmax, params["switch"] the step's switch time as a logit of switch / t_budget."""
    probs = jax.nn.softmax(params["logits"], axis=-1)
    if kind == "constant":
        return sched.Constant(probs[0])
    if kind == "step":
        return sched.Step(t_budget * jax.nn.sigmoid(params["switch"]), probs[0], probs[1])
    if kind == "piecewise_constant":
        return sched.PiecewiseConstant(times, probs)
    return sched.PiecewiseLinear(times, probs)


def _family_reward(params, kind, times, base, target, t_budget, cap, adjoint):
    """Target reward of the family member ``params`` (projected onto the easy-mass cap)."""
    schedule = _build_schedule(kind, params, times, t_budget)
    if kind == "constant":  # a fixed mixture: the training task itself, no schedule
        probs = _feasible_probs(schedule.probs, target.start_probs, cap)
        return target_reward(_with_probs(base, probs), target, t_budget, adjoint=adjoint)
    schedule = _feasible_schedule(schedule, target.start_probs, cap, base.t0, t_budget)
    return target_reward(base, target, t_budget, schedule=schedule, adjoint=adjoint)


@eqx.filter_jit
def _batch_value_and_grad(params, kind, times, base, target, t_budget, cap, adjoint):
    """Rewards and their gradients for a batch of family members (leading axis), one vmapped solve.

    Every optimiser call of one structure (n, model kinds, family and its shape, batch size) reuses
    this one compilation: rows, restarts and budgets are traced data."""
    fn = lambda p: _family_reward(p, kind, times, base, target, t_budget, cap, adjoint)
    return jax.vmap(jax.value_and_grad(fn))(params)


def _stack(items):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *items)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class DesignResult:
    """An optimal training distribution (kind "mixture") or schedule (kind "curriculum").

    probs: the optimal fixed distribution (mixture) or None; schedule: the optimal schedule
    (curriculum) or None; reward: its target reward at t_budget.  rows: comparison rows, each
    {"name", "reward", "feasible", and "probs" or "schedule"}.  history: "rewards" (steps x restarts,
    the reward at each Adam iterate) per family.  source: where the optimum came from.  For a
    curriculum, ``mixture_reward`` is the best fixed mixture's reward and ``gain`` = reward - it;
    ``families`` gives the best reward found in each family.
    """

    kind: str
    n: int
    target: list
    t_budget: float
    reward: float
    probs: np.ndarray | None = None
    schedule: sched.Schedule | None = None
    rows: list = field(default_factory=list)
    history: dict = field(default_factory=dict)
    source: str = ""
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    families: dict = field(default_factory=dict)
    mixture_reward: float | None = None
    versions: dict = field(default_factory=dict)

    @property
    def gain(self) -> float | None:
        """Curriculum: reward - best fixed mixture's reward (None for a mixture)."""
        return None if self.mixture_reward is None else self.reward - self.mixture_reward

    def best_row(self, feasible_only: bool = True) -> dict:
        """The comparison row with the highest reward."""
        rows = [r for r in self.rows if r["feasible"] or not feasible_only]
        return max(rows, key=lambda r: -np.inf if r["reward"] is None else r["reward"])

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field (the schedule as its ``to_dict()``, ``gain`` included)."""
        return {
            "kind": self.kind,
            "n": self.n,
            "target": list(map(float, self.target)),
            "t_budget": float(self.t_budget),
            "reward": float(self.reward),
            "probs": None if self.probs is None else np.asarray(self.probs, dtype=float).tolist(),
            "schedule": None if self.schedule is None else self.schedule.to_dict(),
            "rows": self.rows,
            "history": self.history,
            "source": self.source,
            "config": self.config,
            "timings": self.timings,
            "families": self.families,
            "mixture_reward": self.mixture_reward,
            "gain": self.gain,
            "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, record: dict) -> DesignResult:
        """The result a ``to_dict`` record describes (``gain`` is recomputed, not read).

        Args:
            record: a dict written by ``to_dict`` (or read back from ``save``'s JSON).

        Returns:
            The ``DesignResult``.
        """
        record = dict(record)
        record.pop("gain", None)
        probs = record.pop("probs")
        schedule = record.pop("schedule")
        return cls(
            probs=None if probs is None else np.asarray(probs, dtype=float),
            schedule=None if schedule is None else sched.from_dict(schedule),
            **record,
        )

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (config and versions included); returns the path."""
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(self.to_dict()), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DesignResult:
        """Read a result written by ``save``.

        Args:
            path: the JSON file.

        Returns:
            The ``DesignResult``.
        """
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """A short human-readable report (what the ``gradflow design`` command prints)."""
        fmt = lambda p: "[" + ", ".join(f"{x:.4f}" for x in np.asarray(p)) + "]"
        lines = [f"target {fmt(self.target)} at n = {self.n}, budget t = {self.t_budget:g}"]
        if self.kind == "mixture":
            lines.append(f"optimal mixture (mass on d = 1..{self.n - 1}): {fmt(self.probs)}")
        else:
            lines.append(
                f"optimal curriculum ({self.schedule.to_dict()['kind']}): {json.dumps(_rounded(self.schedule.to_dict()))}"
            )
        lines.append(f"target reward {self.reward:.6f}   (from {self.source})")
        for row in self.rows:
            mark = "" if row["feasible"] else "   (violates the easy-mass cap)"
            lines.append(f"  {row['name']:<34s} {row['reward']:.6f}{mark}")
        if self.kind == "curriculum":
            lines.append(f"gain over the best fixed mixture: {self.gain:+.6f}")
            for family, reward in self.families.items():
                lines.append(f"  best {family:<29s} {reward:.6f}")
        if self.timings:
            lines.append(f"time: {self.timings.get('total_seconds', float('nan')):.1f} s")
        return "\n".join(lines)


def _rounded(record):
    if isinstance(record, dict):
        return {k: _rounded(v) for k, v in record.items()}
    if isinstance(record, list):
        return [_rounded(v) for v in record]
    return round(record, 5) if isinstance(record, float) else record


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jnp.ndarray)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------------
# Optimisers
# --------------------------------------------------------------------------------------------------


def _base_params(target, t_budget, model, theta0, solver, rtol, atol, max_steps, coords, n_vocab) -> FlowParams:
    if not isinstance(target, ChainTask):
        raise ValueError(f"target must be a gradflow.ChainTask, got {type(target).__name__}")
    budget = float(t_budget)
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"t_budget must be a finite time > 0, got {t_budget!r}")
    theta0 = default_theta0() if theta0 is None else theta0
    return FlowParams(
        target,
        model,
        theta0,
        t1=budget,
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=check_int("max_steps", max_steps, 1),
        coords=coords,
        n_vocab=n_vocab,
    )


def _check_cap(mean_easy_mass):
    if mean_easy_mass is None:
        return np.inf
    cap = float(mean_easy_mass)
    if not 0.0 <= cap <= 1.0:
        raise ValueError(f"mean_easy_mass must lie in [0, 1], got {mean_easy_mass!r}")
    return cap


def _logits_of(probs, smoothing: float = SMOOTHING) -> np.ndarray:
    """Logits whose softmax is ``probs`` mixed with ``smoothing`` uniform mass (exact for smoothing 0:
    zero entries become -inf, which only row evaluation uses)."""
    probs = np.asarray(probs, dtype=float)
    with np.errstate(divide="ignore"):
        return np.log((1.0 - smoothing) * probs + smoothing / probs.shape[-1])


def _params(logits, switch_fraction=0.5) -> dict:
    logits = np.atleast_2d(np.asarray(logits, dtype=float))
    fraction = float(np.clip(switch_fraction, 1e-12, 1 - 1e-12))
    return {"logits": logits, "switch": np.asarray(np.log(fraction / (1.0 - fraction)))}


class _Problem:
    """One family's optimisation problem: the compiled batch evaluator and its fixed arguments."""

    def __init__(self, kind, times, base, target, t_budget, cap, adjoint, batch):
        self.kind, self.batch = kind, batch
        self.args = (
            kind,
            jnp.asarray(times, dtype=float),
            base,
            target,
            jnp.asarray(float(t_budget)),
            jnp.asarray(float(cap)),
            adjoint,
        )

    def __call__(self, stacked, cap=None):
        args = self.args if cap is None else self.args[:5] + (jnp.asarray(float(cap)),) + self.args[6:]
        values, grads = _batch_value_and_grad(stacked, *args)
        return np.asarray(values), grads

    def rewards(self, members: list, cap=None) -> np.ndarray:
        """Rewards of any number of members, in chunks of the compiled batch size (no projection when
        ``cap`` is inf)."""
        out = []
        for start in range(0, len(members), self.batch):
            chunk = members[start : start + self.batch]
            chunk = chunk + [chunk[-1]] * (self.batch - len(chunk))
            out.append(self(_stack(chunk), cap)[0][: len(members) - start])
        return np.concatenate(out)[: len(members)]

    def adam(self, inits: dict, steps: int, lr: float, tol: float, patience: int):
        """Adam ascent from every init at once.  Returns (best reward, best params, source, history):
        the best iterate seen, and the reward of every iterate (steps x restarts)."""
        names = list(inits)
        params = _stack(list(inits.values()))
        optimizer, update = _adam()
        opt_state = optimizer.init(params)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(np.float64(lr))
        history, best, last_gain = [], (-np.inf, None, ""), 0
        for step in range(steps + 1):
            rewards, grads = self(params)
            history.append(rewards.tolist())
            finite = np.where(np.isfinite(rewards), rewards, -np.inf)
            k = int(np.argmax(finite))
            if finite[k] > best[0] + tol * max(1.0 - finite[k], 0.0):  # the loss 1 - J fell by a factor (1 - tol)
                last_gain = step
            if finite[k] > best[0]:
                best = (
                    float(finite[k]),
                    jax.tree_util.tree_map(lambda x, k=k: np.asarray(x[k]), params),
                    f"Adam from {names[k]}, step {step}",
                )
            if step == steps or step - last_gain >= patience:
                break
            ascent = jax.tree_util.tree_map(lambda g: -jnp.nan_to_num(g), grads)  # a failed solve adds nothing
            updates, opt_state = update(ascent, opt_state, params)
            params = optax.apply_updates(params, updates)
        return best + (history,)


def _rows_for_mixture(problem: _Problem, target: ChainTask, cap: float, grid: int) -> list[dict]:
    """Comparison rows: the target itself, uniform, and the best mass-c-on-d=1 mixture over a grid
    of ``grid`` values of c in [0, min(1, cap)] (0 and a geometric grid from 1e-3)."""
    n = target.n
    q = np.asarray(target.start_probs)
    uniform = np.full(n - 1, 1.0 / (n - 1))
    cs = np.concatenate([[0.0], np.geomspace(1e-3, 1.0, grid - 1) * min(1.0, cap)])
    mixtures = cs[:, None] * np.eye(n - 1)[0] + (1.0 - cs[:, None]) * np.eye(n - 1)[-1]
    batch = [q, uniform] + list(mixtures)
    rewards = problem.rewards([_params(_logits_of(p, 0.0)) for p in batch], cap=np.inf)
    k = int(np.nanargmax(rewards[2:]))
    feasible = lambda p: bool(off_target_mass(p, q) <= cap + 1e-12)
    return [
        {"name": "target itself", "reward": float(rewards[0]), "feasible": True, "probs": q.tolist()},
        {"name": "uniform", "reward": float(rewards[1]), "feasible": feasible(uniform), "probs": uniform.tolist()},
        {
            "name": f"best mixture c = {cs[k]:.4g} on d = 1",
            "reward": float(rewards[2 + k]),
            "feasible": feasible(mixtures[k]),
            "probs": mixtures[k].tolist(),
            "c": float(cs[k]),
            "grid": {"c": cs.tolist(), "reward": rewards[2:].tolist()},
        },
    ]


def optimal_mixture(
    target: ChainTask,
    t_budget: float,
    model: ModelSpec | None = None,
    theta0: Theta | None = None,
    *,
    steps: int = 80,
    lr: float = 0.1,
    restarts: int = 3,
    seed: int = 0,
    grid: int = GRID_SIZE,
    mean_easy_mass: float | None = None,
    solver: str = "tsit5",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    max_steps: int = DEFAULT_MAX_STEPS,
    coords: str = "reduced",
    n_vocab: int | None = None,
    adjoint: str = "recursive",
    tol: float = 1e-4,
    patience: int = 15,
) -> DesignResult:
    """The fixed start distribution p over d = 1..n-1 that maximises ``target_reward`` at t_budget.

    p = softmax(logits) (projected onto the ``mean_easy_mass`` cap when given); Adam ascent (``lr``,
    at most ``steps`` steps, stopping when the best loss 1 - J has not fallen by a relative ``tol``
    within ``patience`` steps) from ``restarts`` starts run together in one compiled, vmapped step: the
    best comparison row, uniform, then random logits.  The result is the best iterate seen or the best
    feasible comparison row, whichever is higher.

    Args:
        target: the task whose reward is maximised.
        t_budget: the training time, > 0.
        model: the model (default ``ModelSpec()``).
        theta0: the start (default ``default_theta0``).
        steps: the most Adam steps, >= 0.
        lr: Adam's learning rate, > 0.
        restarts: the number of starts run together, >= 1.
        seed: the seed of the random starts, an integer >= 0.
        grid: the number of values of the one-parameter comparison row (>= 2; 64 or more advised).
        mean_easy_mass: a cap in [0, 1] on the (time-averaged) mass outside the target's support
            (None: no cap).
        solver: the diffrax solver name (a ``FlowParams`` field).
        rtol: the solver's relative tolerance.
        atol: the solver's absolute tolerance.
        max_steps: the solver's step budget.
        coords: "reduced" or "full" (a ``FlowParams`` field).
        n_vocab: the vocabulary size N for coords "full" (default 2n + n_isolated).
        adjoint: "recursive" (checkpointed discretise-then-optimise) or "backsolve".
        tol: the relative fall of the best loss 1 - J that counts as progress, >= 0.
        patience: stop after this many steps without progress, >= 1.

    Returns:
        A ``DesignResult`` of kind "mixture": probs, reward, the comparison rows, the search history.

    Raises:
        ValueError: a setting is out of range (steps, restarts, grid, lr, tol, patience, seed,
            mean_easy_mass, adjoint), target is not a ChainTask, or t_budget is not a finite time > 0.
    """
    start = time.perf_counter()
    model = ModelSpec() if model is None else model
    steps, restarts, grid = check_int("steps", steps, 0), check_int("restarts", restarts, 1), check_int("grid", grid, 2)
    check_choice("adjoint", adjoint, ADJOINTS)
    _check_search(lr, tol, patience, seed)
    cap = _check_cap(mean_easy_mass)
    base = _base_params(target, t_budget, model, theta0, solver, rtol, atol, max_steps, coords, n_vocab)
    n = target.n
    problem = _Problem("constant", np.zeros(0), base, target, t_budget, cap, adjoint, restarts)
    rows = _rows_for_mixture(problem, target, cap, grid)
    rows_s = time.perf_counter() - start
    best_row = max((r for r in rows if r["feasible"]), key=lambda r: r["reward"])
    rng = np.random.default_rng(seed)
    inits = {f"row '{best_row['name']}'": _params(_logits_of(best_row["probs"])), "uniform": _params(np.zeros(n - 1))}
    for k in range(restarts - 2):
        inits[f"random {k}"] = _params(rng.normal(0.0, 1.0, n - 1))
    inits = dict(list(inits.items())[:restarts])
    reward, params, source, history = problem.adam(inits, steps, lr, tol, patience)
    if params is None or best_row["reward"] >= reward:
        reward, probs, source = best_row["reward"], np.asarray(best_row["probs"]), f"row '{best_row['name']}'"
    else:
        probs = np.asarray(_feasible_probs(jax.nn.softmax(params["logits"][0]), target.start_probs, cap))
    config = _config(
        base,
        t_budget,
        steps=steps,
        lr=lr,
        restarts=restarts,
        seed=seed,
        grid=grid,
        mean_easy_mass=mean_easy_mass,
        adjoint=adjoint,
        tol=tol,
        patience=patience,
    )
    return DesignResult(
        kind="mixture",
        n=n,
        target=np.asarray(target.start_probs).tolist(),
        t_budget=float(t_budget),
        reward=float(reward),
        probs=probs,
        rows=rows,
        history={"constant": {"rewards": history, "inits": list(inits)}},
        source=source,
        config=config,
        versions=versions(),
        timings={"rows_seconds": rows_s, "total_seconds": time.perf_counter() - start},
    )


def _check_search(lr, tol, patience, seed) -> None:
    """The Adam search's settings: lr finite and > 0, tol >= 0, patience >= 1, seed an integer >= 0."""
    check_positive("lr", lr)
    check_int("seed", seed, 0)
    if not float(tol) >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    check_int("patience", patience, 1)


def _config(base: FlowParams, t_budget, **extra) -> dict:
    model = base.model
    return {
        "model": {
            "attention": model.attention,
            "tau": float(model.tau),
            "mask_self": model.mask_self,
            "n_isolated": model.n_isolated,
            "context": model.context,
            "max_len": getattr(model, "max_len", None),
        },
        "theta0": np.asarray(base.theta0.as_array()).tolist(),
        "t0": float(base.t0),
        "t_budget": float(t_budget),
        "solver": base.solver,
        "rtol": float(base.rtol),
        "atol": float(base.atol),
        "max_steps": base.max_steps,
        "coords": base.coords,
        "n_vocab": base.n_vocab,
        **extra,
    }


def _family_times(kind: str, knots: int, t_budget: float) -> np.ndarray:
    """Fixed times of a family: piecewise constant, the K-1 inner boundaries of K pieces log-spaced
    from t_budget/1000 to t_budget; piecewise linear, K knots over the same range; else none."""
    if kind == "piecewise_constant":
        return sched.log_knots(t_budget, knots + 1, t_budget * FIRST_KNOT)[1:-1]
    if kind == "piecewise_linear":
        return sched.log_knots(t_budget, knots, t_budget * FIRST_KNOT)
    return np.zeros(0)


def _embed(kind: str, schedule, times, t_budget: float, smoothing: float = SMOOTHING) -> dict:
    """Unconstrained parameters of family ``kind`` approximating ``schedule`` (exact for a Step into
    "step" and a Constant into any family, up to ``smoothing``)."""
    if kind == "step":
        if isinstance(schedule, sched.Step):
            return _params(
                _logits_of(np.stack([schedule.before, schedule.after]), smoothing), float(schedule.switch_time) / t_budget
            )
        probs = np.asarray(schedule(0.0))
        return _params(_logits_of(np.stack([probs, probs]), smoothing))
    if kind == "piecewise_constant":  # each piece: the schedule's mean over it
        edges = np.concatenate([[0.0], times, [t_budget]])
        probs = np.stack([np.asarray(schedule.mean_probs(edges[k], edges[k + 1])) for k in range(len(edges) - 1)])
    else:
        probs = np.stack([np.asarray(schedule(t)) for t in times])
    return _params(_logits_of(probs, smoothing))


def optimal_curriculum(
    target: ChainTask,
    t_budget: float,
    knots: int = 4,
    model: ModelSpec | None = None,
    theta0: Theta | None = None,
    *,
    families=FAMILIES,
    steps: int = 80,
    lr: float = 0.1,
    restarts: int = 3,
    seed: int = 0,
    grid: int = GRID_SIZE,
    mean_easy_mass: float | None = None,
    mixture: DesignResult | None = None,
    solver: str = "tsit5",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    max_steps: int = DEFAULT_MAX_STEPS,
    coords: str = "reduced",
    n_vocab: int | None = None,
    adjoint: str = "recursive",
    tol: float = 1e-4,
    patience: int = 15,
) -> DesignResult:
    """The schedule t -> start_probs that maximises ``target_reward`` at t_budget, over ``families``.

    Families: "step" (two distributions and a free switch time), "piecewise_constant" (``knots`` pieces)
    and "piecewise_linear" (``knots`` knots), the latter two on times log-spaced from t_budget/1000 to
    t_budget.  Comparison rows: those of the best fixed mixture (``mixture``, computed with the same
    settings when not given), the best fixed mixture itself, and the best "easiest (d = 1) until s,
    then the target" step over ``grid`` switch times s (under mean_easy_mass c, s <= c t_budget).  Each
    family starts from the best step row, the best mixture and random logits.  The result is the best
    over families and rows; ``gain`` is its reward minus the best fixed mixture's.

    Args:
        target: the task whose reward is maximised.
        t_budget: the training time, > 0.
        knots: the number of pieces / knots of the piecewise families, >= 1.
        model: the model (default ``ModelSpec()``).
        theta0: the start (default ``default_theta0``).
        families (str | Sequence[str]): the schedule families searched (default all of ``FAMILIES``).
        steps: the most Adam steps, >= 0.
        lr: Adam's learning rate, > 0.
        restarts: the number of starts run together, >= 1.
        seed: the seed of the random starts, an integer >= 0.
        grid: the number of values of the one-parameter comparison row (>= 2; 64 or more advised).
        mean_easy_mass: a cap in [0, 1] on the (time-averaged) mass outside the target's support
            (None: no cap).
        mixture: the best fixed mixture, when already computed (``optimal_mixture`` with the same settings).
        solver: the diffrax solver name (a ``FlowParams`` field).
        rtol: the solver's relative tolerance.
        atol: the solver's absolute tolerance.
        max_steps: the solver's step budget.
        coords: "reduced" or "full" (a ``FlowParams`` field).
        n_vocab: the vocabulary size N for coords "full" (default 2n + n_isolated).
        adjoint: "recursive" (checkpointed discretise-then-optimise) or "backsolve".
        tol: the relative fall of the best loss 1 - J that counts as progress, >= 0.
        patience: stop after this many steps without progress, >= 1.

    Returns:
        A ``DesignResult`` of kind "curriculum": schedule, reward, mixture_reward, gain, the rows, the history.

    Raises:
        ValueError: a setting is out of range, families is empty or names an unknown family, target is
            not a ChainTask, or t_budget is not a finite time > 0.
    """
    start = time.perf_counter()
    model = ModelSpec() if model is None else model
    knots, steps = check_int("knots", knots, 1), check_int("steps", steps, 0)
    restarts, grid = check_int("restarts", restarts, 1), check_int("grid", grid, 2)
    check_choice("adjoint", adjoint, ADJOINTS)
    _check_search(lr, tol, patience, seed)
    families = (families,) if isinstance(families, str) else tuple(families)
    if not families:
        raise ValueError(f"families must name at least one of {list(FAMILIES)}")
    for kind in families:
        check_choice("families", kind, FAMILIES)
    cap = _check_cap(mean_easy_mass)
    base = _base_params(target, t_budget, model, theta0, solver, rtol, atol, max_steps, coords, n_vocab)
    budget = float(t_budget)
    n = target.n
    q = np.asarray(target.start_probs)
    if mixture is None:
        mixture = optimal_mixture(
            target,
            t_budget,
            model,
            theta0,
            steps=steps,
            lr=lr,
            restarts=restarts,
            seed=seed,
            grid=grid,
            mean_easy_mass=mean_easy_mass,
            solver=solver,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            coords=coords,
            n_vocab=n_vocab,
            adjoint=adjoint,
            tol=tol,
            patience=patience,
        )
    elif mixture.kind != "mixture" or mixture.n != n or not np.allclose(mixture.target, q):
        raise ValueError("mixture must be an optimal_mixture result for the same target")
    best_mixture = sched.Constant(mixture.probs)
    easiest = np.eye(n - 1)[0]
    switches = np.geomspace(budget * 1e-4, budget * min(1.0, cap) * (1 - 1e-9), grid)
    step_problem = _Problem("step", np.zeros(0), base, target, budget, cap, adjoint, restarts)
    step_rows = [sched.Step(s, easiest, q) for s in switches]
    step_rewards = step_problem.rewards([_embed("step", s, None, budget, 0.0) for s in step_rows], cap=np.inf)
    k = int(np.nanargmax(step_rewards))
    best_step = step_rows[k]
    rows = list(mixture.rows) + [
        {"name": "best fixed mixture", "reward": mixture.reward, "feasible": True, "schedule": best_mixture.to_dict()},
        {
            "name": f"easiest until t = {switches[k]:.4g}, then target",
            "reward": float(step_rewards[k]),
            "feasible": True,
            "schedule": best_step.to_dict(),
            "grid": {"switch_time": switches.tolist(), "reward": step_rewards.tolist()},
        },
    ]
    rows_s = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    history, family_best, overall = {}, {}, (-np.inf, None, "")
    for kind in families:
        count = {"step": 2, "piecewise_constant": knots, "piecewise_linear": knots}[kind]
        times = _family_times(kind, knots, budget)
        inits = {
            "best step row": _embed(kind, best_step, times, budget),
            "best mixture": _embed(kind, best_mixture, times, budget),
        }
        for r in range(restarts - 2):
            inits[f"random {r}"] = _params(rng.normal(0.0, 1.0, (count, n - 1)), rng.uniform(0.05, 0.5))
        inits = dict(list(inits.items())[:restarts])
        problem = step_problem if kind == "step" else _Problem(kind, times, base, target, budget, cap, adjoint, restarts)
        reward, params, source, hist = problem.adam(inits, steps, lr, tol, patience)
        history[kind] = {"rewards": hist, "inits": list(inits), "times": times.tolist()}
        family_best[kind] = reward
        if params is not None and reward > overall[0]:
            schedule = _build_schedule(kind, params, jnp.asarray(times), budget)
            schedule = _feasible_schedule(schedule, jnp.asarray(q), cap, float(base.t0), budget)
            overall = (reward, sched.from_dict(schedule.to_dict()), f"{kind}: {source}")
    row_best = max((r for r in rows if r["feasible"] and "schedule" in r), key=lambda r: r["reward"])
    if overall[1] is None or row_best["reward"] >= overall[0]:
        overall = (row_best["reward"], sched.from_dict(row_best["schedule"]), f"row '{row_best['name']}'")
    reward, schedule, source = overall
    config = _config(
        base,
        t_budget,
        knots=knots,
        families=list(families),
        steps=steps,
        lr=lr,
        restarts=restarts,
        seed=seed,
        grid=grid,
        mean_easy_mass=mean_easy_mass,
        adjoint=adjoint,
        tol=tol,
        patience=patience,
    )
    return DesignResult(
        kind="curriculum",
        n=n,
        target=q.tolist(),
        t_budget=budget,
        reward=float(reward),
        schedule=schedule,
        rows=rows,
        history=history,
        source=source,
        config=config,
        families=family_best,
        mixture_reward=float(mixture.reward),
        versions=versions(),
        timings={
            "rows_seconds": rows_s,
            "mixture_seconds": mixture.timings.get("total_seconds"),
            "total_seconds": time.perf_counter() - start,
        },
    )


def reward_of(
    training,
    target: ChainTask,
    t_budget: float,
    model: ModelSpec | None = None,
    theta0: Theta | None = None,
    *,
    solver: str = "tsit5",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    max_steps: int = DEFAULT_MAX_STEPS,
    coords: str = "reduced",
    n_vocab: int | None = None,
) -> float:
    """The target reward at t_budget of training on ``training``: one forward solve, for comparisons.

    Args:
        training (ArrayLike | Schedule): a distribution over d = 1..n-1, or a schedule (``gradflow.schedules``).
        target: the task to evaluate on.
        t_budget: the training time.
        model: the model (default ``ModelSpec()``).
        theta0: the start (default ``default_theta0``).
        solver: the diffrax solver name (a ``FlowParams`` field).
        rtol: the solver's relative tolerance.
        atol: the solver's absolute tolerance.
        max_steps: the solver's step budget.
        coords: "reduced" or "full" (a ``FlowParams`` field).
        n_vocab: the vocabulary size N for coords "full" (default 2n + n_isolated).

    Returns:
        J_target(theta(t_budget)) (NaN when the solve fails).

    Raises:
        ValueError: the schedule's distributions are over another n, or training is not a distribution
            over d = 1..n-1.
    """
    model = ModelSpec() if model is None else model
    base = _base_params(target, t_budget, model, theta0, solver, rtol, atol, max_steps, coords, n_vocab)
    if sched.is_schedule(training):
        if training.n != target.n:
            raise ValueError(f"schedule: its distributions are over {training.n - 1} distances, expected {target.n - 1}")
        return float(_forward_reward(base, target, jnp.asarray(float(t_budget)), training))
    probs = ChainTask(target.n, training).start_probs
    return float(_forward_reward(_with_probs(base, probs), target, jnp.asarray(float(t_budget)), None))


@eqx.filter_jit
def _forward_reward(base, target, t_budget, schedule):
    return target_reward(base, target, t_budget, schedule=schedule)
