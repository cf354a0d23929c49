"""Continuous-time gradient flow d theta/dt = grad J(theta), integrated with diffrax (docs/THEORY.md §4).

``solve(config) -> Solution`` is the one pure solve: a jitted function of the config whose output is
an ``eqx.Module`` of arrays (times, theta, reward, read-outs, event times with "reached" flags,
solver result and step counts).  Called on a concrete config it runs a cached compiled executable;
called inside ``jax.jit`` / ``jax.vmap`` / ``jax.grad`` it is traced like any JAX function, so a
solution can be batched and differentiated with respect to every number of the config.
``simulate`` and ``simulate_many`` wrap it into the host-side ``Trajectory``; ``hitting_times`` is
the lean stop-at-event solve.  Every number in a config is a traced array: changing it never
recompiles.

The pieces live in their own modules and are re-exported here under their earlier names:
``gradflow.config`` (``FlowParams``, ``Problem``, ``Numerics``, ``Recording``), ``gradflow.integrator``
(the one diffrax solve, its clock, schedule jumps and events), ``gradflow.compile_cache`` (the bounded
cache of compiled executables, ``compilation_count``, the persistent compilation cache) and
``gradflow.trajectory`` (``Trajectory`` with save/load).
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradflow import readouts
from gradflow._checks import check_choice, is_concrete
from gradflow._dependencies import RESULT_DTYPE, SUCCESSFUL, is_result, result_code, result_message
from gradflow._imports import diffrax  # a stand-in: diffrax is imported when first read
from gradflow.ceilings import closed_form_ceiling, reward_ceiling_warning
from gradflow.compile_cache import (
    CACHE_MAX_BYTES,
    CACHE_SIZE,
    CompileRequest,
    compilation_count,
    compiled,
    compiled_in_turn,
    enable_persistent_cache,
    persistent_cache_dir,
    require_x64,
    structure_key,
)
from gradflow.config import (
    COORDS,
    EVENT_NAMES,
    EVENTS,
    N_DEFAULT_SAVES,
    RECORDED,
    STOP_AT,
    TIME_SCALES,
    FlowParams,
    Numerics,
    Problem,
    Recording,
    as_theta,
    config_hash,
    config_label,
    default_theta0,
    extended_config,
    extended_configs,
    stop_at_refusal,
)
from gradflow.integrator import (
    BISECTION_STEPS,
    BRACKET_MAX_STEPS,
    LOCAL_MAX_STEPS,
    SOLVER_CHOICES,
    SOLVERS,
    Clock,
    falling_event,
    flow_clock,
    integrate,
    level_event,
)
from gradflow.model import LaidOutModel, ModelSpec, Theta
from gradflow.objective import expected_reward
from gradflow.task import ChainTask, PaddedTask, bucket_size
from gradflow.trajectory import QUANTITIES, Trajectory

__all__ = [
    "BISECTION_STEPS",
    "BRACKET_MAX_STEPS",
    "CACHE_MAX_BYTES",
    "CACHE_SIZE",
    "COORDS",
    "EVENTS",
    "EVENT_NAMES",
    "LOCAL_MAX_STEPS",
    "METRIC_CHUNK_ELEMENTS",
    "N_DEFAULT_SAVES",
    "ON_ERROR",
    "QUANTITIES",
    "RECORDED",
    "SOLVER_CHOICES",
    "SOLVERS",
    "STOP_AT",
    "TIME_SCALES",
    "FlowParams",
    "Numerics",
    "Problem",
    "Recording",
    "Solution",
    "SolveFailure",
    "Trajectory",
    "as_theta",
    "bucketable",
    "bucketed",
    "options_as_data",
    "check_levels",
    "compilation_count",
    "default_theta0",
    "enable_persistent_cache",
    "failure_message",
    "hitting_times",
    "integrate",
    "level_event",
    "metrics_at",
    "persistent_cache_dir",
    "simulate",
    "simulate_many",
    "solve",
    "solve_many",
    "stack_configs",
]

METRIC_CHUNK_ELEMENTS = 4096
ON_ERROR = ("raise", "report")  # simulate_many: what a failed member does
BATCH_CHUNK = 64  # members vmapped together in a batch on one CPU device (``chunked_on``)
EARLY_STEPS = 16_384  # simulate / simulate_many first solve with at most this many steps: a long solve says so early


# ---------------------------------------------------------------------------------------------------
# Read-outs
# ---------------------------------------------------------------------------------------------------


def _reward(params: FlowParams, y, task: ChainTask | None = None):
    return expected_reward(Theta.from_array(y), params.task if task is None else task, params.model)


def metrics_at(params: FlowParams, theta: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """The read-outs a Solution holds (``RECORDED``, from ``gradflow.readouts``) at one theta on the task.

    Args:
        params: the config whose task and model are read.
        theta: the five attention scores as an array of shape (5,).

    Returns:
        A dict read-out name -> its value at theta.
    """
    return readouts.read(RECORDED, theta, params.task, params.model)


def _recorded_at(params: FlowParams, theta: jnp.ndarray) -> dict:
    """What the recording asks for at one theta besides the reward (the solve has it): its read-outs and the
    reward on each eval task."""
    out = readouts.read_covered(params.recording.readout_names()[1:], theta, params.task, params.model)
    out["eval_reward"] = {
        name: readouts.read(("reward",), theta, task, params.model)["reward"] for name, task in params.eval_tasks.items()
    }
    return out


# ---------------------------------------------------------------------------------------------------
# n as data: chains laid out in buckets
# ---------------------------------------------------------------------------------------------------


def bucketable(params: FlowParams) -> bool:
    """Whether the closed forms solve this config with n as data (``PaddedTask``): linear attention over the
    prompt with the fixed value matrix, no schedule, reduced coordinates and the default vocabulary, capped or not.
    Others compile per n."""
    model = params.model
    return (
        model.attention == "linear"
        and model.values == "fixed"
        and model.context == "prompt"
        and params.problem.schedule is None
        and params.coords == "reduced"
        and params.n_vocab is None
    )


def options_as_data(configs: Sequence[FlowParams]) -> bool:
    """Whether configs solved together lay their model out with its self-mask, isolated count and cap as data
    (``LaidOutModel``): where any of them differs from the defaults (masked, no isolated vertex, no cap).  The
    default flow's program then holds no code for any, and every other mask, count and cap of a bucket shares one
    program."""
    return any(not cfg.model.mask_self or cfg.model.n_isolated or cfg.model.max_len is not None for cfg in configs)


class Layout(NamedTuple):
    """How configs solved together are laid out (``bucketed``): the bucket of their chains, whether their model's
    options are data (``options_as_data``) and the bucket of their caps (None: uncapped)."""

    size: int
    options: bool
    cap_size: int | None


def shared_layout(configs: Sequence[FlowParams]) -> Layout | None:
    """The layout that lets configs share one batch when every one is ``bucketable``: the longest chain's bucket and
    the longest cap's (``bucket_size``), else None.  None too for capped configs that all share n, cap, mask and
    isolated count: one static program serves them, and a laid-out capped recursion runs about twice as long (the
    bucket's rows)."""
    configs = list(configs)
    if not configs or not all(isinstance(cfg, FlowParams) and bucketable(cfg) for cfg in configs):
        return None
    caps = [cfg.model.max_len for cfg in configs if cfg.model.max_len is not None]
    if caps and len({(cfg.task.n, cfg.model.max_len, cfg.model.mask_self, cfg.model.n_isolated) for cfg in configs}) == 1:
        return None
    size = bucket_size(max(cfg.task.n for cfg in configs))
    return Layout(size, options_as_data(configs), bucket_size(max(caps)) if caps else None)


def shares_bucket(params: FlowParams) -> bool:
    """Whether a config solved alone (or in a group of its bucket: ``theory.learning_times``) is laid out in its bucket
    of n: ``bucketable`` and uncapped.  A capped flow keeps its own program (n and cap static), which runs the capped
    recursions about twice as fast as the bucket's (four n of one bucket in learning times, cold: 12.0-12.7 s laid out
    against 8.9-9.1 s for four programs compiled side by side)."""
    return bucketable(params) and params.model.max_len is None


def alone(params: FlowParams) -> FlowParams:
    """The program form of one config solved by itself: its solver resolved, and ``bucketed`` where it
    ``shares_bucket`` (n as data: every n of its bucket shares the program)."""
    program = params.solver_resolved()  # before the layout: ``bucketed`` returns a config it cannot lay out as it is
    return bucketed(program) if shares_bucket(program) else program


def bucketed(params: FlowParams, size: int | None = None, options: bool | None = None, cap_size: int | None = None) -> FlowParams:
    """``params`` with its task and eval tasks laid out in a bucket of ``size`` vertices per chain (default
    ``bucket_size(n)``), n traced: every n up to the bucket shares one compiled solve; with ``options`` (None:
    ``options_as_data([params])``) its model's self-mask, isolated count and cap traced too (``LaidOutModel``, the
    capped recursions running ``cap_size`` steps, default ``bucket_size(max_len)``): either mask, any number of
    isolated vertices and every cap up to ``cap_size`` share that solve.  Its solver resolved ("auto" named: the
    choice reads the mask and cap).  Unchanged when not ``bucketable``.  The padded config is internal (its
    Solution's per-position read-outs have size - 1 columns, those past n - 1 meaningless): ``simulate`` and friends
    trim them."""
    if not bucketable(params):
        return params
    model, solver = params.model, params.resolved_solver  # the solver first: "auto" reads the static mask and cap
    size = bucket_size(params.task.n) if size is None else size
    options = options_as_data([params]) if options is None else options
    if cap_size is None and model.max_len is not None:
        cap_size = bucket_size(model.max_len)
    # the task and the eval tasks (a schedule is never bucketable), the model when its options are data, the numerics
    is_part = lambda x: isinstance(x, (ChainTask, Numerics)) or (options and isinstance(x, ModelSpec))

    def laid_out(x):
        if isinstance(x, Numerics):
            return x.with_solver(solver)
        return PaddedTask.padded(x, size) if isinstance(x, ChainTask) else LaidOutModel.of(x, cap_size)

    # one flatten and unflatten (eqx.tree_at costs 1.2 ms a config: half a second for a batch of 1,024)
    return jax.tree_util.tree_map(lambda x: laid_out(x) if is_part(x) else x, params, is_leaf=is_part)


def _row_slots(task) -> int:
    """The per-position width of a task's read-outs: n - 1, or a bucket's size - 1."""
    return task.size - 1 if isinstance(task, PaddedTask) else task.n - 1


def _trimmed(out: Solution, n: int) -> Solution:
    """A bucketed solve's Solution with its per-position read-outs cut back to the chain's n - 1 positions."""
    width = lambda x: x[..., : n - 1]
    return eqx.tree_at(lambda o: (o.forward_prob, o.switch_prob), out, (width(out.forward_prob), width(out.switch_prob)))


# ---------------------------------------------------------------------------------------------------
# The pure solve
# ---------------------------------------------------------------------------------------------------


class Solution(eqx.Module):
    """The arrays of one solve (a leading batch axis on every field under ``solve_many`` / vmap).

    ts (T,) flow times of the saves (NaN after a stop), theta (T, P), reward (T,); forward_prob and
    switch_prob (T, n-1), expected_length and traversal_prob (T,) (NaN when not recorded);
    eval_reward: name -> (T,).  event_times / event_reached / event_resolved: event name ->
    time (NaN if not reached), whether it was reached, and whether every re-solve of its bracket
    succeeded (``EVENT_ZOOMS`` passes of the solve).  t_stop: where the solve ended (t1, or the stop event); theta_stop its state.
    result: diffrax's result code (``diffrax.RESULTS``); success: ended at t1 or at the asked event;
    field_finite: the vector field is finite at the end of the last accepted step (False when no step was
    accepted).  Step counts as diffrax reports them.
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


EVENT_ZOOMS = 4  # re-solves of each located event's bracket; each shrinks it (saves - 1)-fold
ZOOM_SAVES = 33  # the fewest saves of each re-solve (a config with fewer saves pads its main pass's): 32^4-fold at least
STEP_COUNTS = ("num_steps", "num_accepted_steps", "num_rejected_steps")  # the solver's counts a pass reports


class _Bracket(NamedTuple):
    """Each located event's bracket in solver time (arrays over the events): [s_lo, s_hi] with the state
    at s_lo and the reward at both ends; rising: the reward starts below the level; at_start: the first
    save is already past it; reached: some save reached it; resolved: every re-solve of it succeeded."""

    s_lo: jnp.ndarray
    s_hi: jnp.ndarray
    y_lo: jnp.ndarray
    j_lo: jnp.ndarray
    j_hi: jnp.ndarray
    rising: jnp.ndarray
    at_start: jnp.ndarray
    reached: jnp.ndarray
    resolved: jnp.ndarray


def _narrow(bracket: _Bracket, event, saves_s, ys, rewards, level, first: bool, ok) -> _Bracket:
    """Event ``event``'s bracket narrowed to the first pair of saves around its level (``first``: from the
    main solve's saves, which also fix the direction).  A re-solve that ends just short of the level
    keeps its last interval (the time is then clipped to its end)."""
    finite = jnp.isfinite(rewards) & jnp.isfinite(saves_s)
    rising = jnp.where(first, rewards[0] < level, bracket.rising[event])
    hit = finite & jnp.where(rising, rewards >= level, rewards <= level)
    found = jnp.any(hit)
    k = jnp.where(found, jnp.argmax(hit), saves_s.shape[0] - 1)
    k_lo = jnp.maximum(k - 1, 0)
    s, y, j = jnp.nan_to_num(saves_s), jnp.nan_to_num(ys), jnp.nan_to_num(rewards)
    update = lambda old, new: old.at[event].set(new)
    return _Bracket(
        s_lo=update(bracket.s_lo, s[k_lo]),
        s_hi=update(bracket.s_hi, s[k]),
        y_lo=update(bracket.y_lo, y[k_lo]),
        j_lo=update(bracket.j_lo, j[k_lo]),
        j_hi=update(bracket.j_hi, j[k]),
        rising=update(bracket.rising, rising),
        at_start=update(bracket.at_start, jnp.where(first, found & (k == 0), bracket.at_start[event])),
        reached=update(bracket.reached, jnp.where(first, found, bracket.reached[event])),
        resolved=update(bracket.resolved, bracket.resolved[event] & ok),
    )


def _event_time(bracket: _Bracket, levels) -> jnp.ndarray:
    """Solver time of each event: the level interpolated linearly in its last (tiny) bracket."""
    gap = bracket.j_hi - bracket.j_lo
    fraction = jnp.clip(jnp.where(gap != 0, (levels - bracket.j_lo) / jnp.where(gap != 0, gap, 1.0), 1.0), 0.0, 1.0)
    return bracket.s_lo + fraction * (bracket.s_hi - bracket.s_lo)


class _Plan(NamedTuple):
    """What every pass of a config's solve shares (``_plan``): its clock, save times (solver time, padded to
    ``slots``), the located events' names and levels, the stop event's level (None without one), the main span
    (s0, s1, theta0) and the counts (Python ints)."""

    clock: Clock
    requested: jnp.ndarray
    requested_s: jnp.ndarray
    names: tuple
    located: tuple
    levels: jnp.ndarray
    stop_level: jnp.ndarray | None
    main_span: tuple
    n_saves: int
    slots: int


def _event_names(params: FlowParams) -> tuple[tuple, tuple]:
    """(the events a Solution reports: the recorded ones and the stop event, in ``EVENTS`` order; those located by
    re-solving their brackets: the recorded ones)."""
    names = tuple(EVENTS[k] for k in range(len(EVENTS)) if EVENTS[k] in params.events or EVENTS[k] == params.stop_at)
    return names, tuple(event for event in names if event in params.events)


def _save_count(params: FlowParams) -> int:
    """How many times the config saves (``FlowParams.times``), without computing them."""
    return N_DEFAULT_SAVES + 1 if params.save_ts is None else params.save_ts.shape[0]


def _slots(params: FlowParams) -> int:
    """How many times each pass saves: the config's saves, at least ``ZOOM_SAVES`` where events are located."""
    return max(_save_count(params), ZOOM_SAVES) if _event_names(params)[1] else _save_count(params)


