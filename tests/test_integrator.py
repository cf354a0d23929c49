"""The one integrator: its clock, schedule jumps in every clock, and the single diffrax call site."""

import pathlib
import re

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import slow_case

import gradflow as gf
from gradflow import integrator, schedules
from gradflow.flow import FlowParams
from gradflow.integrator import STIFF_SOLVER, Clock, falling_event, flow_clock, integrate, resolve_solver, solver_for
from gradflow.sweep import config_hash

N = 5
SWITCH = 3.0


def _step_ends(config, clock):
    solution = integrate(config, diffrax.SaveAt(steps=True), clock=clock, t0=clock.to_solver(config.t0))
    s = np.asarray(solution.ts)
    return np.asarray(clock.to_time(jnp.asarray(s[np.isfinite(s)])))


@pytest.mark.parametrize("time_scale", [slow_case("linear"), "log"])
def test_a_schedule_switch_ends_a_step_in_every_clock(time_scale):
    step = schedules.Step(SWITCH, gf.ChainTask.uniform(N).start_probs, gf.ChainTask.hardest(N).start_probs)
    config = FlowParams(gf.ChainTask.hardest(N), t1=10.0, schedule=step, time_scale=time_scale, max_steps=4096)
    for clock in (flow_clock(config), Clock(jnp.asarray(1.0), False), Clock(jnp.asarray(0.0), True)):
        ends = _step_ends(config, clock)
        assert np.min(np.abs(ends - SWITCH)) < 1e-9, (clock, ends)


def test_clock_round_trip_and_rate():
    clock = Clock(jnp.asarray(2.0), True)
    t = jnp.asarray([2.0, 3.0, 1e6])
    np.testing.assert_allclose(clock.to_time(clock.to_solver(t)), t, rtol=1e-14)
    np.testing.assert_allclose(clock.rate(clock.to_solver(t)), 1.0 + t - 2.0, rtol=1e-14)
    linear = Clock(jnp.asarray(2.0), False)
    assert float(linear.to_solver(5.0)) == 3.0 and float(linear.to_time(3.0)) == 5.0


def test_a_clock_chosen_at_run_time_equals_the_static_clocks():
    """Clock(origin, log=<traced bool>) (learning_time's stages) gives the static clocks' numbers and finite derivatives."""
    s, origin = jnp.asarray([0.0, 1.5, 200.0]), jnp.asarray(2.0)

    def readings(log, s):
        clock = Clock(origin, log)
        return clock.to_solver(clock.to_time(s)), clock.to_time(s), clock.rate(s)

    for log in (True, False):
        static = readings(log, s[:2] if log else s)
        traced = jax.jit(readings)(jnp.asarray(log), s[:2] if log else s)
        for a, b in zip(static, traced):
            np.testing.assert_array_equal(a, b)
    slope = jax.grad(lambda u: jax.jit(readings)(jnp.asarray(False), u)[1])(jnp.asarray(800.0))  # e^800 = inf untaken
    assert float(slope) == 1.0


def test_one_diffeqsolve_call_site():
    package = pathlib.Path(gf.__file__).parent
    calls = [(p.name, m.start()) for p in package.rglob("*.py") for m in re.finditer(r"diffrax\.diffeqsolve\(", p.read_text())]
    assert [name for name, _ in calls] == ["integrator.py"], calls


# A capped flow with self-loops allowed that settles into a stiff valley (Hessian eigenvalues -2.56 across, -1e-4 along)
STIFF_THETA0 = gf.Theta(-0.13865533, 0.0330001, -1.42534896, 0.33281361, -0.65128101)
STIFF_PROBS = np.array([0.02114678, 0.45975165, 0.31173079, 0.08367396, 0.12369683])


def _capped(mask_self: bool, **kwargs) -> FlowParams:
    model = gf.ModelSpec(tau=0.2, mask_self=mask_self, max_len=6, n_isolated=1)
    return FlowParams(gf.ChainTask(6, STIFF_PROBS / STIFF_PROBS.sum()), model, STIFF_THETA0, t1=1e4, **kwargs)


def _steps(config) -> tuple[int, np.ndarray]:
    solution = integrate(config, diffrax.SaveAt(t1=True))
    assert solution.result == diffrax.RESULTS.successful, solution.result
    return int(solution.stats["num_steps"]), np.asarray(solution.ys[-1])


