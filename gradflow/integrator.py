"""The one integrator: every diffrax solve in gradflow goes through ``integrate``.

It holds the conventions every solve shares:

- the clock (``Clock``): the time the solver steps in, s = t - origin ("linear") or
  s = log(1 + t - origin) ("log", d theta/ds = (1 + t - origin) grad J: few steps to t = 1e40), with
  its inverse and its rate dt/ds; a config's clock (``flow_clock``) has origin t0 in log time and 0
  in linear time (the solver then steps in flow time itself);
- schedule jumps: a schedule's jump times, mapped through the clock, are steps the adaptive solver
  must end on (``diffrax.ClipStepSizeController(jump_ts=...)``); the fixed-step SDE steps on the
  grid t0 + k dt and evaluates its field at the left end of each step, so a jump inside a step
  takes effect at the next grid point, as it does in the discrete SGD the SDE stands for;
- one event tolerance (``EVENT_RTOL``, ``EVENT_ATOL``) for the bisection of every terminating
  event (``falling_event``, ``level_event``), and one crossing search on a solution (``crossing``).

The vector field is the config's own (``FlowParams.vector_field``); ``integrate`` only rescales it
by the clock's rate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from gradflow._imports import diffrax, optx  # stand-ins: diffrax and optimistix are imported when first read
from gradflow.model import Theta
from gradflow.objective import expected_reward

SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {  # factories: diffrax is imported by the first solve built
    "tsit5": lambda: diffrax.Tsit5(),
    "dopri5": lambda: diffrax.Dopri5(),
    "dopri8": lambda: diffrax.Dopri8(),
    "kvaerno5": lambda: diffrax.Kvaerno5(),
    # Newton to 1/100 of the default step tolerances: with diffrax's default chord iteration half the steps of a
    # stiff capped flow were rejected for a failed iteration (1,516 steps to t = 1e4, 758 rejected; Newton: 154)
    "kvaerno5_newton": lambda: diffrax.Kvaerno5(root_finder=optx.Newton(rtol=1e-10, atol=1e-12)),
}
AUTO = "auto"  # a solver name that ``resolve_solver`` turns into a key of SOLVERS per model
SOLVER_CHOICES = (AUTO, *SOLVERS)  # what a config may name
STIFF_SOLVER = "kvaerno5_newton"  # what "auto" steps a capped flow with self-loops allowed with
EVENT_RTOL = 1e-14  # bisection of a terminating event: relative tolerance on the event time
EVENT_ATOL = 1e-12  # ... absolute tolerance on the event time and on the event condition's value (``BracketBisection``)
BISECTION_STEPS = 60  # halvings of a bracket in ``crossing``
LOCAL_MAX_STEPS = 16_384  # dense re-solve of one bracket on the host side (Trajectory.t_hit, theory.phases)
BRACKET_MAX_STEPS = 128  # earlier solves' in-solve bracket budget; the solve now re-solves brackets as its own passes


class Clock(eqx.Module):
    """Flow time t <-> solver time s: s = t - origin (linear) or s = log(1 + t - origin) (log).

    ``log`` is a Python bool (one clock per program) or a traced bool (the clock chosen at run time:
    ``theory.learning_time`` steps its plateau in log time and its rise in linear time with one solve)."""

    origin: jnp.ndarray
    log: bool | jnp.ndarray

    def to_solver(self, t):
        """s(t)."""
        if isinstance(self.log, bool):
            return jnp.log1p(t - self.origin) if self.log else t - self.origin
        return jnp.where(self.log, jnp.log1p(jnp.where(self.log, t - self.origin, 0.0)), t - self.origin)

    def to_time(self, s):
        """t(s), the inverse of ``to_solver``."""
        if isinstance(self.log, bool):
            return self.origin + (jnp.expm1(s) if self.log else s)
        return self.origin + jnp.where(self.log, jnp.expm1(jnp.where(self.log, s, 0.0)), s)

    def rate(self, s):
        """dt/ds: 1 + t - origin = e^s in log time, 1 in linear time."""
        if isinstance(self.log, bool):
            return jnp.exp(s) if self.log else jnp.ones_like(s)
        return jnp.where(self.log, jnp.exp(jnp.where(self.log, s, 0.0)), jnp.ones_like(s))


def resolve_solver(solver: str, model) -> str:
    """The key of SOLVERS a config's solver name stands for: an explicit name itself; "auto" is ``STIFF_SOLVER``
    for a capped model with self-loops allowed (``ModelSpec(max_len=..., mask_self=False)``) and tsit5 otherwise.

    Those capped flows settle into valleys where the Hessian of J has eigenvalues 1e4 apart (-2.56 across, -1e-4
    along, n = 6, max_len = 6): tsit5's stability keeps its step below about 1.3 there, 9,182 steps to t = 1e4
    against 154 for Kvaerno5 with Newton iterations (masked: 155 with Kvaerno5, 165 with tsit5).
    """
    if solver != AUTO:
        return solver
    return STIFF_SOLVER if model.max_len is not None and not model.mask_self else "tsit5"


def solver_for(params) -> diffrax.AbstractSolver:
    """The diffrax solver a config steps with: SOLVERS[resolve_solver(params.solver, params.model)]."""
    return SOLVERS[resolve_solver(params.solver, params.model)]()


def flow_clock(params) -> Clock:
    """A config's clock: log time from t0 for time_scale "log"; flow time itself (origin 0) for "linear"."""
    log = params.time_scale == "log"
    return Clock(params.t0 if log else jnp.zeros_like(params.t0), log)


