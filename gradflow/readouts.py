"""Read-outs: one registry of the closed-form quantities recorded at a theta (docs/THEORY.md §3.8 and §7.3).

A read-out is a name mapped to one function ``fn(theta, task, model)`` of a ``Theta``, a
``ChainTask`` and a ``ModelSpec`` (capped when ``model.max_len`` is set, as the objective is), with a
record of its shape (``axis``: None for a scalar, "position" for one value per vertex a_i of chain a,
i = 1..n-1, "start" for one per start distance d = 1..n-1) and a one-line description of its math.
The flow's recording, discrete training, the phase analysis and the CLI all read from ``READOUTS``,
so a new read-out is one ``register`` call here.  The reward on another task (the flow's
``eval_reward``) is the "reward" read-out applied to that task.

Step probabilities are conditional on moving: P(kind | the walk leaves a_i) = P(kind) / P(move),
P(move) summed over the moves (never 1 - P(stay)), so they do not depend on ``mask_self`` and the
five of them sum to 1 at every position.  V trained (docs/THEORY.md §10): the row of a_i seen from the
start a_i (``gradflow.two_matrix.step_probabilities``).  Every read-out registered here has a closed form
with V trained too (``TRAINED_V``); ``RECORDED`` is what discrete training records.

``read(names, theta, task, model)`` evaluates several read-outs at once; within one call the shared
intermediates (the step probabilities, the greedy walks, the capped reach) are computed once.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax.numpy as jnp

from gradflow import capped, greedy, objective, two_matrix
from gradflow.model import ModelSpec, Theta, step_probabilities
from gradflow.task import ChainTask, by_distance, layout

AXES = (None, "position", "start")

__all__ = [
    "Readout",
    "READOUTS",
    "AXES",
    "TRAINED_V",
    "RECORDED",
    "TRAINED_V_CAPPED",
    "register",
    "read",
    "read_covered",
    "covers",
    "check_names",
]


class Readout(NamedTuple):
    """One read-out: ``fn(theta, task, model)``; axis None (scalar), "position" (a_i) or "start" (d), each (n-1,);
    probability: its values lie in [0, 1]; description: its math in one line."""

    name: str
    fn: Callable[[Theta, ChainTask, ModelSpec], jnp.ndarray]
    axis: str | None
    probability: bool
    description: str

    def shape(self, n: int) -> tuple[int, ...]:
        """The shape of its value on a chain of n vertices: () or (n - 1,)."""
        return () if self.axis is None else (n - 1,)


READOUTS: dict[str, Readout] = {}


def register(name: str, fn: Callable, axis: str | None = None, probability: bool = False, description: str = "") -> Readout:
    """Add a read-out ``name`` -> fn(theta, task, model) to ``READOUTS``.

    Args:
        name: the read-out's name (non-empty, not yet registered).
        fn: (theta, task, model) -> a scalar or a per-position array.
        axis: None for a scalar, or the name of its per-position axis (one of ``AXES``).
        probability: whether the value is a probability (levels of it must lie in (0, 1)).
        description: one line saying what it is.

    Returns:
        The registered ``Readout``.

    Raises:
        ValueError: the name is empty or taken, the axis unknown, or fn not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in READOUTS:
        raise ValueError(f"read-out {name!r} is already registered")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {list(AXES)}, got {axis!r}")
    if not callable(fn):
        raise ValueError(f"fn must be a function (theta, task, model) -> array, got {fn!r}")
    READOUTS[name] = Readout(name, fn, axis, bool(probability), description)
    return READOUTS[name]


