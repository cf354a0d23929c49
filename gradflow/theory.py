"""What the paper says should happen (THEORY.md sections 4-5), as checks on configs and trajectories.

- ``check_conditions(flow_params)``: the base-model assumption at theta0 (c0, b0), the mass on simple
  examples, the predicted regime (polynomial / exponential) and the value of the sufficiency bound.
- ``phases(trajectory)``: when the reward escapes its plateau, when forward traversal emerges and
  completes, when the loss converges, in which order the positions learn, and how fast the logit gap
  alpha - gamma grows in the late phase (per unit of log t).
- ``learning_time`` / ``learning_times`` / ``scaling``: time for the flow to reach a reward level, and
  exponential versus power-law fits of that time against the chain length n.
- ``gradient_by_distance``: the reward gradient carried by the starts at each distance d (prediction 1).
- ``extrapolate``: the reward of fixed parameters on longer chains (prediction 6).

Flow time is the time of ``gradflow.flow`` (d theta/dt = grad J, reduced coordinates by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from gradflow._checks import check_int
from gradflow.flow import FlowParams, Trajectory, integrate, level_event, stack_configs
from gradflow.model import ModelSpec, Theta, step_probabilities
from gradflow.objective import expected_reward, same_side_probability
from gradflow.task import ChainTask

REGIMES = ("polynomial", "exponential", "undetermined")
DEFAULT_THETA0 = Theta(0.3, 0.0, 0.0)
DEFAULT_T1 = 1e12


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _check_fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    """Return ``value`` as a float, raising ValueError unless low < value < high."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in ({low}, {high}), got {value!r}") from None
    if not low < value < high:
        raise ValueError(f"{name} must lie in ({low}, {high}), got {value!r}")
    return value


