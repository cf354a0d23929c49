"""What the paper says should happen (docs/THEORY.md §4, §5, §7, §12 and §13), as checks on configs and trajectories.

- ``check_conditions(flow_params)``: the base-model assumption at theta0 (c0, b0), the mass on simple
  examples, the predicted regime (polynomial / exponential), the value of the sufficiency bound, and
  the reward ceiling (``max_reward``).
- ``phases(trajectory)``: when the reward escapes its plateau, when forward traversal emerges and
  completes, when the loss converges, when each position learns (root-found on the solution) and in
  which order (only where the times differ beyond a tolerance), and how fast the logit gap
  alpha - gamma grows in the late phase (per unit of log t).
- ``learning_time`` / ``learning_times`` / ``scaling``: time for the flow to reach a reward level,
  integrated in log time s = log(1 + t - t0) so that hardest-only training is measured far past t = 1e12,
  and exponential versus power-law fits of that time against the chain length n.
- ``gradient_by_distance`` / ``success_gradient``: the reward gradient carried by the starts at each
  distance d (prediction 1), capped models included.
- ``max_reward`` / ``reward_ceiling`` / ``reward_ceiling_warning``: the supremum of J over theta (a cap
  and softmax attention each keep it below 1), and the warning for a level above it (they live in
  ``gradflow.ceilings``, left of the flow, which checks them before a solve; re-exported here).
- ``extrapolate``: the reward of fixed parameters on longer chains (prediction 6).

Flow time is the time of ``gradflow.flow`` (d theta/dt = grad J, reduced coordinates by default).
Nothing here builds an array at import: defaults (theta0, model) are made when a function is called.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import readouts
from gradflow._checks import check_fraction, check_int, check_nonnegative
from gradflow._dependencies import is_result, result_code, result_message
from gradflow._deprecated import module_getattr
from gradflow._imports import diffrax  # a stand-in: diffrax is imported when first read
from gradflow._series import first_crossing
from gradflow.ceilings import RewardCeiling, max_reward, reward_ceiling, reward_ceiling_warning  # noqa: F401  (re-exported)
from gradflow.compile_cache import CompileRequest, compiled, run_together
from gradflow.config import FlowParams, config_label
from gradflow.flow import (
    batch_chunk,
    bucketed,
    hitting_times,
    over_batch,
    shared_layout,
    shares_bucket,
    stack_configs,
)
from gradflow.integrator import LOCAL_MAX_STEPS, Clock, crossing, falling_event, integrate
from gradflow.model import ModelSpec, Theta, as_task, default_theta0, step_probabilities
from gradflow.objective import expected_reward, finite_or_extended, same_side_probability
from gradflow.task import ChainTask, PaddedTask, bucket_size
from gradflow.trajectory import Trajectory

REGIMES = ("polynomial", "exponential", "undetermined")
DEFAULT_T1 = 1e40
ORDER_RTOL = 1e-6


__getattr__ = module_getattr(__name__)  # deprecated names (gradflow._deprecated)


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _model_or_default(model) -> ModelSpec:
    if model is None:
        return ModelSpec()
    if not isinstance(model, ModelSpec):
        raise ValueError(f"model must be a gradflow.ModelSpec, got {type(model).__name__}")
    return model


def _theta_or_default(theta0, name: str = "theta0") -> Theta:
    if theta0 is None:
        return default_theta0()
    if not isinstance(theta0, Theta):
        raise ValueError(f"{name} must be a gradflow.Theta, got {type(theta0).__name__}")
    return theta0


def _is_capped(model: ModelSpec) -> bool:
    return model.max_len is not None


def _reward(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """J(theta): ``gradflow.objective.expected_reward`` (capped when the model is)."""
    return expected_reward(theta, task, model)


def _success_per_start(theta: Theta, task: ChainTask, model: ModelSpec) -> jnp.ndarray:
    """h[d-1] = P(reward 1 | start at distance d): same-side absorption, or within the cap."""
    return same_side_probability(theta, task, model)


# ---------------------------------------------------------------------------------------------------
# Conditions at the start of training
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionReport:
    """The paper's assumptions evaluated at theta0, and what they predict.

    forward[i-1], backward[i-1]: P(a_i -> a_{i+1}), P(a_i -> a_{i-1}) at theta0 (unconditional step
    probabilities; with the default mask_self=True they equal the probabilities given a move).
    c0 = min_i forward, b0 = min_i (forward - backward), over the non-terminal positions i = 1..n-1.
    simple_mass[k-1] = P(d <= k), k = 1..n-1.  k: the smallest k with P(d <= k) > 0; c: that mass.
    base_model: c0 > c0_min and b0 > b0_min.  regime: see ``check_conditions``.  bound: the paper's
    sufficiency bound n^2 / (c0^(k+2) b0 c eps^2) (inf when b0 <= 0).  ceiling: sup over theta of J
    (``max_reward``; below 1 with a cap or softmax attention), ceiling_exact: whether it is a closed
    form.  max_len: the model's cap (None: unbounded).
    """

    n: int
    forward: tuple[float, ...]
    backward: tuple[float, ...]
    c0: float
    b0: float
    simple_mass: tuple[float, ...]
    k: int
    c: float
    c0_min: float
    b0_min: float
    base_model: bool
    k_max: int
    c0_floor: float
    regime: str
    eps: float
    bound: float
    ceiling: float = 1.0
    ceiling_exact: bool = True
    max_len: int | None = None

    def __str__(self) -> str:
        mass = ", ".join(f"{m:.3g}" for m in self.simple_mass)
        lines = [
            f"conditions at theta0 (n = {self.n}{'' if self.max_len is None else f', cap {self.max_len} tokens'}):",
            f"  c0 = min forward-step probability = {self.c0:.4g}   (need > {self.c0_min:g})",
            f"  b0 = min (forward - backward)     = {self.b0:.4g}   (need > {self.b0_min:g})",
            f"  base-model assumption: {'holds' if self.base_model else 'FAILS'}",
            f"  simple-example mass P(d <= k), k = 1..{self.n - 1}: [{mass}]",
            f"  smallest k with mass: k = {self.k}, c = P(d <= {self.k}) = {self.c:.4g}",
            f"  predicted regime: {self.regime} (k_max = {self.k_max}, c0^k = {self.c0**self.k:.3g}, floor {self.c0_floor:g})",
            f"  sufficiency bound n^2/(c0^(k+2) b0 c eps^2) at eps = {self.eps:g}: {self.bound:.4g}",
            f"  reward ceiling sup J = {self.ceiling:.10g} ({'exact' if self.ceiling_exact else 'numerical'})"
            + ("" if self.ceiling >= 1.0 else ": higher reward levels are never reached"),
        ]
        return "\n".join(lines)


def check_conditions(
    flow_params: FlowParams,
    c0_min: float = 0.0,
    b0_min: float = 0.0,
    eps: float = 0.1,
    k_max: int = 3,
    c0_floor: float = 1e-8,
) -> ConditionReport:
    """Evaluate the base-model assumption and the simple-example mass at ``flow_params.theta0``.

    c0 is the smallest forward-step probability over the non-terminal positions of a chain, taken
    unconditionally (``step_probabilities(...).forward``); under the default mask_self=True the walk
    always moves, so it equals the probability conditional on moving.  b0 is the smallest margin
    forward - backward (the paper writes this margin d0; we call it b0 to keep d for start distances).
    The base-model assumption holds when c0 > c0_min and b0 > b0_min.

    Regime: let k be the smallest distance with P(d <= k) > 0 and c = P(d <= k).  "polynomial" when
    k <= k_max (a bounded number of steps, independent of n) and c0^k >= c0_floor: the bound
    n^2 / (c0^(k+2) b0 c eps^2) is then polynomial in n, because c0 falls only like 1/n at a fixed
    theta0.  "exponential" when there is no mass on d <= k_max (all starts sit at distances that grow
    with n, so c0^k is exponentially small in n).  "undetermined" otherwise (mass on a few steps but
    c0^k below the floor: the bound is vacuous).  The bound is inf when b0 <= 0.
    Capped models (``ModelSpec.max_len``) are accepted: the step probabilities do not depend on the
    cap, and the report adds the cap and the reward ceiling (``max_reward``) it implies.

    Args:
        flow_params: the config whose task, model and theta0 are checked.
        c0_min: the threshold c0 must exceed, in [0, 1).
        b0_min: the threshold b0 must exceed, >= 0.
        eps: the target loss in the bound n^2 / (c0^(k+2) b0 c eps^2), in (0, 1).
        k_max: the largest number of steps that counts as "a bounded number", >= 1.
        c0_floor: the smallest c0^k for which the regime is "polynomial", >= 0.

    Returns:
        A ``ConditionReport``: c0, b0, whether the assumption holds, k, c, the bound and the regime.

    Raises:
        ValueError: flow_params is not a ``FlowParams`` or a threshold is out of its range.
    """
    if not isinstance(flow_params, FlowParams):
        raise ValueError(f"flow_params must be a gradflow.flow.FlowParams, got {type(flow_params).__name__}")
    c0_min = check_nonnegative("c0_min", c0_min)
    if c0_min >= 1.0:
        raise ValueError(f"c0_min must lie in [0, 1), got {c0_min!r}")
    b0_min = check_nonnegative("b0_min", b0_min)
    eps = check_fraction("eps", eps, 0.0, 1.0)
    k_max = check_int("k_max", k_max, 1)
    c0_floor = check_nonnegative("c0_floor", c0_floor)

    task, model, n = flow_params.task, flow_params.model, flow_params.task.n
    steps = step_probabilities(flow_params.theta0, task, model)
    forward = np.asarray(steps.forward, dtype=float)
    backward = np.asarray(steps.backward, dtype=float)
    c0 = float(forward.min())
    b0 = float((forward - backward).min())
    mass = np.cumsum(np.asarray(task.start_probs, dtype=float))
    k = int(np.argmax(mass > 0.0)) + 1
    c = float(mass[k - 1])
    if k > k_max:
        regime = "exponential"
    elif c0**k >= c0_floor:
        regime = "polynomial"
    else:
        regime = "undetermined"
    bound = n**2 / (c0 ** (k + 2) * b0 * c * eps**2) if b0 > 0 and c0 > 0 else math.inf
    ceiling = reward_ceiling(task, model)
    return ConditionReport(
        n=n,
        forward=tuple(forward.tolist()),
        backward=tuple(backward.tolist()),
        c0=c0,
        b0=b0,
        simple_mass=tuple(mass.tolist()),
        k=k,
        c=c,
        c0_min=c0_min,
        b0_min=b0_min,
        base_model=bool(c0 > c0_min and b0 > b0_min),
        k_max=k_max,
        c0_floor=c0_floor,
        regime=regime,
        eps=eps,
        bound=float(bound),
        ceiling=ceiling.value,
        ceiling_exact=ceiling.exact,
        max_len=model.max_len,
    )


# ---------------------------------------------------------------------------------------------------
# Phases of a trajectory
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseReport:
    """Event times of one trajectory (None: did not happen within the solve).

    escape: the reward has covered ``escape_fraction`` (default 10%) of the way from J(t0) to the
    reward ceiling (1 unless a cap or softmax attention bounds it; see ``max_reward``).
    emergence / traversal: the forward probability given a move reaches 0.5 / 0.99 at every position.
    convergence: the loss 1 - J falls below ``convergence_loss``.  position_times[i-1]: first time the
    forward probability at a_i reaches 0.5.  order: positions i sorted by that time (those that never
    cross are left out); order_groups: the same positions grouped where their times agree within
    ``order_rtol`` (relative): only distinct groups are an order.  gap_slope: d(alpha - gamma)/d(log t)
    fitted over the last third of the log-t range (t > 0); None when fewer than 3 saves lie there.
    With ``exact`` every time is root-found by bisection on a dense re-solve of the flow between the
    two saves that bracket it; otherwise it is interpolated linearly between saves.  warnings: levels
    asked for that lie above the reward ceiling (never reached).  eval_times: name -> first time the
    reward on that evaluation task reaches ``eval_level`` (the config's reward_threshold by default).
    """

    n: int
    t_end: float
    final_reward: float
    escape: float | None
    emergence: float | None
    traversal: float | None
    convergence: float | None
    position_times: tuple[float | None, ...]
    order: tuple[int, ...]
    gap_slope: float | None
    escape_level: float
    convergence_loss: float
    order_groups: tuple[tuple[int, ...], ...] = ()
    order_rtol: float = ORDER_RTOL
    ceiling: float = 1.0
    exact: bool = True
    warnings: tuple[str, ...] = ()
    eval_times: dict[str, float | None] = field(default_factory=dict)
    eval_level: float | None = None

    @property
    def order_is_strict(self) -> bool:
        """True when every position that learned has its own time (no ties within order_rtol)."""
        return all(len(group) == 1 for group in self.order_groups)

    def order_text(self) -> str:
        """ "a7, a1, a2" for a strict order; tied positions in parentheses: "a7, (a1 = a2 = a3)"."""
        parts = []
        for group in self.order_groups:
            names = [f"a{i}" for i in group]
            parts.append(names[0] if len(names) == 1 else "(" + " = ".join(names) + ")")
        return ", ".join(parts) or "-"

    def __str__(self) -> str:
        positions = ", ".join(f"a{i}: {_fmt(t)}" for i, t in enumerate(self.position_times, start=1))
        how = "root-found on the solution" if self.exact else "interpolated between saves"
        lines = [
            f"phases (n = {self.n}, solved to t = {self.t_end:.4g}, final reward {self.final_reward:.6g}; times {how}):",
            f"  escape      (J >= {self.escape_level:.4g}): t = {_fmt(self.escape)}",
            f"  emergence   (forward > 0.5 everywhere):   t = {_fmt(self.emergence)}",
            f"  traversal   (forward > 0.99 everywhere):  t = {_fmt(self.traversal)}",
            f"  convergence (loss < {self.convergence_loss:g}):          t = {_fmt(self.convergence)}",
            f"  forward > 0.5 first at: {positions}",
            f"  learning order (positions; ties within {self.order_rtol:g} relative in parentheses): {self.order_text()}",
            f"  late growth of alpha - gamma per unit log t: {_fmt(self.gap_slope)}",
        ]
        for name, t in self.eval_times.items():
            lines.append(f"  eval {name} learned (J >= {self.eval_level:g}): t = {_fmt(t)}")
        if self.ceiling < 1.0:
            lines.append(f"  reward ceiling of this model: {self.ceiling:.6g}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def late_gap_slope(trajectory: Trajectory, fraction: float = 1.0 / 3.0) -> float | None:
    """Least-squares slope of alpha - gamma against log t over the last ``fraction`` of the log-t range.

    Args:
        trajectory: the solved flow.
        fraction: the share of the log-t range (over t > 0) to fit, in (0, 1].

    Returns:
        d(alpha - gamma)/d(log t), or None when fewer than 3 saves lie in the range.

    Raises:
        ValueError: fraction is not in (0, 1].
    """
    fraction = check_fraction("fraction", fraction, 0.0, 1.0, inclusive=True)
    if fraction == 0.0:
        raise ValueError("fraction must lie in (0, 1], got 0.0")
    ts = np.asarray(trajectory.ts, dtype=float)
    gap = np.asarray(trajectory.theta[:, 0] - trajectory.theta[:, 2], dtype=float)
    keep = (ts > 0) & np.isfinite(gap)
    if keep.sum() < 3:
        return None
    log_t, gap = np.log(ts[keep]), gap[keep]
    late = log_t >= log_t.max() - fraction * (log_t.max() - log_t.min())
    if late.sum() < 3:
        return None
    return float(np.polyfit(log_t[late], gap[late], 1)[0])


def _readouts(params: FlowParams, y: jnp.ndarray, eval_tasks: tuple = ()) -> jnp.ndarray:
    """What phases root-finds, at one theta (P,): [forward | move at a_1..a_{n-1}, their min, J, J on each eval task].

    The read-outs of ``gradflow.readouts`` the trajectory saved, so brackets and roots agree.
    """
    values = readouts.read(("forward_prob", "reward"), y, params.task, params.model)
    forward = values["forward_prob"]
    evals = [jnp.asarray(readouts.read("reward", y, task, params.model)["reward"])[None] for task in eval_tasks]
    return jnp.concatenate([forward, jnp.min(forward)[None], jnp.asarray(values["reward"])[None], *evals])


@eqx.filter_jit
def _eval_rewards(model: ModelSpec, eval_tasks: tuple, thetas: jnp.ndarray) -> jnp.ndarray:
    """(T, E): the reward on each eval task at every saved theta."""
    rewards = [jax.vmap(lambda y, t=task: expected_reward(Theta.from_array(y), t, model))(thetas) for task in eval_tasks]
    return jnp.stack(rewards, axis=1)


def _phase_crossings(params: FlowParams, eval_tasks: tuple, ts, thetas, table, columns, levels):
    """For each (column, level): the first time read-out ``column`` reaches ``level``, root-found.

    ``gradflow.integrator.crossing`` per request (bracket on the saves, dense re-solve of the bracket in
    the config's own time variable, bisection), vmapped over the requests: one compilation per
    structure for every position, emergence, traversal and the reward events together.
    """

    def one(column, level):
        quantity = lambda y: _readouts(params, y, eval_tasks)[column]
        return crossing(params, ts, thetas, table[:, column], level, quantity, LOCAL_MAX_STEPS)

    return jax.vmap(one)(columns, levels)


def _root_times(
    trajectory: Trajectory, requests: list[tuple[int, float]], exact: bool, eval_tasks: tuple = ()
) -> list[float | None]:
    """First time each read-out column reaches its level (``requests``: (column, level) pairs).

    Columns: 0..n-2 the forward probability given a move at a_1..a_{n-1}, n-1 its minimum, n the
    reward, n+1.. the reward on each of ``eval_tasks``.  A read-out already at its level at the first
    save gives that time.  With ``exact`` the crossing is root-found on the solution
    (``_phase_crossings``, all requests in one call); otherwise it is interpolated linearly between
    saves (``gradflow._series.first_crossing``).
    """
    ts = np.asarray(trajectory.ts, dtype=float)
    forward = np.asarray(trajectory.forward_prob, dtype=float)
    reward = np.asarray(trajectory.reward, dtype=float)
    table = np.concatenate([forward, np.min(forward, axis=1, keepdims=True), reward[:, None]], axis=1)
    if eval_tasks:
        thetas = jnp.asarray(np.nan_to_num(np.asarray(trajectory.theta, dtype=float)))
        table = np.concatenate([table, np.asarray(_eval_rewards(trajectory.config.model, eval_tasks, thetas))], axis=1)
    valid = np.isfinite(ts) & np.all(np.isfinite(table), axis=1)
    out: list[float | None] = [None] * len(requests)
    if not valid.any():
        return out
    first = int(np.flatnonzero(valid)[0])
    pending = []
    for index, (column, level) in enumerate(requests):
        column_values = np.where(valid, table[:, column], np.nan)
        if not (column_values[valid] >= level).any():
            continue
        if column_values[first] >= level:
            out[index] = float(ts[first])
        elif exact:
            pending.append(index)
        else:
            out[index] = first_crossing(ts, column_values, level)
    if not pending:
        return out
    columns = np.array([c for c, _ in requests])
    levels = np.array([lv for _, lv in requests], dtype=float)
    args = (
        trajectory.config.solver_resolved(),
        eval_tasks,
        jnp.asarray(np.where(valid, ts, np.nan)),
        jnp.asarray(np.nan_to_num(np.asarray(trajectory.theta, dtype=float))),
        jnp.asarray(np.where(valid[:, None], table, np.nan)),
        jnp.asarray(columns),
        jnp.asarray(levels),
    )
    executable, _ = compiled("phases", _phase_crossings, args, export=True, quick=True)
    times, reached, resolved = jax.device_get(executable(*args))
    for index in pending:
        if not resolved[index]:
            raise RuntimeError(
                f"phases: the dense re-solve of the bracket of read-out {requests[index]} needs more than "
                f"{LOCAL_MAX_STEPS} steps; save more times (FlowParams.save_ts)"
            )
        out[index] = float(times[index]) if reached[index] else None
    return out


def _order_groups(position_times, rtol: float) -> tuple[tuple[int, ...], ...]:
    """Positions sorted by time, grouped where consecutive times agree within ``rtol`` (relative)."""
    crossed = sorted((t, i) for i, t in enumerate(position_times, start=1) if t is not None)
    groups: list[list[int]] = []
    anchor = None
    for t, i in crossed:
        if anchor is not None and abs(t - anchor) <= rtol * max(abs(t), abs(anchor)):
            groups[-1].append(i)
        else:
            groups.append([i])
            anchor = t
    return tuple(tuple(sorted(g)) for g in groups)


def phases(
    trajectory: Trajectory,
    escape_fraction: float = 0.1,
    emergence_level: float = 0.5,
    traversal_level: float = 0.99,
    convergence_loss: float = 1e-3,
    exact: bool = True,
    order_rtol: float = ORDER_RTOL,
    eval_tasks: dict[str, ChainTask] | None = None,
    eval_level: float | None = None,
) -> PhaseReport:
    """Read the phases of docs/THEORY.md §5 off a solved trajectory; see ``PhaseReport``.

    Capped models and softmax attention are accepted; a reward level above the model's ceiling
    (``max_reward``) is reported in ``warnings`` (and warned) instead of silently never being reached.

    Args:
        trajectory: the solved flow.
        escape_fraction: escape is when the reward has covered this share of the way from J(t0) to the
            reward ceiling.
        emergence_level: the forward probability (given a move) that every position must reach for emergence;
            also the level of each position's time.
        traversal_level: the forward probability every position must reach for traversal.
        convergence_loss: convergence is when the loss 1 - J falls below this.
        exact: True root-finds every time (reward events, each position's forward probability,
            emergence, traversal) on a dense re-solve of the flow between the saves that bracket it, all
            in one vmapped call (one compilation per structure); False interpolates between saves.
        order_rtol: positions whose times agree within this (relative) are reported as tied, not ordered.
        eval_tasks: name -> ChainTask of the same n; these and the config's own ``eval_tasks`` each get
            the first time their reward reaches ``eval_level``, in ``eval_times``, root-found like the rest.
        eval_level: the reward level of the eval tasks (default: the config's reward_threshold).

    Returns:
        The ``PhaseReport``.

    Raises:
        ValueError: trajectory is not a ``Trajectory`` or holds no finite reward, a level or fraction is
            outside (0, 1), order_rtol is negative, or an eval task is not a ChainTask of the same n.
    """
    if not isinstance(trajectory, Trajectory):
        raise ValueError(f"trajectory must be a gradflow.flow.Trajectory, got {type(trajectory).__name__}")
    escape_fraction = check_fraction("escape_fraction", escape_fraction)
    emergence_level = check_fraction("emergence_level", emergence_level)
    traversal_level = check_fraction("traversal_level", traversal_level)
    convergence_loss = check_fraction("convergence_loss", convergence_loss)
    order_rtol = check_nonnegative("order_rtol", order_rtol)

    ts = np.asarray(trajectory.ts, dtype=float)
    reward = np.asarray(trajectory.reward, dtype=float)
    forward = np.asarray(trajectory.forward_prob, dtype=float)
    valid = np.isfinite(reward) & np.isfinite(ts)
    if not valid.any():
        raise ValueError("trajectory holds no finite reward")
    config = trajectory.config
    model = config.model
    exact_ceiling = model.attention == "linear" and not _is_capped(model)
    ceiling = 1.0 if exact_ceiling else reward_ceiling(config.task, model).value
    j0 = float(reward[valid][0])
    escape_level = j0 + escape_fraction * (ceiling - j0)
    convergence_level = 1.0 - convergence_loss
    notes = []
    if convergence_level >= ceiling:
        notes.append(reward_ceiling_warning(config, convergence_level) or "")
        warnings.warn(notes[-1], stacklevel=2)

    evals = {**config.eval_tasks, **_check_eval_tasks(eval_tasks, [config.task.n])}
    eval_level = check_fraction("eval_level", float(config.reward_threshold) if eval_level is None else eval_level)
    n_pos = forward.shape[1]
    requests = [(i, emergence_level) for i in range(n_pos)]
    requests += [(n_pos, emergence_level), (n_pos, traversal_level), (n_pos + 1, escape_level), (n_pos + 1, convergence_level)]
    requests += [(n_pos + 2 + k, eval_level) for k in range(len(evals))]
    times = _root_times(trajectory, requests, exact, tuple(evals.values()))
    eval_times = dict(zip(evals, times[n_pos + 4 :]))
    position_times = tuple(times[:n_pos])
    emergence, traversal, escape, convergence = times[n_pos : n_pos + 4]
    groups = _order_groups(position_times, order_rtol)
    last = int(np.flatnonzero(valid)[-1])
    return PhaseReport(
        n=config.task.n,
        t_end=float(ts[last]),
        final_reward=float(reward[last]),
        escape=escape,
        emergence=emergence,
        traversal=traversal,
        convergence=convergence,
        position_times=position_times,
        order=tuple(i for group in groups for i in group),
        gap_slope=late_gap_slope(trajectory),
        escape_level=escape_level,
        convergence_loss=convergence_loss,
        order_groups=groups,
        order_rtol=order_rtol,
        ceiling=ceiling,
        exact=exact,
        warnings=tuple(notes),
        eval_times=eval_times,
        eval_level=eval_level,
    )


# ---------------------------------------------------------------------------------------------------
# Learning times and their scaling with n
# ---------------------------------------------------------------------------------------------------


SWITCH_SPEED = 1.0  # the log-time stage hands over when theta moves this fast per unit log t
SEGMENT_GROWTH = 10.0  # a linear-time segment ends (and the clock restarts) when |grad J| has grown this much
MAX_SEGMENTS = 400  # linear-time segments at most (n = 40 needs 50)
ESCAPE_FRACTION = 0.1  # the plateau ends when J has covered this share of the way from J(theta0) to 1 (``phases``)
# in one ``learning_times`` call, the tasks of every bucket of n up to this size share one program (laid out in the
# largest of their buckets): their solves take seconds, each program's compilation tens of seconds
SHARED_PROGRAM_UP_TO = 32


class LearningTime(float):
    """A learning time T (a float, as before) that also holds its two phases: ``plateau``, the flow time at
    which J has covered ``ESCAPE_FRACTION`` of the way from J(theta0) to 1 (``phases``' escape with ceiling 1,
    or the level if that is lower), and ``rise``, the time from there to the level, T - plateau summed over
    the rise's own clock (at n = 40 it lasts a few time units at t ~ 1e49, below one ulp of T)."""

    plateau: float
    rise: float

    def __new__(cls, total: float, plateau: float, rise: float):
        time = super().__new__(cls, total)
        time.plateau, time.rise = float(plateau), float(rise)
        return time

    def __reduce__(self):
        return LearningTime, (float(self), self.plateau, self.rise)


def _learning_solve(params: FlowParams, watched: ChainTask):
    """Integrate the flow until J on ``watched`` = reward_threshold: log time across the plateau, then linear
    time in segments that each restart the clock (``watched`` is the training task, or an eval task measured
    along the same training flow).

    Returns (stop time t, whether the level was reached, J there, steps taken, solver result code, the
    plateau's end (``LearningTime``), the rise's length summed over its segments).
    Stage 1 steps in s = log(1 + t - t0) (d theta/ds = (1 + t - t0) grad J): hardest-only training sits
    on a plateau for a time exponential in n, which costs about a hundred steps in s.  It stops when J
    reaches the level or when theta starts to move on the log scale ((1 + t - t0) |grad J| >= SWITCH_SPEED).
    The escape that follows accelerates without bound: the rise from 1/2 to 0.9 lasts a few time units at
    t ~ 1e49 (n = 40), far below one ulp of t.  So stage 2 runs in linear time u = t - t_k from u = 0,
    restarting the clock at t_k + u (every digit of u kept) each time |grad J| has grown SEGMENT_GROWTH-fold,
    until J reaches the level (docs/THEORY.md §12.4).  Both stages are passes of one loop around ONE
    ``gradflow.integrator.integrate`` call whose clock (log or linear) is data, so the program holds one copy
    of the solve and of its event (two copies compiled twice as long).  A schedule's jumps end a step in
    either clock, and each event is root-found by bisection on the step interpolant.  Under vmap, configs
    whose event did not fire report a meaningless stop time.
    """
    level = params.reward_threshold
    reward = lambda y: _reward(Theta.from_array(y), watched, params.model)
    speed = lambda t, y: jnp.linalg.norm(params.vector_field(t, y))
    y0 = params.theta0.as_array(params.model.values)
    j0, speed0 = reward(y0), speed(params.t0, y0)
    escape = jnp.minimum(j0 + ESCAPE_FRACTION * (1.0 - j0), level)  # the plateau ends here (``phases``' escape)
    # a flow already fast at theta0 (a condition that starts below 0 never falls through it) has no plateau to
    # cross in log time: the log-time stage takes zero length and the linear-time stage starts at t0
    starts_fast = 1.0 - speed0 / SWITCH_SPEED <= 0.0

    def terms(plateau, clock: Clock, grown, t_escape, s, y):
        """(the level's term, the speed's term, the plateau end's term) of the event: each falls through 0; and J and
        |grad J| at (s, y), which the stage after this one starts from.
        Plateau (log time): J reaches the plateau's end, or theta moves fast ((1 + t - t0) |grad J| >= SWITCH_SPEED);
        rise (linear time): J reaches the level, |grad J| grows SEGMENT_GROWTH-fold, or J passes the plateau's end."""
        j, moving = reward(y), speed(clock.to_time(s), y)
        level_term = jnp.where(plateau, jnp.inf, level - j)
        speed_term = jnp.where(plateau, 1.0 - clock.rate(s) * moving / SWITCH_SPEED, 1.0 - moving / grown)
        end_term = jnp.where(plateau | jnp.isnan(t_escape), escape - j, jnp.inf)
        return (level_term, speed_term, end_term), (j, moving)

    def active(state):
        k, _, _, _, _, going, *_ = state
        return going & (k <= MAX_SEGMENTS)

    # the state: segment k, its origin (flow time), theta there, steps so far, result code, whether another segment
    # follows, the plateau's end, the rise so far, whether the rise started, whether the level was reached in log
    # time, and J and |grad J| at theta (each computed once where a segment ends: the program holds fewer copies)

    def stage(state):  # k = 0: the plateau in log time from t0; k >= 1: the rise's segments u = t - origin, every digit kept
        k, origin, theta, steps, result, going, t_escape, rise, switched, done, j_theta, speed_theta = state
        plateau = k == 0
        clock = Clock(origin, log=plateau)
        grown = SEGMENT_GROWTH * jnp.maximum(speed_theta, jnp.finfo(float).tiny)
        event = falling_event(lambda t, y, args, **kwargs: jnp.min(jnp.stack(terms(plateau, clock, grown, t_escape, t, y)[0])))
        span = jnp.where(plateau, jnp.where(starts_fast, 0.0, clock.to_solver(params.t1)), params.t1 - origin)
        span = jnp.where(going, span, 0.0)  # under vmap, members already done take a zero-length solve (their state is kept)
        sol = integrate(params, diffrax.SaveAt(t1=True), clock=clock, t0=0.0, t1=span, y0=theta, event=event)
        s_end, y_end = sol.ts[-1], sol.ys[-1]
        (_, speed_end, end_end), (j_end, moving_end) = terms(plateau, clock, grown, t_escape, s_end, y_end)
        fired = sol.event_mask  # (a zero-length solve fires nothing)
        ok = sol.result == diffrax.RESULTS.event_occurred
        # plateau: where it ended, and whether the rise in linear time follows
        escaped = fired & (end_end <= speed_end)
        reached = escaped & (escape >= level)  # the level is the plateau's end: reached in log time
        rises = (fired & ~reached) | starts_fast
        # rise: whether this segment ended the plateau, and whether another segment follows
        ended = ok & (end_end <= speed_end)
        y_next = jnp.where(going, y_end, theta)
        j_next, speed_next = jnp.where(going, j_end, j_theta), jnp.where(going, moving_end, speed_theta)
        t_next = clock.to_time(s_end)
        return (
            k + 1,
            t_next,
            y_next,
            steps + sol.stats["num_steps"],
            jnp.where(plateau | ~ok, result_code(sol.result), result),
            jnp.where(plateau, rises, ok & (j_next < level)),
            jnp.where(plateau, jnp.where(escaped, t_next, jnp.nan), jnp.where(ended, t_next, t_escape)),
            rise + jnp.where(~plateau & ~jnp.isnan(t_escape), s_end, 0.0),
            jnp.where(plateau, rises, switched),
            jnp.where(plateau, reached, done),
            j_next,
            speed_next,
        )

    zero, no = jnp.zeros(()), jnp.asarray(False)
    start = (jnp.asarray(0), params.t0, y0, jnp.asarray(0), result_code(diffrax.RESULTS.successful), jnp.asarray(True))
    k, t_stop, y_stop, steps, result, _, t_escape, rise, switched, done, j_stop, _ = jax.lax.while_loop(
        active, stage, (*start, jnp.nan * zero, zero, no, no, j0, speed0)
    )
    fired = jnp.where(switched, j_stop >= level - 1e-12, done)
    result = jnp.where(switched & fired, result_code(diffrax.RESULTS.successful), result)
    unended = jnp.isnan(t_escape)  # J jumped past the plateau's end and the level within one segment
    return t_stop, fired, j_stop, steps, result, jnp.where(unended, t_stop, t_escape), jnp.where(unended, 0.0, rise)


def _learning_request(configs, watched) -> CompileRequest:
    """The ``compile_cache.CompileRequest`` of the learning-time solve of one config (watching one task; a quick
    program, compiled without XLA's while-loop passes: 20-30% less XLA time, the same numbers), or of a stacked batch
    (with them: without, its compile took about 10% less and its run about 20% more)."""
    batched = isinstance(configs, list)
    configs, watched = _in_buckets(configs if batched else [configs], watched if batched else [watched])
    configs, watched = (configs, watched) if batched else (configs[0], watched[0])
    if batched:
        args = (stack_configs(configs).solver_resolved(), _stacked(watched))
    else:
        args = (configs.solver_resolved(), watched)
    fn = over_batch(_learning_solve) if batched else _learning_solve
    kind = "learning_batch" if batched else "learning"
    return CompileRequest(kind, fn, args, batch_chunk(), True, quick=not batched, loop_passes=batched)


def _stacked(tasks: list):
    """Tasks of one structure (``ChainTask``s of one n, or ``PaddedTask``s of one bucket) stacked on a leading axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *tasks)


def _bucket_of(config: FlowParams):
    """What shares a learning-time compilation in one call: the bucket of n where ``shares_bucket`` (n as data), every bucket
    up to ``SHARED_PROGRAM_UP_TO`` together, else n itself."""
    if not shares_bucket(config):
        return ("n", config.task.n)
    size = bucket_size(config.task.n)
    return ("buckets up to", SHARED_PROGRAM_UP_TO) if size <= SHARED_PROGRAM_UP_TO else ("bucket", size)


def _in_buckets(configs: list, watched: list) -> tuple[list, list]:
    """The configs and watched tasks laid out in the bucket of the longest chain when all are ``bucketable``."""
    layout = shared_layout(configs)
    if layout is None:
        return configs, watched
    return [bucketed(cfg, *layout) for cfg in configs], [PaddedTask.padded(task, layout.size) for task in watched]


def _learning_configs(tasks, model, theta0, level, t1, flow_kwargs) -> list[FlowParams]:
    level = check_fraction("level", level)
    if not (isinstance(t1, (int, float, np.floating, np.integer)) and math.isfinite(float(t1)) and float(t1) > 0):
        raise ValueError(f"t1 must be a positive finite number, got {t1!r}")
    model = _model_or_default(model)
    theta0 = _theta_or_default(theta0)
    for key in ("task", "model", "theta0", "t1", "reward_threshold", "stop_at"):
        if key in flow_kwargs:
            raise ValueError(f"{key} is set by learning_time itself; do not pass it in flow_kwargs")
    return [
        FlowParams(task=task, model=model, theta0=theta0, t1=float(t1), reward_threshold=level, **flow_kwargs) for task in tasks
    ]


def _interpret(params: FlowParams, t_stop, fired, reward, num_steps, result, t_plateau, rise) -> LearningTime | None:
    level = float(params.reward_threshold)
    if not math.isfinite(float(reward)):
        raise RuntimeError(
            f"learning_time: {config_label(params)}: the reward J is not finite ({float(reward)}) where the solve "
            f"stopped, t = {float(t_stop):.6g} after {int(num_steps)} steps: the closed form cannot be evaluated there"
        )
    if bool(fired):
        return LearningTime(float(t_stop), float(t_plateau), float(rise))
    if int(num_steps) >= params.max_steps or is_result(result, diffrax.RESULTS.max_steps_reached):
        raise RuntimeError(
            f"the flow at n = {params.task.n} took max_steps = {params.max_steps} steps before reaching "
            f"reward {level} (stopped at t = {float(t_stop):.6g}, J = {float(reward):.6g}): raise max_steps or loosen rtol/atol"
        )
    if not is_result(result, diffrax.RESULTS.successful):
        raise RuntimeError(
            f"the flow at n = {params.task.n} failed before reaching reward {level} at t = {float(t_stop):.6g} "
            f"({result_message(result)}, J = {float(reward):.6g})"
        )
    return None


@dataclass(frozen=True)
class TaskTimes:
    """When each task is learned along one training flow (None: not by t1): ``train`` for the training
    task, ``eval[name]`` for each evaluation task (its reward reaches the same level)."""

    train: float | None
    eval: dict[str, float | None]


def _check_eval_tasks(eval_tasks, n_of: Iterable[int]) -> dict[str, ChainTask]:
    """``eval_tasks`` (name -> ChainTask, each of the training tasks' n) as a dict; ValueError otherwise."""
    eval_tasks = {} if eval_tasks is None else eval_tasks
    if not isinstance(eval_tasks, dict):
        raise ValueError(f"eval_tasks must be a dict name -> gradflow.ChainTask, got {type(eval_tasks).__name__}")
    ns = set(n_of)
    for name, task in eval_tasks.items():
        if not isinstance(name, str) or not isinstance(task, ChainTask):
            raise ValueError(f"eval_tasks must map names (str) to gradflow.ChainTask, got {name!r}: {task!r}")
        if {task.n} != ns:
            raise ValueError(f"eval_tasks[{name!r}] has n = {task.n}, the training task(s) have n in {sorted(ns)}")
    return dict(eval_tasks)


def learning_times(
    tasks: Sequence[ChainTask],
    model: ModelSpec | None = None,
    theta0: Theta | None = None,
    level: float = 0.9,
    t1: float = DEFAULT_T1,
    eval_tasks: dict[str, ChainTask] | None = None,
    progress: bool = False,
    **flow_kwargs,
) -> list[float | None] | list[TaskTimes]:
    """``learning_time`` for several tasks; tasks whose n share a bucket (``gradflow.task.bucket_size``; every bucket
    up to ``SHARED_PROGRAM_UP_TO`` counts as one) are solved as one vmapped program, and the programs of several buckets
    compile side by side (one thread per core), each bucket's solves running as soon as its program is ready
    (``compile_cache.run_together``).

    A level at or above the model's reward ceiling (``max_reward``: a cap or softmax attention) gives
    None for that task without solving, with a warning.

    Args:
        tasks: the training tasks (a non-empty sequence of ``ChainTask``).
        model: the model (default ``ModelSpec()``).
        theta0: the start (default (0.3, 0, 0)).
        level: the reward level J to reach.
        t1: the last flow time.
        eval_tasks: name -> ChainTask (each of the tasks' n): then each entry is a ``TaskTimes``, the time
            each eval task's reward reaches ``level`` while training on that task (one more solve per
            eval task, batched with the others).
        progress: print (to stderr) the programs being compiled and each bucket's solve as it ends.
        **flow_kwargs (Any): more ``FlowParams`` fields (solver, rtol, atol, coords, max_steps, schedule, ...).

    Returns:
        One learning time (a ``LearningTime``: a float with its ``plateau`` and ``rise``; None if not by t1)
        per task, or one ``TaskTimes`` per task with eval_tasks.

    Raises:
        ValueError: tasks is empty or holds something other than a ChainTask, or an eval task is not a
            ChainTask of the tasks' n.
        RuntimeError: a solve ran out of max_steps or failed.
    """
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, ChainTask) for t in tasks):
        raise ValueError("tasks must be a non-empty sequence of gradflow.ChainTask")
    evals = _check_eval_tasks(eval_tasks, (t.n for t in tasks))
    configs = _learning_configs(tasks, model, theta0, level, t1, flow_kwargs)
    jobs = [(i, None, cfg.task) for i, cfg in enumerate(configs)]
    jobs += [(i, name, task) for i in range(len(configs)) for name, task in evals.items()]
    times: list[float | None] = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    start_rewards = _start_rewards(configs, jobs)
    for index, (i, _, watched) in enumerate(jobs):
        cfg = configs[i]
        if start_rewards[index] >= float(cfg.reward_threshold):
            times[index] = LearningTime(float(cfg.t0), float(cfg.t0), 0.0)
            continue
        note = reward_ceiling_warning(watched, float(cfg.reward_threshold), cfg.model)
        if note is not None:
            warnings.warn(f"learning_time at n = {cfg.task.n}: {note}", stacklevel=3)
            continue
        groups.setdefault(_bucket_of(cfg), []).append(index)
    buckets, members = list(groups), list(groups.values())
    solves = [_group_solve(configs, jobs, indices) for indices in members]
    requests = [_learning_request(*solve) for solve in solves]
    if len(requests) > 1:  # one program per bucket of n (the small ones shared), on a thread per core
        _report(
            progress,
            f"learning_times: {len(requests)} programs (one per bucket of n), compiled side by side, each "
            "bucket's solves as soon as its program is ready",
        )

    def solve(k: int, executable) -> tuple:
        start = time.perf_counter()
        out = jax.device_get(executable(*requests[k].args))
        _report(
            progress,
            f"learning_times: {buckets[k][0]} {buckets[k][1]}: {len(members[k])} solves in {time.perf_counter() - start:.1f} s",
        )
        return out

    # the most work first (members x the longest chain: the solves' cost; each program's compile costs about the same)
    order = sorted(range(len(requests)), key=lambda k: -len(members[k]) * max(jobs[i][2].n for i in members[k]))
    outs = run_together([requests[k] for k in order], lambda i, executable: solve(order[i], executable))
    for k, out in zip(order, outs):
        if len(members[k]) == 1:
            times[members[k][0]] = _interpret(solves[k][0], *out)
            continue
        for row, index in enumerate(members[k]):
            times[index] = _interpret(configs[jobs[index][0]], *(x[row] for x in out))
    if not evals:
        return times
    found = {(i, name): t for (i, name, _), t in zip(jobs, times)}
    return [TaskTimes(found[i, None], {name: found[i, name] for name in evals}) for i in range(len(configs))]


def _start_rewards(configs: list, jobs: list) -> np.ndarray:
    """J(theta0) of each job's config on its watched task: the bucketable jobs in one vmapped program (n as data, laid
    out in the longest chain's bucket: evaluating is cheap, compiling is not), the others one per n (the phase
    diagram's 24 n spent 16 s here compiling one program per n).  A job alone in its group, and a NaN, is evaluated
    by the eager ``_reward`` (float64, then extended numbers where that holds a NaN)."""
    groups: dict = {}
    for index, (i, _, _) in enumerate(jobs):
        groups.setdefault("bucketed" if shares_bucket(configs[i]) else ("n", configs[i].task.n), []).append(index)
    out = np.full(len(jobs), np.nan)
    for indices in (indices for indices in groups.values() if len(indices) > 1):
        laid_out, watched = _in_buckets(*_group_solve(configs, jobs, indices))
        thetas = np.stack([cfg.theta0.as_array(cfg.model.values) for cfg in laid_out])
        args = (thetas, _stacked(watched), laid_out[0].model)
        executable, _ = compiled("start_rewards", _rewards_at, args, export=True, quick=True)
        out[indices] = np.asarray(executable(*args))
    for index in np.flatnonzero(np.isnan(out)):
        i, _, watched = jobs[index]
        out[index] = float(_reward(configs[i].theta0, watched, configs[i].model))
    return out


def _rewards_at(thetas: jnp.ndarray, tasks, model: ModelSpec) -> jnp.ndarray:
    """J at each row of thetas (k, P) on the matching task of a stacked batch of k tasks."""
    return jax.vmap(lambda x, task: _reward(Theta.from_array(x, model.values), task, model))(thetas, tasks)


def _report(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)


def _group_solve(configs: list, jobs: list, indices: list) -> tuple:
    """A group of jobs' configs and watched tasks (``_learning_request``'s arguments): one config and its task, or the
    lists of a batch."""
    if len(indices) == 1:
        i, _, watched = jobs[indices[0]]
        return configs[i], watched
    return [configs[jobs[k][0]] for k in indices], [jobs[k][2] for k in indices]


def escape_times(configs: Sequence[FlowParams], rise: float = 1e-3) -> list[float | None]:
    """The time each config's flow leaves the saddle it starts near: the first t with J(theta_t) >= J(theta0) + rise.

    A choice (docs/THEORY.md §10): the reward, the observable, rather than |theta|; the flow ascends J, so
    the first crossing is the only one.  From the two-matrix model's near-zero start
    (``model.authors_start(scale)``) J - J(theta0) grows like scale^2 e^{2 lambda t} while the flow sits at
    the saddle, so the escape time grows like log(1/scale) / lambda.  One lean solve per config
    (``flow.hitting_times``: configs of one structure share a compilation), each to its t1.

    Args:
        configs: the ``FlowParams`` to solve (any model; their stop_at and reward_threshold are replaced).
        rise: the rise of J that counts as the escape, in (0, 1).

    Returns:
        One time (or None when t1 comes first) per config, in order.
    """
    check_fraction("rise", rise)
    staged = []
    for cfg in configs:
        level = float(expected_reward(cfg.theta0, cfg.task, cfg.model)) + rise
        staged.append(cfg.replace(reward_threshold=level, stop_at="threshold"))
    return hitting_times(staged)


def learning_time(
    task: ChainTask,
    model: ModelSpec | None = None,
    theta0: Theta | None = None,
    level: float = 0.9,
    t1: float = DEFAULT_T1,
    eval_tasks: dict[str, ChainTask] | None = None,
    **flow_kwargs,
) -> float | None | TaskTimes:
    """Flow time at which the reward J first reaches ``level`` starting from ``theta0``; None if not by t1.

    Builds ``FlowParams(task, model, theta0, t1=t1, reward_threshold=level, **flow_kwargs)`` (it stops on the
    watched task's reward itself, no ``stop_at``) and integrates it in log time s = log(1 + t - t0) (d theta/ds =
    (1 + t - t0) grad J)
    across the plateau, then in linear-time segments that each restart the clock for the rise
    (``_learning_solve``, docs/THEORY.md §12.4); the crossing is root-found by bisection.  Hardest-only
    training: n = 16 learns at t = 1.973e11, n = 20 at 5.907e16, n = 24 at 4.565e22, n = 30 at
    1.251e32, n = 40 at 1.171e49 (a few hundred to two thousand steps each).  If J(theta0) >= level
    already, the answer is t0; a level above the reward ceiling gives None with a warning.

    Args:
        task: the training task.
        model: the model (default ``ModelSpec()``).
        theta0: the start (default (0.3, 0, 0)).
        level: the reward level J to reach.
        t1: the last flow time.
        eval_tasks: name -> ChainTask of the same n: then a ``TaskTimes``, that time (``train``) and,
            along the same training flow, the time each eval task's reward reaches ``level`` (``eval[name]``).
        **flow_kwargs (Any): more ``FlowParams`` fields (solver, rtol, atol, coords, max_steps, schedule, ...).

    Returns:
        The learning time (a ``LearningTime``: a float with its ``plateau`` and ``rise``; None if not reached
        by t1), or a ``TaskTimes`` with eval_tasks.

    Raises:
        ValueError: task is not a ChainTask, or an eval task is not a ChainTask of the same n.
        RuntimeError: max_steps ran out first or the solver failed.
    """
    if not isinstance(task, ChainTask):
        raise ValueError(f"task must be a gradflow.ChainTask, got {type(task).__name__}")
    return learning_times([task], model, theta0, level, t1, eval_tasks, **flow_kwargs)[0]


@dataclass(frozen=True)
class ScalingResult:
    """Learning times against n, fitted both ways in log T over the n where the level was reached.

    exponential: log T = exp_intercept + rate * n (each +1 in n multiplies T by factor = e^rate).
    power law:   log T = power_intercept + degree * log n.
    *_rss: residual sums of squares in log T; better: the fit with the smaller one.
    """

    ns: tuple[int, ...]
    times: tuple[float | None, ...]
    level: float
    rate: float
    factor: float
    exp_intercept: float
    exp_rss: float
    degree: float
    power_intercept: float
    power_rss: float
    better: str

    def ratios(self) -> tuple[float | None, ...]:
        """T(n_{j+1}) / T(n_j) for consecutive ns (None where either is missing)."""
        pairs = zip(self.times[:-1], self.times[1:])
        return tuple(None if a is None or b is None else b / a for a, b in pairs)

    def __str__(self) -> str:
        rows = "\n".join(f"  n = {n:3d}: T = {_fmt(t, '.5g')}" for n, t in zip(self.ns, self.times))
        return "\n".join(
            [
                f"time to reward {self.level:g} against n:",
                rows,
                f"  exponential fit: log T = {self.exp_intercept:.3f} + {self.rate:.4f} n  "
                f"(x{self.factor:.3g} per unit n), rss {self.exp_rss:.3g}",
                f"  power-law fit:   log T = {self.power_intercept:.3f} + {self.degree:.4f} log n, rss {self.power_rss:.3g}",
                f"  better fit: {self.better}",
            ]
        )


def fit_scaling(ns: Sequence[int], times: Sequence[float | None], level: float = 0.9) -> ScalingResult:
    """Exponential and power-law fits of log T against n (points with T None are left out; >= 3 needed).

    Args:
        ns: the chain lengths.
        times: the learning time at each n (None or non-finite where the level was not reached).
        level: the reward level the times are for (recorded in the result).

    Returns:
        The ``ScalingResult`` of both fits.

    Raises:
        ValueError: ns and times differ in length, or fewer than 3 positive times are given.
    """
    ns = tuple(int(n) for n in ns)
    times = tuple(None if t is None or not np.isfinite(t) else float(t) for t in times)
    if len(ns) != len(times):
        raise ValueError(f"ns and times must have the same length, got {len(ns)} and {len(times)}")
    keep = [(n, t) for n, t in zip(ns, times) if t is not None and t > 0]
    if len(keep) < 3:
        raise ValueError(f"times: need at least 3 positive learning times to compare fits, got {len(keep)}")
    x = np.array([n for n, _ in keep], dtype=float)
    y = np.log([t for _, t in keep])

    def fit(feature):
        coef, *_ = np.polyfit(feature, y, 1, full=True)
        residual = y - np.polyval(coef, feature)
        return float(coef[0]), float(coef[1]), float(residual @ residual)

    rate, exp_intercept, exp_rss = fit(x)
    degree, power_intercept, power_rss = fit(np.log(x))
    return ScalingResult(
        ns=ns,
        times=times,
        level=float(level),
        rate=rate,
        factor=math.exp(rate),
        exp_intercept=exp_intercept,
        exp_rss=exp_rss,
        degree=degree,
        power_intercept=power_intercept,
        power_rss=power_rss,
        better="exponential" if exp_rss < power_rss else "power",
    )


def scaling(
    ns: Iterable[int],
    make_task: Callable[[int], ChainTask],
    model: ModelSpec | None = None,
    theta0: Theta | None = None,
    level: float = 0.9,
    t1: float = DEFAULT_T1,
    **flow_kwargs,
) -> ScalingResult:
    """Learning time to ``level`` for ``make_task(n)`` at each n, with exponential and power-law fits.

    Each distinct n compiles its own solve (once per process and structure).

    Args:
        ns: distinct chain lengths, each >= 2.
        make_task: n -> the ChainTask of length n to train on.
        model: the model (default ``ModelSpec()``).
        theta0: the start (default (0.3, 0, 0)).
        level: the reward level J to reach.
        t1: the last flow time.
        **flow_kwargs (Any): more ``FlowParams`` fields (solver, rtol, atol, coords, max_steps, ...).

    Returns:
        The ``ScalingResult`` (times and both fits).

    Raises:
        ValueError: ns are not distinct integers >= 2, make_task is not callable or returns a task of
            another n, or the level is reached at fewer than 3 n (``fit_scaling``).
        RuntimeError: a solve ran out of max_steps or failed.
    """
    ns = [check_int("ns entry", n, 2) for n in ns]
    if len(set(ns)) != len(ns):
        raise ValueError(f"ns must be distinct, got {ns}")
    if not callable(make_task):
        raise ValueError(f"make_task must be a callable n -> ChainTask, got {make_task!r}")
    tasks = [make_task(n) for n in ns]
    for n, task in zip(ns, tasks):
        if not isinstance(task, ChainTask) or task.n != n:
            raise ValueError(f"make_task({n}) must return a ChainTask with n = {n}, got {task!r}")
    times = learning_times(tasks, model, theta0, level, t1, **flow_kwargs)
    return fit_scaling(ns, times, level)


# ---------------------------------------------------------------------------------------------------
# Gradients per start distance and out-of-distribution rewards
# ---------------------------------------------------------------------------------------------------


def success_gradient(theta: Theta, task: ChainTask | int, model: ModelSpec | None = None) -> np.ndarray:
    """G[d-1, k] = d h_d / d theta_k: the gradient of the success probability of a start at distance d.

    h_d is ``same_side_probability`` (uncapped) or, with ``model.max_len`` set, the capped success
    probability ``gradflow.capped.success_per_start`` (the own terminal written within max_len
    tokens).  Columns k in (alpha, beta, gamma, eta, delta) order; rows d = 1..n-1.  ``task`` may be
    an int n (only n matters: h_d does not depend on the start distribution).  A training
    distribution p makes grad J = sum_d p[d-1] G[d-1].  In extended numbers where float64's has a NaN
    (``gradflow.objective.finite_or_extended``).
    """
    task = as_task(task)
    model = _model_or_default(model)
    theta = _theta_or_default(theta, "theta")
    jacobian = lambda m: jax.jacobian(lambda x: _success_per_start(Theta.from_array(x), task, m))(theta.as_array())
    return np.asarray(finite_or_extended(jacobian, model))


def gradient_by_distance(theta: Theta, task: ChainTask | int, model: ModelSpec | None = None) -> np.ndarray:
    """g[d-1] = || d h_d / d theta ||, the gradient norm of the success probability of a start at d.

    Arguments in the ``(theta, task, model)`` order of the rest of gradflow (an int n in the task's
    place is deprecated).  h_d as in ``success_gradient`` (capped when
    ``model.max_len`` is set), differentiated in the five reduced coordinates (eta, delta carry
    nothing under linear attention).  g[d-1] bounds the signal the starts at d can carry.
    """
    return np.linalg.norm(success_gradient(theta, task, model), axis=1)


def extrapolate(
    theta: Theta,
    ns: Iterable[int],
    model: ModelSpec | None = None,
    make_task: Callable[[int], ChainTask] = ChainTask.uniform,
) -> dict[int, float]:
    """The reward J of fixed parameters ``theta`` on ``make_task(n)`` for each n (closed form).

    Args:
        theta: the attention scores, kept fixed.
        ns: chain lengths, each >= 2.
        model: the model (default ``ModelSpec()``).
        make_task: n -> the ChainTask of length n to evaluate on (default uniform starts).

    Returns:
        n -> J(theta) on make_task(n).

    Raises:
        ValueError: theta is not a Theta or an n is not an integer >= 2.
    """
    if not isinstance(theta, Theta):
        raise ValueError(f"theta must be a gradflow.Theta, got {type(theta).__name__}")
    model = _model_or_default(model)
    out = {}
    for n in ns:
        n = check_int("ns entry", n, 2)
        out[n] = float(_reward(theta, make_task(n), model))
    return out
