"""The one integrator: its clock, schedule jumps in every clock, and the single diffrax call site."""

import pathlib
import re

import diffrax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow as gf
from gradflow import schedules
from gradflow.flow import FlowParams
from gradflow.integrator import Clock, flow_clock, integrate

N = 5
SWITCH = 3.0


def _step_ends(config, clock):
    solution = integrate(config, diffrax.SaveAt(steps=True), clock=clock, t0=clock.to_solver(config.t0))
    s = np.asarray(solution.ts)
    return np.asarray(clock.to_time(jnp.asarray(s[np.isfinite(s)])))


@pytest.mark.parametrize("time_scale", ["linear", "log"])
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


def test_one_diffeqsolve_call_site():
    package = pathlib.Path(gf.__file__).parent
    calls = [(p.name, m.start()) for p in package.rglob("*.py") for m in re.finditer(r"diffrax\.diffeqsolve\(", p.read_text())]
    assert [name for name, _ in calls] == ["integrator.py"], calls