def _check_nonnegative(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


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
    sufficiency bound n^2 / (c0^(k+2) b0 c eps^2) (inf when b0 <= 0).
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

    def __str__(self) -> str:
        mass = ", ".join(f"{m:.3g}" for m in self.simple_mass)
        return "\n".join(
            [
                f"conditions at theta0 (n = {self.n}):",
                f"  c0 = min forward-step probability = {self.c0:.4g}   (need > {self.c0_min:g})",
                f"  b0 = min (forward - backward)     = {self.b0:.4g}   (need > {self.b0_min:g})",
                f"  base-model assumption: {'holds' if self.base_model else 'FAILS'}",
                f"  simple-example mass P(d <= k), k = 1..{self.n - 1}: [{mass}]",
                f"  smallest k with mass: k = {self.k}, c = P(d <= {self.k}) = {self.c:.4g}",
                f"  predicted regime: {self.regime} (k_max = {self.k_max}, c0^k = {self.c0 ** self.k:.3g}, "
                f"floor {self.c0_floor:g})",
                f"  sufficiency bound n^2/(c0^(k+2) b0 c eps^2) at eps = {self.eps:g}: {self.bound:.4g}",
            ]
        )


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
    """
    if not isinstance(flow_params, FlowParams):
        raise ValueError(f"flow_params must be a gradflow.flow.FlowParams, got {type(flow_params).__name__}")
    c0_min = _check_nonnegative("c0_min", c0_min)
    if c0_min >= 1.0:
        raise ValueError(f"c0_min must lie in [0, 1), got {c0_min!r}")
    b0_min = _check_nonnegative("b0_min", b0_min)
    eps = _check_fraction("eps", eps, 0.0, 1.0)
    k_max = check_int("k_max", k_max, 1)
    c0_floor = _check_nonnegative("c0_floor", c0_floor)

    task, n = flow_params.task, flow_params.task.n
    steps = step_probabilities(flow_params.theta0, n, flow_params.model)
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
    )


# ---------------------------------------------------------------------------------------------------
# Phases of a trajectory
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseReport:
    """Event times of one trajectory (None: did not happen within the solve).

    escape: the reward has covered ``escape_fraction`` (default 10%) of the way from J(t0) to 1.
    emergence / traversal: the forward probability given a move exceeds 0.5 / 0.99 at every position.
    convergence: the loss 1 - J falls below ``convergence_loss``.  position_times[i-1]: first time the
    forward probability at a_i exceeds 0.5; order: positions i sorted by that time (those that never
    cross are left out).  gap_slope: d(alpha - gamma)/d(log t) fitted over the last third of the
    log-t range (t > 0); None when fewer than 3 saves lie there.  Reward times are root-found
    (``Trajectory.t_hit``) when ``exact``, the others are the first saved time meeting the condition.
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

    def __str__(self) -> str:
        positions = ", ".join(f"a{i}: {_fmt(t)}" for i, t in enumerate(self.position_times, start=1))
        return "\n".join(
            [
                f"phases (n = {self.n}, solved to t = {self.t_end:.4g}, final reward {self.final_reward:.6g}):",
                f"  escape      (J >= {self.escape_level:.4g}): t = {_fmt(self.escape)}",
                f"  emergence   (forward > 0.5 everywhere):   t = {_fmt(self.emergence)}",
                f"  traversal   (forward > 0.99 everywhere):  t = {_fmt(self.traversal)}",
                f"  convergence (loss < {self.convergence_loss:g}):          t = {_fmt(self.convergence)}",
                f"  forward > 0.5 first at: {positions}",
                f"  learning order (positions): {', '.join(f'a{i}' for i in self.order) or '-'}",
                f"  late growth of alpha - gamma per unit log t: {_fmt(self.gap_slope)}",
            ]
        )


def _first_time(ts: np.ndarray, condition: np.ndarray) -> float | None:
    """The first saved time at which ``condition`` holds, None if never."""
    hits = np.flatnonzero(condition)
    return float(ts[hits[0]]) if hits.size else None


def _grid_hit(ts: np.ndarray, reward: np.ndarray, level: float) -> float | None:
    """First crossing of ``level`` by linear interpolation between saves (the non-exact read-off)."""
    hits = np.flatnonzero(reward >= level)
    if not hits.size:
        return None
    k = hits[0]
    if k == 0:
        return float(ts[0])
    r0, r1 = reward[k - 1], reward[k]
    return float(ts[k - 1] + (level - r0) / (r1 - r0) * (ts[k] - ts[k - 1]))


def late_gap_slope(trajectory: Trajectory, fraction: float = 1.0 / 3.0) -> float | None:
    """Least-squares slope of alpha - gamma against log t over the last ``fraction`` of the log-t range."""
    fraction = _check_fraction("fraction", fraction, 0.0, 1.0 + 1e-12)
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


def phases(
    trajectory: Trajectory,
    escape_fraction: float = 0.1,
    emergence_level: float = 0.5,
    traversal_level: float = 0.99,
    convergence_loss: float = 1e-3,
    exact: bool = True,
) -> PhaseReport:
    """Read the phases of THEORY.md section 5 off a solved trajectory; see ``PhaseReport``.

    exact=True root-finds the reward events (escape, convergence) on a dense re-solve of the flow
    (``Trajectory.t_hit``, one compilation per structure); exact=False interpolates between saves.
    """
    if not isinstance(trajectory, Trajectory):
        raise ValueError(f"trajectory must be a gradflow.flow.Trajectory, got {type(trajectory).__name__}")
    escape_fraction = _check_fraction("escape_fraction", escape_fraction)
    emergence_level = _check_fraction("emergence_level", emergence_level)
    traversal_level = _check_fraction("traversal_level", traversal_level)
    convergence_loss = _check_fraction("convergence_loss", convergence_loss)

    ts = np.asarray(trajectory.ts, dtype=float)
    reward = np.asarray(trajectory.reward, dtype=float)
    forward = np.asarray(trajectory.forward_prob, dtype=float)
    valid = np.isfinite(reward)
    if not valid.any():
        raise ValueError("trajectory holds no finite reward")
    j0 = float(reward[0])
    escape_level = j0 + escape_fraction * (1.0 - j0)
    reached = np.where(valid, reward, -np.inf)

    def reward_time(level: float) -> float | None:
        if not (reached >= level).any():
            return None
        return trajectory.t_hit(level) if exact else _grid_hit(ts, reached, level)

    safe_forward = np.where(np.isfinite(forward), forward, -np.inf)
    position_times = tuple(_first_time(ts, safe_forward[:, i] > emergence_level) for i in range(forward.shape[1]))
    crossed = [(t, i) for i, t in enumerate(position_times, start=1) if t is not None]
    last = int(np.flatnonzero(valid)[-1])
    return PhaseReport(
        n=trajectory.config.task.n,
        t_end=float(ts[last]),
        final_reward=float(reward[last]),
        escape=reward_time(escape_level),
        emergence=_first_time(ts, safe_forward.min(axis=1) > emergence_level),
        traversal=_first_time(ts, safe_forward.min(axis=1) > traversal_level),
        convergence=reward_time(1.0 - convergence_loss),
        position_times=position_times,
        order=tuple(i for _, i in sorted(crossed)),
        gap_slope=late_gap_slope(trajectory),
        escape_level=escape_level,
        convergence_loss=convergence_loss,
    )


# ---------------------------------------------------------------------------------------------------
# Learning times and their scaling with n
# ---------------------------------------------------------------------------------------------------


def _threshold_solve(params: FlowParams):
    """Integrate the flow until J = reward_threshold: (stop time, J there, steps taken).

    A lean solve (no saves besides the end) whose terminating event is root-found by bisection on
    the step's interpolant.  Bisection, not Newton: after the long plateau of hardest-only training
    J rises from 0.5 to 0.9 within a relative time ~1e-6 (n = 14, t ~ 6e8), where Newton does not
    converge and the reward can only be matched to ~1e-8 (the time to ~1e-12 relative, far below the
    ODE tolerance).  ``fired`` tells whether the event fired; under vmap, configs whose event did not
    fire report a meaningless stop time.
    """
    solution = integrate(params, diffrax.SaveAt(t1=True), event=level_event(params, params.reward_threshold))
    reward = expected_reward(Theta.from_array(solution.ys[-1]), params.task, params.model)
    return solution.ts[-1], solution.event_mask, reward, solution.stats["num_steps"]


_threshold_one = jax.jit(_threshold_solve)
_threshold_batch = jax.jit(jax.vmap(_threshold_solve))


def _threshold_configs(tasks, model, theta0, level, t1, flow_kwargs) -> list[FlowParams]:
    level = _check_fraction("level", level)
    if not (isinstance(t1, (int, float, np.floating, np.integer)) and float(t1) > 0):
        raise ValueError(f"t1 must be a positive number, got {t1!r}")
    if not isinstance(model, ModelSpec):
        raise ValueError(f"model must be a gradflow.ModelSpec, got {type(model).__name__}")
    if not isinstance(theta0, Theta):
        raise ValueError(f"theta0 must be a gradflow.Theta, got {type(theta0).__name__}")
    for key in ("task", "model", "theta0", "t1", "reward_threshold", "stop_at"):
        if key in flow_kwargs:
            raise ValueError(f"{key} is set by learning_time itself; do not pass it in flow_kwargs")
    return [
        FlowParams(
            task=task,
            model=model,
            theta0=theta0,
            t1=float(t1),
            reward_threshold=level,
            stop_at="threshold",
            **flow_kwargs,
        )
        for task in tasks
    ]


def _interpret(params: FlowParams, t_stop, fired, reward, num_steps) -> float | None:
    level = float(params.reward_threshold)
    if bool(fired):
        return float(t_stop)
    if int(num_steps) >= params.max_steps:
        raise RuntimeError(
            f"the flow at n = {params.task.n} took max_steps = {params.max_steps} steps before reaching "
            f"reward {level} (stopped at J = {float(reward):.6g}): raise max_steps or loosen rtol/atol"
        )
    return None


def learning_times(
    tasks: Sequence[ChainTask],
    model: ModelSpec = ModelSpec(),
    theta0: Theta = DEFAULT_THETA0,
    level: float = 0.9,
    t1: float = DEFAULT_T1,
    **flow_kwargs,
) -> list[float | None]:
    """``learning_time`` for several tasks; tasks of one n are solved as one vmapped compilation."""
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, ChainTask) for t in tasks):
        raise ValueError("tasks must be a non-empty sequence of gradflow.ChainTask")
    configs = _threshold_configs(tasks, model, theta0, level, t1, flow_kwargs)
    times: list[float | None] = [None] * len(configs)
    groups: dict[int, list[int]] = {}
    for index, cfg in enumerate(configs):
        groups.setdefault(cfg.task.n, []).append(index)
    for index, cfg in enumerate(configs):
        if float(expected_reward(cfg.theta0, cfg.task, cfg.model)) >= float(cfg.reward_threshold):
            times[index] = float(cfg.t0)
            groups[cfg.task.n].remove(index)
    for indices in groups.values():
        if not indices:
            continue
        if len(indices) == 1:
            cfg = configs[indices[0]]
            out = jax.device_get(_threshold_one(cfg))
            times[indices[0]] = _interpret(cfg, *out)
            continue
        out = jax.device_get(_threshold_batch(stack_configs([configs[i] for i in indices])))
        for row, index in enumerate(indices):
            times[index] = _interpret(configs[index], *(x[row] for x in out))
    return times