def check_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` (one name or several) as a tuple; ValueError naming the registered read-outs if one is unknown."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name not in READOUTS:
            raise ValueError(f"unknown read-out {name!r}; the read-outs are {list(READOUTS)}")
    return names


def read(names: Iterable[str], theta, task: ChainTask, model: ModelSpec) -> dict[str, jnp.ndarray]:
    """{name: value} of the named read-outs at one theta; traceable.

    Intermediates shared by several read-outs are computed once per call.

    Args:
        names: one read-out name or several (registered in ``READOUTS``).
        theta (Theta | jax.Array): a ``Theta`` or its array of shape (5,).
        task: the chain task.
        model: the model.

    Returns:
        A dict name -> value.

    Raises:
        ValueError: a name is not a registered read-out.
    """
    names = check_names(names)
    theta = theta if isinstance(theta, Theta) else Theta.from_array(jnp.asarray(theta))
    token = _MEMO.set({})
    try:
        return {name: READOUTS[name].fn(theta, task, model) for name in names}
    finally:
        _MEMO.reset(token)


RECORDED = (
    "reward",
    "forward_prob",
    "switch_prob",
    "expected_length",
    "traversal_prob",
    "success_per_start",
    "reach_per_start",
    "reach_probability",
    "greedy_accuracy",
    "greedy_conditional_accuracy",
    "greedy_reach_rate",
    "greedy_traversal_accuracy",
    "greedy_tie_rate",
    "greedy_correct",
    "greedy_reached",
)  # what discrete training records (``gradflow.training.TrainingTrajectory``)
TRAINED_V_CAPPED = ()  # the read-outs with V trained only with a cap (none: every one has both, ``TRAINED_V``)


def covers(name: str, model: ModelSpec) -> bool:
    """Whether read-out ``name`` has a closed form for ``model``: every one with the fixed V; with V trained
    (docs/THEORY.md §10) those of ``TRAINED_V``, and ``TRAINED_V_CAPPED`` when the model sets a cap."""
    if model.values == "fixed":
        return True
    return name in TRAINED_V or (model.max_len is not None and name in TRAINED_V_CAPPED)


def read_covered(names: Iterable[str], theta, task: ChainTask, model: ModelSpec) -> dict[str, jnp.ndarray]:
    """``read`` of the names the model ``covers``, NaN (of the read-out's shape) for the others; traceable.

    Args:
        names: one read-out name or several (registered in ``READOUTS``).
        theta (Theta | jax.Array): a ``Theta`` or its parameter array.
        task: the chain task.
        model: the model.

    Returns:
        A dict name -> value, in the order of ``names``.
    """
    names = check_names(names)
    known = read(tuple(name for name in names if covers(name, model)), theta, task, model)
    return {name: known[name] if name in known else jnp.full(READOUTS[name].shape(task.n), jnp.nan) for name in names}


# --------------------------------------------------------------------------------------------------
# Intermediates shared by several read-outs, computed once per ``read``
# --------------------------------------------------------------------------------------------------

_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("gradflow_readouts_memo", default=None)


def _shared(fn: Callable) -> Callable:
    """fn(theta, task, model), evaluated once per ``read`` call for the same arguments (by identity)."""

    @functools.wraps(fn)
    def once(theta, task, model):
        memo = _MEMO.get()
        if memo is None:
            return fn(theta, task, model)
        key = (fn, id(theta), id(task), id(model))
        if key not in memo:
            memo[key] = (fn(theta, task, model), (theta, task, model))  # the inputs kept alive: their ids stay unique
        return memo[key][0]

    return once


@_shared
def _steps(theta: Theta, task: ChainTask, model: ModelSpec):
    """The step probabilities per position (``gradflow.model.step_probabilities``; V trained: ``two_matrix``'s)."""
    return (two_matrix.step_probabilities if model.values == "trained" else step_probabilities)(theta, task, model)


_greedy = _shared(greedy.greedy_metrics)


def _given_move(kind: str) -> Callable:
    """theta, task, model -> P(step of ``kind`` from a_i | the walk moves), i = 1..n-1."""

    def fn(theta, task, model):
        steps = _steps(theta, task, model)
        move = steps.forward + steps.backward + steps.switch + steps.jump + steps.isolated
        return getattr(steps, kind) / move

    return fn


def _greedy_field(field: str) -> Callable:
    return lambda theta, task, model: getattr(_greedy(theta, task, model), field)


def _greedy_per_start_field(field: str) -> Callable:
    return lambda theta, task, model: getattr(_greedy(theta, task, model).per_start, field).astype(float)


@_shared
def _reach_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """P(some terminal within the cap) by d: ``capped.reach_per_start``; 1 without a cap (absorption is certain)."""
    if model.max_len is None:
        n, rows = layout(task)
        return by_distance(jnp.ones(n - 1 if rows is None else rows), n, rows)  # a bucket's slots past n - 1: 0
    return capped.reach_per_start(theta, task, model)


def _reach_probability(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """P(some terminal within the cap), start-weighted (1 without a cap)."""
    return jnp.sum(task.start_probs * _reach_per_start(theta, task, model))


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------

register(
    "reward",
    objective.expected_reward,
    probability=True,
    description="J = sum_d p[d-1] h[d-1], h = P(own terminal first) (capped: within max_len tokens)",
)
register(
    "forward_prob", _given_move("forward"), axis="position", probability=True, description="P(a_i -> a_{i+1} | the walk moves)"
)
register(
    "backward_prob", _given_move("backward"), axis="position", probability=True, description="P(a_i -> a_{i-1} | the walk moves)"
)
register(
    "switch_prob",
    _given_move("switch"),
    axis="position",
    probability=True,
    description="P(a_i -> a vertex of chain b | the walk moves)",
)
register(
    "jump_prob",
    _given_move("jump"),
    axis="position",
    probability=True,
    description="P(a_i -> a non-adjacent vertex of chain a | the walk moves)",
)
register(
    "isolated_prob",
    _given_move("isolated"),
    axis="position",
    probability=True,
    description="P(a_i -> an isolated vertex | the walk moves)",
)
register(
    "expected_length",
    objective.expected_length,
    description="E[tokens up to the first terminal] = sum_d p[d-1] L[d-1] (capped: E[min(L, max_len)])",
)
register(
    "traversal_prob",
    objective.traversal_probability,
    probability=True,
    description="P(the path is exactly the forward path) = sum_d p[d-1] prod_{i=n-d}^{n-1} P(a_i -> a_{i+1})",
)
register(
    "success_per_start",
    objective.same_side_probability,
    axis="start",
    probability=True,
    description="h[d-1] = P(the own terminal is the first written, within the cap if any) from a_{n-d}",
)
register(
    "reach_per_start",
    _reach_per_start,
    axis="start",
    probability=True,
    description="P(some terminal within the cap) from a_{n-d} (1 uncapped)",
)
register(
    "reach_probability",
    _reach_probability,
    probability=True,
    description="sum_d p[d-1] P(some terminal within the cap) (1 uncapped)",
)
register(
    "greedy_accuracy",
    _greedy_field("accuracy"),
    probability=True,
    description="sum_d p[d-1] [the greedy path's first terminal is its own]",
)
register(
    "greedy_conditional_accuracy",
    _greedy_field("conditional_accuracy"),
    probability=True,
    description="greedy accuracy / greedy reach rate (NaN when no greedy path writes a terminal)",
)
register(
    "greedy_reach_rate",
    _greedy_field("reach_rate"),
    probability=True,
    description="sum_d p[d-1] [the greedy path writes a terminal]",
)
register(
    "greedy_traversal_accuracy",
    _greedy_field("traversal_accuracy"),
    probability=True,
    description="sum_d p[d-1] [the greedy path is exactly the chain suffix a_{n-d+1}..a_n]",
)
register(
    "greedy_tie_rate",
    _greedy_field("tie_rate"),
    probability=True,
    description="sum_d p[d-1] [the greedy path passed an exact tie]",
)
register(
    "greedy_correct",
    _greedy_per_start_field("correct"),
    axis="start",
    probability=True,
    description="[the greedy path from a_{n-d} first writes its own terminal], as 0/1",
)
register(
    "greedy_reached",
    _greedy_per_start_field("reached"),
    axis="start",
    probability=True,
    description="[the greedy path from a_{n-d} writes a terminal], as 0/1",
)

TRAINED_V = tuple(READOUTS)  # the read-outs with a closed form with V trained: every one registered above