def test_auto_resolves_per_model_and_explicit_names_keep_their_meaning():
    """Issue 23.5: "auto" (the default) is Kvaerno5 with Newton iterations for a capped flow with self-loops allowed,
    tsit5 otherwise; a name given keeps its meaning; the hash is that of the resolved solver."""
    plain = FlowParams(gf.ChainTask.uniform(4))
    assert plain.solver == "auto" and plain.resolved_solver == "tsit5" and isinstance(solver_for(plain), diffrax.Tsit5)
    assert config_hash(plain) == config_hash(plain.replace(solver="tsit5")) == "815d06daf8f06b35"  # its hash before "auto"
    stiff = _capped(False)
    assert stiff.resolved_solver == STIFF_SOLVER == resolve_solver("auto", stiff.model)
    assert isinstance(solver_for(stiff), diffrax.Kvaerno5) and isinstance(solver_for(stiff).root_finder, optx.Newton)
    assert _capped(True).resolved_solver == "tsit5"
    for name in ("tsit5", "dopri5", "kvaerno5"):
        assert stiff.replace(solver=name).resolved_solver == name
    assert isinstance(solver_for(stiff.replace(solver="tsit5")), diffrax.Tsit5)
    assert not isinstance(solver_for(stiff.replace(solver="kvaerno5")).root_finder, optx.Newton)  # diffrax's default
    record = stiff.to_dict()
    assert (record["solver"], record["resolved_solver"]) == ("auto", STIFF_SOLVER)
    assert FlowParams.from_dict(record).to_dict() == record
    assert config_hash(stiff) == config_hash(stiff.replace(solver=STIFF_SOLVER)) != config_hash(stiff.replace(solver="tsit5"))


@pytest.mark.slow
def test_auto_steps_a_stiff_capped_flow_with_self_loops_like_a_masked_one():
    """Issue 23.5: n = 6, max_len = 6, self-loops allowed: tsit5 took 9,182 steps to t = 1e4 (masked: 165);
    "auto" takes 154 (masked: tsit5's 165), the same steps as naming kvaerno5_newton, and agrees with diffrax's
    default Kvaerno5 (1,516 steps) to the tolerances."""
    steps, ys = {}, {}
    for mask in (True, False):
        steps[mask], ys[mask] = _steps(_capped(mask, max_steps=2000))
    assert steps[False] <= 2 * steps[True] and steps[False] < 400, steps
    named_steps, named = _steps(_capped(False, max_steps=2000, solver=STIFF_SOLVER))
    assert named_steps == steps[False]
    np.testing.assert_array_equal(named, ys[False])
    np.testing.assert_allclose(_steps(_capped(False, max_steps=4000, solver="kvaerno5"))[1], ys[False], rtol=1e-5, atol=1e-6)


def test_tsit5_named_on_a_stiff_capped_flow_keeps_its_route():
    """An explicit tsit5 still steps explicitly: its stability limit (step ~1.3) runs out of 1,000 steps long before t = 1e4."""
    solution = integrate(_capped(False, solver="tsit5", max_steps=1000), diffrax.SaveAt(t1=True))
    assert solution.result == diffrax.RESULTS.max_steps_reached


def test_an_event_whose_condition_outruns_one_ulp_of_time_is_located():
    """learning_times over 33 masses at n = 240 and 256: in a linear-time segment at t ~ 3e5 one ulp of t (6e-11)
    moves the growth condition by more than EVENT_ATOL = 1e-12, so no float has |condition| < EVENT_ATOL;
    optimistix's bisection narrowed its bracket to two neighbouring floats and spun to its 256 steps ("maximum
    number of steps reached in the nonlinear solver").  ``BracketBisection`` stops there, at the same point."""
    root = 654321.123  # 1e4 (root - t) + 3e-7 falls by 1.2e-6 per ulp of t
    event = falling_event(lambda t, y, args, **kwargs: 1e4 * (root - t) + 3e-7)
    solution = integrate(FlowParams(gf.ChainTask.uniform(2), t1=1e6), diffrax.SaveAt(t1=True), event=event)
    assert solution.result == diffrax.RESULTS.event_occurred, solution.result
    assert 0 < float(solution.ts[-1]) - root <= np.spacing(root)
    assert isinstance(event.root_finder, integrator.BracketBisection)


def test_bracket_bisection_is_one_class_defined_at_its_first_read():
    """``integrator.BracketBisection`` is built when first read (optimistix is imported then), once."""
    assert integrator.BracketBisection is integrator.BracketBisection
    assert issubclass(integrator.BracketBisection, optx.Bisection)
    assert integrator.BracketBisection.__module__ == "gradflow.integrator"
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchSolver'"):
        integrator.NoSuchSolver  # noqa: B018