def _pass_count(params: FlowParams) -> int:
    """The main pass and ``EVENT_ZOOMS`` re-solves of each located event."""
    return 1 + len(_event_names(params)[1]) * EVENT_ZOOMS


def _pass_index(index: int) -> np.ndarray:
    """A pass's index as the compiled pass programs take it."""
    return np.asarray(index, np.dtype(jnp.result_type(int)))


def _plan(params: FlowParams) -> _Plan:
    """The passes' shared plan of a config (traceable)."""
    clock = flow_clock(params)
    requested = params.times()
    requested_s = clock.to_solver(requested)
    names, located = _event_names(params)
    levels = jnp.stack([params.event_level(event) for event in located]) if located else jnp.zeros(0)
    n_saves, slots = requested_s.shape[0], _slots(params)
    padded_s = requested_s  # the main pass saves its last time again in the extra slots
    if slots > n_saves:
        padded_s = jnp.concatenate([requested_s, jnp.full(slots - n_saves, requested_s[-1])])
    main_span = (clock.to_solver(params.t0), clock.to_solver(params.t1), params.theta0.as_array(params.model.values))
    stop_level = params.event_level(params.stop_at) if params.stop_at is not None else None
    return _Plan(clock, requested, padded_s, names, located, levels, stop_level, main_span, n_saves, slots)