def learning_time(
    task: ChainTask,
    model: ModelSpec = ModelSpec(),
    theta0: Theta = DEFAULT_THETA0,
    level: float = 0.9,
    t1: float = DEFAULT_T1,
    **flow_kwargs,
) -> float | None:
    """Flow time at which the reward J first reaches ``level`` starting from ``theta0``; None if not by t1.

    Builds ``FlowParams(task, model, theta0, t1=t1, reward_threshold=level, stop_at="threshold",
    **flow_kwargs)`` and integrates it with a lean event solve (the crossing is root-found by
    bisection on the step interpolant; the time is then as accurate as the ODE solve, ~1e-5 relative
    for hardest-only n = 14 at the default rtol 1e-8).  The default t1 = 1e12 covers hardest-only training up to n = 14
    (~6e8); extra keyword arguments (solver, rtol, atol, coords, max_steps, ...) go to FlowParams.
    If J(theta0) >= level already, the answer is t0.  RuntimeError if max_steps ran out first.
    """
    if not isinstance(task, ChainTask):
        raise ValueError(f"task must be a gradflow.ChainTask, got {type(task).__name__}")
    return learning_times([task], model, theta0, level, t1, **flow_kwargs)[0]


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
                f"  power-law fit:   log T = {self.power_intercept:.3f} + {self.degree:.4f} log n, "
                f"rss {self.power_rss:.3g}",
                f"  better fit: {self.better}",
            ]
        )