def jump_ts(params, clock: Clock):
    """The schedule's jump times (clamped at t0) in the clock's time, or None when it has none.

    Args:
        params (FlowParams): the config (its schedule's jump times and t0).
        clock: the clock whose time the jumps are given in.

    Returns:
        jumps (jax.Array | None): the jump times in solver time, or None when the schedule has no jumps.
    """
    jumps = params.jump_times()
    return None if jumps is None else clock.to_solver(jnp.maximum(jnp.asarray(jumps, dtype=float), params.t0))


@functools.cache
def _bracket_bisection() -> type:
    """The class ``BracketBisection``, defined at its first use: it subclasses optimistix's ``Bisection``, and
    optimistix (with lineax, about 0.2 s) is imported only when a solve is built, never by a warm run."""

    class BracketBisection(optx.Bisection):
        """optimistix's ``Bisection`` (stop when the bracket is below atol + rtol |t| and |condition| < atol) that
        also stops when the bracket is down to two neighbouring floats, where no halving can shrink it.

        Where one ulp of t moves the condition by more than atol (a growth or level event in a linear-time
        segment at t ~ 1e4..5e5, n >= 240: 1e-12..8e-11 per ulp) no float has |condition| < atol: the bracket
        collapsed and the search spun to optimistix's 256 steps, failing the solve ("maximum number of steps
        reached in the nonlinear solver").  The collapsed bracket still holds the sign change, so its end is
        the event time to one ulp; every search that stopped before stops at the same point.
        """

        def terminate(self, fn, y, args, options, state, tags):  # y: the point just evaluated, an end of the bracket
            small = jnp.abs(state.lower - state.upper) < self.atol + self.rtol * jnp.abs(y)
            middle = state.lower + 0.5 * (state.upper - state.lower)  # the next point ``step`` would evaluate
            collapsed = (middle == state.lower) | (middle == state.upper)
            return small & ((jnp.abs(state.error) < self.atol) | collapsed), optx.RESULTS.successful

    BracketBisection.__module__ = __name__
    return BracketBisection


def __getattr__(name: str):
    """``integrator.BracketBisection`` (``_bracket_bisection``: optimistix imported at its first read)."""
    if name == "BracketBisection":
        return _bracket_bisection()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def falling_event(cond: Callable) -> diffrax.Event:
    """A terminating event where ``cond(t, y, args, **kwargs)`` falls through zero, root-found by bisection.

    diffrax calls ``cond`` with keyword arguments, ``t`` being the solver's time (s in log time).

    The condition must fall (``flip=True``): diffrax root-finds every batch member when one member's
    event fires, and the members whose event did not fire get the function t_next - t, which also
    falls; with a rising condition and ``flip=False`` their bisection ran the wrong way and failed
    (issue 12.4).  A bracket down to neighbouring floats ends the bisection too (``BracketBisection``).
    """
    return diffrax.Event(cond, root_finder=_bracket_bisection()(rtol=EVENT_RTOL, atol=EVENT_ATOL, flip=True))


def level_event(params, level, quantity: Callable | None = None, rising=True) -> diffrax.Event:
    """A terminating event at quantity(theta) = level (default: the reward J on the config's task).

    The condition is level - q (or q - level for a falling quantity), so that it falls through zero
    (``falling_event``).

    Args:
        params (FlowParams): the config (its task and model give the default quantity).
        level (float | jax.Array): the level at which the solve stops.
        quantity: the read-out q(y) of the state vector y; None: the expected reward J.
        rising (bool): the quantity rises through the level (False: it falls).

    Returns:
        The event, for ``integrate``.
    """
    if quantity is None:
        quantity = lambda y: expected_reward(Theta.from_array(y), params.task, params.model)
    sign = 1.0 if rising else -1.0
    return falling_event(lambda t, y, args, **kw: sign * (level - quantity(y)))