def _integrated(params: FlowParams, plan: _Plan, index, bracket: _Bracket | None, progress: bool) -> dict:
    """Pass ``index`` (0: the main solve; 1 + e Z + z: a re-solve of event e's bracket, ``_passes``) integrated: its
    solution's times, states (the save slots and t1), result code, event mask, field check and step counts
    (``_pass_shapes``)."""
    main = index == 0
    reward = lambda y: _reward(params, y)
    event = jnp.clip((index - 1) // EVENT_ZOOMS, 0, max(len(plan.located) - 1, 0))
    if bracket is None:
        t0, t1, y0, saves = *plan.main_span, plan.requested_s
    else:
        s_lo, s_hi = bracket.s_lo[event], bracket.s_hi[event]
        s_lo = jnp.where(jnp.isfinite(s_lo), s_lo, plan.main_span[0])  # saves past a stop are inf: never a NaN span
        s_hi = jnp.where(jnp.isfinite(s_hi) & (s_hi > s_lo), s_hi, s_lo + 1.0)  # nothing to find: any short span
        t0, t1 = jnp.where(main, plan.main_span[0], s_lo), jnp.where(main, plan.main_span[1], s_hi)
        y0 = jnp.where(main, plan.main_span[2], bracket.y_lo[event])
        saves = jnp.where(main, plan.requested_s, jnp.linspace(s_lo, s_hi, plan.slots))
    stop = None
    if plan.stop_level is not None:
        stop = falling_event(lambda t, y, args, **kw: jnp.where(main, plan.stop_level - reward(y), 1.0))
    saveat = diffrax.SaveAt(ts=saves, t1=True, solver_state=True)  # an FSAL solver's state: the field at the end
    solution = integrate(params, saveat, t0=t0, t1=t1, y0=y0, event=stop, progress=progress)
    return {
        "ts": solution.ts,
        "ys": solution.ys,
        "result": result_code(solution.result),
        "event_mask": jnp.asarray(solution.event_mask if plan.stop_level is not None else False),
        "field_finite": _end_field_finite(solution),
        **{name: solution.stats[name] for name in STEP_COUNTS},
    }


def _with_rewards(params: FlowParams, integrated: dict) -> dict:
    """A pass's outputs with the reward at each of its saves."""
    return {**integrated, "rewards": jax.vmap(lambda y: _reward(params, y))(jnp.nan_to_num(integrated["ys"][:-1]))}


def _one_pass(params: FlowParams, plan: _Plan, index, bracket: _Bracket | None, progress: bool) -> dict:
    """Pass ``index`` integrated, with its rewards at the saves."""
    return _with_rewards(params, _integrated(params, plan, index, bracket, progress))


def _pass_shapes(params: FlowParams, saves: int) -> dict:
    """Shape and dtype of each output of ``_integrated`` (with ``saves`` save slots), and of its rewards."""
    width, integer = Theta.size(params.model.values), np.dtype(jnp.result_type(int))
    shapes = {
        "ts": ((saves + 1,), np.dtype(float)),
        "ys": ((saves + 1, width), np.dtype(float)),
        "rewards": ((saves,), np.dtype(float)),
        "result": ((), RESULT_DTYPE),
        "event_mask": ((), np.dtype(bool)),
        "field_finite": ((), np.dtype(bool)),
    }
    return {**shapes, **{name: ((), integer) for name in STEP_COUNTS}}


def _main_outputs(plan: _Plan, solved: dict) -> dict:
    """What the caller reads of the main pass: its saves (the config's, then t1) and the rest as they are."""
    kept = lambda x: x if plan.slots == plan.n_saves else jnp.concatenate([x[: plan.n_saves], x[-1:]])
    return {**solved, "ts": kept(solved["ts"]), "ys": kept(solved["ys"]), "rewards": solved["rewards"][: plan.n_saves]}


def _first_carry(params: FlowParams) -> tuple[dict, _Bracket]:
    """The passes' carry before the main pass (each entry replaced by it; every bracket resolved so far), as numpy
    arrays."""
    width, n_events = Theta.size(params.model.values), len(_event_names(params)[1])
    main_out = {name: np.zeros(shape, dtype) for name, (shape, dtype) in _pass_shapes(params, _save_count(params)).items()}
    none, zero = np.zeros(n_events, bool), np.zeros(n_events)
    return main_out, _Bracket(zero, zero, np.zeros((n_events, width)), zero, zero, none, none, none, np.ones(n_events, bool))


def _after_pass(plan: _Plan, index, carry: tuple[dict, _Bracket], solved: dict) -> tuple[dict, _Bracket]:
    """The carry after pass ``index``: the main pass's outputs kept and every bracket set from its saves; a re-solve
    narrows its own event's bracket."""
    main_out, bracket = carry
    main = index == 0
    keep = lambda old, new: jax.tree_util.tree_map(lambda a, b: jnp.where(main, b, a), old, new)
    main_out = keep(main_out, _main_outputs(plan, solved))
    saves_s, ys, rewards = solved["ts"][:-1], solved["ys"][:-1], solved["rewards"]
    for event in range(len(plan.located)):  # the main pass sets every bracket ...
        bracket = keep(bracket, _narrow(bracket, event, saves_s, ys, rewards, plan.levels[event], True, True))
    mine = jnp.clip((index - 1) // EVENT_ZOOMS, 0, len(plan.located) - 1)  # ... and a zoom pass narrows its own
    ok = solved["result"] == result_code(diffrax.RESULTS.successful)
    narrowed = _narrow(bracket, mine, saves_s, ys, rewards, plan.levels[mine], False, ok)
    active = ~main & bracket.reached[mine] & ~bracket.at_start[mine]
    bracket = jax.tree_util.tree_map(lambda a, b: jnp.where(active, b, a), bracket, narrowed)
    return main_out, bracket


def _passes(params: FlowParams, plan: _Plan, progress: bool) -> tuple[dict, _Bracket | None]:
    """The main solve and ``EVENT_ZOOMS`` re-solves of each event's bracket, as passes of ONE integrate call in a loop
    (traced: batches and traced solves; one config runs the loop on the host, each pass a run of compiled programs,
    ``_compiled_solve``).

    Pass 0 solves the config's span with its saves (and its stop event); pass 1 + e Z + z re-solves event
    e's bracket from its left state with as many saves as the main solve, at least ``ZOOM_SAVES`` (the main pass's
    padded with copies of its last), so the bracket shrinks (T - 1)^Z-fold and the time is interpolated in it.  The
    program holds one copy of the solve and of the reward, however many events (a dense re-solve per event cost as
    much again to compile).

    Returns:
        (main, bracket): the main pass's ts, ys, rewards at the saves, result code, event mask and step
        counts (a dict), and the events' ``_Bracket`` (None without events).
    """
    if not plan.located:
        return _main_outputs(plan, _one_pass(params, plan, jnp.asarray(0), None, progress)), None
    body = lambda index, carry: _after_pass(plan, index, carry, _one_pass(params, plan, index, carry[1], progress))
    return jax.lax.fori_loop(0, _pass_count(params), body, _first_carry(params))


def _end_field_finite(solution: diffrax.Solution) -> jnp.ndarray:
    """Whether the vector field was finite at the end of the solve's last accepted step (False when no step was
    accepted), read from the solver's state: every solver of ``SOLVERS`` is first-same-as-last and keeps
    (first-step flag, field) there, so the program holds no extra copy of grad J for this check."""
    leaves = jax.tree_util.tree_leaves(solution.solver_state)
    fields = [x for x in leaves if x.shape == solution.ys.shape[1:]]
    flags = [x for x in leaves if x.shape == () and x.dtype == bool]
    if len(fields) != 1 or len(flags) != 1:
        raise TypeError("the flow's solver must keep (first-step flag, vector field) in its state (first-same-as-last)")
    return ~flags[0] & jnp.all(jnp.isfinite(fields[0]))


def _solve(params: FlowParams, progress: bool = False) -> Solution:
    """Integrate the flow, read the closed-form metrics at the saves and locate the events (traceable): one program
    (batches); one config's solve runs ``_bare_solve`` and ``_readouts_at`` as two (``_compiled_solve``)."""
    bare = _bare_solve(params, progress)
    return _with_readouts(bare, _readouts_at(params, bare.theta))


def _readouts_at(params: FlowParams, thetas: jnp.ndarray) -> dict:
    """The recorded read-outs besides the reward (and the eval tasks' rewards) at the saved thetas (rows, NaN after
    a stop: those rows NaN), full width, NaN where not recorded."""
    valid = jnp.all(jnp.isfinite(thetas), axis=1)
    # lax.map in chunks of ~4096 / n saves bounds the intermediates of large n (a full vmap over the
    # saves of a 64-config sweep at n = 1000 peaks at 4.4 GB); small n stays one vmapped chunk
    chunk = max(1, min(thetas.shape[0], METRIC_CHUNK_ELEMENTS // (_row_slots(params.task) + 1)))
    recorded = jax.lax.map(lambda y: _recorded_at(params, y), jnp.nan_to_num(thetas), batch_size=chunk)
    mask = lambda v: jnp.where(valid.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.nan)
    recorded = jax.tree_util.tree_map(mask, recorded)
    n_saves, width = thetas.shape[0], _row_slots(params.task)
    nan = lambda *shape: jnp.full(shape, jnp.nan)
    return {
        "forward_prob": recorded.get("forward_prob", nan(n_saves, width)),
        "switch_prob": recorded.get("switch_prob", nan(n_saves, width)),
        "expected_length": recorded.get("expected_length", nan(n_saves)),
        "traversal_prob": recorded.get("traversal_prob", nan(n_saves)),
        "eval_reward": recorded["eval_reward"],
    }


def _with_readouts(bare: Solution, recorded: dict) -> Solution:
    """``_bare_solve``'s Solution with the read-outs of ``_readouts_at`` in their fields (on the host or traced)."""
    return replace(bare, **recorded)


def _bare_solve(params: FlowParams, progress: bool = False) -> Solution:
    """``_solve`` without the read-outs but the reward (their fields empty: zero-width arrays and no eval reward)."""
    require_x64()
    plan = _plan(params)
    return _finished(params, plan, *_passes(params, plan, progress))


def _finished(params: FlowParams, plan: _Plan, main: dict, bracket: _Bracket | None) -> Solution:
    """The Solution (no read-outs but the reward) from the passes' outputs: times back in flow time, NaN past a stop,
    each event's time interpolated in its last bracket."""
    clock, requested, levels, names, located = plan.clock, plan.requested, plan.levels, plan.names, plan.located
    requested_s = plan.requested_s[: plan.n_saves]
    # after a requested stop diffrax writes the stop state into the next save slot (with its time)
    # and inf into the rest: keep the real times, NaN the unused slots
    saved_s, saved_ys = main["ts"][:-1], main["ys"][:-1]
    valid = jnp.isfinite(saved_s) & jnp.all(jnp.isfinite(saved_ys), axis=1)
    # a save at its requested time reports that time exactly (no round trip through log time)
    as_time = lambda s, want_s, want_t: jnp.where(s == want_s, want_t, clock.to_time(s))
    ts = jnp.where(valid, as_time(jnp.where(valid, saved_s, 0.0), requested_s, requested), jnp.nan)
    thetas = jnp.where(valid[:, None], saved_ys, jnp.nan)
    reward = jnp.where(valid, main["rewards"], jnp.nan)  # the solve's own reward at its saves
    empty = jnp.zeros((thetas.shape[0], 0))
    # the end of the solve: the last finite saved time (t1, or the stop event's time)
    finite_s = jnp.isfinite(main["ts"])
    last = jnp.argmax(jnp.where(finite_s, main["ts"], -jnp.inf))
    finite_stop = jnp.any(finite_s)
    s_stop = jnp.where(finite_s, main["ts"], 0.0)[last]
    t_stop = jnp.where(finite_stop, as_time(s_stop, clock.to_solver(params.t1), params.t1), jnp.nan)
    theta_stop = main["ys"][last]
    result = main["result"]
    is_code = lambda item: result == result_code(item)
    stopped = main["event_mask"] & is_code(diffrax.RESULTS.event_occurred)

    event_times, event_reached, event_resolved = {}, {}, {}
    for event in names:
        if event in located:
            k = located.index(event)
            at_event = jnp.where(bracket.at_start[k], ts[0], clock.to_time(_event_time(bracket, levels)[k]))
            t, reached, resolved = at_event, bracket.reached[k], bracket.resolved[k] | ~bracket.reached[k]
        else:
            t, reached, resolved = t_stop, stopped, jnp.asarray(True)
        if event == params.stop_at:
            t, reached, resolved = jnp.where(stopped, t_stop, t), stopped | reached, stopped | resolved
        event_times[event] = jnp.where(reached, t, jnp.nan)
        event_reached[event] = reached
        event_resolved[event] = resolved

    success = is_code(diffrax.RESULTS.successful) | stopped
    field_finite = main["field_finite"]
    return Solution(
        ts=ts,
        theta=thetas,
        reward=reward,
        forward_prob=empty,
        switch_prob=empty,
        expected_length=jnp.zeros(0),
        traversal_prob=jnp.zeros(0),
        eval_reward={},
        event_times=event_times,
        event_reached=event_reached,
        event_resolved=event_resolved,
        t_stop=t_stop,
        theta_stop=theta_stop,
        result=result,
        success=success,
        field_finite=field_finite & jnp.all(jnp.isfinite(theta_stop)),
        num_steps=main["num_steps"],
        num_accepted_steps=main["num_accepted_steps"],
        num_rejected_steps=main["num_rejected_steps"],
    )


def solve(config: FlowParams, *, progress: bool = False) -> Solution:
    """The pure solve of one config: a ``Solution`` of arrays.

    Concrete config: runs the cached compiled executable.  Inside jit / vmap / grad (a traced
    config): traced inline, so ``jax.grad(lambda p: solve(cfg(p)).eval_reward["target"][-1])`` and
    ``jax.vmap(solve)(stacked_configs)`` work.  Reverse-mode derivatives go through the solver steps
    (discretise-then-optimise, binomial checkpointing); they need second derivatives of J.

    Args:
        config: the flow to solve (concrete or traced).
        progress: show diffrax's progress meter.

    Returns:
        The ``Solution`` (arrays only; a failed solve is flagged in it, not raised).

    Raises:
        ValueError: config is not a ``FlowParams``, or its ``stop_at`` level is at or above the reward
            ceiling (``check_levels``).
    """
    if not isinstance(config, FlowParams):
        raise ValueError(f"config must be a gradflow.FlowParams, got {type(config).__name__}")
    if not is_concrete(config):
        return _solve(config, progress)
    check_levels(config)
    program = alone(config)
    return _trimmed(_compiled_solve(program, progress)[0](program), config.task.n)


def _compiled_solve(program: FlowParams, progress: bool) -> tuple[Callable, float]:
    """``_solve`` of one config in its program form (``alone``) as three compiled programs, traced in turn while the
    others compile (``compile_cache.compiled_in_turn``): one pass of the solve integrated (``_integrated``: the main
    solve, and each re-solve of an event's bracket), the longest, on a core of its own; the rewards at its saves, the
    passes' carry after it (``_after_pass``) and the Solution so far (``_finished``), so that the loop of ``_passes``
    runs here, on the host, traced first: it compiles while the pass traces, and the closed forms both call are
    traced once; and the read-outs at the saves.  Returns the solve and the compile seconds (0 when cached).  The
    numbers are those of the batch program, which holds all of it in one (tested)."""
    located = bool(_event_names(program)[1])
    shapes = _pass_shapes(program, _slots(program))
    integrated = {name: jax.ShapeDtypeStruct(*shapes[name]) for name in shapes if name != "rewards"}
    if located:
        first, index = _first_carry(program), _pass_index(0)
        one_pass, pass_args = (lambda p, i, b: _integrated(p, _plan(p), i, b, progress)), (program, index, first[1])
        after, after_args = _host_after_pass, (program, index, first, integrated)
    else:
        one_pass, pass_args = (lambda p: _integrated(p, _plan(p), jnp.asarray(0), None, progress)), (program,)
        after, after_args = _host_main_pass, (program, integrated)
    thetas = jax.ShapeDtypeStruct((_save_count(program), Theta.size(program.model.values)), float)
    (after_, pass_, readout), seconds = compiled_in_turn(
        [
            CompileRequest("after_pass", after, after_args, (), export=True, quick=True),
            # the progress meter is in the pass's program only
            CompileRequest("pass", one_pass, pass_args, progress, export=not progress, quick=True),
            CompileRequest("readouts", _readouts_at, (program, thetas), (), export=True, quick=True),
        ],
        longest=1,
    )

    def run(params: FlowParams) -> Solution:
        if located:
            carry = first
            for index in map(_pass_index, range(_pass_count(params))):
                carry, solution = after_(params, index, carry, pass_(params, index, carry[1]))
        else:
            solution = after_(params, pass_(params))
        return _with_readouts(solution, readout(params, solution.theta))

    return run, seconds


def _host_after_pass(params: FlowParams, index, carry: tuple[dict, _Bracket], integrated: dict) -> tuple[tuple, Solution]:
    """One config's solve on the host: the carry after pass ``index`` (``_after_pass``) and the Solution it gives."""
    plan = _plan(params)
    carry = _after_pass(plan, index, carry, _with_rewards(params, integrated))
    return carry, _finished(params, plan, *carry)


def _host_main_pass(params: FlowParams, integrated: dict) -> Solution:
    """One config's solve on the host, without located events: the Solution of its only pass."""
    plan = _plan(params)
    return _finished(params, plan, _main_outputs(plan, _with_rewards(params, integrated)), None)


def solve_many(configs: Sequence[FlowParams] | FlowParams, *, progress: bool = False, devices=None) -> Solution:
    """``solve`` vmapped over configs of one structure (a list, or configs already stacked by ``stack_configs``).

    Every field of the returned ``Solution`` has a leading axis of len(configs).  Configs that differ only
    in n share the batch when they are ``bucketable`` (n as data): their per-position read-outs then have
    as many columns as the longest chain's bucket - 1 (those past a member's n - 1 are meaningless);
    one n gives n - 1 columns.

    Args:
        configs: a sequence of ``FlowParams`` of one structure, or one ``FlowParams`` already stacked.
        progress: show diffrax's progress meter.
        devices (Sequence[jax.Device] | None): None (the default device) or a sequence of jax devices to
            shard the batch over (padded to a multiple of their count).

    Returns:
        One ``Solution`` whose fields have a leading batch axis.

    Raises:
        ValueError: the configs differ in structure (``stack_configs``) or a ``stop_at`` level is at or
            above the reward ceiling (``check_levels``).
    """
    if not isinstance(configs, FlowParams):
        configs = list(configs)
        for index, cfg in enumerate(configs):
            if isinstance(cfg, FlowParams):
                check_levels(cfg, index)
    batch = _stack_bucketed(configs) if not isinstance(configs, FlowParams) else configs
    size = int(np.shape(batch.t0)[0])
    if devices is not None:
        batch = _shard(batch, size, list(devices))
    out, _ = _run_batch(batch, progress, devices)
    out = jax.tree_util.tree_map(lambda x: x[:size], out)
    lengths = {cfg.task.n for cfg in configs} if not isinstance(configs, FlowParams) else set()
    return _trimmed(out, lengths.pop()) if len(lengths) == 1 else out


def _run_batch(batch: FlowParams, progress: bool, devices):
    """A stacked batch (sharded over ``devices`` when given) solved by one compiled program (``over_batch``)."""
    batch = batch.solver_resolved()
    executable, compile_s = _batch_program(batch, progress, devices)
    return executable(batch), compile_s


def _batch_program(batch: FlowParams, progress: bool, devices):
    """(the compiled program that solves stacked configs shaped like ``batch``, its compile seconds)."""
    solve_batch = over_batch(lambda p: _solve(p, progress), devices)
    export = not progress and devices is None  # a sharded batch compiles as usual
    static_key = (progress, 1 if devices is None else len(devices), batch_chunk(devices))
    return compiled("solve_many", solve_batch, (batch,), static_key, export=export)


def over_batch(fn: Callable, devices=None) -> Callable:
    """``fn`` mapped over the leading axis of its arguments.  Where ``chunked_on``: a loop over chunks of
    ``BATCH_CHUNK`` vmapped members, on each device its own shard of them (``devices``: several CPU devices);
    elsewhere one vmap (partitioned over ``devices`` when the arguments are sharded)."""
    if not chunked_on(devices):
        return jax.vmap(fn)
    chunks = functools.partial(_in_chunks, fn)
    if devices is None:
        return chunks
    spec = PartitionSpec("batch")
    mesh = Mesh(np.asarray(list(devices)), ("batch",))
    return lambda *args: jax.shard_map(chunks, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


def _in_chunks(fn: Callable, *args):
    """fn over the leading axis in chunks of ``BATCH_CHUNK`` vmapped members, the batch padded to whole chunks with
    copies of its last member (a remainder would be a second vmapped copy of fn to compile), the padding dropped."""
    size = jax.tree_util.tree_leaves(args)[0].shape[0]
    if size <= BATCH_CHUNK:
        return jax.vmap(fn)(*args)
    padded = _with_last_repeated(args, -(-size // BATCH_CHUNK) * BATCH_CHUNK)
    out = jax.lax.map(lambda xs: fn(*xs), padded, batch_size=BATCH_CHUNK)
    return jax.tree_util.tree_map(lambda y: y[:size], out)


def _with_last_repeated(tree, size: int):
    """Every leaf's leading axis extended to ``size`` with copies of its last member (padding results are dropped)."""
    pad = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], size - x.shape[0], axis=0)]) if size > x.shape[0] else x
    return jax.tree_util.tree_map(pad, tree)


def batch_chunk(devices=None) -> int:
    """Members per chunk of a batch on these devices: ``BATCH_CHUNK`` where ``chunked_on``, else 0 (one vmap); part
    of a batch program's compile key."""
    return BATCH_CHUNK if chunked_on(devices) else 0


def chunked_on(devices=None) -> bool:
    """Whether batches run in chunks of ``BATCH_CHUNK`` members: on CPU devices (the default device, or ``devices``),
    where a chunk's working set stays in cache (a whole 1,024-member batch streams its intermediates through
    memory) and each chunk stops with its own slowest member; a GPU takes every member at once."""
    platforms = {jax.devices()[0].platform} if devices is None else {device.platform for device in devices}
    return platforms == {"cpu"}


# ---------------------------------------------------------------------------------------------------
# Host-side wrappers: trajectories, batches, hitting times
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolveFailure:
    """One config of a batch whose solve failed (``simulate_many(..., on_error="report")``).

    index: its position in the batch; config_hash: ``gradflow.sweep.config_hash`` of it (None for a
    config with a plain-callable schedule, which has no hash); label: the config named in one line
    (``config_label``); reason: what went wrong (``failure_message``).
    """

    index: int
    config_hash: str | None
    label: str
    reason: str

    def __str__(self) -> str:
        return f"configs[{self.index}] ({self.label}): {self.reason}"


def _failure(index: int, params: FlowParams, reason: str) -> SolveFailure:
    try:
        digest = config_hash(params)
    except ValueError:
        digest = None
    return SolveFailure(index, digest, config_label(params), reason)


def _nonfinite_save(out) -> int | None:
    """The first save (a finite time) whose reward is NaN or infinite, or None."""
    bad = np.nonzero(np.isfinite(np.asarray(out.ts)) & ~np.isfinite(np.asarray(out.reward)))[0]
    return int(bad[0]) if bad.size else None


def _not_finite(out) -> bool:
    """Whether a solve failed by a NaN or infinite reward or vector field (what extended numbers may mend)."""
    return _nonfinite_save(out) is not None or not bool(out.field_finite)


def _also_extended(message: str, extended_message: str) -> str:
    """The reason of a solve that failed in float64 numbers and again in extended ones (``extended_config``)."""
    return f"{extended_message} (solved again with ModelSpec(numbers='extended') after float64 numbers failed: {message})"


def failure_message(params: FlowParams, out) -> str | None:
    """What went wrong in a solve, or None when it succeeded.

    A NaN or infinite reward at a save or vector field at the end, steps ran out, a failed root-find, ...;
    each message names the time, the steps and theta.

    Args:
        params: the config that was solved.
        out (Solution): its ``Solution`` (one member of a batch, on the host).

    Returns:
        A one-line reason, or None.
    """
    steps = int(out.num_steps)
    where = f"at t={float(out.t_stop):.6g} < t1={float(params.t1):.6g} after {steps} steps"
    k = _nonfinite_save(out)
    if k is not None:
        return (
            f"the reward J is not finite ({float(out.reward[k])}) at save {k}, t={float(out.ts[k]):.6g} (the solve took "
            f"{steps} steps), theta = {np.round(np.asarray(out.theta[k]), 6).tolist()}: the closed form cannot be evaluated there"
        )
    if not bool(out.field_finite) and int(out.num_accepted_steps) == 0:
        return (
            f"no step of the flow solve was accepted ({int(out.num_rejected_steps)} rejected): the vector field grad J is "
            f"not finite (NaN or inf) at theta0 = {np.round(np.asarray(out.theta_stop), 6).tolist()}, or every step failed"
        )
    if not bool(out.field_finite):
        where = where if not bool(out.success) else f"at t={float(out.t_stop):.6g} after {steps} steps"
        return (
            f"the flow's vector field grad J is not finite (NaN or inf) {where}, theta = "
            f"{np.round(np.asarray(out.theta_stop), 6).tolist()}: the closed form cannot be evaluated there"
        )
    if bool(out.success):
        return None
    code = int(out.result)
    if is_result(code, diffrax.RESULTS.max_steps_reached):
        return (
            f"the flow solve ran out of steps {where} ({int(out.num_rejected_steps)} of them rejected): raise max_steps "
            f"(now {params.max_steps}) or loosen rtol/atol"
        )
    if is_result(code, diffrax.RESULTS.nonlinear_max_steps_reached) or is_result(code, diffrax.RESULTS.nonlinear_divergence):
        return (
            f"the root-find of the stop event ({params.stop_at}) failed {where}; the event level was "
            f"{float(params.event_level(params.stop_at)) if params.stop_at else float('nan'):.6g}"
        )
    return f"the flow solve failed {where}: {result_message(code)}"


def check_levels(params: FlowParams, index: int | None = None) -> None:
    """Before a solve: the reward levels of its events against the model's closed-form reward ceiling.

    A warning when a recorded event's level is at or above the ceiling (it is never reached).  Only
    closed-form ceilings are checked (``gradflow.ceilings.closed_form_ceiling``: linear attention, softmax
    without a cap; cached), so the check costs microseconds after the first call.  A ``stop_at`` that cannot
    fire is refused already when a ``FlowParams`` is built; this check repeats it at the entry of every solve
    for configs changed without being built (``eqx.tree_at``) and names the config (and its batch index).

    Args:
        params: the config to check.
        index: its position in a batch, named in the messages (None for a single config).

    Raises:
        ValueError: the ``stop_at`` event's level is at or above the ceiling (it can never fire, so the
            solve would run to t1 or max_steps); the message names the config (``config_label``).
    """
    name = lambda: config_label(params) if index is None else f"configs[{index}] ({config_label(params)})"
    refusal = stop_at_refusal(params)
    if refusal is not None:
        raise ValueError(f"{name()}: {refusal}")
    events = [e for e in EVENTS if e in params.events and e != params.stop_at]
    if not events or not is_concrete((params.reward_threshold, params.convergence_loss)):
        return
    ceiling = closed_form_ceiling(params.task, params.model)
    if ceiling is None or ceiling >= 1.0:
        return
    notes = [(event, reward_ceiling_warning(params, float(params.event_level(event)))) for event in events]
    notes = [f"{EVENT_NAMES[event]} event: {note}" for event, note in notes if note is not None]
    if notes:
        warnings.warn(f"{name()}: " + "; ".join(notes), stacklevel=3)


def _trajectory(params: FlowParams, out, stats: dict) -> Trajectory:
    """Package one config's successful solution on the host."""
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
            "solver": params.solver,
            "resolved_solver": params.resolved_solver,
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


def _early(params: FlowParams) -> FlowParams:
    """The config a host solve runs first: at most ``EARLY_STEPS`` steps (a solve that ends within them is
    identical to the full one; the others are reported by ``_outlook`` and solved again in full).  Also of
    stacked configs: only the numerics are rebuilt (max_steps is static)."""
    if params.max_steps <= EARLY_STEPS:
        return params
    numerics = params.numerics
    early = Numerics(numerics.solver, numerics.rtol, numerics.atol, EARLY_STEPS)
    return eqx.tree_at(lambda p: p.numerics, params, early)


def _ran_out_early(params: FlowParams, out) -> bool:
    """Whether an early solve (``_early``) of ``params`` stopped at ``EARLY_STEPS`` short of its own max_steps."""
    code = int(out.result)  # a success never reads diffrax's codes (a warm process never imports diffrax)
    return params.max_steps > EARLY_STEPS and code != SUCCESSFUL and is_result(code, diffrax.RESULTS.max_steps_reached)


def _outlook(params: FlowParams, out, seconds: float) -> tuple[str, bool]:
    """What an early solve that ran out of steps says: the time reached, the step rate and the steps t1 needs
    at that pace, from steps uniform in log(1 + t - t0) (a converging flow's steps grow with t: the fewest)
    to steps uniform in t (a stiff flow's stable step: the most); hopeless when even the fewest exceed max_steps."""
    t0, t1, reached = float(params.t0), float(params.t1), float(out.t_stop)
    steps = int(out.num_steps)
    fraction = lambda f: (f(reached - t0) / f(t1 - t0)) if reached > t0 else 0.0
    fewest, most = (steps / fraction(f) if fraction(f) > 0 else math.inf for f in (math.log1p, float))
    rate = steps / max(seconds, 1e-9)
    message = (
        f"after {steps:,} steps ({rate:,.0f} steps/s) the flow solve has reached t={reached:.6g} of t1={t1:.6g}: at "
        f"this pace t1 needs {fewest:,.0f} (steps uniform in log t) to {most:,.0f} steps (uniform in t)"
    )
    return message, fewest > params.max_steps


def _early_failure(message: str, params: FlowParams) -> str:
    return (
        f"{message}, more than max_steps={params.max_steps:,}: raise max_steps, loosen rtol/atol, or (a capped flow with "
        "self-loops is stiff) use solver 'auto'"
    )


def simulate(flow_params: FlowParams, progress: bool = False) -> Trajectory:
    """Integrate d theta/dt = grad J(theta) from theta0 over [t0, t1]; see ``Trajectory``.

    The solve first runs at most ``EARLY_STEPS`` steps (the same result when it ends within them).  One that
    needs more says so then: it raises when, at the pace so far (extrapolated in the solver's time), t1
    needs more than max_steps, and otherwise warns with the time reached and the step rate and solves
    again with the full max_steps (a second compilation, for long solves only).

    Args:
        flow_params: the flow to solve.
        progress: show diffrax's tqdm meter (that executable holds a host callback, so JAX's persistent
            cache never stores it: a new process compiles it again); no early solve then.

    Returns:
        The ``Trajectory`` of the solve.

    Raises:
        RuntimeError: the solve failed (``failure_message``: a NaN or infinite reward or field, steps ran
            out, ...) or will run out of steps (``EARLY_STEPS``); the message names the config
            (``config_label``), the time, the steps and theta or the step rate.
        ValueError: flow_params is not a ``FlowParams``, or its ``stop_at`` level is at or above the
            reward ceiling (``check_levels``; a recorded event above it only warns).
    """
    if not isinstance(flow_params, FlowParams):
        raise ValueError(f"flow_params must be a gradflow.FlowParams, got {type(flow_params).__name__}")
    check_levels(flow_params)
    out, stats = _simulated(flow_params, progress, flow_params)
    message = failure_message(flow_params, out)
    extended = extended_config(flow_params) if message is not None and _not_finite(out) else None
    if extended is not None:  # a NaN in float64 numbers: the same flow with the extended closed form
        out, stats = _simulated(extended, progress, flow_params)
        stats["numbers"] = "extended"
        again = failure_message(extended, out)
        message = None if again is None else _also_extended(message, again)
    if message is not None:
        raise RuntimeError(f"{config_label(flow_params)}: {message}")
    return _trajectory(flow_params, out, stats)


def _simulated(params: FlowParams, progress: bool, named: FlowParams) -> tuple:
    """``_host_solve`` of one config after an early solve (``_early``): raises when it is going to run out of steps,
    naming the config ``named`` (``config_label``, computed only then: hashing a config runs eager JAX operations,
    each compiled the first time)."""
    out, stats = _host_solve(params if progress else _early(params), progress)
    if not progress and _ran_out_early(params, out) and not _not_finite(out):  # a NaN: failure_message says so
        message, hopeless = _outlook(params, out, stats["run_seconds"])
        label = config_label(named)
        if hopeless:
            raise RuntimeError(f"{label}: {_early_failure(message, params)}")
        warnings.warn(f"{label}: {message}; solving again up to max_steps={params.max_steps:,}", stacklevel=3)
        out, stats = _host_solve(params, progress)
    return out, stats


def _host_solve(params: FlowParams, progress: bool) -> tuple:
    """One config's Solution on the host (trimmed to its n) and its compile and run seconds."""
    program = alone(params)
    executable, compile_s = _compiled_solve(program, progress)
    start = time.perf_counter()
    out = jax.device_get(_trimmed(executable(program), params.task.n))
    return out, {"compile_seconds": compile_s, "run_seconds": time.perf_counter() - start}


def _stack_bucketed(configs: Sequence[FlowParams], layout: Layout | None = None) -> FlowParams:
    """``stack_configs`` of the configs laid out alike (``layout``; default ``shared_layout(configs)``) when every
    one is ``bucketable``: chains of different n then share one batch and one compilation, and so do masks, isolated
    counts and caps."""
    configs = list(configs)
    layout = shared_layout(configs) if layout is None else layout
    if layout is None:
        return stack_configs(configs)
    return stack_configs([bucketed(cfg, *layout) for cfg in configs])


def stack_configs(configs: Sequence[FlowParams]) -> FlowParams:
    """Stack configs of one structure on a leading axis.

    Args:
        configs: ``FlowParams`` of one structure (n, attention kind, solver, schedule, events, ...).

    Returns:
        One ``FlowParams`` whose leaves have a leading axis of len(configs).

    Raises:
        ValueError: configs is empty, holds something other than a ``FlowParams``, or its members differ
            in structure (the message names what must match).
    """
    configs = list(configs)
    if not configs:
        raise ValueError("configs must hold at least one FlowParams")
    flat = []  # each config flattened once
    for index, cfg in enumerate(configs):
        if not isinstance(cfg, FlowParams):
            raise ValueError(f"configs[{index}] must be a gradflow.FlowParams, got {type(cfg).__name__}")
        flat.append(jax.tree_util.tree_flatten(cfg))
    structure, shapes = flat[0][1], [np.shape(x) for x in flat[0][0]]
    for index, (leaves, treedef) in enumerate(flat):
        if treedef != structure or [np.shape(x) for x in leaves] != shapes:
            raise ValueError(
                f"configs[{index}] differs in structure from configs[0] (n, attention kind, solver, coords, "
                "n_vocab, max_steps, schedule, stop_at, events, readouts, eval task names, time_scale and "
                "save_ts length must match): run it separately"
            )
    # stacked on the host, then one transfer per leaf (jnp.stack of 64 device scalars is ~1.5x slower)
    columns = zip(*(leaves for leaves, _ in flat))
    return jax.tree_util.tree_unflatten(structure, [jnp.asarray(np.stack([np.asarray(x) for x in xs])) for xs in columns])


def simulate_many(
    configs: Sequence[FlowParams], progress: bool = False, devices=None, on_error: str = "raise"
) -> list[Trajectory | SolveFailure]:
    """Solve configs of one structure as one vmapped compilation; results match ``simulate``.

    Configs that differ only in n share one batch and one compilation when they are ``bucketable``
    (linear attention without cap or schedule, the defaults): the chains are laid out in the bucket of
    the longest (``gradflow.task.bucket_size``), n traced.

    Configs may stop at different times or never reach their stop event.  The batch first runs at most
    ``EARLY_STEPS`` steps per member: a member that has not finished by then is reported at once when, at
    its pace, t1 needs more than its max_steps (a ``SolveFailure`` or the raise), and otherwise is solved
    again alone with its full max_steps (with a warning giving its time reached and step rate), so the
    rest of the batch never waits for it.

    Args:
        configs: ``FlowParams`` of one structure.
        progress: show diffrax's progress meter.
        devices (Sequence[jax.Device] | None): None (default device) or a sequence of jax devices
            (``jax.devices()`` for all): the batch is padded to a multiple of the device count and
            sharded along a 1-D mesh.  On the default CPU device a batch of several chunks runs on a
            thread per core (``host_threads``), each solving its own slice with one shared program.
        on_error: "raise" (default) raises on the first failed config; "report" returns one entry per
            config, its Trajectory or a ``SolveFailure`` (index, config hash, reason), so the other
            results are kept.

    Returns:
        One ``Trajectory`` (or, with on_error="report", ``SolveFailure``) per config, in order.

    Raises:
        RuntimeError: with on_error="raise", a solve failed; the message names the first failed config
            (its index and ``config_label``) and why.
        ValueError: on_error is not "raise" or "report", the configs differ in structure, or a ``stop_at``
            level is at or above the reward ceiling (before anything runs, in both modes).
    """
    check_choice("on_error", on_error, ON_ERROR)
    configs = list(configs)
    for index, cfg in enumerate(configs):
        if isinstance(cfg, FlowParams):
            check_levels(cfg, index)
    outs, stats, reasons = _batch_solved(configs, progress, devices)
    messages = {index: reasons.get(index) or failure_message(cfg, outs[index]) for index, cfg in enumerate(configs)}
    failed = [i for i, message in messages.items() if message is not None and i not in reasons and _not_finite(outs[i])]
    extended = extended_configs(configs, failed)
    again_stats = stats
    if extended:  # NaN members in float64 numbers: solved again, in a batch of their own, in extended numbers
        again, again_stats, again_reasons = _batch_solved(list(extended.values()), progress, devices)
        for row, (index, cfg) in enumerate(extended.items()):
            outs[index] = again[row]
            message = again_reasons.get(row) or failure_message(cfg, again[row])
            messages[index] = None if message is None else _also_extended(messages[index], message)
    results = []
    for index, cfg in enumerate(configs):
        one, message = outs[index], messages[index]
        if message is None:
            results.append(_trajectory(cfg, one, again_stats | {"numbers": "extended"} if index in extended else stats))
        elif on_error == "report":
            results.append(_failure(index, cfg, message))
        else:
            raise RuntimeError(str(_failure(index, cfg, message)))
    return results


def _batch_solved(configs: list[FlowParams], progress: bool, devices) -> tuple[list, dict, dict]:
    """``_host_batch`` of configs after an early solve (``_early``): each member's Solution, the batch's stats, and
    {index: reason} of the members that are going to run out of steps (the others that ran out are solved again)."""
    outs, stats = _host_batch(configs, progress, devices, early=not progress)
    reasons, again = {}, []
    for index, cfg in enumerate(configs):  # members that ran out of early steps: hopeless, or solved again in full
        if not progress and _ran_out_early(cfg, outs[index]) and not _not_finite(outs[index]):
            message, hopeless = _outlook(cfg, outs[index], stats["run_seconds"])
            if hopeless:
                reasons[index] = _early_failure(message, cfg)
            else:
                again.append(index)
                note = f"configs[{index}] ({config_label(cfg)}): {message}; solving it again up to max_steps"
                warnings.warn(note, stacklevel=3)
    if again:
        for index, out in zip(again, _host_batch([configs[i] for i in again], progress, devices)[0]):
            outs[index] = out
    return outs, stats, reasons


def _host_batch(configs: list[FlowParams], progress: bool, devices, early: bool = False) -> tuple[list, dict]:
    """Configs of one structure solved as one batch: each member's Solution on the host (trimmed to its n),
    and the batch's compile and run seconds.  ``early``: the batch runs ``_early`` (once, on the stacked
    configs: max_steps is static).  A batch of one on the default device is ``simulate``'s solve (its
    program, already compiled when that config was simulated)."""
    first = _early if early else (lambda params: params)
    size = len(configs)
    if size == 1 and devices is None:
        out, stats = _host_solve(first(configs[0]), progress)
        return [out], stats | {"batch": 1}
    threads = 1 if progress or devices is not None else host_threads(size)
    if threads > 1:
        out, compile_s, seconds = _threaded_batch(configs, threads, first)
    else:
        batch = first(_stack_bucketed(configs))
        if devices is not None:
            batch = _shard(batch, size, list(devices))
        start = time.perf_counter()
        out, compile_s = _run_batch(batch, progress, devices)
        out = jax.device_get(out)
        seconds = time.perf_counter() - start - compile_s
    stats = {"compile_seconds": compile_s, "run_seconds": seconds, "batch": size, "threads": threads}
    return _members(out, [cfg.task.n for cfg in configs]), stats


def host_threads(size: int) -> int:
    """How many threads ``simulate_many`` runs a batch of ``size`` members on: one per core this process may use
    (at most one per ``BATCH_CHUNK`` members) on the default CPU device, where a compiled loop runs on one core; one
    elsewhere (a GPU takes the whole batch; ``devices`` shards it)."""
    if not chunked_on():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, size // BATCH_CHUNK))


def _threaded_batch(configs: list[FlowParams], threads: int, first: Callable) -> tuple[Solution, float, float]:
    """Configs solved as ``threads`` equal slices (the last padded with copies of its last config), one compiled
    program of the slice's size run on every slice at once, one thread each (the solve releases the GIL); each
    slice is stacked on the host while the slices before it run.
    Returns (the batch's Solution on the host, compile seconds, run seconds: the later slices' stacking included)."""
    size, layout = len(configs), shared_layout(configs)
    part = -(-size // threads)
    slices = [configs[k : k + part] for k in range(0, size, part)]
    slices[-1] = slices[-1] + [slices[-1][-1]] * (part - len(slices[-1]))
    stacked = lambda members: first(_stack_bucketed(members, layout)).solver_resolved()
    head = stacked(slices[0])
    executable, compile_s = _batch_program(head, False, None)
    run = lambda batch: jax.device_get(executable(batch))
    start = time.perf_counter()
    with ThreadPoolExecutor(len(slices)) as pool:
        running = [pool.submit(run, head)] + [pool.submit(run, stacked(members)) for members in slices[1:]]
        outs = [future.result() for future in running]
    seconds = time.perf_counter() - start
    joined = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:size], *outs)
    return joined, compile_s, seconds


def _members(out: Solution, ns: list[int]) -> list[Solution]:
    """A batch's Solution (on the host) split into its members, each trimmed to its own n (the batch is trimmed
    once to the longest chain; only shorter members are trimmed again)."""
    widest = max(ns)
    leaves, structure = jax.tree_util.tree_flatten(_trimmed(out, widest))
    members = [jax.tree_util.tree_unflatten(structure, [leaf[index] for leaf in leaves]) for index in range(len(ns))]
    return [member if n == widest else _trimmed(member, n) for member, n in zip(members, ns)]


def hitting_times(configs: Sequence[FlowParams]) -> list[float | None]:
    """The time each config's ``stop_at`` event happens (None when t1 comes first), by lean solves.

    Each config is solved with saves at t0 and t1 only, no read-outs and no brackets (its own
    time_scale, solver and tolerances are kept); configs of one structure share one vmapped
    compilation.  A config already past its level at theta0 returns t0.
    This is the solve behind ``gradflow.theory.learning_time(s)``.

    Args:
        configs: ``FlowParams``, each with ``stop_at`` set.

    Returns:
        One hitting time (or None) per config, in order.

    Raises:
        RuntimeError: a solve failed (steps ran out, a NaN vector field, ...); the message names the config.
        ValueError: a config is not a ``FlowParams`` with ``stop_at`` set, or its stop_at level lies at or
            above the reward ceiling (``check_levels``).
    """
    configs = list(configs)
    for index, cfg in enumerate(configs):
        if not isinstance(cfg, FlowParams) or cfg.stop_at is None:
            raise ValueError(f"configs[{index}] must be a FlowParams with stop_at set")
        check_levels(cfg, index)
    lean = [cfg.replace(save_ts=jnp.stack([cfg.t0, cfg.t1]), events=(), readouts=False, eval_tasks={}) for cfg in configs]
    out: list[float | None] = [None] * len(lean)
    groups: dict = {}
    for index, cfg in enumerate(lean):
        groups.setdefault(structure_key(cfg), []).append(index)
    for indices in groups.values():
        for index, one in zip(indices, _lean_solutions([lean[i] for i in indices])):
            cfg = configs[index]
            message = failure_message(cfg, one)
            if message is not None:
                raise RuntimeError(str(_failure(index, cfg, message)))
            level = float(cfg.event_level(cfg.stop_at))
            if float(one.reward[0]) >= level:
                out[index] = float(cfg.t0)
            elif bool(one.event_reached[cfg.stop_at]):
                out[index] = float(one.event_times[cfg.stop_at])
    return out


def _lean_solutions(configs: list[FlowParams]) -> list:
    """Each member's Solution of configs of one structure, solved as one batch; the members with a NaN in
    float64 numbers solved again in extended numbers (``extended_config``), in a batch of their own."""
    solution = jax.device_get(solve_many(stack_configs(configs)))
    outs = [jax.tree_util.tree_map(lambda v, row=row: v[row], solution) for row in range(len(configs))]
    bad = [row for row, one in enumerate(outs) if failure_message(configs[row], one) is not None and _not_finite(one)]
    extended = extended_configs(configs, bad)
    if extended:
        for row, one in zip(extended, _lean_solutions(list(extended.values()))):
            outs[row] = one
    return outs


def _shard(batch: FlowParams, size: int, devices: list) -> FlowParams:
    """Pad the leading axis to a multiple of len(devices) (repeating the last config) and shard it."""
    batch = _with_last_repeated(batch, -(-size // len(devices)) * len(devices))
    sharding = NamedSharding(Mesh(np.asarray(devices), ("batch",)), PartitionSpec("batch"))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)