def fit_scaling(ns: Sequence[int], times: Sequence[float | None], level: float = 0.9) -> ScalingResult:
    """Exponential and power-law fits of log T against n (points with T None are left out; >= 3 needed)."""
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
    model: ModelSpec = ModelSpec(),
    theta0: Theta = DEFAULT_THETA0,
    level: float = 0.9,
    t1: float = DEFAULT_T1,
    **flow_kwargs,
) -> ScalingResult:
    """Learning time to ``level`` for ``make_task(n)`` at each n, with exponential and power-law fits.

    Each distinct n compiles its own solve (once per process and structure).
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


def gradient_by_distance(theta: Theta, n: int, model: ModelSpec = ModelSpec()) -> np.ndarray:
    """g[d-1] = || d h_d / d theta ||, the gradient norm of the success probability of a start at d.

    h_d = ``same_side_probability`` (one entry per d = 1..n-1), differentiated in the five reduced
    coordinates (eta, delta carry nothing under linear attention).  A training distribution p makes
    grad J = sum_d p[d-1] grad h_d, so g[d-1] bounds the signal the starts at d can carry.
    """
    n = check_int("n", n, 2)
    if not isinstance(theta, Theta):
        raise ValueError(f"theta must be a gradflow.Theta, got {type(theta).__name__}")
    task = ChainTask.uniform(n)
    jac = jax.jacobian(lambda x: same_side_probability(Theta.from_array(x), task, model))(theta.as_array())
    return np.linalg.norm(np.asarray(jac), axis=1)


def extrapolate(
    theta: Theta,
    ns: Iterable[int],
    model: ModelSpec = ModelSpec(),
    make_task: Callable[[int], ChainTask] = ChainTask.uniform,
) -> dict[int, float]:
    """The reward J of fixed parameters ``theta`` on ``make_task(n)`` for each n (closed form)."""
    if not isinstance(theta, Theta):
        raise ValueError(f"theta must be a gradflow.Theta, got {type(theta).__name__}")
    out = {}
    for n in ns:
        n = check_int("ns entry", n, 2)
        out[n] = float(expected_reward(theta, make_task(n), model))
    return out