class EulerMaruyama(eqx.Module):
    """The Ito SDE d theta = field(t, theta) d control(t), stepped by Euler at the fixed step dt.

    field: (t, y, args) -> a matrix whose product with the control's increment is the step
    (for SGD: [drift | diffusion] against d(t, W)); control: a ``diffrax.AbstractPath``.  It runs in
    flow time (a linear clock); a schedule's jumps are taken at the next grid point (module docstring).
    """

    field: Callable
    control: diffrax.AbstractPath
    dt: jnp.ndarray


def integrate(
    params,
    saveat: diffrax.SaveAt,
    *,
    clock: Clock | None = None,
    t0=None,
    t1=None,
    y0=None,
    max_steps=None,
    event=None,
    progress: bool = False,
    adjoint=None,
    sde: EulerMaruyama | None = None,
) -> diffrax.Solution:
    """The one diffeqsolve of gradflow; never throws (read ``result``).

    Without ``sde``: d theta/ds = rate(s) * params.vector_field(t(s), theta) with the config's solver
    (``solver_for``) and PID tolerances, ending a step on every schedule jump.  With ``sde``: that SDE, by Euler steps of
    ``sde.dt`` in flow time (default clock: linear, origin 0).  Times (t0, t1, the saveat times and the solution's ts) are in the
    clock's time (default ``flow_clock(params)``).  Defaults: the config's span, theta0 and
    max_steps; adjoint: diffrax's ``RecursiveCheckpointAdjoint``.

    Args:
        params (FlowParams): the config (vector field, solver, tolerances, span, theta0, max_steps).
        saveat: what the solution keeps (diffrax ``SaveAt``), times in the clock's time.
        clock: the solver's clock; None: ``flow_clock(params)`` (a linear clock from 0 with ``sde``).
        t0 (float | jax.Array | None): the start in the clock's time; None: the config's t0.
        t1 (float | jax.Array | None): the end in the clock's time; None: the config's t1.
        y0 (jax.Array | None): the initial state vector; None: the config's theta0.
        max_steps (int | None): the solver's step limit; None: the config's max_steps.
        event (diffrax.Event | None): a terminating event (``level_event``); None: none.
        progress: show diffrax's tqdm progress meter (a host callback).
        adjoint (diffrax.AbstractAdjoint | None): the differentiation method; None: ``RecursiveCheckpointAdjoint``.
        sde: the SDE to step instead of the ODE; None: the deterministic flow.

    Returns:
        The diffrax solution (its ``result`` says whether the solve succeeded).

    Raises:
        ValueError: ``sde`` is given with a log-time clock.
    """
    if clock is None:
        clock = flow_clock(params) if sde is None else Clock(jnp.zeros_like(params.t0), False)
    if sde is None:
        term = diffrax.ODETerm(lambda s, y, args: clock.rate(s) * params.vector_field(clock.to_time(s), y))
        solver, dt0 = solver_for(params), None
        controller = diffrax.PIDController(rtol=params.rtol, atol=params.atol)
        jumps = jump_ts(params, clock)
        if jumps is not None:
            controller = diffrax.ClipStepSizeController(controller, jump_ts=jumps)
    else:
        if clock.log is not False:
            raise ValueError("integrate: the SDE runs in flow time (a linear clock)")
        term, solver, dt0, controller = diffrax.ControlTerm(sde.field, sde.control), diffrax.Euler(), sde.dt, None
    return diffrax.diffeqsolve(
        term,
        solver,
        clock.to_solver(params.t0) if t0 is None else t0,
        clock.to_solver(params.t1) if t1 is None else t1,
        dt0,
        params.theta0.as_array(params.model.values) if y0 is None else y0,
        saveat=saveat,
        stepsize_controller=diffrax.ConstantStepSize() if controller is None else controller,
        event=event,
        max_steps=params.max_steps if max_steps is None else max_steps,
        throw=False,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        progress_meter=diffrax.TqdmProgressMeter(refresh_steps=200) if progress else diffrax.NoProgressMeter(),
    )


def crossing(params, ts, thetas, values, level, quantity_fn: Callable, max_steps: int):
    """First t at which a read-out reaches ``level``: bracket on the saves, re-solve densely, bisect.

    The crossing direction is up when the first value lies below the level, down otherwise.  The
    bracket is re-solved in the config's clock and halved ``BISECTION_STEPS`` times.

    Args:
        params (FlowParams): the config the saves came from.
        ts (jax.Array): the save times (flow time).
        thetas (jax.Array): the state vectors at the saves, one row per time.
        values (jax.Array): the read-out at the saves (NaN rows skipped).
        level (float | jax.Array): the level to reach.
        quantity_fn: the read-out at one state vector.
        max_steps: the step limit of the bracket's dense re-solve.

    Returns:
        crossing (tuple[jax.Array, jax.Array, jax.Array]): (t, reached, resolved): t is NaN when no save
            reaches the level; resolved is False when the bracket's dense re-solve needed more than
            ``max_steps`` steps (t is then meaningless).
    """
    clock = flow_clock(params)
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
